//! The admin endpoint of the real `bsfg` gateway: refused to web pages and to names
//! rebound to loopback, and its health and readiness probes against a real
//! nats-server that dies and comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::time::Duration;

use bsfg_testkit::{NatsServer, eventually_blocking};

mod common;
use common::{Gateway, ZoneFile};

/// One raw HTTP/1.1 request to `127.0.0.1:port` with exactly these header lines;
/// returns the status code and the body.
fn request(port: u16, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for h in headers {
        req += h;
        req += "\r\n";
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

/// A gateway of zone `plant-a` on `nats` with its admin endpoint on a free port, and
/// a link (so that accept-gap has something to name).
fn gateway(dir: &std::path::Path, nats: &NatsServer) -> (Gateway, u16) {
    let [port, admin, upstream] = common::free_ports::<3>();
    let config = ZoneFile::new("plant-a", nats)
        .consumer("reporting", "operational")
        .plaintext(port)
        .admin(admin)
        .link(
            "from-idmz",
            &format!("grpc://127.0.0.1:{upstream}"),
            "to-plant-a",
            "insecure = true\nsource_zone = \"idmz\"",
        )
        .write(&dir.join("zone.toml"));
    (
        Gateway::spawn(config, format!("grpc://127.0.0.1:{port}")),
        admin,
    )
}

#[test]
fn admin_requests_naming_another_host_or_coming_from_another_origin_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().unwrap();
    let (_gw, admin) = gateway(dir.path(), &nats);
    let own = format!("Host: 127.0.0.1:{admin}");
    let accept = "/links/from-idmz/accept-gap?from=1&to=2&by=mallory";

    // Its own name, in any of the loopback spellings, is served.
    assert_eq!(
        request(admin, "GET", "/healthz", &[&own]),
        (200, "ok\n".into())
    );
    let (code, body) = request(
        admin,
        "GET",
        "/status",
        &[&format!("Host: localhost:{admin}")],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("from-idmz"), "{body}");

    // A DNS name rebound to 127.0.0.1 (the page's own host name), or no Host at all.
    let (code, body) = request(
        admin,
        "GET",
        "/status",
        &[&format!("Host: evil.example:{admin}")],
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("Host must name this endpoint"), "{body}");
    let (code, _) = request(
        admin,
        "POST",
        accept,
        &[&format!("Host: evil.example:{admin}")],
    );
    assert_eq!(code, 403);
    let (code, _) = request(admin, "GET", "/metrics", &[]);
    assert_eq!(code, 403);

    // A web page of another origin posting to the right host.
    let (code, body) = request(
        admin,
        "POST",
        accept,
        &[&own, "Origin: http://evil.example"],
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("another origin"), "{body}");
    let (code, _) = request(admin, "POST", accept, &[&own, "Origin: null"]);
    assert_eq!(code, 403);
    let (code, _) = request(admin, "POST", accept, &[&own, "Sec-Fetch-Site: cross-site"]);
    assert_eq!(code, 403);

    // None of them reached the link: the operator's own request is answered by it
    // (there is no gap to accept, so it is refused for that reason, not for its
    // origin), and the same-origin spelling passes the guard too.
    let (code, body) = request(admin, "POST", accept, &[&own]);
    assert_eq!(code, 409, "{body}");
    let origin = format!("Origin: http://127.0.0.1:{admin}");
    let (code, body) = request(admin, "POST", accept, &[&own, &origin]);
    assert_eq!(code, 409, "{body}");
    // And the CLI still reaches it.
    let status = common::admin_status(admin);
    assert_eq!(status["zone"], "plant-a", "{status}");
}

#[test]
fn readyz_follows_the_zone_store_while_healthz_only_says_the_process_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start().unwrap();
    let (_gw, admin) = gateway(dir.path(), &nats);
    let own = format!("Host: 127.0.0.1:{admin}");
    assert_eq!(
        request(admin, "GET", "/readyz", &[&own]),
        (200, "ready\n".into())
    );

    nats.kill();
    let body = eventually_blocking("readyz to fail", Duration::from_secs(20), || match request(
        admin,
        "GET",
        "/readyz",
        &[&own],
    ) {
        (503, body) => Ok(body),
        other => Err(format!("{other:?}")),
    });
    assert!(body.contains("store does not answer"), "{body}");
    assert_eq!(request(admin, "GET", "/healthz", &[&own]).0, 200);

    nats.restart().unwrap();
    eventually_blocking(
        "readyz to recover",
        Duration::from_secs(30),
        || match request(admin, "GET", "/readyz", &[&own]) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}
