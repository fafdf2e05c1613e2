//! Two zones on one host linked over `unix://`: the plant gateway serves its zone on
//! a Unix socket only, the enterprise gateway pulls over it, and the plant knows the
//! puller by its operating-system credentials (a grant for `uid:<n>`, anchor `unix`).
//! Nothing but the zone files says which transport is used.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use bsfg_core::BoundaryApi;
use common::{Gateway, ZoneFile, drain_exactly, free_ports, plant_fact, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_zones_on_one_host_replicate_over_a_unix_socket_with_a_credential_grant() {
    let dir = tempfile::tempdir().unwrap();
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let socket = dir.path().join("run/plant.sock");
    let plant_nats = common::nats_for("plant");
    let ent_nats = common::nats_for("enterprise");
    let [ent_port] = free_ports();

    let plant_cfg = ZoneFile::new("plant", &plant_nats)
        .consumer("to-enterprise", "operational")
        .section(&format!(
            "[[listeners]]\nurl = \"unix://{}\"\nmode = \"0600\"",
            socket.display()
        ))
        .section(&format!(
            "[[peers]]\nidentity = \"uid:{uid}\"\nca = \"unix\"\nclaim_from_zones = [\"plant\"]\nto_zones = [\"*\"]\nconsumers = [\"to-enterprise\"]"
        ))
        .write(&dir.path().join("plant.toml"));
    let plant_url = format!("unix://{}", socket.display());
    let plant = Gateway::spawn(plant_cfg.clone(), plant_url.clone());
    // The socket carries only its owner's permissions.
    let mode = std::fs::metadata(&socket).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let ent_cfg = ZoneFile::new("enterprise", &ent_nats)
        .consumer("reporting", "operational")
        .plaintext(ent_port)
        .link(
            "from-plant",
            &plant_url,
            "to-enterprise",
            "source_zone = \"plant\"\nwait = \"1s\"",
        )
        .write(&dir.path().join("enterprise.toml"));
    let out = std::process::Command::new(common::BSFG)
        .args(["validate", "--config"])
        .arg(&ent_cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ent = Gateway::spawn(ent_cfg, format!("grpc://127.0.0.1:{ent_port}"));

    // A producer on the host appends over the socket with the CLI, as the same user.
    let mut expected = HashSet::new();
    for i in 0..50 {
        let m = plant_fact("U", i);
        expected.insert(m.envelope.message_id.clone());
        let out = plant.bsfg(&[
            "append",
            "--message-id",
            &m.envelope.message_id,
            "--from",
            "plant",
            "--to",
            "enterprise",
            "--subject",
            &m.fact.subject,
            "--predicate",
            &m.fact.predicate,
            "--object",
            &m.fact.object_json,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let api = bsfg_transport_grpc::GrpcClient::connect_lazy(
        &ent.url,
        bsfg_transport_grpc::ClientConfig::default(),
    )
    .unwrap();
    let via = drain_exactly(
        &api as &dyn BoundaryApi,
        "reporting",
        &expected,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(via, HashSet::from(["plant".to_owned()]));

    // A claim the grant does not allow is refused over the socket too.
    let out = plant.bsfg(&[
        "append",
        "--message-id",
        "x-1",
        "--from",
        "enterprise",
        "--to",
        "plant",
        "--subject",
        "batch:X/1",
        "--predicate",
        "step_completed",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("permission_denied") || text(&out.stderr).contains("denied"),
        "{}",
        text(&out.stderr)
    );
}
