//! The admin endpoint of the real `bsfg` gateway: refused to web pages and to names
//! rebound to loopback, state-changing calls only with the zone's admin token, a
//! read-only metrics listener, and its health and readiness probes (HTTP and the gRPC
//! health service) against a real nats-server that dies and comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::time::Duration;

use bsfg_testkit::{NatsServer, eventually_blocking};

mod common;
use common::{ADMIN_TOKEN, Gateway, ZoneFile};

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

/// A gateway of zone `plant-a` on `nats` with its admin endpoint (and token) on a
/// free port, and a link (so that accept-gap has something to name).
fn gateway(dir: &std::path::Path, nats: &NatsServer) -> (Gateway, u16) {
    gateway_with(dir, nats, "token_file = \"admin.token\"")
}

/// The same with these `[admin]` keys besides `listen`.
fn gateway_with(dir: &std::path::Path, nats: &NatsServer, keys: &str) -> (Gateway, u16) {
    let [port, admin, upstream] = common::free_ports::<3>();
    let config = ZoneFile::new("plant-a", nats)
        .consumer("reporting", "operational")
        .plaintext(port)
        .admin_keys(admin, keys)
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

    // Not even with the token.
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let (code, _) = request(
        admin,
        "POST",
        accept,
        &[&own, "Origin: http://evil.example", &bearer],
    );
    assert_eq!(code, 403);

    // None of them reached the link: the operator's own request is answered by it
    // (there is no gap to accept, so it is refused for that reason, not for its
    // origin), and the same-origin spelling passes the guard too.
    let (code, body) = request(admin, "POST", accept, &[&own, &bearer]);
    assert_eq!(code, 409, "{body}");
    let origin = format!("Origin: http://127.0.0.1:{admin}");
    let (code, body) = request(admin, "POST", accept, &[&own, &origin, &bearer]);
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

#[test]
fn state_changing_admin_calls_need_the_zone_admin_token_and_reads_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().unwrap();
    let (gw, admin) = gateway(dir.path(), &nats);
    let own = format!("Host: 127.0.0.1:{admin}");
    let accept = "/links/from-idmz/accept-gap?from=1&to=2&by=mallory";
    let release = "/quarantine/release?id=x&by=mallory";

    for path in [accept, release, "/quarantine/drop?id=x&by=mallory"] {
        // No credential: 401 with the scheme to use.
        let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nConnection: close\r\n{own}\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        assert!(raw.starts_with("HTTP/1.1 401"), "{path}: {raw}");
        assert!(
            raw.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{raw}"
        );
        assert!(raw.contains("need the admin token"), "{raw}");
        // Another token, a token of another scheme, a token with something after it.
        for auth in [
            "Authorization: Bearer 0123456789abcdef0123456789abcdef0123".to_owned(),
            format!("Authorization: Basic {ADMIN_TOKEN}"),
            format!("Authorization: Bearer {ADMIN_TOKEN}x"),
            format!(
                "Authorization: Bearer {}",
                &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]
            ),
        ] {
            let (code, body) = request(admin, "POST", path, &[&own, &auth]);
            assert!(code == 403 || code == 401, "{path} {auth}: {code} {body}");
        }
    }
    // The right token reaches the handlers (nothing to accept or release here).
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}");
    assert_eq!(request(admin, "POST", accept, &[&own, &bearer]).0, 409);
    let (code, body) = request(admin, "POST", release, &[&own, &bearer]);
    assert!(code == 404 || code == 409, "{code} {body}");
    // Reads need none.
    for path in ["/status", "/metrics", "/quarantine", "/healthz", "/readyz"] {
        assert_eq!(request(admin, "GET", path, &[&own]).0, 200, "{path}");
    }

    // The CLI: with the token file (here from BSFG_ADMIN_TOKEN_FILE) the request is
    // the link's to refuse; without one it is refused for the credential.
    let url = format!("http://127.0.0.1:{admin}");
    let args = [
        "link",
        "accept-gap",
        "--admin",
        &url,
        "--link",
        "from-idmz",
        "--from",
        "1",
        "--to",
        "2",
    ];
    let with = gw.bsfg(&args);
    assert!(!with.status.success());
    let err = String::from_utf8_lossy(&with.stderr);
    assert!(!err.contains("admin token"), "{err}");
    assert!(err.contains("not gapped") || err.contains("gap"), "{err}");
    let without = std::process::Command::new(common::BSFG)
        .args(args)
        .env_remove("BSFG_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(!without.status.success());
    let err = String::from_utf8_lossy(&without.stderr);
    assert!(err.contains("need the admin token"), "{err}");
    // --config finds the token through [admin] token_file.
    let by_config = std::process::Command::new(common::BSFG)
        .args(["link", "accept-gap", "--config"])
        .arg(&gw.config)
        .args(["--link", "from-idmz", "--from", "1", "--to", "2"])
        .env_remove("BSFG_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&by_config.stderr);
    assert!(
        !by_config.status.success() && !err.contains("admin token"),
        "{err}"
    );
}

#[test]
fn a_gateway_without_an_admin_token_refuses_every_state_changing_call() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().unwrap();
    let (_gw, admin) = gateway_with(dir.path(), &nats, "");
    let own = format!("Host: 127.0.0.1:{admin}");
    for auth in [
        "X-None: 1".to_owned(),
        format!("Authorization: Bearer {ADMIN_TOKEN}"),
    ] {
        let (code, body) = request(
            admin,
            "POST",
            "/links/from-idmz/accept-gap?from=1&to=2&by=x",
            &[&own, &auth],
        );
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("no [admin] token_file"), "{body}");
    }
    assert_eq!(request(admin, "GET", "/status", &[&own]).0, 200);
}

#[test]
fn the_metrics_listener_serves_metrics_and_probes_to_any_host_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().unwrap();
    let metrics = common::free_port();
    let (_gw, _admin) = gateway_with(
        dir.path(),
        &nats,
        &format!("token_file = \"admin.token\"\nmetrics_listen = \"127.0.0.1:{metrics}\""),
    );
    // A scraper on another host names this one as it knows it.
    let host = "Host: gateway.plant.example:9465";
    let (code, body) = request(metrics, "GET", "/metrics", &[host]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("bsfg_link_state{"), "{body}");
    assert_eq!(request(metrics, "GET", "/healthz", &[host]).0, 200);
    assert_eq!(request(metrics, "GET", "/readyz", &[host]).0, 200);
    // Status, the quarantine and every state change are not there, token or not.
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}");
    for (method, path) in [
        ("GET", "/status"),
        ("GET", "/quarantine"),
        ("POST", "/links/from-idmz/accept-gap?from=1&to=2&by=x"),
        ("POST", "/quarantine/release?id=x&by=x"),
        ("POST", "/metrics"),
    ] {
        let (code, _) = request(metrics, method, path, &[host, &bearer]);
        assert!(code == 404 || code == 405, "{method} {path}: {code}");
    }
}

/// The gRPC health service's answer for `service` on the gateway at `url`.
async fn grpc_health(url: &str, service: &str) -> Result<i32, String> {
    let channel = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_health_service_says_not_serving_while_the_zone_store_is_down() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start().unwrap();
    let (gw, _admin) = gateway(dir.path(), &nats);
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    let wait_for = |want: i32, what: &'static str| {
        let url = gw.url.clone();
        async move {
            bsfg_testkit::eventually(what, Duration::from_secs(30), || {
                let url = url.clone();
                async move {
                    for service in ["", "bsfg.v1.Boundary"] {
                        match grpc_health(&url, service).await {
                            Ok(s) if s == want => {}
                            other => return Err(format!("{service:?}: {other:?}")),
                        }
                    }
                    Ok(())
                }
            })
            .await
        }
    };
    wait_for(serving, "SERVING at start").await;
    nats.kill();
    wait_for(not_serving, "NOT_SERVING with the store down").await;
    nats.restart().unwrap();
    wait_for(serving, "SERVING again").await;
}
