//! Receiver-driven replication between real `bsfg` gateways, each zone on its own
//! nats-server and JetStream domain: plant -> idmz -> enterprise with a link per hop,
//! through crashes, restarts and outages; and the gapped state as an operator sees it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bsfg_core::{BoundaryApi, FetchRequest, Message};
use bsfg_testkit::{NatsServer, eventually, http_get};
use bsfg_transport_grpc::{ClientConfig, GrpcClient};
use common::{Gateway, ZoneFile, free_ports, text};

struct Site {
    name: String,
    nats: NatsServer,
    gw: Gateway,
    admin: u16,
    _dir: tempfile::TempDir,
}

struct LinkSpec<'a> {
    name: &'a str,
    source: &'a str,
    consumer: &'a str,
}

fn site(name: &str, consumers: &[&str], links: &[LinkSpec<'_>], max_age: &str) -> Site {
    let nats = common::nats_for(name);
    let dir = tempfile::tempdir().unwrap();
    let [port, admin] = free_ports();
    let mut cfg = ZoneFile::new(name, &nats)
        .sink_keys(&format!("duplicate_window = \"1s\"\nclasses = [{{ name = \"operational\", max_age = \"{max_age}\" }}, {{ name = \"audit\", max_age = \"365d\" }}]"))
        .plaintext(port)
        .admin(admin);
    for c in consumers {
        let class = if *c == "audit-reader" {
            "audit"
        } else {
            "operational"
        };
        cfg = cfg.consumer(c, class);
    }
    for l in links {
        let keys = format!(
            "source_zone = \"{}\"\ninsecure = true\nclasses = [\"operational\"]\nwait = \"1s\"\nrequest_timeout = \"3s\"",
            l.name.trim_start_matches("from-")
        );
        cfg = cfg.link(l.name, l.source, l.consumer, &keys);
    }
    let config = cfg.write(&dir.path().join(format!("{name}.toml")));
    let gw = Gateway::spawn(config, format!("grpc://127.0.0.1:{port}"));
    Site {
        name: name.to_owned(),
        nats,
        gw,
        admin,
        _dir: dir,
    }
}

fn client(url: &str) -> GrpcClient {
    GrpcClient::connect_lazy(url, ClientConfig::default()).unwrap()
}

fn fact(i: u32) -> Message {
    common::plant_fact("B", i)
}

/// Appends until the zone acknowledges: a producer that retries the same fact.
/// Appends until it succeeds; returns the fact's offset.
async fn append_retrying(api: &GrpcClient, m: Message) -> u64 {
    eventually(
        "an append to succeed",
        Duration::from_secs(60),
        async || api.append_fact(m.clone()).await.map_err(|e| e.to_string()),
    )
    .await
    .offset
}

fn status(s: &Site) -> serde_json::Value {
    common::admin_status(s.admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_zones_hold_every_fact_exactly_once_through_crashes_restarts_and_outages() {
    const N: u32 = 1200;
    let mut plant = site("plant", &["to-idmz"], &[], "30d");
    let mut idmz = site(
        "idmz",
        &["to-enterprise", "reporting"],
        &[LinkSpec {
            name: "from-plant",
            source: &plant.gw.url.clone(),
            consumer: "to-idmz",
        }],
        "30d",
    );
    let mut enterprise = site(
        "enterprise",
        &["reporting"],
        &[LinkSpec {
            name: "from-idmz",
            source: &idmz.gw.url.clone(),
            consumer: "to-enterprise",
        }],
        "30d",
    );
    let producer_url = plant.gw.url.clone();
    let producer = tokio::spawn(async move {
        let api = client(&producer_url);
        for i in 0..N {
            append_retrying(&api, fact(i)).await;
        }
    });

    // kill -9 the last hop's gateway five times in the middle of the stream.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        enterprise.gw.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        enterprise.gw.respawn();
    }
    // Hard restart of the source zone's nats-server (producers retry meanwhile).
    plant.nats.kill_and_restart().unwrap();
    // Stop the middle gateway (the enterprise link's source) while the plant keeps
    // appending locally.
    assert!(idmz.gw.sigterm().success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    idmz.gw.respawn();

    // Replays injected at each hop: a re-sent fact is stored once.
    let (idmz_api, ent_api) = (client(&idmz.gw.url), client(&enterprise.gw.url));
    for i in (0..N).step_by(37) {
        append_retrying(&idmz_api, fact(i)).await;
        append_retrying(&ent_api, fact(i)).await;
    }
    producer.await.unwrap();

    let expected: HashSet<String> = (0..N).map(|i| fact(i).envelope.message_id).collect();
    let via =
        common::drain_exactly(&ent_api, "reporting", &expected, Duration::from_secs(120)).await;
    assert!(via.contains("idmz"), "provenance at the last hop: {via:?}");
    let via =
        common::drain_exactly(&idmz_api, "reporting", &expected, Duration::from_secs(60)).await;
    assert!(
        via.contains("plant"),
        "provenance at the first hop: {via:?}"
    );

    // Status and metrics show both links caught up and running.
    let l = eventually(
        "the enterprise link to catch up",
        Duration::from_secs(30),
        || async {
            let l = status(&enterprise)["links"][0].clone();
            (l["state"] == "running" && l["lag_facts"] == 0)
                .then_some(l.clone())
                .ok_or(l.to_string())
        },
    )
    .await;
    assert_eq!(l["source_zone"], "idmz");
    let (code, metrics) = http_get(enterprise.admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    for name in [
        "bsfg_replication_lag_seconds{",
        "bsfg_replication_lag_facts{",
        "bsfg_frontier_offset{",
        "bsfg_fetch_requests_total{",
        "bsfg_confirm_requests_total{",
        "bsfg_append_requests_total{",
        "bsfg_append_failures_total{",
        "bsfg_append_latency_seconds_bucket{",
        // Capacity of the idempotency index, read at start-up and every 30 s.
        "bsfg_index_ids{zone=\"enterprise\"}",
        "bsfg_index_disk_bytes{zone=\"enterprise\"}",
        "bsfg_index_lookup_bytes{zone=\"enterprise\"}",
        "bsfg_index_horizon_seconds{zone=\"enterprise\"} 0",
        "bsfg_store_server_memory_bytes{zone=\"enterprise\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing in:\n{metrics}");
    }
    assert!(
        metrics.contains(r#"bsfg_link_state{zone="enterprise",link="from-idmz",consumer="to-enterprise",state="running"} 1"#),
        "{metrics}"
    );
    let _ = (&plant.name, &idmz.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_past_lost_facts_is_gapped_in_status_and_metrics_until_an_operator_accepts() {
    let plant = site("plant", &["to-enterprise"], &[], "3s");
    let mut enterprise = site(
        "enterprise",
        &["reporting", "audit-reader"],
        &[LinkSpec {
            name: "from-plant",
            source: &plant.gw.url.clone(),
            consumer: "to-enterprise",
        }],
        "30d",
    );
    let (plant_api, ent_api) = (client(&plant.gw.url), client(&enterprise.gw.url));
    let first = append_retrying(&plant_api, fact(1)).await;
    let expected: HashSet<String> = [fact(1).envelope.message_id].into();
    common::drain_exactly(&ent_api, "reporting", &expected, Duration::from_secs(20)).await;

    // The enterprise gateway is down while facts 2..4 come and expire in the plant.
    assert!(enterprise.gw.sigterm().success());
    let mut lost = 0;
    for i in 2..=4 {
        lost = append_retrying(&plant_api, fact(i)).await;
    }
    // The gap: after the last confirmed fact, up to the last lost one.
    let (from, to) = (first + 1, lost);
    tokio::time::sleep(Duration::from_secs(5)).await;
    append_retrying(&plant_api, fact(5)).await;
    enterprise.gw.respawn();

    let link = eventually("the link to be gapped", Duration::from_secs(20), || async {
        let l = status(&enterprise)["links"][0].clone();
        (l["state"] == "gapped")
            .then_some(l.clone())
            .ok_or(l.to_string())
    })
    .await;
    assert_eq!(
        (link["missing_from"].as_u64(), link["missing_to"].as_u64()),
        (Some(from), Some(to))
    );
    let (_, metrics) = http_get(enterprise.admin, "/metrics").unwrap();
    assert!(
        metrics.contains(r#"bsfg_link_state{zone="enterprise",link="from-plant",consumer="to-enterprise",state="gapped"} 1"#),
        "{metrics}"
    );
    // The human status says how to go on.
    let out = enterprise.gw.bsfg(&[
        "status",
        "--admin",
        &format!("127.0.0.1:{}", enterprise.admin),
    ]);
    let human = text(&out.stdout);
    assert!(
        human.contains(&format!(
            "from-plant <- plant/to-enterprise: gapped at offsets {from}..={to}"
        )),
        "{human}"
    );

    // As a monitoring check: critical (2), naming the alert and the range.
    let check = enterprise.gw.bsfg(&[
        "status",
        "--check",
        "--admin",
        &format!("127.0.0.1:{}", enterprise.admin),
    ]);
    let said = text(&check.stdout);
    assert_eq!(check.status.code(), Some(2), "{said}");
    assert!(
        said.starts_with("BSFG CRITICAL - zone enterprise: link from-plant"),
        "{said}"
    );
    assert!(
        said.contains(&format!("CRITICAL BsfgLinkGapped: link from-plant <- plant/to-enterprise gapped at offsets {from}..={to}")),
        "{said}"
    );

    let admin = format!("http://127.0.0.1:{}", enterprise.admin);
    let wrong = enterprise.gw.bsfg(&[
        "link",
        "accept-gap",
        "--admin",
        &admin,
        "--link",
        "from-plant",
        "--from",
        &from.to_string(),
        "--to",
        &(to - 1).to_string(),
        "--by",
        "jdoe",
    ]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stderr).contains(&format!("gapped at {from}..={to}")),
        "{}",
        text(&wrong.stderr)
    );
    let ok = enterprise.gw.bsfg(&[
        "link",
        "accept-gap",
        "--admin",
        &admin,
        "--link",
        "from-plant",
        "--from",
        &from.to_string(),
        "--to",
        &to.to_string(),
        "--by",
        "jdoe",
    ]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    let expected: HashSet<String> = [fact(5).envelope.message_id].into();
    common::drain_exactly(&ent_api, "reporting", &expected, Duration::from_secs(20)).await;
    let audit = ent_api
        .fetch_facts(FetchRequest {
            consumer: "audit-reader".into(),
            limit: 10,
            wait: Duration::from_secs(2),
        })
        .await
        .unwrap();
    assert_eq!(audit.facts.len(), 1);
    let f = &audit.facts[0].message.fact;
    assert_eq!(f.predicate, "gap_accepted");
    assert!(
        f.object_json.contains(r#""accepted_by":"jdoe""#),
        "{}",
        f.object_json
    );
    let s = status(&enterprise);
    assert_eq!(s["links"][0]["state"], "running");
    assert_eq!(s["links"][0]["gaps_accepted"], 1);
    // Past the gap the check is ok again (0); a gateway that does not answer is
    // critical.
    let check = enterprise.gw.bsfg(&[
        "status",
        "--check",
        "--admin",
        &format!("127.0.0.1:{}", enterprise.admin),
    ]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stdout));
    assert!(text(&check.stdout).starts_with("BSFG OK - zone enterprise"));
    // A site's own limit: any time since the last step is too long here.
    let check = enterprise.gw.bsfg(&[
        "status",
        "--check",
        "--stalled-warning",
        "0",
        "--admin",
        &format!("127.0.0.1:{}", enterprise.admin),
    ]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check.stdout));
    assert!(text(&check.stdout).contains("WARNING BsfgLinkStalled: link from-plant"));
    let admin_port = enterprise.admin;
    assert!(enterprise.gw.sigterm().success());
    let check = enterprise.gw.bsfg(&[
        "status",
        "--check",
        "--admin",
        &format!("127.0.0.1:{admin_port}"),
    ]);
    assert_eq!(check.status.code(), Some(2), "{}", text(&check.stdout));
    assert!(
        text(&check.stdout).contains("CRITICAL BsfgGatewayDown"),
        "{}",
        text(&check.stdout)
    );
}

/// Resident memory of a process: (current, peak) in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let (now, peak) = bsfg_testkit::memory_bytes(&pid.to_string()).unwrap();
    (now / 1024, peak / 1024)
}

/// A receiving gateway streams a 256 MiB artifact from its source into its own
/// store: its peak resident memory grows by less than 64 MiB over what it used
/// before the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_copies_a_256_mib_artifact_in_bounded_memory() {
    use bsfg_core::model::ArtifactRef;
    use futures::StreamExt as _;
    const MIB: usize = 1024 * 1024;
    const SIZE: usize = 256 * MIB;
    let plant = site("plant", &["to-idmz"], &[], "30d");
    let idmz = site(
        "idmz",
        &["reporting"],
        &[LinkSpec {
            name: "from-plant",
            source: &plant.gw.url.clone(),
            consumer: "to-idmz",
        }],
        "30d",
    );
    let producer = client(&plant.gw.url);
    // A fact first, so the link is warm when the baseline is read.
    let warm = append_retrying(&producer, fact(0)).await;
    eventually("the warm-up fact", Duration::from_secs(30), || async {
        let f = status(&idmz)["links"][0]["frontier"].as_u64();
        (f == Some(warm)).then_some(()).ok_or(format!("{f:?}"))
    })
    .await;
    let info = producer
        .put_object(
            "batch-files",
            "run/artifact.bin",
            futures::stream::iter(0..SIZE / MIB)
                .map(|i| Ok(bytes::Bytes::from(vec![(i % 251) as u8; MIB])))
                .boxed(),
        )
        .await
        .unwrap();
    let pid = idmz.gw.child.id();
    let (before, _) = rss_kib(pid);
    let mut m = fact(1);
    m.envelope.object_media_type = Some("application/octet-stream".into());
    m.fact.artifacts = vec![ArtifactRef {
        bucket: info.bucket.clone(),
        key: info.key.clone(),
        digest: info.digest.clone(),
        size: info.size,
    }];
    let with_artifact = append_retrying(&producer, m).await;
    eventually(
        "the artifact and its fact",
        Duration::from_secs(300),
        || async {
            let f = status(&idmz)["links"][0]["frontier"].as_u64();
            (f == Some(with_artifact))
                .then_some(())
                .ok_or(format!("{f:?}"))
        },
    )
    .await;
    let (_, peak) = rss_kib(pid);
    let held = client(&idmz.gw.url)
        .head_object("batch-files", "run/artifact.bin")
        .await
        .unwrap();
    assert_eq!(held, info);
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "receiving gateway: {before} KiB before, peak {peak} KiB while copying 256 MiB (+{growth_mib} MiB)"
    );
    assert!(growth_mib < 64, "peak memory grew by {growth_mib} MiB");
}
