//! The real `bsfg` binary against a real nats-server: every CLI command, exit codes
//! and output, broken configs, and SIGTERM in the middle of a stream of appends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bsfg_testkit::NatsServer;

mod common;
use common::{BSFG, Gateway, ZoneFile, free_port, text};

fn step(id: &str, step: u32) -> Vec<String> {
    [
        "append",
        "--message-id",
        id,
        "--from",
        "plant-a",
        "--to",
        "enterprise",
        "--subject",
        "batch:PlantA/B1042",
        "--predicate",
        "step_completed",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(["--object".to_owned(), format!(r#"{{"step":{step}}}"#)])
    .collect()
}

fn jsonl_line(id: &str, n: u32) -> String {
    format!(
        r#"{{"envelope":{{"message_id":"{id}","from_zone":"plant-a","to_zone":"enterprise","produced_at_unix_ms":1764000000000}},"fact":{{"subject":"batch:PlantA/B{n}","predicate":"step_completed","object_json":"{{\"n\":{n}}}"}}}}"#
    )
}

#[test]
fn every_cli_command_works_against_a_running_gateway() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &nats);

    let out = Command::new(BSFG)
        .args(["validate", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("ok: zone plant-a"));
    assert!(
        text(&out.stdout).contains("accepts 8388608 bytes per message"),
        "{}",
        text(&out.stdout)
    );

    let a = |args: Vec<String>| gw.bsfg(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = a(step("evt-1", 1));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o1 = number_after(&text(&out.stdout), "appended  evt-1 -> facts_operational:");
    let out = a(step("evt-1", 1));
    assert!(text(&out.stdout).contains(&format!("duplicate evt-1 -> facts_operational:{o1}")));
    let out = a(step("evt-1", 2));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("conflicting_duplicate"),
        "{}",
        text(&out.stderr)
    );
    let mut bad = step("evt-9", 1);
    bad[10] = "StepCompleted".into();
    let out = a(bad);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid_argument: field `fact.predicate`"),
        "{}",
        text(&out.stderr)
    );

    // JSON lines from a file, and from stdin, with --json output.
    let file = dir.path().join("facts.jsonl");
    std::fs::write(
        &file,
        (2..=4)
            .map(|n| jsonl_line(&format!("evt-{n}"), n) + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let out = gw.bsfg(&["--json", "append", "--file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let acks: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let offsets: HashSet<u64> = acks.iter().map(|a| a["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets.len(), 3);
    assert!(offsets.iter().all(|o| *o > o1), "{offsets:?}");
    let mut child = Command::new(BSFG)
        .args(["--url", &gw.url, "append", "--file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all((jsonl_line("evt-5", 5) + "\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let o5 = number_after(&text(&out.stdout), "appended  evt-5 -> facts_operational:");
    assert!(offsets.iter().all(|o| *o < o5), "{offsets:?} {o5}");

    // Fetch, confirm, fetch --confirm.
    let out = gw.bsfg(&["--json", "fetch", "--consumer", "reporting", "--limit", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let fetched: Vec<u64> = page["facts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(fetched.len(), 3);
    assert_eq!(page["last_offset"], o5);
    let third = fetched[2].to_string();
    let out = gw.bsfg(&["confirm", "--consumer", "reporting", "--offset", &third]);
    // The frontier covers the third fact (it may stand on a later position of the
    // log that holds no fact), and not the fourth.
    let frontier = number_after(&text(&out.stdout), "frontier ");
    let fourth = *offsets.iter().max().unwrap();
    assert!(
        (fetched[2]..fourth).contains(&frontier),
        "{}",
        text(&out.stdout)
    );
    let out = gw.bsfg(&["fetch", "--consumer", "reporting", "--confirm"]);
    let s = text(&out.stdout);
    assert!(
        s.contains(&format!("facts_operational:{fourth}"))
            && s.contains(&format!("facts_operational:{o5}")),
        "{s}"
    );
    assert!(s.contains(&format!("frontier {o5}")), "{s}");
    let out = gw.bsfg(&["fetch", "--consumer", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("unknown_consumer"));

    // put-object: digest as sha256sum computes it; other bytes under the key refused.
    let art = dir.path().join("record.pdf");
    std::fs::write(&art, vec![7u8; 3 * 1024 * 1024 + 5]).unwrap();
    let out = gw.bsfg(&[
        "--json",
        "put-object",
        "--bucket",
        "batch-files",
        art.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let sum = text(&Command::new("sha256sum").arg(&art).output().unwrap().stdout);
    assert_eq!(
        info["digest"],
        format!("sha256:{}", sum.split_whitespace().next().unwrap())
    );
    assert_eq!(info["key"], "record.pdf");
    std::fs::write(&art, b"other bytes").unwrap();
    let out = gw.bsfg(&[
        "put-object",
        "--bucket",
        "batch-files",
        art.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("conflicting_duplicate"));
}

#[test]
fn broken_configs_exit_non_zero_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("zone.toml");
    std::fs::write(
        &cfg,
        "[zone]\nname = \"plant a\"\n\n[sink]\ntype = \"jetstream\"\nurl = \"nats://127.0.0.1:4222\"\nmax_batch = 0\n\n[[listeners]]\nurl = \"grpc://10.0.0.1:7443\"\ninsecure = true\n",
    )
    .unwrap();
    for cmd in ["validate", "run"] {
        let out = Command::new(BSFG)
            .args([cmd, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = text(&out.stderr);
        let path = cfg.display().to_string();
        assert!(err.contains(&format!("{path}:2:8: zone.name:")), "{err}");
        assert!(
            err.contains(&format!(
                "{path}:7:13: sink.max_batch: must be between 1 and 1000"
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "{path}:10:7: listeners[0].url: plaintext is allowed only on loopback"
            )),
            "{err}"
        );
    }
    let out = Command::new(BSFG)
        .args(["validate", "--config", "/nonexistent/zone.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read"));
}

#[test]
fn validate_takes_values_from_the_environment_and_names_an_unset_variable_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("zone.toml");
    std::fs::write(
        &cfg,
        "[zone]\nname = \"${BSFG_TEST_ZONE}\"\n\n[sink]\ntype = \"jetstream\"\nurl = \"${BSFG_TEST_NATS:-nats://127.0.0.1:4222}\"\n\n[[listeners]]\nurl = \"grpc://127.0.0.1:${BSFG_TEST_PORT}\"\ninsecure = true\n",
    )
    .unwrap();
    let validate = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(BSFG);
        cmd.args(["validate", "--config"]).arg(&cfg);
        cmd.env_remove("BSFG_TEST_ZONE")
            .env_remove("BSFG_TEST_PORT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = validate(&[("BSFG_TEST_ZONE", "plant-b"), ("BSFG_TEST_PORT", "7999")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("ok: zone plant-b"),
        "{}",
        text(&out.stdout)
    );

    let out = validate(&[("BSFG_TEST_PORT", "7999")]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    let path = cfg.display().to_string();
    assert!(
        err.contains(&format!(
            "{path}:2:8: zone.name: environment variable BSFG_TEST_ZONE is not set"
        )),
        "{err}"
    );
}

#[test]
fn sigterm_during_a_stream_of_appends_loses_no_acknowledged_fact() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &nats);
    let total = 2000;
    let file = dir.path().join("stream.jsonl");
    std::fs::write(
        &file,
        (0..total)
            .map(|n| jsonl_line(&format!("s-{n}"), n) + "\n")
            .collect::<String>(),
    )
    .unwrap();

    let mut producer = Command::new(BSFG)
        .args([
            "--url",
            &gw.url,
            "--json",
            "append",
            "--concurrency",
            "16",
            "--file",
        ])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = HashSet::new();
    let mut lines = BufReader::new(producer.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        acked.insert(v["message_id"].as_str().unwrap().to_owned());
        if acked.len() == 200 {
            break;
        }
    }
    let status = gw.sigterm();
    assert!(
        status.success(),
        "gateway must exit cleanly on SIGTERM: {status:?}"
    );
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        acked.insert(v["message_id"].as_str().unwrap().to_owned());
    }
    let producer_status = producer.wait().unwrap();
    assert!(
        !producer_status.success(),
        "the producer must notice the stop"
    );
    assert!(
        acked.len() < total as usize,
        "the stop came too late to test anything"
    );

    // Back up: every acknowledged fact is stored, and a re-run of the whole file
    // stores the rest exactly once.
    gw.restart();
    let out = gw.bsfg(&["--json", "append", "--file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut stored_before = HashSet::new();
    for l in text(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["duplicate"] == true {
            stored_before.insert(v["message_id"].as_str().unwrap().to_owned());
        }
    }
    assert!(
        acked.is_subset(&stored_before),
        "acknowledged but lost: {:?}",
        acked.difference(&stored_before).take(5).collect::<Vec<_>>()
    );
    let mut ids = HashSet::new();
    loop {
        let out = gw.bsfg(&[
            "--json",
            "fetch",
            "--consumer",
            "reporting",
            "--limit",
            "1000",
            "--confirm",
        ]);
        let first = text(&out.stdout).lines().next().unwrap().to_owned();
        let page: serde_json::Value = serde_json::from_str(&first).unwrap();
        let facts = page["facts"].as_array().unwrap();
        if facts.is_empty() {
            break;
        }
        for f in facts {
            let id = f["message"]["envelope"]["message_id"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(ids.insert(id), "stored twice");
            assert!(
                f["message"]["fact"]["object_json"]
                    .as_str()
                    .unwrap()
                    .starts_with("{\"n\":")
            );
        }
    }
    assert_eq!(ids.len(), total as usize);
}

#[test]
fn pull_moves_every_fact_between_two_gateways_once() {
    let (nats_a, nats_b) = (NatsServer::start().unwrap(), NatsServer::start().unwrap());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plant = Gateway::start(dir_a.path(), &nats_a);
    let enterprise = Gateway::start(dir_b.path(), &nats_b);
    let file = dir_a.path().join("f.jsonl");
    std::fs::write(
        &file,
        (0..30)
            .map(|n| jsonl_line(&format!("p-{n}"), n) + "\n")
            .collect::<String>(),
    )
    .unwrap();
    assert!(
        plant
            .bsfg(&["append", "--file", file.to_str().unwrap()])
            .status
            .success()
    );

    // The enterprise zone pulls from plant-a through plant-a's consumer `reporting`.
    let out = enterprise.bsfg(&[
        "pull",
        "--source",
        &plant.url,
        "--consumer",
        "reporting",
        "--limit",
        "7",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let frontier = number_after(&s, "source frontier ");
    assert!(
        s.contains(&format!("source frontier {frontier} of {frontier}")),
        "{s}"
    );
    // A replay of plant-a's history into enterprise stores nothing new.
    let out = enterprise.bsfg(&["--json", "append", "--file", file.to_str().unwrap()]);
    assert!(
        text(&out.stdout)
            .lines()
            .all(|l| l.contains("\"duplicate\":true"))
    );
    let out = enterprise.bsfg(&[
        "--json",
        "fetch",
        "--consumer",
        "reporting",
        "--limit",
        "100",
    ]);
    let page: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let ids: HashSet<&str> = page["facts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["message"]["envelope"]["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        (0..30)
            .map(|n| format!("p-{n}"))
            .collect::<HashSet<_>>()
            .iter()
            .map(String::as_str)
            .collect()
    );
}

/// The project-local Python that scripts/setup.sh prepared.
fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/venv/bin/python");
    assert!(
        p.is_file(),
        "run scripts/setup.sh first: {} is missing",
        p.display()
    );
    p
}

#[test]
fn a_client_knowing_only_the_address_calls_the_gateway_through_reflection() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &nats);
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients/reflection_client.py");
    let out = Command::new(python())
        .arg(script)
        .arg(gw.url.trim_start_matches("grpc://"))
        .arg("reporting")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("\"ok\": true"),
        "{}",
        text(&out.stdout)
    );
}

// `bsfg bench` exists only with the `bench` feature (scripts/test.sh turns it on).
#[cfg(feature = "bench")]
#[test]
fn bench_append_prints_a_row_per_flush_setting_with_its_baseline() {
    let out = Command::new(BSFG)
        .args([
            "bench",
            "append",
            "--facts",
            "512",
            "--clients",
            "2",
            "--inflight",
            "8",
            "--file-facts",
            "300",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let rows: Vec<&str> = s
        .lines()
        .filter(|l| l.starts_with("| sync") || l.starts_with("| default"))
        .collect();
    // Per flush setting: AppendFact beside raw publishing, then the engine beside
    // `bsfg append --file`.
    assert_eq!(rows.len(), 4, "{s}");
    for r in rows {
        // raw msg/s, facts/s and the ratio are all present and positive.
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        assert!(cells[2].parse::<f64>().unwrap() > 0.0, "{r}");
        assert!(cells[3].parse::<f64>().unwrap() > 0.0, "{r}");
        assert!(cells[4].ends_with('x'), "{r}");
    }
}

// Needs root for the link emulator (CI runs as root), like the QUIC link tests.
#[cfg(feature = "bench")]
#[test]
fn bench_artifacts_prints_artifact_throughput_beside_fact_throughput_per_transport() {
    let out = Command::new(BSFG)
        .args([
            "bench",
            "artifacts",
            "--rtt-ms",
            "1",
            "--loss-pct",
            "1",
            "--artifacts",
            "2",
            "--artifact-mib",
            "1",
            "--facts",
            "500",
            "--fact-window",
            "1s",
            "--window",
            "30s",
        ])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let rows: Vec<Vec<String>> = s
        .lines()
        .filter(|l| l.starts_with("| 1 ms"))
        .map(|l| l.split('|').map(|c| c.trim().to_owned()).collect())
        .collect();
    assert_eq!(rows.len(), 2, "a row for gRPC and one for QUIC: {s}");
    for r in &rows {
        assert!(r[4].parse::<f64>().unwrap() > 0.0, "MiB/s: {r:?}");
        assert!(r[5].ends_with('x'), "ratio to gRPC: {r:?}");
        assert!(r[6].starts_with("2/2"), "every artifact copied: {r:?}");
        assert!(r[8].parse::<f64>().unwrap() > 0.0, "facts/s: {r:?}");
    }
}

#[test]
fn the_gateway_keeps_serving_across_a_hard_restart_of_its_nats_server() {
    let mut nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &nats);
    let a = |args: Vec<String>| gw.bsfg(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let first = a(step("r-1", 1));
    assert!(first.status.success());
    let r1 = number_after(&text(&first.stdout), "appended  r-1 -> facts_operational:");

    nats.kill_and_restart().unwrap();
    // In between, appends fail with a clear `unavailable` (retrying is safe); once the
    // client has reconnected they succeed again, and nothing was stored twice.
    let deadline = Instant::now() + Duration::from_secs(60);
    let r2 = loop {
        let out = a(step("r-2", 2));
        if out.status.success() {
            break number_after(&text(&out.stdout), "appended  r-2 -> facts_operational:");
        }
        let err = text(&out.stderr);
        assert!(
            err.contains("unavailable"),
            "only `unavailable` is expected meanwhile: {err}"
        );
        assert!(
            Instant::now() < deadline,
            "the gateway did not recover: {err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let out = a(step("r-1", 1));
    assert!(
        text(&out.stdout).contains(&format!("duplicate r-1 -> facts_operational:{r1}")),
        "{}",
        text(&out.stdout)
    );
    let out = gw.bsfg(&[
        "--json",
        "fetch",
        "--consumer",
        "reporting",
        "--limit",
        "10",
    ]);
    let page: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(page["last_offset"], r2);
}

/// The number printed right after the last `prefix` in `out`.
fn number_after(out: &str, prefix: &str) -> u64 {
    let at = out
        .rfind(prefix)
        .unwrap_or_else(|| panic!("`{prefix}` not in: {out}"));
    out[at + prefix.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after `{prefix}` in: {out}"))
}

// `bsfg bench` exists only with the `bench` feature (scripts/test.sh turns it on).
#[cfg(feature = "bench")]
#[test]
fn bench_replicate_prints_the_link_beside_native_sourcing_and_a_raw_copier() {
    let out = Command::new(BSFG)
        .args([
            "bench",
            "replicate",
            "--facts",
            "600",
            "--page-size",
            "200",
            "--idle-samples",
            "3",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let rate = |prefix: &str| -> f64 {
        let row = s
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix}: {s}"));
        row.split('|')
            .map(str::trim)
            .nth(2)
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(rate("| native JetStream sourcing") > 0.0);
    assert!(rate("| raw JetStream fetch") > 0.0);
    assert!(rate("| BSFG link over gRPC") > 0.0);
    // Every fact of the backlog crossed once: the link stored them all, no replays.
    assert!(s.contains("600 stored, 0 replays, 0 failures"), "{s}");
    // Both flush settings: durable (what BSFG ships) and the server's lazy default.
    assert!(
        s.contains("with sync_interval: always") && s.contains("with the default lazy flushing"),
        "{s}"
    );
    assert!(
        s.contains("idle link, append in A -> stored in B and confirmed: p50"),
        "{s}"
    );
}

#[test]
fn validate_and_run_refuse_a_max_fact_bytes_the_zone_server_cannot_hold() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ZoneFile::new("plant-a", &nats)
        .section("[limits]\nmax_fact_bytes = 8388608")
        .section(&format!(
            "[[listeners]]\nurl = \"grpc://127.0.0.1:{}\"\ninsecure = true\nmax_message_bytes = 33554432",
            free_port()
        ))
        .write(&dir.path().join("zone.toml"));
    // A configuration problem, for both.
    validate_and_run_refuse(&config, |err| {
        err.contains("max_fact_bytes = 8388608") && err.contains("max_payload")
    });
}

/// `bsfg validate` and `bsfg run` both exit 2 on `config`, saying what `says` looks for.
fn validate_and_run_refuse(config: &std::path::Path, says: impl Fn(&str) -> bool) {
    for cmd in ["validate", "run"] {
        let out = Command::new(BSFG)
            .args([cmd, "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(says(&err), "{cmd}: {err}");
    }
}

#[test]
fn a_zone_of_the_per_id_index_layout_is_refused_until_bsfg_index_migrate_moved_it() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ZoneFile::new("plant-a", &nats)
        .plaintext(free_port())
        .write(&dir.path().join("zone.toml"));
    // What a zone of the per-id layout holds: the index stream with one entry.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "bsfg_ids".into(),
            subjects: vec!["bsfg.ids.*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let entry = r#"{"id":"m-1","digest":"00","stream":"facts_operational","subject":"facts.operational.batch.x","offset":5}"#;
        js.publish("bsfg.ids.x", entry.into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    validate_and_run_refuse(&config, |err| err.contains("bsfg index migrate --config"));
    let migrate = |expect: &str| {
        let out = Command::new(BSFG)
            .args(["index", "migrate", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains(expect), "{}", text(&out.stdout));
    };
    migrate("moved 1 of 1 per-id index entries");
    migrate("nothing changed");
}

#[test]
fn append_file_with_1024_calls_in_flight_on_one_plaintext_connection_stores_every_line() {
    // Many concurrent calls on one connection are what gRPC clients do: the listener
    // takes them all (it once dropped the connection: "too_many_data_frames").
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &nats);
    let file = dir.path().join("many.jsonl");
    std::fs::write(
        &file,
        (0..5000)
            .map(|n| jsonl_line(&format!("many-{n}"), n) + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let out = gw.bsfg(&[
        "append",
        "--concurrency",
        "1024",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("5000 stored, 0 duplicate"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn append_file_interrupted_by_a_gateway_restart_resumes_after_what_was_acknowledged() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &nats);
    let n = 40_000;
    let file = dir.path().join("day.jsonl");
    std::fs::write(
        &file,
        (0..n)
            .map(|i| jsonl_line(&format!("day-{i}"), i) + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let progress = dir.path().join("day.jsonl.bsfg-acked");
    let child = Command::new(BSFG)
        .args([
            "--url",
            &gw.url,
            "append",
            "--batch",
            "200",
            "--concurrency",
            "400",
        ])
        .arg("--file")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once some calls were acknowledged, the gateway dies hard and comes back.
    let acked = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked(&progress) < 2000 {
        assert!(Instant::now() < deadline, "no progress recorded");
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.restart();
    let out = child.wait_with_output().unwrap();
    let first = acked(&progress);
    assert!(
        !out.status.success() || first == n as usize,
        "the first run either stopped at the restart or finished"
    );
    assert!(first >= 2000, "{first}");
    let out = gw.bsfg(&[
        "append",
        "--resume",
        "--batch",
        "200",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    // Only what was in flight and unacknowledged at the restart comes again.
    let dups = number_after(&err, "stored, ");
    let stored = err
        .split(" stored")
        .next()
        .and_then(|s| s.trim().rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap();
    assert_eq!(stored + dups as usize, n as usize - first, "{err}");
    assert!(dups <= 400, "{err}");
    if first > 0 && first < n as usize {
        assert!(
            err.contains(&format!("lines 1..={first} acknowledged before")),
            "{err}"
        );
    }
    // Every line stored exactly once: a replay of the whole file stores nothing.
    let out = gw.bsfg(&["append", "--file", file.to_str().unwrap()]);
    assert!(
        text(&out.stderr).contains(&format!("0 stored, {n} duplicate(s)")),
        "{}",
        text(&out.stderr)
    );
}
