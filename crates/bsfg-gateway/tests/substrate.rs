//! The zone's substrate is locked: the gateway connects to a nats-server that admits
//! only its user (`[sink] user` + `password_file`), and a local process without the
//! gateway's credentials, or with another user's, cannot write facts, reserve ids or
//! call the JetStream API of the zone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bsfg_testkit::{NatsOptions, NatsServer};
use common::{BSFG, Gateway, ZoneFile, text};

const GATEWAY_PASSWORD: &str = "gateway-password-0123456789abcdef";
const APP_PASSWORD: &str = "app-password-0123456789";

/// A nats-server whose only users are the gateway's (everything) and an application's
/// (its own `app.>` subjects and inboxes only).
fn locked_nats() -> NatsServer {
    NatsServer::start_with(NatsOptions {
        extra_config: format!(
            r#"authorization {{
  users = [
    {{ user: "bsfg", password: "{GATEWAY_PASSWORD}" }}
    {{ user: "app", password: "{APP_PASSWORD}", permissions: {{
        publish: ["app.>", "_INBOX.>"], subscribe: ["app.>", "_INBOX.>"] }} }}
  ]
}}"#
        ),
        ..Default::default()
    })
    .unwrap()
}

fn secret(path: &Path, text: &str) {
    std::fs::write(path, format!("{text}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

async fn as_gateway(nats: &NatsServer) -> async_nats::jetstream::Context {
    let client =
        async_nats::ConnectOptions::with_user_and_password("bsfg".into(), GATEWAY_PASSWORD.into())
            .connect(nats.url())
            .await
            .unwrap();
    async_nats::jetstream::new(client)
}

async fn log_messages(js: &async_nats::jetstream::Context) -> u64 {
    js.get_stream("bsfg_log")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_gateway_user_can_touch_the_zone_streams() {
    let dir = tempfile::tempdir().unwrap();
    let nats = locked_nats();
    secret(&dir.path().join("nats.password"), GATEWAY_PASSWORD);
    let port = common::free_port();
    let config = ZoneFile::new("plant-a", &nats)
        .sink_keys("user = \"bsfg\"\npassword_file = \"nats.password\"")
        .consumer("reporting", "operational")
        .plaintext(port)
        .write(&dir.path().join("zone.toml"));
    let gw = Gateway::spawn(config, format!("grpc://127.0.0.1:{port}"));
    let out = gw.bsfg(&[
        "append",
        "--message-id",
        "plant:1",
        "--from",
        "plant-a",
        "--to",
        "enterprise",
        "--subject",
        "batch:B1",
        "--predicate",
        "step_completed",
        "--object",
        "{\"step\":1}",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let js = as_gateway(&nats).await;
    let before = log_messages(&js).await;
    assert!(before > 0, "the gateway stored through its user");

    // No credentials, or the gateway's user with another password: refused at connect.
    let anonymous = async_nats::connect(nats.url()).await;
    let err = anonymous.expect_err("a process without credentials is refused");
    assert_eq!(
        err.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation,
        "{err}"
    );
    let guessed = async_nats::ConnectOptions::with_user_and_password("bsfg".into(), "guess".into())
        .connect(nats.url())
        .await;
    assert_eq!(
        guessed.expect_err("a wrong password is refused").kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation
    );

    // Another user of the same server: every publish outside its subjects is refused
    // (a permissions violation), the JetStream API does not answer it.
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = violations.clone();
    let app = async_nats::ConnectOptions::with_user_and_password("app".into(), APP_PASSWORD.into())
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        })
        .request_timeout(Some(Duration::from_secs(2)))
        .connect(nats.url())
        .await
        .unwrap();
    for subject in [
        "bsfg.log.facts.operational.batch.x",
        "bsfg.log.ids.00",
        "bsfg.log.head.operational",
        "$JS.API.STREAM.PURGE.bsfg_log",
        "$JS.ACK.bsfg_log.reporting.1.1.1.1.0",
    ] {
        app.publish(subject, "intruder".into()).await.unwrap();
    }
    app.flush().await.unwrap();
    let app_js = async_nats::jetstream::new(app.clone());
    assert!(
        app_js.get_stream("bsfg_log").await.is_err(),
        "the JetStream API answers only the gateway's user"
    );
    let acked = match app_js
        .publish("bsfg.log.facts.operational.batch.x", "intruder".into())
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!acked, "no stream acknowledges another user's fact");
    let deadline = Instant::now() + Duration::from_secs(10);
    while violations.lock().unwrap().len() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let violations = violations.lock().unwrap().clone();
    for subject in ["bsfg.log.facts.", "bsfg.log.ids.", "$JS.API.STREAM.PURGE"] {
        assert!(
            violations
                .iter()
                .any(|v| v.to_lowercase().contains("permissions violation") && v.contains(subject)),
            "{subject}: {violations:?}"
        );
    }
    assert_eq!(log_messages(&js).await, before, "nothing reached the log");
    // And the gateway still serves.
    let out = gw.bsfg(&["fetch", "--consumer", "reporting", "--limit", "10"]);
    assert!(
        out.status.success() && text(&out.stdout).contains("plant:1"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn a_gateway_with_an_nkey_seed_connects_to_a_server_that_knows_only_its_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_with(NatsOptions {
        extra_config: format!(
            "authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}",
            user.public_key()
        ),
        ..Default::default()
    })
    .unwrap();
    secret(&dir.path().join("bsfg.nk"), &user.seed().unwrap());
    let port = common::free_port();
    let config = ZoneFile::new("plant-a", &nats)
        .sink_keys("nkey_seed_file = \"bsfg.nk\"")
        .consumer("reporting", "operational")
        .plaintext(port)
        .write(&dir.path().join("zone.toml"));
    let gw = Gateway::spawn(config, format!("grpc://127.0.0.1:{port}"));
    let out = gw.bsfg(&[
        "append",
        "--message-id",
        "plant:nk",
        "--from",
        "plant-a",
        "--to",
        "enterprise",
        "--subject",
        "batch:B1",
        "--predicate",
        "step_completed",
        "--object",
        "{}",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = gw.bsfg(&["fetch", "--consumer", "reporting"]);
    assert!(
        text(&out.stdout).contains("plant:nk"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_gateway_without_the_credentials_of_its_locked_server_does_not_start_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let nats = locked_nats();
    let port = common::free_port();
    let config = ZoneFile::new("plant-a", &nats)
        .plaintext(port)
        .write(&dir.path().join("zone.toml"));
    let mut child = Command::new(BSFG)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the gateway kept running");
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    assert!(!status.success());
    let err = text(&out.stderr);
    assert!(err.contains("authorization violation"), "{err}");
}
