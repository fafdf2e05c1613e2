//! The Python producer and reader of `examples/clients/python`, with stubs generated
//! from `proto/bsfg/v1/boundary.proto` by grpcio-tools, against a live gateway: the
//! producer retries through a gateway that is not up yet and reads ErrorInfo reasons;
//! the reader fetches, processes and confirms every fact exactly once; both over
//! mutual TLS with a granted client certificate, and a refused claim is final.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bsfg_testkit::NatsServer;
use common::{Gateway, ZoneFile, free_ports, text};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The project-local Python that scripts/setup.sh prepared (grpcio-tools in it).
fn python() -> PathBuf {
    let p = repo().join(".tools/venv/bin/python");
    assert!(
        p.is_file(),
        "run scripts/setup.sh first: {} is missing",
        p.display()
    );
    p
}

/// Generates the Python stubs from the contract into `dir`, as the README says.
fn generate(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(python())
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo().join("proto"))
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg(repo().join("proto/bsfg/v1/boundary.proto"))
        .output()
        .unwrap();
    assert!(out.status.success(), "protoc: {}", text(&out.stderr));
    assert!(dir.join("bsfg/v1/boundary_pb2_grpc.py").is_file());
}

fn example(stubs: &Path, script: &str) -> Command {
    let mut c = Command::new(python());
    c.arg(repo().join("examples/clients/python").join(script))
        .env("PYTHONPATH", stubs)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    let s = text(&out.stdout);
    serde_json::from_str(s.trim())
        .unwrap_or_else(|e| panic!("{e}: stdout {s}\nstderr {}", text(&out.stderr)))
}

#[test]
fn the_python_producer_retries_idempotently_and_the_reader_confirms_each_fact_once() {
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("gen");
    generate(&stubs);
    let nats = NatsServer::start().unwrap();
    let [port] = free_ports();
    let target = format!("127.0.0.1:{port}");

    // The producer starts before the gateway: its first attempts find nothing
    // listening (unavailable, retried with the same message_id).
    let producer = example(&stubs, "producer.py")
        .args(["--target", &target, "--batch", "B7", "--steps", "25"])
        .args(["--retry-for", "60", "--invalid"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let config = ZoneFile::new("plant-a", &nats)
        .consumer("reporting", "operational")
        .plaintext(port)
        .write(&dir.path().join("zone.toml"));
    let _gw = Gateway::spawn(config, format!("grpc://{target}"));
    let out = producer.wait_with_output().unwrap();
    let report = json_of(&out);
    assert!(out.status.success(), "{report}\n{}", text(&out.stderr));
    assert_eq!(report["appended"].as_array().unwrap().len(), 25, "{report}");
    assert!(report["retries"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(report["refused"], serde_json::json!([]));
    // The first fact sent again: a duplicate at its original offset.
    assert_eq!(report["resent_first"]["duplicate"], true, "{report}");
    assert_eq!(
        report["resent_first"]["offset"],
        report["appended"][0]["offset"]
    );
    // The invalid fact: final, with the stable reason and the field it names.
    let invalid = &report["invalid"];
    assert_eq!(invalid["reason"], "invalid_argument", "{invalid}");
    assert_eq!(invalid["code"], "INVALID_ARGUMENT");
    assert_eq!(
        invalid["metadata"]["field"], "fact.object_json.id",
        "{invalid}"
    );

    // A second producer run: every fact a duplicate, nothing stored again.
    let again = example(&stubs, "producer.py")
        .args(["--target", &target, "--batch", "B7", "--steps", "25"])
        .output()
        .unwrap();
    let again = json_of(&again);
    assert_eq!(again["duplicates"].as_array().unwrap().len(), 25, "{again}");
    assert_eq!(again["appended"], serde_json::json!([]));

    // The reader: every fact once, processed then confirmed, in pages of 10.
    let seen = dir.path().join("seen.jsonl");
    let read = |max: &str| {
        example(&stubs, "reader.py")
            .args([
                "--target",
                &target,
                "--consumer",
                "reporting",
                "--limit",
                "10",
            ])
            .args(["--wait-ms", "500", "--max-facts", max, "--out"])
            .arg(&seen)
            .output()
            .unwrap()
    };
    let first = read("0");
    let r = json_of(&first);
    assert!(first.status.success(), "{r}");
    assert_eq!(r["processed"], 25, "{r}");
    assert_eq!(r["frontier"], report["appended"][24]["offset"], "{r}");
    let lines = std::fs::read_to_string(&seen).unwrap();
    let ids: Vec<String> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["message_id"].to_string())
        .collect();
    assert_eq!(ids.len(), 25);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        25,
        "each fact once"
    );
    // Everything was confirmed: a second reader run finds nothing new.
    let second = json_of(&read("0"));
    assert_eq!(
        (second["processed"].as_u64(), second["replays"].as_u64()),
        (Some(0), Some(0))
    );
}

fn bsfg(args: &[&str]) {
    let o = Command::new(common::BSFG).args(args).output().unwrap();
    assert!(o.status.success(), "bsfg {args:?}: {}", text(&o.stderr));
}

#[test]
fn the_python_examples_talk_mutual_tls_with_a_granted_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("gen");
    generate(&stubs);
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    bsfg(&["certs", "init", "--zone", "plant-a", "--dir", &d("ca")]);
    let ca = d("ca");
    bsfg(&[
        "certs",
        "issue",
        "--dir",
        &ca,
        "--name",
        "plant-a-bsfg",
        "--server",
        "--ip",
        "127.0.0.1",
    ]);
    bsfg(&[
        "certs",
        "issue",
        "--dir",
        &ca,
        "--name",
        "mes-producer",
        "--client",
    ]);
    let nats = NatsServer::start().unwrap();
    let [port, plain] = free_ports();
    let config = ZoneFile::new("plant-a", &nats)
        .consumer("reporting", "operational")
        .section(&format!("[[listeners]]\nurl = \"grpcs://127.0.0.1:{port}\""))
        .plaintext(plain)
        .section("[tls]\ncert = \"ca/plant-a-bsfg.pem\"\nkey = \"ca/plant-a-bsfg.key\"\ntrust = { plant-a = \"ca/ca.pem\" }")
        .section("[[peers]]\nidentity = \"mes-producer\"\nca = \"plant-a\"\nclaim_from_zones = [\"plant-a\"]\nto_zones = [\"*\"]\nconsumers = [\"reporting\"]")
        .write(&dir.path().join("zone.toml"));
    let _gw = Gateway::spawn(config, format!("grpc://127.0.0.1:{plain}"));
    let target = format!("127.0.0.1:{port}");
    let tls = |c: &mut Command| {
        c.args(["--ca", &d("ca/ca.pem"), "--cert", &d("ca/mes-producer.pem")])
            .args(["--key", &d("ca/mes-producer.key")]);
    };
    let mut producer = example(&stubs, "producer.py");
    producer.args(["--target", &target, "--batch", "T1", "--steps", "5"]);
    tls(&mut producer);
    let out = producer.output().unwrap();
    let report = json_of(&out);
    assert!(out.status.success(), "{report}\n{}", text(&out.stderr));
    assert_eq!(report["appended"].as_array().unwrap().len(), 5, "{report}");

    // A zone the certificate may not claim: permission_denied, final, not retried.
    let mut denied = example(&stubs, "producer.py");
    denied.args([
        "--target",
        &target,
        "--from-zone",
        "enterprise",
        "--steps",
        "1",
    ]);
    tls(&mut denied);
    let report = json_of(&denied.output().unwrap());
    assert_eq!(
        report["refused"][0]["reason"], "permission_denied",
        "{report}"
    );
    assert_eq!(report["retries"], 0, "{report}");

    let mut reader = example(&stubs, "reader.py");
    reader
        .args([
            "--target",
            &target,
            "--consumer",
            "reporting",
            "--wait-ms",
            "300",
            "--out",
        ])
        .arg(dir.path().join("seen.jsonl"));
    tls(&mut reader);
    let r = json_of(&reader.output().unwrap());
    assert_eq!(r["processed"], 5, "{r}");
}
