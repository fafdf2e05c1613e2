//! What a site drops into its monitoring, checked against a live gateway: every metric
//! the Grafana dashboard (`examples/grafana/bsfg-zones.json`) and the alerting rules
//! (`examples/prometheus/bsfg-rules.yml`) name is in a running gateway's `/metrics`,
//! and every rule and dashboard query parses (`promtool`, fetched by
//! `scripts/setup.sh`); `bsfg status --check` warns (1) while a fact sits in
//! quarantine; `--log-format json` writes one JSON object per line with the link's
//! zone, link, consumer and peer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bsfg_core::BoundaryApi;
use bsfg_testkit::{NatsServer, eventually, http_get, plugins};
use bsfg_transport_grpc::{ClientConfig, GrpcClient};
use common::{BSFG, Gateway, ZoneFile, free_ports, text};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// promtool from `scripts/setup.sh`; a test that needs it fails loudly without it.
fn promtool() -> PathBuf {
    let p = std::env::var_os("BSFG_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".tools/bin/promtool"));
    assert!(
        p.exists(),
        "promtool not found at {} (run scripts/setup.sh, or set BSFG_PROMTOOL)",
        p.display()
    );
    p
}

/// Every `bsfg_*` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("bsfg_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Not a part of a longer name (`KV_bsfg_leases`), nor a stream or a bucket.
        let before = rest[..at].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// The names of the samples a `/metrics` text exposes.
fn exposed(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every query of the dashboard, with Grafana's variables given values PromQL parses.
fn dashboard_queries() -> Vec<String> {
    let path = repo().join("examples/grafana/bsfg-zones.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(p["title"].is_string(), "a panel without a title: {p}");
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            out.push(
                expr.replace("$__rate_interval", "5m")
                    .replace("\"$zone\"", "\".*\""),
            );
        }
    }
    assert!(out.len() >= 15, "the dashboard has {} queries", out.len());
    out
}

fn bsfg(args: &[&str]) {
    let o = Command::new(BSFG).args(args).output().unwrap();
    assert!(o.status.success(), "bsfg {args:?}: {}", text(&o.stderr));
}

#[test]
fn every_rule_and_dashboard_query_parses_and_the_rules_fire_as_the_runbook_says() {
    let rules = repo().join("examples/prometheus/bsfg-rules.yml");
    let out = Command::new(promtool())
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The rules' behaviour on series as a gateway exposes them: a gapped link fires,
    // a standby link never stalls, thresholds at their levels.
    let out = Command::new(promtool())
        .args(["test", "rules"])
        .arg(repo().join("examples/prometheus/bsfg-rules.test.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The dashboard's queries, as recording rules, through the same parser.
    let dir = tempfile::tempdir().unwrap();
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries().iter().enumerate() {
        file += &format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(q).unwrap()
        );
    }
    let f = dir.path().join("dashboard.yml");
    std::fs::write(&f, file).unwrap();
    let out = Command::new(promtool())
        .args(["check", "rules"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a dashboard query does not parse: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_name_is_exposed_by_a_live_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    bsfg(&["certs", "init", "--zone", "enterprise", "--dir", &d("ca")]);
    bsfg(&[
        "certs",
        "issue",
        "--dir",
        &d("ca"),
        "--name",
        "enterprise-bsfg",
        "--server",
        "--client",
        "--ip",
        "127.0.0.1",
    ]);

    let plant_nats = NatsServer::start().unwrap();
    let [plant_port, tls_port, plain_port, admin] = free_ports();
    let plant_cfg = ZoneFile::new("plant", &plant_nats)
        .consumer("to-enterprise", "operational")
        .plaintext(plant_port)
        .write(&dir.path().join("plant.toml"));
    let plant = Gateway::spawn(plant_cfg, format!("grpc://127.0.0.1:{plant_port}"));

    let nats = NatsServer::start().unwrap();
    let config = ZoneFile::new("enterprise", &nats)
        .consumer("reporting", "operational")
        .section(&format!(
            "[[listeners]]\nurl = \"grpcs://127.0.0.1:{tls_port}\"\nhandshake_timeout = \"1s\""
        ))
        .plaintext(plain_port)
        .section(
            "[tls]\ncert = \"ca/enterprise-bsfg.pem\"\nkey = \"ca/enterprise-bsfg.key\"\ntrust = { enterprise = \"ca/ca.pem\" }",
        )
        .link(
            "from-plant",
            &plant.url,
            "to-enterprise",
            "source_zone = \"plant\"\ninsecure = true\nwait = \"1s\"",
        )
        .section(&format!(
            "[[policies]]\nname = \"no-recipes\"\nmodule = \"{}\"\nhooks = [\"intake\"]\nsettings = {{ predicates = \"recipe_changed\" }}",
            plugins::built("deny_predicates").display()
        ))
        .admin(admin)
        .write(&dir.path().join("enterprise.toml"));
    let enterprise = Gateway::spawn_env(
        config.clone(),
        format!("grpc://127.0.0.1:{plain_port}"),
        &[("BSFG_LOG_FORMAT", "json"), ("BSFG_LOG_LEVEL", "info")],
    );

    // Traffic that makes every family appear: a replicated fact, one denied at intake
    // (quarantine), a refused append, a failed TLS handshake.
    let client =
        |url: &str| GrpcClient::connect_lazy(url, ClientConfig::default()).expect("a client");
    let papi = client(&plant.url);
    let mut step = bsfg_testkit::fixtures::step_completed("plant:obs:1", 1);
    step.envelope.from_zone = "plant".into();
    papi.append_fact(step.clone()).await.unwrap();
    let mut denied = bsfg_testkit::fixtures::step_completed("plant:obs:2", 2);
    denied.envelope.from_zone = "plant".into();
    denied.fact.predicate = "recipe_changed".into();
    papi.append_fact(denied).await.unwrap();
    let eapi = client(&enterprise.url);
    let mut bad = step.clone();
    bad.fact.object_json = "{\"n\":1e400}".into();
    assert!(eapi.append_fact(bad).await.is_err());
    let _ = std::net::TcpStream::connect(("127.0.0.1", tls_port)).map(|mut s| {
        use std::io::Write as _;
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
        std::thread::sleep(Duration::from_millis(200));
    });
    eventually(
        "the link to take both facts",
        Duration::from_secs(30),
        || async {
            let s = common::admin_status(admin);
            let l = &s["links"][0];
            (l["state"] == "running" && l["lag_facts"] == 0 && l["quarantined"] == 1)
                .then_some(())
                .ok_or(s.to_string())
        },
    )
    .await;

    let metrics = eventually(
        "every family to be exposed",
        Duration::from_secs(20),
        || async {
            let (code, m) = http_get(admin, "/metrics").unwrap();
            assert_eq!(code, 200);
            let have = exposed(&m);
            [
                "bsfg_tls_handshake_failures_total",
                "bsfg_requests_refused_total",
            ]
            .iter()
            .all(|n| have.contains(*n))
            .then_some(m.clone())
            .ok_or(m)
        },
    )
    .await;
    let have = exposed(&metrics);
    let rules = std::fs::read_to_string(repo().join("examples/prometheus/bsfg-rules.yml")).unwrap();
    let dashboard = dashboard_queries().join("\n");
    for (what, names) in [
        ("bsfg-rules.yml", metric_names(&rules)),
        ("bsfg-zones.json", metric_names(&dashboard)),
    ] {
        assert!(names.len() >= 10, "{what} names {names:?}");
        let missing: Vec<&String> = names.iter().filter(|n| !have.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "{what} names metrics a live gateway does not expose: {missing:?}\nexposed: {have:?}"
        );
    }

    // The check warns (1) for the fact held in quarantine, and says where to look.
    let out = enterprise.bsfg(&[
        "status",
        "--check",
        "--admin",
        &format!("127.0.0.1:{admin}"),
    ]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.starts_with("BSFG WARNING - zone enterprise: 1 fact(s) held in quarantine"),
        "{said}"
    );
    assert!(said.contains("WARNING BsfgQuarantineGrowing"), "{said}");
    let out = enterprise.bsfg(&[
        "--json",
        "status",
        "--check",
        "--admin",
        &format!("127.0.0.1:{admin}"),
    ]);
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(
        (v["level"].as_str(), v["exit_code"].as_i64()),
        (Some("WARNING"), Some(1))
    );

    // JSON logs: one object per line; the link's lines carry its fields.
    let log = std::fs::read_to_string(config.with_extension("log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let link_line = lines
        .iter()
        .find(|l| l["message"] == "link started")
        .unwrap_or_else(|| panic!("no link start in {log}"));
    let span = &link_line["span"];
    assert_eq!(
        (
            span["zone"].as_str(),
            span["link"].as_str(),
            span["consumer"].as_str(),
            span["peer"].as_str()
        ),
        (
            Some("enterprise"),
            Some("from-plant"),
            Some("to-enterprise"),
            Some(plant.url.as_str())
        ),
        "{link_line}"
    );
    assert_eq!(link_line["level"], "INFO");
    assert!(lines.iter().all(|l| l["timestamp"].is_string()));
    // Every line names the zone, and a request's lines its peer.
    let stray: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["zone"] != "enterprise").collect();
    assert!(stray.is_empty(), "lines without the zone: {stray:?}");
    let refused = lines
        .iter()
        .find(|l| l["message"] == "request refused")
        .unwrap_or_else(|| panic!("no refused request in {log}"));
    assert_eq!(refused["span"]["peer"], "local", "{refused}");
    assert_eq!(refused["code"], "invalid_argument", "{refused}");
}

#[test]
fn a_bad_log_level_is_a_usage_error_naming_the_flag() {
    let policy_test = |level: &str| {
        Command::new(BSFG)
            .args([
                "--log-level",
                level,
                "policy",
                "test",
                "--module",
                "/nonexistent.wasm",
            ])
            .args(["--facts", "/nonexistent.jsonl"])
            .output()
            .unwrap()
    };
    let bad = policy_test("info,=bogus[");
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    assert!(
        text(&bad.stderr).contains("--log-level"),
        "{}",
        text(&bad.stderr)
    );
    // A good level gets as far as the missing module (an operation error, 1).
    let good = policy_test("debug");
    assert_eq!(good.status.code(), Some(1), "{}", text(&good.stderr));
}
