//! Zone identity and authorization on a real `bsfg` gateway with a mutual-TLS
//! listener, certificates made by `bsfg certs`: every hostile or mistaken call is
//! refused with a clear status and reason, logged with the identity, counted in a
//! metric, and a well-behaved peer is served right after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bsfg_core::{ArtifactRef, BoundaryApi, BoundaryError, FetchRequest, Message, Reason};
use bsfg_testkit::{NatsServer, fixtures, http_get};
use bsfg_tls::{ALPN_H2, Anchor, ClientTls, IdentityFrom, TlsFiles};
use bsfg_transport_grpc::{ClientConfig, GrpcClient};
use common::{BSFG, Gateway, ZoneFile, free_ports, text};

fn bsfg(args: &[&str]) {
    let o = Command::new(BSFG).args(args).output().unwrap();
    assert!(o.status.success(), "bsfg {args:?}: {}", text(&o.stderr));
}

/// Zone CAs for plant, idmz and a rogue one, and the certificates the tests present.
fn pki(dir: &Path) {
    let d = |z: &str| dir.join(z).to_string_lossy().into_owned();
    for zone in ["plant", "idmz", "rogue"] {
        bsfg(&["certs", "init", "--zone", zone, "--dir", &d(zone)]);
    }
    let issue = |zone: &str, name: &str, extra: &[&str]| {
        let dir = d(zone);
        let mut args = vec!["certs", "issue", "--dir", &dir, "--name", name, "--client"];
        args.extend_from_slice(extra);
        bsfg(&args);
    };
    issue("plant", "plant-bsfg", &["--server", "--ip", "127.0.0.1"]);
    issue("idmz", "idmz-bsfg", &["--server", "--ip", "127.0.0.1"]);
    // A second instance of the idmz reader, granted the same consumer.
    issue("idmz", "idmz-backup", &[]);
    // The right name from the wrong CAs: unknown to the plant, and the plant's own.
    issue("rogue", "idmz-bsfg", &[]);
    issue("plant", "idmz-bsfg", &[]);
}

struct Plant {
    gw: Gateway,
    tls_port: u16,
    plain_port: u16,
    admin: u16,
    dir: tempfile::TempDir,
    _nats: NatsServer,
}

const PEERS: &str = r#"
[[peers]]
identity = "idmz-bsfg"
ca = "idmz"
claim_from_zones = ["idmz"]
to_zones = ["plant"]
consumers = ["to-idmz"]
put_buckets = ["batch-files"]

[[peers]]
identity = "idmz-backup"
ca = "idmz"
consumers = ["to-idmz"]
"#;

fn plant() -> Plant {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let nats = NatsServer::start().unwrap();
    let [tls_port, plain_port, admin] = free_ports();
    let config = ZoneFile::new("plant", &nats)
        .section("[limits]\nmax_fact_bytes = 4096")
        .consumer("to-idmz", "operational")
        .section("[[consumers]]\nname = \"to-enterprise\"\nclass = \"operational\"")
        .section(&format!(
            "[[listeners]]\nurl = \"grpcs://127.0.0.1:{tls_port}\"\nmax_message_bytes = 16384\nidle_timeout = \"1s\"\nhandshake_timeout = \"1s\""
        ))
        .plaintext(plain_port)
        .section(
            r#"[tls]
cert = "plant/plant-bsfg.pem"
key = "plant/plant-bsfg.key"
reload_interval = "1s"
trust = { plant = "plant/ca.pem", idmz = "idmz/ca.pem" }"#,
        )
        .section(PEERS)
        .admin(admin)
        .write(&dir.path().join("plant.toml"));
    let gw = Gateway::spawn(config, format!("grpcs://127.0.0.1:{tls_port}"));
    Plant {
        gw,
        tls_port,
        plain_port,
        admin,
        dir,
        _nats: nats,
    }
}

fn client_tls(dir: &Path, issuer: &str, name: &str) -> Arc<ClientTls> {
    let files = TlsFiles {
        cert: dir.join(issuer).join(format!("{name}.pem")),
        key: dir.join(issuer).join(format!("{name}.key")),
        trust: vec![Anchor {
            name: "plant".into(),
            path: dir.join("plant/ca.pem"),
        }],
        identity_from: IdentityFrom::San,
    };
    ClientTls::new(files, vec![ALPN_H2.to_vec()], "test", Arc::default()).unwrap()
}

fn quick() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    }
}

impl Plant {
    /// A peer presenting `issuer`'s certificate for `name`.
    fn peer(&self, issuer: &str, name: &str) -> GrpcClient {
        let url = format!("grpcs://127.0.0.1:{}", self.tls_port);
        GrpcClient::connect_lazy_tls(
            &url,
            quick(),
            client_tls(self.dir.path(), issuer, name),
            None,
        )
        .unwrap()
    }

    /// The well-behaved peer: idmz's gateway.
    fn idmz(&self) -> GrpcClient {
        self.peer("idmz", "idmz-bsfg")
    }

    /// A local producer on the plaintext loopback listener.
    fn local(&self) -> GrpcClient {
        GrpcClient::connect_lazy(&format!("grpc://127.0.0.1:{}", self.plain_port), quick()).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.gw.config.with_extension("log")).unwrap_or_default()
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)], at_least: u64) -> u64 {
        counter(self.admin, name, labels, at_least)
    }

    /// The gateway still serves a well-behaved peer.
    async fn still_serves_idmz(&self, id: &str) {
        let out = self.idmz().append_fact(from_idmz(id)).await;
        assert!(out.is_ok(), "the good peer must still be served: {out:?}");
    }
}

/// The value of the counter `name` (summed over the rows whose labels include
/// `labels`) on the admin endpoint at `admin`, waiting up to 5 s for it to reach
/// `at_least`.
fn counter(admin: u16, name: &str, labels: &[(&str, &str)], at_least: u64) -> u64 {
    let read = || {
        let (_, body) = http_get(admin, "/metrics").unwrap();
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    bsfg_testkit::eventually_blocking(name, Duration::from_secs(5), || {
        let v = read();
        (v >= at_least).then_some(v).ok_or(format!("{v}"))
    })
}

fn from_idmz(id: &str) -> Message {
    let mut m = fixtures::step_completed(id, 1);
    m.envelope.from_zone = "idmz".into();
    m.envelope.to_zone = "plant".into();
    m
}

fn denied(r: Result<impl std::fmt::Debug, BoundaryError>, needle: &str) {
    match r {
        Err(BoundaryError::PermissionDenied(m)) => {
            assert!(m.contains(needle), "reason `{m}` should mention `{needle}`");
        }
        other => panic!("expected permission_denied ({needle}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_an_unknown_ca_is_refused_at_the_handshake() {
    let p = plant();
    let r = p
        .peer("rogue", "idmz-bsfg")
        .append_fact(from_idmz("r-1"))
        .await;
    assert!(
        matches!(&r, Err(e) if e.reason() == Reason::Unavailable),
        "{r:?}"
    );
    let n = p.counter(
        "bsfg_tls_handshake_failures_total",
        &[("reason", "unknown_ca")],
        1,
    );
    assert!(n >= 1, "unknown_ca is counted");
    let log = p.log();
    assert!(
        log.contains("presented_identity=idmz-bsfg") && log.contains("UnknownIssuer"),
        "the rejection is logged with the identity it claimed:\n{log}"
    );
    p.still_serves_idmz("r-ok").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_client_certificate_is_refused() {
    let p = plant();
    let d = p.dir.path().join("idmz").to_string_lossy().into_owned();
    bsfg(&[
        "certs",
        "issue",
        "--dir",
        &d,
        "--name",
        "idmz-late",
        "--client",
        "--valid-for",
        "1s",
    ]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = p
        .peer("idmz", "idmz-late")
        .append_fact(from_idmz("e-1"))
        .await;
    assert!(r.is_err(), "{r:?}");
    let n = p.counter(
        "bsfg_tls_handshake_failures_total",
        &[("reason", "expired_certificate")],
        1,
    );
    assert!(n >= 1, "expired_certificate is counted");
    assert!(p.log().contains("presented_identity=idmz-late"));
    p.still_serves_idmz("e-ok").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_may_not_claim_or_target_zones_outside_its_grant() {
    let p = plant();
    let idmz = p.idmz();
    let mut claim = from_idmz("c-1");
    claim.envelope.from_zone = "plant".into();
    denied(
        idmz.append_fact(claim).await,
        "envelope.from_zone: `idmz-bsfg` may not claim zone `plant`",
    );
    let mut target = from_idmz("c-2");
    target.envelope.to_zone = "enterprise".into();
    denied(idmz.append_fact(target).await, "envelope.to_zone");
    let n = p.counter(
        "bsfg_authz_denials_total",
        &[("peer", "idmz-bsfg"), ("operation", "append")],
        2,
    );
    assert_eq!(n, 2);
    let log = p.log();
    assert!(
        log.contains("request denied peer=idmz-bsfg operation=\"append\""),
        "{log}"
    );
    // Nothing of the refused appends was stored: the same ids go through now.
    p.still_serves_idmz("c-1").await;
    p.still_serves_idmz("c-2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_is_believed_only_from_its_own_zone_ca() {
    let p = plant();
    // A valid chain (the plant trusts its own CA) naming idmz-bsfg: no grant.
    let forged = p.peer("plant", "idmz-bsfg");
    denied(
        forged.append_fact(from_idmz("f-1")).await,
        "issued by CA `idmz`",
    );
    denied(
        forged
            .fetch_facts(FetchRequest {
                consumer: "to-idmz".into(),
                limit: 10,
                wait: Duration::ZERO,
            })
            .await,
        "issued by CA `idmz`",
    );
    assert!(p.counter("bsfg_authz_denials_total", &[("peer", "idmz-bsfg")], 2) >= 2);
    p.still_serves_idmz("f-ok").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fetching_or_confirming_another_zones_consumer_is_denied() {
    let p = plant();
    p.local()
        .append_fact(fixtures::step_completed("k-1", 1))
        .await
        .unwrap();
    let idmz = p.idmz();
    let req = |consumer: &str| FetchRequest {
        consumer: consumer.into(),
        limit: 10,
        wait: Duration::from_millis(500),
    };
    denied(
        idmz.fetch_facts(req("to-enterprise")).await,
        "may not use consumer `to-enterprise`",
    );
    denied(
        idmz.confirm_receipt("to-enterprise", 1).await,
        "may not use consumer `to-enterprise`",
    );
    assert_eq!(
        p.counter(
            "bsfg_authz_denials_total",
            &[("peer", "idmz-bsfg"), ("operation", "fetch")],
            1
        ),
        1
    );
    assert_eq!(
        p.counter(
            "bsfg_authz_denials_total",
            &[("peer", "idmz-bsfg"), ("operation", "confirm")],
            1
        ),
        1
    );
    // Its own consumer works, and the other zone's consumer was not moved.
    let page = idmz.fetch_facts(req("to-idmz")).await.unwrap();
    assert_eq!(page.facts.len(), 1);
    idmz.confirm_receipt("to-idmz", page.last_offset)
        .await
        .unwrap();
    let theirs = p.local().fetch_facts(req("to-enterprise")).await.unwrap();
    assert_eq!(theirs.frontier, 0, "a denied confirm moves nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_cannot_confirm_a_page_another_identity_fetched_on_a_shared_consumer() {
    let p = plant();
    p.local()
        .append_fact(fixtures::step_completed("s-1", 1))
        .await
        .unwrap();
    let (idmz, backup) = (p.idmz(), p.peer("idmz", "idmz-backup"));
    let page = idmz
        .fetch_facts(FetchRequest {
            consumer: "to-idmz".into(),
            limit: 10,
            wait: Duration::from_millis(500),
        })
        .await
        .unwrap();
    let last = page.facts.last().map(|f| f.offset).unwrap();
    // Granted the consumer, but not delivered this page: refused, nothing moves.
    for other in [&backup, &p.local()] {
        let e = other.confirm_receipt("to-idmz", last).await.unwrap_err();
        assert_eq!(e.reason(), bsfg_core::Reason::FailedPrecondition, "{e}");
        assert!(
            e.to_string().contains("to-idmz") && e.to_string().contains(&format!("offset {last}")),
            "{e}"
        );
    }
    assert_eq!(
        backup
            .fetch_facts(FetchRequest {
                consumer: "to-idmz".into(),
                limit: 10,
                wait: Duration::ZERO,
            })
            .await
            .unwrap()
            .frontier,
        0
    );
    assert_eq!(
        idmz.confirm_receipt("to-idmz", last).await.unwrap().offset,
        last
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_without_a_grant_can_be_neither_written_nor_read() {
    let p = plant();
    let idmz = p.idmz();
    let body = || -> bsfg_core::ByteStream {
        Box::pin(futures::stream::iter([Ok(bytes::Bytes::from_static(
            b"recipe v1",
        ))]))
    };
    denied(
        idmz.put_object("recipes", "r1.csv", body()).await,
        "may not put into bucket `recipes`",
    );
    // A granted bucket works.
    let info = idmz
        .put_object("batch-files", "b1.csv", body())
        .await
        .unwrap();
    // A fact referencing it, appended locally, would show idmz an artifact in a
    // bucket it has no read grant for: the page is refused, not confirmed.
    let mut m = fixtures::step_completed("a-1", 1);
    m.envelope.object_media_type = Some("text/csv".into());
    m.fact.artifacts = vec![ArtifactRef {
        bucket: info.bucket.clone(),
        key: info.key.clone(),
        digest: info.digest.clone(),
        size: info.size,
    }];
    p.local().append_fact(m).await.unwrap();
    denied(
        idmz.fetch_facts(FetchRequest {
            consumer: "to-idmz".into(),
            limit: 10,
            wait: Duration::from_millis(500),
        })
        .await,
        "may not read bucket `batch-files`",
    );
    assert!(
        p.counter(
            "bsfg_authz_denials_total",
            &[("peer", "idmz-bsfg"), ("operation", "put_object")],
            1
        ) >= 1
    );
    assert!(
        p.counter(
            "bsfg_authz_denials_total",
            &[("peer", "idmz-bsfg"), ("operation", "fetch")],
            1
        ) >= 1
    );
    p.still_serves_idmz("b-ok").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_to_the_tls_port_is_refused() {
    let p = plant();
    let plain =
        GrpcClient::connect_lazy(&format!("grpc://127.0.0.1:{}", p.tls_port), quick()).unwrap();
    let r = plain.append_fact(from_idmz("p-1")).await;
    assert!(r.is_err(), "{r:?}");
    assert!(
        p.counter(
            "bsfg_tls_handshake_failures_total",
            &[("reason", "not_tls")],
            1
        ) >= 1
    );
    assert!(p.log().contains("reason=\"not_tls\""), "{}", p.log());
    p.still_serves_idmz("p-ok").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_message_is_refused_before_it_is_decoded() {
    let p = plant();
    let mut big = from_idmz("o-1");
    big.fact.object_json = format!(r#"{{"pad":"{}"}}"#, "x".repeat(64 * 1024));
    let r = p.idmz().append_fact(big).await;
    assert!(r.is_err(), "{r:?}");
    assert!(
        r.unwrap_err()
            .to_string()
            .contains("message length too large"),
        "the status says why"
    );
    assert_eq!(
        p.counter(
            "bsfg_requests_refused_total",
            &[("peer", "idmz-bsfg"), ("code", "out_of_range")],
            1
        ),
        1
    );
    p.still_serves_idmz("o-ok").await;
}

/// Sends raw bytes as a gRPC message, whatever they are.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;
impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}
impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}
impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_protobuf_is_refused_and_harms_nothing() {
    let p = plant();
    let url = format!("grpcs://127.0.0.1:{}", p.tls_port);
    let channel = bsfg_transport_grpc::tls_channel(
        &url,
        &quick(),
        client_tls(p.dir.path(), "idmz", "idmz-bsfg"),
        None,
    )
    .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for garbage in [
        vec![0xff; 16],
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        b"\x0a\x05hello".to_vec(),
    ] {
        grpc.ready().await.unwrap();
        let r = grpc
            .unary(
                tonic::Request::new(garbage),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/bsfg.v1.Boundary/AppendFact",
                ),
                RawCodec,
            )
            .await;
        let status = r.expect_err("garbage must not be accepted");
        assert!(
            matches!(
                status.code(),
                tonic::Code::Internal | tonic::Code::InvalidArgument
            ),
            "{status:?}"
        );
    }
    assert!(p.counter("bsfg_requests_refused_total", &[("peer", "idmz-bsfg")], 3) >= 3);
    p.still_serves_idmz("m-ok").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_connects_or_opens_a_stream_and_never_sends_is_cut_off() {
    let p = plant();
    // Connects and never starts TLS.
    let silent = tokio::net::TcpStream::connect(("127.0.0.1", p.tls_port))
        .await
        .unwrap();
    assert!(
        p.counter(
            "bsfg_tls_handshake_failures_total",
            &[("reason", "handshake_timeout")],
            1
        ) >= 1
    );
    drop(silent);
    // Opens a PutObject stream, sends the header, then nothing.
    let t = Instant::now();
    let never: bsfg_core::ByteStream = Box::pin(futures::stream::pending());
    let r = p.idmz().put_object("batch-files", "slow.bin", never).await;
    match r {
        Err(BoundaryError::InvalidArgument { field, rule }) => {
            assert_eq!(field, "chunk");
            assert!(rule.contains("no data for"), "{rule}");
        }
        other => panic!("expected the idle upload to be cut off, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(
        p.counter(
            "bsfg_requests_refused_total",
            &[("peer", "idmz-bsfg"), ("code", "invalid_argument")],
            1
        ) >= 1
    );
    p.still_serves_idmz("s-ok").await;
}

fn ids_at(url: &str, consumer: &str, expected: usize) -> Vec<String> {
    let rt = tokio::runtime::Handle::current();
    let c = GrpcClient::connect_lazy(url, quick()).unwrap();
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids.len() < expected && Instant::now() < deadline {
        let page = tokio::task::block_in_place(|| {
            rt.block_on(c.fetch_facts(FetchRequest {
                consumer: consumer.into(),
                limit: 500,
                wait: Duration::from_millis(500),
            }))
        })
        .unwrap();
        if page.facts.is_empty() {
            continue;
        }
        ids.extend(
            page.facts
                .iter()
                .map(|f| f.message.envelope.message_id.clone()),
        );
        let last = page.facts.last().map_or(0, |f| f.offset);
        tokio::task::block_in_place(|| rt.block_on(c.confirm_receipt(consumer, last))).unwrap();
    }
    // Anything beyond would be a duplicate: look once more.
    let extra = tokio::task::block_in_place(|| {
        rt.block_on(c.fetch_facts(FetchRequest {
            consumer: consumer.into(),
            limit: 500,
            wait: Duration::from_millis(1500),
        }))
    })
    .unwrap();
    ids.extend(
        extra
            .facts
            .iter()
            .map(|f| f.message.envelope.message_id.clone()),
    );
    ids
}

fn not_after_of(pem: &Path) -> i64 {
    let bytes = std::fs::read(pem).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&bytes).unwrap();
    let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
    c.validity().not_after.timestamp()
}

use rustls_pki_types::pem::PemObject as _;

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotated_during_replication_lose_nothing() {
    // The plant serves over mTLS; idmz pulls from it with a grpcs link.
    let p = plant();
    let nats = NatsServer::start().unwrap();
    let [plain, admin] = free_ports();
    let cfg = p.dir.path().join("idmz.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[zone]
name = "idmz"

[sink]
type = "jetstream"
url = "{url}"
monitor_url = "{monitor}"

[[consumers]]
name = "check"
class = "operational"

[[listeners]]
url = "grpc://127.0.0.1:{plain}"
insecure = true

[[links]]
name = "from-plant"
source = "grpcs://127.0.0.1:{tls}"
ca = "plant"
consumer = "to-idmz"
classes = ["operational"]
wait = "200ms"
backoff_min = "50ms"
backoff_max = "500ms"
request_timeout = "3s"

[tls]
cert = "idmz/idmz-bsfg.pem"
key = "idmz/idmz-bsfg.key"
reload_interval = "1s"
trust = {{ plant = "plant/ca.pem", idmz = "idmz/ca.pem" }}

[admin]
listen = "127.0.0.1:{admin}"
"#,
            url = nats.url(),
            monitor = nats.monitor_url(),
            tls = p.tls_port,
        ),
    )
    .unwrap();
    let _idmz = Gateway::spawn(cfg, format!("grpc://127.0.0.1:{plain}"));

    let plant_dir = p.dir.path().join("plant");
    let idmz_dir = p.dir.path().join("idmz");
    let old_server = not_after_of(&plant_dir.join("plant-bsfg.pem"));
    let producer = {
        let local = p.local();
        tokio::spawn(async move {
            for i in 0..600 {
                local
                    .append_fact(fixtures::step_completed(&format!("rot-{i}"), i))
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Rotate both ends while facts flow: new keys, new validity, same CAs.
    let (pd, id) = (
        plant_dir.to_string_lossy().into_owned(),
        idmz_dir.to_string_lossy().into_owned(),
    );
    bsfg(&[
        "certs",
        "issue",
        "--dir",
        &pd,
        "--name",
        "plant-bsfg",
        "--server",
        "--client",
        "--ip",
        "127.0.0.1",
        "--valid-for",
        "30d",
        "--force",
    ]);
    bsfg(&[
        "certs",
        "issue",
        "--dir",
        &id,
        "--name",
        "idmz-bsfg",
        "--server",
        "--client",
        "--ip",
        "127.0.0.1",
        "--valid-for",
        "30d",
        "--force",
    ]);
    let new_server = not_after_of(&plant_dir.join("plant-bsfg.pem"));
    assert_ne!(old_server, new_server);
    assert!(
        p.counter("bsfg_tls_reloads_total", &[], 1) >= 1,
        "plant reloaded"
    );
    let expiry = p.counter(
        "bsfg_certificate_expiry_timestamp_seconds",
        &[("role", "cert"), ("name", "plant-bsfg")],
        u64::try_from(new_server).unwrap(),
    );
    assert_eq!(
        expiry,
        u64::try_from(new_server).unwrap(),
        "the metric shows the new certificate"
    );
    // A new connection is served with the new certificate, without a restart.
    let tls = client_tls(p.dir.path(), "idmz", "idmz-bsfg");
    let s = tls
        .connect(&format!("127.0.0.1:{}", p.tls_port), "127.0.0.1")
        .await
        .unwrap();
    let served = s.get_ref().get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, c) = x509_parser::parse_x509_certificate(&served).unwrap();
    assert_eq!(c.validity().not_after.timestamp(), new_server);

    producer.await.unwrap();
    let ids = ids_at(&format!("grpc://127.0.0.1:{plain}"), "check", 600);
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), 600, "every fact arrived once");
    assert_eq!(unique.len(), 600, "no fact arrived twice");
}

#[test]
fn the_three_zone_example_validates_with_the_certificates_make_certs_makes() {
    // The example's layout (its policies name ../../plugins/...), with the
    // repository's built plugins linked in.
    let root = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::os::unix::fs::symlink(repo.join("plugins"), root.path().join("plugins")).unwrap();
    let dir = root.path().join("examples/three-zones");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(repo.join("examples/three-zones")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let o = Command::new("bash")
        .arg(dir.as_path().join("make-certs.sh"))
        .arg(BSFG)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    for zone in ["plant", "idmz", "enterprise"] {
        let config = dir.as_path().join(format!("{zone}.toml"));
        let o = Command::new(BSFG)
            .args(["validate", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{zone}: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
}

#[test]
fn the_cluster_zone_example_validates_and_lists_every_node() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let config = repo.join("examples/cluster-zone/plant.toml");
    let o = Command::new(BSFG)
        .args(["validate", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("nats://127.0.0.1:4221,nats://127.0.0.1:4222,nats://127.0.0.1:4223"),
        "{out}"
    );
    assert!(!out.contains("URL is invalid"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn withdrawing_the_source_ca_stops_a_running_link_within_the_reload_interval_and_restoring_it_resumes()
 {
    let p = plant();
    let nats = NatsServer::start().unwrap();
    let [plain, admin] = free_ports();
    // The idmz trusts the plant through its own copy of the plant CA.
    let trust = p.dir.path().join("idmz-trust");
    std::fs::create_dir_all(&trust).unwrap();
    let plant_ca = std::fs::read(p.dir.path().join("plant/ca.pem")).unwrap();
    std::fs::write(trust.join("plant-ca.pem"), &plant_ca).unwrap();
    let cfg = ZoneFile::new("idmz", &nats)
        .consumer("check", "operational")
        .plaintext(plain)
        .link(
            "from-plant",
            &format!("grpcs://127.0.0.1:{}", p.tls_port),
            "to-idmz",
            "ca = \"plant\"\nclasses = [\"operational\"]\nwait = \"200ms\"\nrequest_timeout = \"3s\"",
        )
        .section(
            r#"[tls]
cert = "idmz/idmz-bsfg.pem"
key = "idmz/idmz-bsfg.key"
reload_interval = "1s"
trust = { plant = "idmz-trust/plant-ca.pem", idmz = "idmz/ca.pem" }"#,
        )
        .admin(admin)
        .write(&p.dir.path().join("idmz.toml"));
    let _idmz = Gateway::spawn(cfg, format!("grpc://127.0.0.1:{plain}"));
    let stored = || {
        let s = common::admin_status(admin);
        let l = &s["links"][0];
        (
            l["facts_stored"].as_u64().unwrap_or(0),
            l["state"].as_str().unwrap_or_default().to_owned(),
        )
    };

    let producer = {
        let local = p.local();
        tokio::spawn(async move {
            for i in 0..400 {
                local
                    .append_fact(fixtures::step_completed(&format!("rev-{i}"), i))
                    .await
                    .unwrap();
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    };
    bsfg_testkit::eventually_blocking("replication to start", Duration::from_secs(20), || {
        let (n, _) = stored();
        (n >= 50).then_some(()).ok_or(format!("{n}"))
    });

    // Withdraw the plant CA on the idmz: the open connection is closed at the next
    // reload (1 s), the link's reconnect is refused, and nothing more is stored.
    std::fs::write(trust.join("plant-ca.pem"), "").unwrap();
    let started = Instant::now();
    let link = [("endpoint", "link:from-plant")];
    assert!(counter(admin, "bsfg_tls_connections_revoked_total", &link, 1) >= 1);
    bsfg_testkit::eventually_blocking("the link to back off", Duration::from_secs(10), || {
        match stored() {
            (_, s) if s == "backing_off" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let stopped_after = started.elapsed();
    assert!(counter(admin, "bsfg_tls_handshake_failures_total", &link, 1) >= 1);
    let (held, _) = stored();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stored().0,
        held,
        "nothing crosses while the CA is withdrawn"
    );
    assert!(held < 400, "the link stopped mid-stream ({held} stored)");
    assert!(
        stopped_after < Duration::from_secs(8),
        "stopped {stopped_after:?} after the withdrawal"
    );

    // Restored: the link resumes and every fact arrives once.
    std::fs::write(trust.join("plant-ca.pem"), &plant_ca).unwrap();
    producer.await.unwrap();
    let ids = ids_at(&format!("grpc://127.0.0.1:{plain}"), "check", 400);
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (400, 400));
}
