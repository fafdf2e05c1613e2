//! Stops are bounded: SIGTERM to a gateway whose nats-server is gone, with an append
//! in flight, exits within `[zone] stop_timeout`, saying what it could not finish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bsfg_testkit::NatsServer;
use common::{Gateway, ZoneFile};

#[test]
fn sigterm_with_the_zone_store_gone_exits_within_the_grace_period_naming_what_it_left() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start().unwrap();
    let port = common::free_port();
    let config = ZoneFile::new("plant-a", &nats)
        .consumer("reporting", "operational")
        .plaintext(port)
        .write(&dir.path().join("zone.toml"));
    // stop_timeout belongs to [zone]: put it right after the zone's name.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen(
            "name = \"plant-a\"\n",
            "name = \"plant-a\"\nstop_timeout = \"3s\"\n",
            1,
        ),
    )
    .unwrap();
    let mut gw = Gateway::spawn(config.clone(), format!("grpc://127.0.0.1:{port}"));
    nats.kill();
    // An append in flight that the store will not answer.
    let append = std::process::Command::new(common::BSFG)
        .args(["--url", &gw.url, "append", "--message-id", "stuck:1"])
        .args([
            "--from",
            "plant-a",
            "--to",
            "enterprise",
            "--subject",
            "batch:B1",
        ])
        .args(["--predicate", "step_completed", "--object", "{}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let term = std::process::Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let sent = Instant::now();
    let status = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "still running {:?} after SIGTERM (grace 3 s):\n{}",
            sent.elapsed(),
            std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = sent.elapsed();
    let log = std::fs::read_to_string(config.with_extension("log")).unwrap();
    assert!(took < Duration::from_secs(10), "exited after {took:?}");
    assert!(!status.success(), "an unfinished stop is not a clean exit");
    assert!(log.contains("stop timed out"), "{log}");
    assert!(log.contains("still answering requests in flight"), "{log}");
    let mut append = append;
    let _ = append.kill();
    let _ = append.wait();
}
