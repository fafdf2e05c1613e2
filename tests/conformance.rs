//! Conformance suites, one per trait, generic over the implementation.
//!
//! - [`transport_suite`]: every registered scheme serves a real zone through the
//!   [`Transport`] trait only (its listener and its dialer, as the gateway composes
//!   them) and must carry every operation, every error reason with its field, the
//!   serving limits (a page trimmed to `max_message_bytes`, an upload cut off at
//!   `max_object_bytes`), authorization as the scheme's caller, refusal of a caller
//!   without credentials, and a graceful stop.
//! - [`sink_suite`]: every registered sink, configured from its TOML table and opened
//!   through the [`Sink`] trait, must keep idempotency (also after the store's server
//!   is killed and after the gateway's own state is lost), the frontier as a
//!   gap-free prefix, and the receiver rules of confirms.
//!
//! A new transport or sink is tested by adding one line to [`conformance!`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::component::{
    Checks, DeTable, Registry, Security, ServeContext, ServeLimits, Setup, Table, TlsMaterial,
    ZoneSettings, ZoneStore,
};
use bsfg_core::{
    Authorization, Boundary, BoundaryApi, BoundaryError, FetchRequest, Gate, Grant, Limits, Reason,
    ServeStats,
};
use bsfg_testkit::NatsServer;
use bsfg_testkit::fixtures::{padded_fact, step_completed as fact};
use bsfg_testkit::pki::Pki;
use bsfg_tls::{ClientTls, ServerTls, TlsStats};
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use tokio::sync::oneshot;

/// Every transport and sink under test: the same registrations as the gateway's.
fn registry() -> Registry {
    Registry::new()
        .with_transport(bsfg_transport_grpc::GrpcTransport)
        .with_transport(bsfg_transport_quic::QuicTransport)
        .with_transport(bsfg_transport_unix::UnixTransport)
        .with_sink(bsfg_sink_jetstream::JetStreamSink)
}

/// One test per implementation: `name: suite(what)`.
macro_rules! conformance {
    ($($name:ident: $suite:ident($what:literal),)*) => {$(
        #[tokio::test]
        async fn $name() {
            $suite($what).await;
        }
    )*};
}

conformance! {
    grpc_plaintext_conforms: transport_suite("grpc"),
    grpc_over_mutual_tls_conforms: transport_suite("grpcs"),
    quic_conforms: transport_suite("quic"),
    unix_socket_conforms: transport_suite("unix"),
    jetstream_sink_conforms: sink_suite("jetstream"),
}

/// A TOML table as a component receives it.
fn table<'i>(key: &str, src: &'i str) -> Table<'i> {
    let doc = DeTable::parse(src).unwrap();
    let span = doc.span();
    Table::new(key, span, doc.into_inner())
}

/// The zone `plant-a` on `nats`, opened through the sink registered as `kind`.
async fn open_zone(kind: &str, nats: &NatsServer, dir: &Path) -> Arc<dyn ZoneStore> {
    let registry = registry();
    let sink = registry.sink(kind).expect("registered sink");
    let sink_src = format!("url = \"{}\"\n", nats.url());
    let consumer_src = "name = \"to-enterprise\"\nclass = \"operational\"\nack_wait = \"2s\"\n";
    let mut checks = Checks::default();
    let plan = sink
        .configure(
            &ZoneSettings {
                zone: "plant-a".into(),
                limits: Limits::default(),
                base_dir: dir.to_path_buf(),
            },
            table("sink", &sink_src),
            vec![table("consumers[0]", consumer_src)],
            &mut checks,
        )
        .unwrap_or_else(|| panic!("{:?}", checks.problems));
    assert_eq!(plan.consumers(), ["to-enterprise"]);
    plan.open().await.unwrap()
}

/// Who the client of a scheme is, as a grant names it: `None` for plaintext (local,
/// full access).
fn client_identity(security: Security, dir: &Path) -> Option<(String, String)> {
    match security {
        Security::Plaintext => None,
        Security::MutualTls { .. } => Some(("idmz-bsfg".into(), "idmz".into())),
        Security::LocalCredentials { anchor } => {
            let uid = std::fs::metadata(dir).unwrap().uid();
            Some((format!("uid:{uid}"), anchor.into()))
        }
    }
}

fn grant(identity: &str, ca: &str) -> Grant {
    Grant {
        identity: identity.into(),
        ca: ca.into(),
        claim_from_zones: vec!["plant-a".into()],
        to_zones: vec!["*".into()],
        consumers: vec!["to-enterprise".into(), "ghost".into()],
        put_buckets: vec!["batch-files".into()],
        read_buckets: vec!["batch-files".into()],
    }
}

/// A listener of one scheme serving one zone, started through the trait.
struct Served {
    url: String,
    stats: Arc<ServeStats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("a graceful stop ends the listener")
            .unwrap();
    }
}

struct Env {
    dir: tempfile::TempDir,
    plant: Pki,
    idmz: Pki,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let plant = Pki::new(dir.path(), "plant").unwrap();
        let idmz = Pki::new(dir.path(), "idmz").unwrap();
        Env { dir, plant, idmz }
    }

    /// The listen URL of `scheme` on a free port (or a socket file).
    fn listen_url(&self, scheme: &str, security: Security, n: usize) -> String {
        match security {
            Security::LocalCredentials { .. } => {
                format!(
                    "{scheme}://{}",
                    self.dir.path().join(format!("zone-{n}.sock")).display()
                )
            }
            _ => format!("{scheme}://127.0.0.1:0"),
        }
    }

    /// The client's TLS for a mutual-TLS scheme, from `who`'s CA.
    fn client_tls(&self, alpn: &[u8], who: &Pki, name: &str) -> (TlsMaterial, Option<String>) {
        let tls = ClientTls::new(
            who.files(name, &[&self.plant]).unwrap(),
            vec![alpn.to_vec()],
            format!("client:{name}"),
            Arc::new(TlsStats::default()),
        )
        .unwrap();
        (TlsMaterial::new(tls), Some("plant-bsfg".into()))
    }

    /// Serves `api` on `scheme` with `grants` (a plaintext scheme ignores them).
    async fn serve(
        &self,
        scheme: &str,
        n: usize,
        api: Arc<dyn BoundaryApi>,
        grants: Vec<Grant>,
        limits: &ServeLimits,
    ) -> Served {
        let registry = registry();
        let (transport, s, _) = registry.endpoint(&format!("{scheme}://x")).unwrap();
        let url = self.listen_url(scheme, s.security, n);
        let (_, s, address) = registry.endpoint(&url).unwrap();
        let mut checks = Checks::default();
        let at = Setup::new(
            s,
            address,
            ("listeners[0].url", 0..0),
            Table::empty("listeners[0]"),
            &mut checks,
        );
        let listen = transport
            .listener(at, limits)
            .unwrap_or_else(|| panic!("{:?}", checks.problems));
        let gate = match s.security {
            Security::Plaintext => Gate::local_only(api),
            _ => Gate::new(api, Arc::new(Authorization::new(grants))),
        };
        let tls = match s.security {
            Security::MutualTls { alpn } => Some(TlsMaterial::new(
                ServerTls::new(
                    self.plant.files("plant-bsfg", &[&self.idmz]).unwrap(),
                    vec![alpn.to_vec()],
                    url.clone(),
                    Arc::new(TlsStats::default()),
                )
                .unwrap(),
            )),
            _ => None,
        };
        let stats = Arc::new(ServeStats::default());
        let (tx, rx) = oneshot::channel::<()>();
        let serving = listen
            .start(ServeContext {
                gate,
                served: stats.clone(),
                tls,
                stopped: async {
                    let _ = rx.await;
                }
                .boxed(),
                ready: bsfg_core::component::Readiness::always(),
            })
            .await
            .unwrap();
        let serve = serving.serve;
        let task = tokio::spawn(async move { serve.await.unwrap() });
        Served {
            url: serving.url,
            stats,
            stop: Some(tx),
            task,
        }
    }

    /// A client of `url` through the scheme's dialer, with this suite's client
    /// identity when the scheme is mutual TLS.
    fn dial(&self, url: &str) -> Result<Arc<dyn BoundaryApi>, BoundaryError> {
        let registry = registry();
        let (_, s, _) = registry.endpoint(url).unwrap();
        let tls = match s.security {
            Security::MutualTls { alpn } => Some(self.client_tls(alpn, &self.idmz, "idmz-bsfg")),
            _ => None,
        };
        registry.dial(url, tls)
    }
}

fn fetch(consumer: &str, limit: u32) -> FetchRequest {
    FetchRequest {
        consumer: consumer.into(),
        limit,
        wait: Duration::from_millis(200),
    }
}

fn body(parts: Vec<Result<Bytes, BoundaryError>>) -> bsfg_core::ByteStream {
    futures::stream::iter(parts).boxed()
}

/// The transport suite for one registered scheme.
async fn transport_suite(scheme: &str) {
    let env = Env::new();
    let nats = NatsServer::start().expect("nats-server");
    let store = open_zone("jetstream", &nats, env.dir.path()).await;
    let engine = Boundary::new(store.fact_log(), store.object_store(), Limits::default());
    let api: Arc<dyn BoundaryApi> = Arc::new(engine);
    let security = registry().scheme(scheme).expect("registered").1.security;
    let identity = client_identity(security, env.dir.path());
    let grants: Vec<Grant> = identity.iter().map(|(i, ca)| grant(i, ca)).collect();
    let limits = ServeLimits {
        max_message_bytes: 256 * 1024,
        max_object_bytes: 1024 * 1024,
        ..ServeLimits::default()
    };
    let mut served = env.serve(scheme, 0, api.clone(), grants, &limits).await;
    let c = env.dial(&served.url).unwrap();

    // Every operation, every error reason with its field and details.
    let first = c.append_fact(fact("c-1", 1)).await.unwrap();
    assert_eq!(
        (first.stream.as_str(), first.duplicate),
        ("facts_operational", false),
        "{scheme}"
    );
    assert!(first.offset > 0, "{scheme}");
    let dup = c.append_fact(fact("c-1", 1)).await.unwrap();
    assert_eq!(
        (dup.offset, dup.duplicate),
        (first.offset, true),
        "{scheme}"
    );
    let e = c.append_fact(fact("c-1", 2)).await.unwrap_err();
    assert_eq!(
        e,
        BoundaryError::ConflictingDuplicate {
            message_id: "c-1".into(),
            stream: "facts_operational".into(),
            offset: first.offset
        },
        "{scheme}"
    );
    let mut bad = fact("c-2", 1);
    bad.fact.subject = "nope".into();
    let e = c.append_fact(bad).await.unwrap_err();
    assert_eq!(
        (e.reason(), e.field()),
        (Reason::InvalidArgument, Some("fact.subject")),
        "{scheme}"
    );
    let page = c.fetch_facts(fetch("to-enterprise", 10)).await.unwrap();
    assert_eq!(page.facts.len(), 1, "{scheme}");
    assert_eq!(page.facts[0].message.envelope.message_id, "c-1");
    assert_eq!(
        (page.facts[0].offset, page.last_offset, page.frontier),
        (first.offset, first.offset, 0),
        "{scheme}"
    );
    let e = c.confirm_receipt("to-enterprise", 99).await.unwrap_err();
    assert_eq!(
        (e.reason(), e.field()),
        (Reason::InvalidArgument, Some("offset")),
        "{scheme}: {e}"
    );
    assert_eq!(
        c.confirm_receipt("to-enterprise", first.offset)
            .await
            .unwrap()
            .offset,
        first.offset
    );
    let e = c.fetch_facts(fetch("ghost", 1)).await.unwrap_err();
    assert_eq!(
        e,
        BoundaryError::UnknownConsumer("ghost".into()),
        "{scheme}"
    );
    // A page delivered to another receiver is not this caller's to confirm.
    let c3 = c.append_fact(fact("c-3", 3)).await.unwrap().offset;
    let other = store
        .fact_log()
        .fetch(&fetch("to-enterprise", 10), "someone-else@elsewhere")
        .await
        .unwrap();
    assert_eq!(other.facts.len(), 1);
    let e = c.confirm_receipt("to-enterprise", c3).await.unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{scheme}: {e}");

    // Many calls at once on one connection, as gRPC clients make them: every one is
    // answered on its own (here: stored), none refused for how many there are.
    // (Class `audit`, which the consumers below do not read.)
    let many = futures::future::join_all((0..1024).map(|i| {
        let mut m = fact(&format!("many-{i}"), i);
        m.envelope.labels.insert("class".into(), "audit".into());
        c.append_fact(m)
    }))
    .await;
    let stored = many
        .iter()
        .filter(|r| matches!(r, Ok(o) if !o.duplicate))
        .count();
    assert_eq!(
        stored,
        1024,
        "{scheme}: {:?}",
        many.iter().find(|r| r.is_err())
    );

    // Limits: a page is trimmed to max_message_bytes, never refused.
    for i in 0..6 {
        c.append_fact(padded_fact(&format!("big-{i}"), i, 100_000))
            .await
            .unwrap();
    }
    let page = c.fetch_facts(fetch("to-enterprise", 10)).await.unwrap();
    assert!(
        (1..6).contains(&page.facts.len()),
        "{scheme}: {} facts of 100 kB cannot all fit in 256 KiB, one always does",
        page.facts.len()
    );
    // PutObject: uneven pieces re-chunked; over max_object_bytes cut off and nothing
    // stored; a body that fails half way stores nothing either.
    let pieces = (0..3)
        .map(|i| Ok(Bytes::from(vec![i as u8; 100 * 1024 + 17])))
        .collect();
    let info = c
        .put_object("batch-files", "a.bin", body(pieces))
        .await
        .unwrap();
    assert_eq!(info.size, 3 * (100 * 1024 + 17), "{scheme}");
    assert!(info.digest.starts_with("sha256:"));
    let e = c
        .put_object(
            "batch-files",
            "huge.bin",
            body(
                (0..6)
                    .map(|_| Ok(Bytes::from(vec![7u8; 200 * 1024])))
                    .collect(),
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::InvalidArgument, "{scheme}: {e}");
    assert!(e.to_string().contains("max_object_bytes"), "{scheme}: {e}");
    let e = c
        .put_object(
            "batch-files",
            "half.bin",
            body(vec![
                Ok(Bytes::from_static(b"first half")),
                Err(BoundaryError::Unavailable("disk read failed".into())),
            ]),
        )
        .await
        .unwrap_err();
    assert_eq!(e, BoundaryError::Unavailable("disk read failed".into()));
    for key in ["huge.bin", "half.bin"] {
        let ok = c
            .put_object(
                "batch-files",
                key,
                body(vec![Ok(Bytes::from_static(b"whole"))]),
            )
            .await
            .unwrap();
        assert_eq!(ok.size, 5, "{scheme}: the refused upload left {key} free");
    }
    // HeadObject and GetObject: the info, then the bytes from any offset (larger than
    // one message in all, so they cross in several parts), each error with its
    // reason; a fact referencing an artifact the zone lacks is refused naming it.
    assert_eq!(
        c.head_object("batch-files", "a.bin").await.unwrap(),
        info,
        "{scheme}"
    );
    let whole: Vec<u8> = (0..3u8)
        .flat_map(|i| std::iter::repeat_n(i, 100 * 1024 + 17))
        .collect();
    for offset in [0u64, 150_000, info.size] {
        let read = c.get_object("batch-files", "a.bin", offset).await.unwrap();
        assert_eq!((&read.info, read.offset), (&info, offset), "{scheme}");
        let got: Vec<Bytes> = read.body.try_collect().await.unwrap();
        assert!(
            got.concat() == whole[offset as usize..],
            "{scheme}: the bytes from {offset}"
        );
    }
    let e = c
        .get_object("batch-files", "a.bin", info.size + 1)
        .await
        .unwrap_err();
    assert_eq!(
        (e.reason(), e.field()),
        (Reason::InvalidArgument, Some("offset")),
        "{scheme}: {e}"
    );
    for e in [
        c.head_object("batch-files", "none.bin").await.unwrap_err(),
        c.get_object("batch-files", "none.bin", 0)
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.reason(), Reason::NotFound, "{scheme}: {e}");
    }
    let mut with_artifact = fact("c-6", 1);
    with_artifact.envelope.object_media_type = Some("application/octet-stream".into());
    with_artifact.fact.artifacts = vec![bsfg_core::model::ArtifactRef {
        bucket: "batch-files".into(),
        key: "none.bin".into(),
        digest: info.digest.clone(),
        size: info.size,
    }];
    let e = c.append_fact(with_artifact.clone()).await.unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{scheme}: {e}");
    assert!(e.to_string().contains("fact.artifacts[0]"), "{scheme}: {e}");
    with_artifact.fact.artifacts[0].key = "a.bin".into();
    c.append_fact(with_artifact).await.unwrap();

    // An upload is bounded by the idle time between its parts, not by
    // request_timeout: 1.5 s of slow parts through a listener whose calls may take
    // 0.5 s, stored whole.
    {
        let slow_limits = ServeLimits {
            request_timeout: Duration::from_millis(500),
            max_fetch_wait: Duration::from_millis(100),
            ..limits.clone()
        };
        let grants: Vec<Grant> = identity.iter().map(|(i, ca)| grant(i, ca)).collect();
        let mut slow = env
            .serve(scheme, 2, api.clone(), grants, &slow_limits)
            .await;
        let sc = env.dial(&slow.url).unwrap();
        let parts = futures::stream::unfold(0u8, |i| async move {
            if i == 5 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            Some((Ok(Bytes::from(vec![i; 1000])), i + 1))
        })
        .boxed();
        let info = sc
            .put_object("batch-files", "slow.bin", parts)
            .await
            .unwrap();
        assert_eq!(info.size, 5000, "{scheme}");
        slow.stop().await;
    }

    // Authorization as the scheme's caller, and refusal without credentials.
    if let Some((who, anchor)) = &identity {
        let mut claim = fact("c-4", 1);
        claim.envelope.from_zone = "enterprise".into();
        let e = c.append_fact(claim).await.unwrap_err();
        assert_eq!(e.reason(), Reason::PermissionDenied, "{scheme}: {e}");
        let e = c
            .put_object("secret", "x", body(vec![Ok(Bytes::from_static(b"x"))]))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), Reason::PermissionDenied, "{scheme}: {e}");
        for e in [
            c.head_object("secret", "x").await.unwrap_err(),
            c.get_object("secret", "x", 0).await.unwrap_err(),
        ] {
            assert_eq!(e.reason(), Reason::PermissionDenied, "{scheme}: {e}");
        }
        let refused = served.stats.errors();
        assert_eq!(
            refused.get(&(who.clone(), "permission_denied")),
            Some(&4),
            "{scheme}: refusals counted for {who} (anchor {anchor}): {refused:?}"
        );
    }
    let before = store
        .fact_log()
        .fetch(&fetch("to-enterprise", 100), "audit")
        .await
        .unwrap()
        .last_offset;
    match security {
        Security::MutualTls { alpn } => {
            // No certificate: never dialed in plaintext.
            assert!(registry().dial(&served.url, None).is_err(), "{scheme}");
            // A certificate from a CA the zone does not trust: refused at the
            // handshake, nothing stored.
            let stranger_dir = tempfile::tempdir().unwrap();
            let stranger = Pki::new(stranger_dir.path(), "stranger").unwrap();
            let tls = env.client_tls(alpn, &stranger, "mallory");
            let m = registry().dial(&served.url, Some(tls)).unwrap();
            let e = m.append_fact(fact("m-1", 1)).await.unwrap_err();
            assert_eq!(e.reason(), Reason::Unavailable, "{scheme}: {e}");
        }
        Security::LocalCredentials { .. } => {
            // Known by its credentials, but without a grant: default deny.
            let mut bare = env.serve(scheme, 1, api.clone(), Vec::new(), &limits).await;
            let m = env.dial(&bare.url).unwrap();
            let e = m.append_fact(fact("m-1", 1)).await.unwrap_err();
            assert_eq!(e.reason(), Reason::PermissionDenied, "{scheme}: {e}");
            bare.stop().await;
        }
        Security::Plaintext => {}
    }
    let after = store
        .fact_log()
        .fetch(&fetch("to-enterprise", 100), "audit")
        .await
        .unwrap()
        .last_offset;
    assert_eq!(before, after, "{scheme}: refused callers stored nothing");

    // A graceful stop ends the listener; calls then fail as unavailable.
    served.stop().await;
    let e = c.append_fact(fact("c-5", 1)).await.unwrap_err();
    assert_eq!(e.reason(), Reason::Unavailable, "{scheme}: {e}");
}

/// The zone-log suite for one registered sink.
async fn sink_suite(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start().expect("nats-server");
    let store = open_zone(kind, &nats, dir.path()).await;
    let log = store.fact_log();
    let limits = Limits::default();
    let append = |id: &str, step: i64| {
        let log = log.clone();
        let m = limits.validate(fact(id, step)).unwrap();
        async move { log.append(m).await }
    };

    // Idempotency: same id and payload -> the original offset; other payload ->
    // conflicting duplicate, nothing stored.
    let a = append("s-1", 1).await.unwrap();
    let b = append("s-2", 2).await.unwrap();
    assert!(
        a.offset < b.offset && !a.duplicate && !b.duplicate,
        "{kind}"
    );
    let again = append("s-1", 1).await.unwrap();
    assert_eq!((again.offset, again.duplicate), (a.offset, true), "{kind}");
    let e = append("s-1", 9).await.unwrap_err();
    assert_eq!(e.reason(), Reason::ConflictingDuplicate, "{kind}");
    // Concurrent appends of one id store it once.
    let racing: Vec<_> = futures::future::join_all((0..8).map(|_| append("s-3", 3))).await;
    let offsets: std::collections::HashSet<u64> =
        racing.iter().map(|r| r.as_ref().unwrap().offset).collect();
    assert_eq!(offsets.len(), 1, "{kind}: {racing:?}");
    let c3 = racing[0].as_ref().unwrap().offset;
    assert_eq!(
        racing
            .iter()
            .filter(|r| !r.as_ref().unwrap().duplicate)
            .count(),
        1
    );

    // The frontier: a gap-free prefix of what this receiver confirmed.
    let page = log.fetch(&fetch("to-enterprise", 2), "r@a").await.unwrap();
    assert_eq!(
        page.facts.iter().map(|f| f.offset).collect::<Vec<_>>(),
        [a.offset, b.offset]
    );
    assert_eq!(
        log.confirm("to-enterprise", b.offset, "r@a")
            .await
            .unwrap()
            .offset,
        b.offset
    );
    let e = log
        .confirm("to-enterprise", c3 + 50, "r@a")
        .await
        .unwrap_err();
    assert_eq!(
        (e.reason(), e.field()),
        (Reason::InvalidArgument, Some("offset")),
        "{kind}"
    );
    let page = log.fetch(&fetch("to-enterprise", 5), "r@a").await.unwrap();
    assert_eq!(
        page.facts.iter().map(|f| f.offset).collect::<Vec<_>>(),
        [c3]
    );
    let e = log
        .confirm("to-enterprise", c3, "other@b")
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{kind}");
    assert_eq!(page.frontier, b.offset, "{kind}");

    // Crash points: the store's server killed and restarted, then this gateway's own
    // state lost (a store opened afresh, its local files gone): an append retried
    // after either is answered with the original offset, never stored twice.
    store.close().await;
    drop((store, log));
    nats.kill_and_restart().unwrap();
    let store = open_zone(kind, &nats, dir.path()).await;
    let m = limits.validate(fact("s-2", 2)).unwrap();
    let r = store.fact_log().append(m).await.unwrap();
    assert_eq!(
        (r.offset, r.duplicate),
        (b.offset, true),
        "{kind} after a server kill"
    );
    store.close().await;
    drop(store);
    let state = dir.path().join("state");
    if state.exists() {
        std::fs::remove_dir_all(&state).unwrap();
    }
    let store = open_zone(kind, &nats, dir.path()).await;
    let m = limits.validate(fact("s-1", 1)).unwrap();
    let r = store.fact_log().append(m).await.unwrap();
    assert_eq!(
        (r.offset, r.duplicate),
        (a.offset, true),
        "{kind} with its local state lost"
    );
    let m = limits.validate(fact("s-4", 4)).unwrap();
    let r = store.fact_log().append(m).await.unwrap();
    assert!(
        r.offset > c3 && !r.duplicate,
        "{kind}: stored after the others: {r:?}"
    );
}
