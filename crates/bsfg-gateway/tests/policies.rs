//! WASM policies in real `bsfg` gateways, composed from config: a local append denied
//! with the policy's name and reason; a replicated fact quarantined at intake and
//! released by the operator command; a module replaced while facts flow; hostile
//! modules contained while the gateway keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bsfg_core::{BoundaryApi, FetchRequest, Message, Reason};
use bsfg_testkit::{NatsOptions, NatsServer, http_get, plugins};
use bsfg_transport_grpc::{ClientConfig, GrpcClient};
use common::{Gateway, ZoneFile, free_ports, text};

struct Site {
    nats: NatsServer,
    gw: Gateway,
    admin: u16,
    dir: tempfile::TempDir,
}

impl Site {
    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    fn api(&self) -> GrpcClient {
        GrpcClient::connect_lazy(&self.gw.url, ClientConfig::default()).unwrap()
    }

    fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").unwrap().1
    }

    /// `bsfg quarantine <args> --admin <this zone>`, as it ran.
    fn quarantine_run(&self, args: &[&str]) -> std::process::Output {
        self.gw
            .bsfg(&[&["quarantine"], args, &["--admin", &self.admin_url()]].concat())
    }

    /// `bsfg quarantine <args> --admin <this zone>`, which must succeed; its stdout.
    fn quarantine(&self, args: &[&str]) -> String {
        let out = self.quarantine_run(args);
        assert!(
            out.status.success(),
            "bsfg quarantine {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

/// A zone named `name` with consumers, an optional link pulling `to-<name>` from
/// `source`, and `extra` config (policies) appended verbatim.
fn site(name: &str, consumers: &[(&str, &str)], source: Option<&str>, extra: &str) -> Site {
    let nats = common::nats_for(name);
    let dir = tempfile::tempdir().unwrap();
    let [port, admin] = free_ports();
    let mut cfg = ZoneFile::new(name, &nats)
        .sink_keys("classes = [{ name = \"operational\", max_age = \"30d\" }, { name = \"audit\", max_age = \"365d\" }]")
        .plaintext(port)
        .admin(admin);
    for (c, class) in consumers {
        cfg = cfg.consumer(c, class);
    }
    if let Some(source) = source {
        cfg = cfg.link(
            "from-plant",
            source,
            &format!("to-{name}"),
            "source_zone = \"plant\"\ninsecure = true\nclasses = [\"operational\"]\npage_size = 20\nwait = \"500ms\"\nrequest_timeout = \"3s\"",
        );
    }
    let config = cfg
        .section(extra)
        .write(&dir.path().join(format!("{name}.toml")));
    let gw = Gateway::spawn(config, format!("grpc://127.0.0.1:{port}"));
    Site {
        nats,
        gw,
        admin,
        dir,
    }
}

/// A `[[policies]]` entry (module path absolute, so any folder works).
fn policy(name: &str, module: &Path, hooks: &str, settings: &str, extra: &str) -> String {
    format!(
        "\n[[policies]]\nname = \"{name}\"\nmodule = \"{}\"\nhooks = [{hooks}]\nsettings = {{ {settings} }}\n{extra}\n",
        module.display()
    )
}

/// A module file a test replaces while the gateway runs, atomically (write beside,
/// then rename), as a deployment would.
struct Swappable {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Swappable {
    fn new(name: &str, from: &Path) -> Swappable {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::copy(from, &path).unwrap();
        Swappable { dir, path }
    }

    fn replace(&self, with: &Path) {
        let staged = self.dir.path().join("staged");
        std::fs::copy(with, &staged).unwrap();
        std::fs::rename(&staged, &self.path).unwrap();
    }
}

fn fact(i: u32, site_label: &str, predicate: &str) -> Message {
    let mut m = common::plant_fact("P", i);
    m.envelope.labels.insert("site".into(), site_label.into());
    m.fact.predicate = predicate.into();
    m
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    bsfg_testkit::eventually_blocking(what, timeout, || {
        ok().then_some(()).ok_or_else(|| "not yet".to_owned())
    });
}

fn link_frontier(s: &Site) -> u64 {
    common::admin_status(s.admin)["links"][0]["frontier"]
        .as_u64()
        .unwrap_or(0)
}

/// Every message_id the quarantine holds (`bsfg --json quarantine list`).
fn quarantined_ids(s: &Site) -> HashSet<String> {
    let out = s.gw.bsfg(&[
        "--json",
        "quarantine",
        "list",
        "--limit",
        "10000",
        "--admin",
        &s.admin_url(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["message"]["envelope"]["message_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// The audit facts delivered to `audit-reader` since its last fetch (not confirmed).
async fn audit_records(api: &dyn BoundaryApi) -> Vec<bsfg_core::Fact> {
    let page = api
        .fetch_facts(FetchRequest {
            consumer: "audit-reader".into(),
            limit: 10,
            wait: Duration::ZERO,
        })
        .await
        .unwrap();
    page.facts.into_iter().map(|f| f.message.fact).collect()
}

/// Reads `reader` until it has nothing more; each message_id must come once.
async fn read_all(api: &dyn BoundaryApi, reader: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    loop {
        let page = api
            .fetch_facts(FetchRequest {
                consumer: reader.into(),
                limit: 500,
                wait: Duration::from_millis(300),
            })
            .await
            .unwrap();
        let Some(last) = page.facts.last().map(|f| f.offset) else {
            return ids;
        };
        for f in &page.facts {
            let id = f.message.envelope.message_id.clone();
            assert!(ids.insert(id.clone()), "{id} stored twice");
        }
        api.confirm_receipt(reader, last).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_from_config_denies_a_local_append_with_its_name_and_reason() {
    let extra = policy(
        "only-plant-a",
        &plugins::built("allow_labels"),
        "\"append\"",
        "label = \"site\", values = \"PlantA\"",
        "",
    );
    let zone = site("enterprise", &[("reporting", "operational")], None, &extra);
    let api = zone.api();
    api.append_fact(fact(1, "PlantA", "step_completed"))
        .await
        .unwrap();
    let e = api
        .append_fact(fact(2, "PlantB", "step_completed"))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::PermissionDenied);
    assert!(
        e.to_string().contains(
            "policy `only-plant-a` denied message_id `plant:batch:P0:step:2`: label `site` is `PlantB`, allowed: PlantA"
        ),
        "{e}"
    );
    // Bad input is still invalid_argument naming the field: validation comes first.
    let mut bad = fact(3, "PlantB", "step_completed");
    bad.fact.subject = "no kind".into();
    let e = api.append_fact(bad).await.unwrap_err();
    assert_eq!(e.field(), Some("fact.subject"), "{e}");
    assert_eq!(
        read_all(&api, "reporting").await,
        HashSet::from(["plant:batch:P0:step:1".to_owned()])
    );
    let m = zone.metrics();
    assert!(
        m.contains(r#"bsfg_policy_decisions_total{zone="enterprise",policy="only-plant-a",verdict="deny"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fact_denied_at_intake_is_quarantined_the_page_confirmed_and_the_operator_releases_or_drops_it()
 {
    let plant = site("plant", &[("to-enterprise", "operational")], None, "");
    let extra = policy(
        "no-recipes",
        &plugins::built("deny_predicates"),
        "\"intake\"",
        "predicates = \"recipe_changed\"",
        "",
    );
    let enterprise = site(
        "enterprise",
        &[("reporting", "operational"), ("audit-reader", "audit")],
        Some(&plant.gw.url),
        &extra,
    );
    let papi = plant.api();
    let mut offsets = Vec::new();
    for (i, p) in [
        (1, "step_completed"),
        (2, "recipe_changed"),
        (3, "step_completed"),
    ] {
        offsets.push(papi.append_fact(fact(i, "PlantA", p)).await.unwrap().offset);
    }
    wait_until(
        "the link to confirm every page",
        Duration::from_secs(30),
        || link_frontier(&enterprise) == offsets[2],
    );
    let eapi = enterprise.api();
    let denied = "plant:batch:P0:step:2";
    assert_eq!(
        read_all(&eapi, "reporting").await,
        HashSet::from([
            "plant:batch:P0:step:1".to_owned(),
            "plant:batch:P0:step:3".to_owned()
        ])
    );
    let sha = {
        let bytes = std::fs::read(plugins::built("deny_predicates")).unwrap();
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
    };
    let listing = enterprise.quarantine(&["list"]);
    assert!(
        listing.contains(denied)
            && listing.contains(&format!(
                "from plant offset {} via link from-plant",
                offsets[1]
            ))
            && listing.contains(&format!(
                "policy no-recipes ({sha}): predicate `recipe_changed` is denied"
            )),
        "{listing}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&enterprise.quarantine(&["show", "--id", denied])).unwrap();
    assert_eq!(shown["message"]["fact"]["predicate"], "recipe_changed");
    assert_eq!(shown["source_zone"], "plant");

    let released = enterprise.quarantine(&["release", "--id", denied, "--by", "alice"]);
    assert!(released.contains("released by alice"), "{released}");
    assert_eq!(
        read_all(&eapi, "reporting").await,
        HashSet::from([denied.to_owned()])
    );
    assert!(quarantined_ids(&enterprise).is_empty());
    let audit = audit_records(&eapi).await;
    assert_eq!(audit.len(), 1);
    let record = &audit[0];
    assert_eq!(record.predicate, "quarantine_released");
    assert!(
        record.object_json.contains(r#""by":"alice""#),
        "{}",
        record.object_json
    );
    // Released once: the entry is gone, a second release is refused.
    let again = enterprise.quarantine_run(&["release", "--id", denied, "--by", "alice"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("no quarantined fact"),
        "{}",
        text(&again.stderr)
    );

    // Another denied fact, dropped by an operator: never stored, the drop recorded.
    let fourth = papi
        .append_fact(fact(4, "PlantA", "recipe_changed"))
        .await
        .unwrap()
        .offset;
    wait_until("the next page confirmed", Duration::from_secs(30), || {
        link_frontier(&enterprise) == fourth
    });
    let dropped_id = "plant:batch:P0:step:4";
    assert_eq!(
        quarantined_ids(&enterprise),
        HashSet::from([dropped_id.to_owned()])
    );
    let dropped = enterprise.quarantine(&["drop", "--id", dropped_id, "--by", "bob"]);
    assert!(dropped.contains("dropped by bob"), "{dropped}");
    assert!(quarantined_ids(&enterprise).is_empty());
    assert!(read_all(&eapi, "reporting").await.is_empty());
    let audit = audit_records(&eapi).await;
    let predicates: Vec<_> = audit.iter().map(|f| f.predicate.as_str()).collect();
    // (the release record was delivered by the first fetch)
    assert_eq!(predicates, ["quarantine_dropped"]);
    assert!(audit[0].object_json.contains(r#""by":"bob""#));
    let m = enterprise.metrics();
    assert!(
        m.contains(r#"bsfg_quarantined_facts_total{zone="enterprise",link="from-plant",consumer="to-enterprise",cause="policy_denied"} 2"#),
        "{m}"
    );
    drop(plant.nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_module_file_while_facts_flow_changes_verdicts_without_loss_or_duplicates() {
    const N: u32 = 400;
    let plant = site("plant", &[("to-enterprise", "operational")], None, "");
    let module = Swappable::new("gate.wasm", &plugins::built("allow_labels"));
    // Both modules find their settings: allow_labels allows site PlantA (every fact),
    // deny_predicates denies step_completed (every fact).
    let extra = policy(
        "gate",
        &module.path,
        "\"intake\"",
        "label = \"site\", values = \"PlantA\", predicates = \"step_completed\"",
        "",
    );
    let enterprise = site(
        "enterprise",
        &[("reporting", "operational")],
        Some(&plant.gw.url),
        &extra,
    );
    let papi = plant.api();
    let producer = tokio::spawn(async move {
        let mut last = 0;
        for i in 0..N {
            last = papi
                .append_fact(fact(i, "PlantA", "step_completed"))
                .await
                .unwrap()
                .offset;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        last
    });
    wait_until("the first facts to cross", Duration::from_secs(30), || {
        common::admin_status(enterprise.admin)["links"][0]["facts_stored"]
            .as_u64()
            .unwrap_or(0)
            >= 50
    });
    module.replace(&plugins::built("deny_predicates"));
    let last = producer.await.unwrap();
    wait_until("every page confirmed", Duration::from_secs(60), || {
        link_frontier(&enterprise) == last
    });

    let stored = read_all(&enterprise.api(), "reporting").await;
    let quarantined = quarantined_ids(&enterprise);
    let all: HashSet<String> = (0..N)
        .map(|i| fact(i, "PlantA", "").envelope.message_id)
        .collect();
    assert!(
        stored.is_disjoint(&quarantined),
        "a fact both stored and quarantined"
    );
    assert_eq!(&stored | &quarantined, all, "a fact is missing");
    assert!(
        stored.len() >= 50 && !quarantined.is_empty(),
        "verdicts did not change: {} stored, {} quarantined",
        stored.len(),
        quarantined.len()
    );
    let m = enterprise.metrics();
    assert!(
        m.contains(
            r#"bsfg_policy_reloads_total{zone="enterprise",policy="gate",result="applied"} 1"#
        ),
        "{m}"
    );
    let log = std::fs::read_to_string(enterprise.gw.config.with_extension("log")).unwrap();
    assert!(log.contains("policy reloaded"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_modules_are_contained_and_the_gateway_keeps_serving() {
    let module = Swappable::new("hostile.wat", &plugins::hostile("infinite-loop"));
    let extra = policy(
        "hostile",
        &module.path,
        "\"append\"",
        "",
        "timeout = \"50ms\"\nmemory_mib = 8\nbroken_after = 100",
    );
    let zone = site("enterprise", &[("reporting", "operational")], None, &extra);
    let api = zone.api();
    let swap = |fixture: &str| module.replace(&plugins::hostile(fixture));
    let reloads = |result: &str| -> bool {
        zone.metrics().contains(&format!(
            r#"bsfg_policy_reloads_total{{zone="enterprise",policy="hostile",result="{result}"}} "#
        ))
    };
    let mut applied = 0;
    for (fixture, reason) in [
        ("infinite-loop", "policy_fault: deadline of 50ms exceeded"),
        (
            "memory-bomb",
            "policy_fault: memory limit of 8388608 bytes exceeded",
        ),
        (
            "trap",
            "policy_fault: trap: wasm trap: wasm `unreachable` instruction executed",
        ),
    ] {
        if fixture != "infinite-loop" {
            swap(fixture);
            applied += 1;
            let want = format!(
                r#"bsfg_policy_reloads_total{{zone="enterprise",policy="hostile",result="applied"}} {applied}"#
            );
            wait_until("the reload", Duration::from_secs(10), || {
                zone.metrics().contains(&want)
            });
        }
        let e = api
            .append_fact(fact(1, "PlantA", "step_completed"))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), Reason::PermissionDenied, "{fixture}: {e}");
        assert!(e.to_string().contains(reason), "{fixture}: {e}");
        // Other traffic is served as before.
        let page = api
            .fetch_facts(FetchRequest {
                consumer: "reporting".into(),
                limit: 10,
                wait: Duration::ZERO,
            })
            .await
            .unwrap();
        assert!(page.facts.is_empty(), "{fixture}: a denied fact was stored");
        common::admin_status(zone.admin);
    }
    // Modules that fail the load checks are refused; the trap module stays.
    for (n, bad) in ["imports-unknown", "wrong-exports"].iter().enumerate() {
        swap(bad);
        let want = format!(
            r#"bsfg_policy_reloads_total{{zone="enterprise",policy="hostile",result="rejected"}} {}"#,
            n + 1
        );
        wait_until("the reload refused", Duration::from_secs(10), || {
            zone.metrics().contains(&want)
        });
    }
    assert!(reloads("applied"));
    let e = api
        .append_fact(fact(1, "PlantA", "step_completed"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("policy_fault: trap"), "{e}");
    let log = std::fs::read_to_string(zone.gw.config.with_extension("log")).unwrap();
    assert!(
        log.contains("imports `wasi:http/outgoing-handler@0.2.0`, which this host does not offer")
            && log.contains("`decide` does not have the type"),
        "{log}"
    );
    // SIGHUP reloads every policy: the file is unchanged, and that is counted too.
    std::process::Command::new("kill")
        .args(["-HUP", &zone.gw.child.id().to_string()])
        .status()
        .unwrap();
    wait_until("the SIGHUP reload", Duration::from_secs(10), || {
        reloads("unchanged")
    });
    drop(zone.dir);
}

#[test]
fn a_config_naming_a_module_that_imports_an_unknown_interface_fails_validation_clearly() {
    let nats = NatsServer::start_with(NatsOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let [port] = free_ports();
    let cfg = format!(
        "[zone]\nname = \"z\"\n\n[sink]\ntype = \"jetstream\"\nurl = \"{}\"\n\n[[listeners]]\nurl = \"grpc://127.0.0.1:{port}\"\ninsecure = true\n{}",
        nats.url(),
        policy(
            "fs",
            &plugins::hostile("imports-unknown"),
            "\"append\"",
            "",
            ""
        )
    );
    let path = dir.path().join("z.toml");
    std::fs::write(&path, cfg).unwrap();
    for cmd in ["validate", "run"] {
        let out = std::process::Command::new(common::BSFG)
            .args([cmd, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cmd} accepted it");
        let err = text(&out.stderr);
        assert!(
            err.contains("policy `fs`")
                && err.contains(
                    "imports `wasi:http/outgoing-handler@0.2.0`, which this host does not offer"
                ),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn bsfg_policy_test_prints_each_verdict_and_the_policy_log_without_a_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let facts = dir.path().join("facts.jsonl");
    let mut lines: Vec<String> = [(1, "step_completed"), (2, "deny"), (3, "step_completed")]
        .iter()
        .map(|(i, p)| serde_json::to_string(&fact(*i, "PlantA", p)).unwrap())
        .collect();
    // A fact the gateway would refuse never reaches the policy: same rules here.
    let mut rounded = fact(4, "PlantA", "step_completed");
    rounded.fact.object_json = r#"{"ts_ns": 1764000000123456789}"#.into();
    lines.push(serde_json::to_string(&rounded).unwrap());
    std::fs::write(&facts, lines.join("\n")).unwrap();
    let run = |module: &Path, extra: &[&str]| {
        std::process::Command::new(common::BSFG)
            .args(["policy", "test", "--module"])
            .arg(module)
            .arg("--facts")
            .arg(&facts)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&plugins::built("chaos"), &["--set", "mode=demo"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(
            "allow plant:batch:P0:step:1\ndeny plant:batch:P0:step:2: asked to deny\nallow plant:batch:P0:step:3\nrefused plant:batch:P0:step:4: invalid_argument: field `fact.object_json.ts_ns`"
        ),
        "{stdout}"
    );
    let err = text(&out.stderr);
    // The guest's host.log line, tagged with the policy's name.
    assert!(
        err.contains("chaos policy ready") && err.contains("policy=test"),
        "{err}"
    );
    assert!(
        err.contains("2 allowed, 1 denied, 0 filtered, 1 refused by validation"),
        "{err}"
    );

    let out = run(&plugins::hostile("imports-unknown"), &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("imports `wasi:http/outgoing-handler@0.2.0`"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&plugins::built("allow_labels"), &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("setting `label` is required"),
        "{}",
        text(&out.stderr)
    );
}

/// Ordinary std-Rust components (wit-bindgen, serde_json, no SDK) in a running
/// gateway: json-rules denies what its settings say; the WASI probe reaches for a
/// file, the environment and a socket, gets nothing, and each reach is counted in
/// /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_std_policies_decide_in_a_gateway_and_what_they_reach_for_is_refused_and_counted()
{
    let extra = [
        policy(
            "rules",
            &plugins::built_std("json_rules"),
            "\"append\"",
            "require = \"operator\", predicates = \"step_completed\"",
            "timeout = \"1s\"",
        ),
        policy(
            "probe",
            &plugins::built_std("wasi_probe"),
            "\"append\"",
            "",
            "timeout = \"1s\"",
        ),
    ]
    .concat();
    let s = site("plant", &[("reporting", "operational")], None, &extra);
    let api = s.api();
    let mut ok = fact(1, "PlantA", "step_completed");
    ok.fact.object_json = r#"{"operator":"jdoe","step":1}"#.into();
    api.append_fact(ok).await.unwrap();
    let mut anonymous = fact(2, "PlantA", "step_completed");
    anonymous.fact.object_json = r#"{"step":2}"#.into();
    let e = api.append_fact(anonymous).await.unwrap_err();
    assert_eq!(e.reason(), Reason::PermissionDenied, "{e}");
    assert!(
        e.to_string().contains("policy `rules`") && e.to_string().contains("operator: required"),
        "{e}"
    );
    for (i, what, got) in [
        (3, "file", "file: error: No such file"),
        (4, "env", "env: HOME=None, 0 variables"),
        (5, "tcp", "tcp: error: Permission denied"),
    ] {
        let e = api.append_fact(fact(i, "PlantA", what)).await.unwrap_err();
        assert!(
            e.to_string().contains("policy `probe`") && e.to_string().contains(got),
            "{e}"
        );
    }
    let m = s.metrics();
    for what in ["filesystem", "environment", "network"] {
        let line = format!(
            "bsfg_policy_sandbox_refusals_total{{zone=\"plant\",policy=\"probe\",what=\"{what}\"}} 1"
        );
        assert!(m.contains(&line), "{line} in:\n{m}");
    }
}

/// A fact an intake policy filters is dropped (not stored, not quarantined), counted
/// per policy and reason, and listed in the page's `facts_filtered` audit fact; a
/// denied one beside it is quarantined; a local append the policy filters is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fact_filtered_at_intake_is_dropped_counted_and_recorded_while_a_denied_one_is_quarantined()
 {
    let plant = site("plant", &[("to-enterprise", "operational")], None, "");
    let extra = policy(
        "wanted",
        &plugins::built("deny_predicates"),
        "\"intake\", \"append\"",
        "predicates = \"recipe_changed\", filter_predicates = \"heartbeat\"",
        "",
    );
    let enterprise = site(
        "enterprise",
        &[("reporting", "operational"), ("audit-reader", "audit")],
        Some(&plant.gw.url),
        &extra,
    );
    let papi = plant.api();
    let mut offsets = Vec::new();
    for (i, p) in [
        (1, "step_completed"),
        (2, "heartbeat"),
        (3, "recipe_changed"),
        (4, "step_completed"),
    ] {
        offsets.push(papi.append_fact(fact(i, "PlantA", p)).await.unwrap().offset);
    }
    wait_until(
        "the link to confirm every page",
        Duration::from_secs(30),
        || link_frontier(&enterprise) == offsets[3],
    );
    let eapi = enterprise.api();
    assert_eq!(
        read_all(&eapi, "reporting").await,
        HashSet::from([
            "plant:batch:P0:step:1".to_owned(),
            "plant:batch:P0:step:4".to_owned()
        ])
    );
    assert_eq!(
        quarantined_ids(&enterprise),
        HashSet::from(["plant:batch:P0:step:3".to_owned()]),
        "only the denied fact waits in the quarantine"
    );
    let records = audit_records(&eapi).await;
    let filtered: Vec<_> = records
        .iter()
        .filter(|f| f.predicate == "facts_filtered")
        .collect();
    assert_eq!(filtered.len(), 1, "{records:?}");
    let o: serde_json::Value = serde_json::from_str(&filtered[0].object_json).unwrap();
    assert_eq!(o["count"], 1, "{o}");
    assert_eq!(o["facts"][0]["message_id"], "plant:batch:P0:step:2", "{o}");
    assert_eq!(o["facts"][0]["source_offset"], offsets[1], "{o}");
    assert_eq!(o["facts"][0]["policy"], "wanted", "{o}");
    assert_eq!(filtered[0].subject, "link:from-plant");
    let m = enterprise.metrics();
    for line in [
        "bsfg_filtered_facts_total{zone=\"enterprise\",link=\"from-plant\",consumer=\"to-enterprise\"} 1",
        "bsfg_policy_filtered_total{zone=\"enterprise\",policy=\"wanted\",reason=\"predicate `heartbeat` is not wanted here\"} 1",
        "bsfg_policy_decisions_total{zone=\"enterprise\",policy=\"wanted\",verdict=\"filter\"} 1",
    ] {
        assert!(m.contains(line), "{line} in:\n{m}");
    }
    // At the append hook a filter refuses the producer: it is never told an unstored
    // fact was stored.
    let e = eapi
        .append_fact(fact(9, "PlantA", "heartbeat"))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::PermissionDenied, "{e}");
    assert!(e.to_string().contains("is not wanted here"), "{e}");
}

/// A policy written in Python (componentize-py, plugins/python/site-filter) decides in
/// real gateways on both hooks: a local append denied with its reason, a replicated
/// fact filtered (counted, audit record) and another quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_policy_denies_filters_and_quarantines_in_real_gateways() {
    let plant = site("plant", &[("to-enterprise", "operational")], None, "");
    let extra = policy(
        "sites",
        &plugins::built_python("site_filter"),
        "\"append\", \"intake\"",
        "sites = \"PlantA\", filter_predicates = \"heartbeat\"",
        // CPython inside: more memory and time than a Rust guest.
        "memory_mib = 64\ntimeout = \"2s\"\ninstances = 1",
    );
    let enterprise = site(
        "enterprise",
        &[("reporting", "operational"), ("audit-reader", "audit")],
        Some(&plant.gw.url),
        &extra,
    );
    let papi = plant.api();
    let mut offsets = Vec::new();
    for (i, site_label, p) in [
        (1, "PlantA", "step_completed"),
        (2, "PlantA", "heartbeat"),
        (3, "PlantZ", "step_completed"),
        (4, "PlantA", "step_completed"),
    ] {
        offsets.push(
            papi.append_fact(fact(i, site_label, p))
                .await
                .unwrap()
                .offset,
        );
    }
    wait_until(
        "the link to confirm every page",
        Duration::from_secs(60),
        || link_frontier(&enterprise) == offsets[3],
    );
    let eapi = enterprise.api();
    assert_eq!(
        read_all(&eapi, "reporting").await,
        HashSet::from([
            "plant:batch:P0:step:1".to_owned(),
            "plant:batch:P0:step:4".to_owned()
        ])
    );
    assert_eq!(
        quarantined_ids(&enterprise),
        HashSet::from(["plant:batch:P0:step:3".to_owned()])
    );
    let records = audit_records(&eapi).await;
    let filtered: Vec<_> = records
        .iter()
        .filter(|f| f.predicate == "facts_filtered")
        .collect();
    assert_eq!(filtered.len(), 1, "{records:?}");
    assert!(
        filtered[0].object_json.contains("plant:batch:P0:step:2"),
        "{}",
        filtered[0].object_json
    );
    let m = enterprise.metrics();
    let line = "bsfg_policy_filtered_total{zone=\"enterprise\",policy=\"sites\",reason=\"predicate `heartbeat` is not wanted here\"} 1";
    assert!(m.contains(line), "{line} in:\n{m}");
    // A local append from another site is denied with the policy's reason.
    let e = eapi
        .append_fact(fact(9, "PlantZ", "step_completed"))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::PermissionDenied, "{e}");
    assert!(
        e.to_string().contains("policy `sites`")
            && e.to_string().contains("site `PlantZ` is not one of PlantA"),
        "{e}"
    );
}
