//! The gateway under a service manager (`Type=notify`), with the manager played by
//! the test: readiness, watchdog pings, a reload on SIGHUP that picks up new
//! certificates at once, and the stop, all on `$NOTIFY_SOCKET`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use bsfg_testkit::{NatsServer, http_get};
use common::{BSFG, Gateway, ZoneFile, free_ports, text};

fn bsfg(args: &[&str]) {
    let o = Command::new(BSFG).args(args).output().unwrap();
    assert!(o.status.success(), "bsfg {args:?}: {}", text(&o.stderr));
}

/// Datagrams from the gateway until one contains `want` (within `within`).
fn until(sock: &UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        let Ok(n) = sock.recv(&mut buf) else { break };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.lines().any(|l| l == want);
        seen.push(msg);
        if done {
            return seen;
        }
    }
    panic!("no {want} within {within:?}; got {seen:?}");
}

fn reloads(admin: u16) -> u64 {
    let (_, m) = http_get(admin, "/metrics").unwrap();
    m.lines()
        .find(|l| l.starts_with("bsfg_tls_reloads_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn kill(sig: &str, gw: &Gateway) {
    Command::new("kill")
        .args([sig, &gw.child.id().to_string()])
        .status()
        .unwrap();
}

#[test]
fn readiness_watchdog_reload_and_stop_reach_the_service_manager() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    bsfg(&["certs", "init", "--zone", "plant", "--dir", &d("ca")]);
    let issue = |extra: &[&str]| {
        let dir = d("ca");
        let mut args = vec!["certs", "issue", "--dir", &dir, "--name", "plant-bsfg"];
        args.extend_from_slice(&["--server", "--client", "--ip", "127.0.0.1"]);
        args.extend_from_slice(extra);
        bsfg(&args);
    };
    issue(&[]);
    let nats = NatsServer::start().unwrap();
    let [tls_port, plain_port, admin] = free_ports();
    let config = ZoneFile::new("plant", &nats)
        .section(&format!("[[listeners]]\nurl = \"grpcs://127.0.0.1:{tls_port}\""))
        .plaintext(plain_port)
        .section(
            // Files are polled only hourly: what reloads them below is the SIGHUP.
            "[tls]\ncert = \"ca/plant-bsfg.pem\"\nkey = \"ca/plant-bsfg.key\"\nreload_interval = \"1h\"\ntrust = { plant = \"ca/ca.pem\" }",
        )
        .admin(admin)
        .write(&dir.path().join("zone.toml"));

    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut gw = Gateway::spawn_env(
        config,
        format!("grpc://127.0.0.1:{plain_port}"),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            // 400 ms: pings every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = until(&sock, "READY=1", Duration::from_secs(10));
    assert!(
        ready
            .iter()
            .any(|m| m.contains("STATUS=zone plant ready (2 listener(s)")),
        "{ready:?}"
    );
    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        until(&sock, "WATCHDOG=1", Duration::from_secs(2));
        pings += 1;
    }
    assert!(start.elapsed() < Duration::from_secs(3), "pings too slow");

    // systemctl reload: new certificate files, SIGHUP, reloaded at once.
    assert_eq!(reloads(admin), 0);
    issue(&["--force"]);
    kill("-HUP", &gw);
    let reload = until(&sock, "RELOADING=1", Duration::from_secs(5));
    assert!(
        reload.iter().any(|m| m.contains("MONOTONIC_USEC=")),
        "systemd 253+ needs the monotonic time with RELOADING=1: {reload:?}"
    );
    until(&sock, "READY=1", Duration::from_secs(5));
    assert_eq!(reloads(admin), 1, "the certificate reloaded on SIGHUP");
    assert!(gw.child.try_wait().unwrap().is_none(), "SIGHUP ended it");

    // systemctl stop.
    kill("-TERM", &gw);
    until(&sock, "STOPPING=1", Duration::from_secs(5));
    assert!(gw.sigterm().success());
}

#[test]
fn a_sighup_never_ends_a_gateway_without_tls_or_policies() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().unwrap();
    let gw = Gateway::start(dir.path(), &nats);
    kill("-HUP", &gw);
    std::thread::sleep(Duration::from_millis(500));
    let mut gw = gw;
    assert!(gw.child.try_wait().unwrap().is_none(), "SIGHUP ended it");
    assert!(gw.sigterm().success());
}
