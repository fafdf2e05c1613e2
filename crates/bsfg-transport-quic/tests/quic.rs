//! The QUIC transport end to end: a real zone (nats-server) served over quinn with
//! mutual TLS, called through the client, directly and through the seeded UDP relay
//! (loss, delay, reordering, blackholes). Every operation and error reason over QUIC
//! is in the transport conformance suite (tests/conformance.rs); here what is QUIC's
//! own: handshakes, loss, reconnection, migration, malformed frames.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::link::{PullStep, pull_page};
use bsfg_core::{
    Authorization, Boundary, BoundaryApi, BoundaryError, FactLog, FetchRequest, Gate, Grant,
    Limits, Reason, ServeStats,
};
use bsfg_sink_jetstream::{ConsumerConfig, JetStreamConfig, JetStreamZone};
use bsfg_testkit::NatsServer;
use bsfg_testkit::fixtures::step_completed as fact;
use bsfg_testkit::pki::Pki;
use bsfg_testkit::udp_relay::{Profile, UdpRelay};
use bsfg_tls::{ClientTls, ServerTls, TlsStats};
use bsfg_transport_quic::{
    ALPN, ClientConfig, Congestion, Listener, QuicClient, ServerConfig, Tuning,
};
use bytes::Bytes;
use futures::StreamExt;
use sha2::Digest;
use tokio::sync::oneshot;

struct Pkis {
    _dir: tempfile::TempDir,
    plant: Pki,
    idmz: Pki,
}

fn pkis() -> Pkis {
    let dir = tempfile::tempdir().unwrap();
    let plant = Pki::new(dir.path(), "plant").unwrap();
    let idmz = Pki::new(dir.path(), "idmz").unwrap();
    Pkis {
        _dir: dir,
        plant,
        idmz,
    }
}

/// The plant zone on its own nats-server, served over QUIC to `idmz-bsfg` (idmz CA).
struct Plant {
    _nats: NatsServer,
    zone: Arc<JetStreamZone>,
    addr: SocketAddr,
    stats: Arc<ServeStats>,
    tls_stats: Arc<TlsStats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn plant_zone(nats: &NatsServer) -> Arc<JetStreamZone> {
    let mut cfg = JetStreamConfig::new("plant", nats.url());
    cfg.consumers = vec![ConsumerConfig::new("to-idmz", "operational")];
    Arc::new(JetStreamZone::connect(cfg).await.unwrap())
}

fn grants() -> Vec<Grant> {
    vec![Grant {
        identity: "idmz-bsfg".into(),
        ca: "idmz".into(),
        claim_from_zones: vec!["plant-a".into()],
        to_zones: vec!["enterprise".into()],
        consumers: vec!["to-idmz".into()],
        put_buckets: vec!["batch-files".into()],
        read_buckets: vec!["*".into()],
    }]
}

async fn serve(
    zone: Arc<JetStreamZone>,
    p: &Pkis,
    addr: SocketAddr,
    config: ServerConfig,
) -> (
    SocketAddr,
    Arc<ServeStats>,
    Arc<TlsStats>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let api: Arc<dyn BoundaryApi> = Arc::new(Boundary::new(zone.clone(), zone, Limits::default()));
    let gate = Gate::new(api, Arc::new(Authorization::new(grants())));
    let tls_stats = Arc::new(TlsStats::default());
    let tls = ServerTls::new(
        p.plant.files("plant-bsfg", &[&p.idmz]).unwrap(),
        vec![ALPN.to_vec()],
        "quic-listener",
        tls_stats.clone(),
    )
    .unwrap();
    let listener = Listener::bind(addr, config, tls).unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(ServeStats::default());
    let (tx, rx) = oneshot::channel();
    let st = stats.clone();
    let task = tokio::spawn(async move {
        listener
            .serve(gate, st, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (addr, stats, tls_stats, tx, task)
}

async fn plant(p: &Pkis) -> Plant {
    let nats = NatsServer::start().expect("nats-server");
    let zone = plant_zone(&nats).await;
    let (addr, stats, tls_stats, stop, task) = serve(
        zone.clone(),
        p,
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::default(),
    )
    .await;
    Plant {
        _nats: nats,
        zone,
        addr,
        stats,
        tls_stats,
        stop: Some(stop),
        task,
    }
}

impl Plant {
    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.unwrap();
    }
}

fn client_tls(p: &Pkis, who: &Pki, name: &str) -> Arc<ClientTls> {
    ClientTls::new(
        who.files(name, &[&p.plant]).unwrap(),
        vec![ALPN.to_vec()],
        format!("client:{name}"),
        Arc::new(TlsStats::default()),
    )
    .unwrap()
}

fn client(p: &Pkis, addr: SocketAddr, config: ClientConfig) -> QuicClient {
    QuicClient::new(
        &format!("quic://{addr}"),
        config,
        client_tls(p, &p.idmz, "idmz-bsfg"),
        Some("plant-bsfg".into()),
    )
    .unwrap()
}

fn fetch(consumer: &str, limit: u32) -> FetchRequest {
    FetchRequest {
        consumer: consumer.into(),
        limit,
        wait: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn a_client_from_an_unknown_ca_is_refused_at_the_handshake() {
    let p = pkis();
    let mut g = plant(&p).await;
    let dir = tempfile::tempdir().unwrap();
    let stranger = Pki::new(dir.path(), "stranger").unwrap();
    let c = QuicClient::new(
        &format!("quic://{}", g.addr),
        ClientConfig::default(),
        client_tls(&p, &stranger, "mallory"),
        Some("plant-bsfg".into()),
    )
    .unwrap();
    let e = c.append_fact(fact("m-1", 1)).await.unwrap_err();
    assert_eq!(e.reason(), Reason::Unavailable, "{e}");
    assert!(
        e.to_string().contains("peer_rejected_our_certificate"),
        "{e}"
    );
    let failures = g.tls_stats.handshake_failures();
    assert_eq!(
        failures.get(&("quic-listener".to_owned(), "unknown_ca")),
        Some(&1),
        "{failures:?}"
    );
    assert!(
        g.zone
            .fetch(&fetch("to-idmz", 1), "local")
            .await
            .unwrap()
            .facts
            .is_empty()
    );
    g.stop().await;
}

/// The judged case in process: 10 % loss, 100 ms delay each way with jitter and
/// reordering, and duplicated datagrams; every fact arrives exactly once.
#[tokio::test]
async fn replication_over_a_lossy_reordering_path_delivers_every_fact_exactly_once() {
    let p = pkis();
    let mut g = plant(&p).await;
    let bad = Profile {
        loss: 0.10,
        delay: Duration::from_millis(50),
        jitter: Duration::from_millis(20),
        reorder: 0.05,
        duplicate: 0.02,
        rate_bps: None,
    };
    let relay = UdpRelay::start(g.addr, bad, bad, 42).await.unwrap();
    let mut last = 0;
    for i in 0..300 {
        last = g
            .zone
            .append(
                Limits::default()
                    .validate(fact(&format!("x-{i}"), i))
                    .unwrap(),
            )
            .await
            .unwrap()
            .offset;
    }
    let c = client(&p, relay.addr(), ClientConfig::default());
    let dest_nats = NatsServer::start().unwrap();
    let mut dcfg = JetStreamConfig::new("idmz", dest_nats.url());
    dcfg.consumers = vec![ConsumerConfig::new("reader", "operational")];
    let dest = Arc::new(JetStreamZone::connect(dcfg).await.unwrap());
    let engine = Boundary::new(dest.clone(), dest.clone(), Limits::default());
    let step = PullStep {
        link: "plant-over-quic".into(),
        consumer: "to-idmz".into(),
        limit: 50,
        wait: Duration::from_millis(200),
        streams: vec![],
        source_zone: "plant".into(),
        local_zone: "idmz".into(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut failures = 0;
    loop {
        // A failed step (a lost answer) is retried, as the link loop does.
        match tokio::time::timeout(Duration::from_secs(15), pull_page(&c, &engine, &step, None))
            .await
        {
            Ok(Ok(r)) if r.frontier >= last => break,
            Ok(Ok(_)) => {}
            _ => failures += 1,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained in time"
        );
    }
    // Every message_id once: read the destination through its own consumer.
    let mut ids = BTreeSet::new();
    loop {
        let page = dest
            .fetch(
                &FetchRequest {
                    consumer: "reader".into(),
                    limit: 500,
                    wait: Duration::ZERO,
                },
                "local",
            )
            .await
            .unwrap();
        let Some(last) = page.facts.last().map(|f| f.offset) else {
            break;
        };
        for f in &page.facts {
            assert!(
                ids.insert(f.message.envelope.message_id.clone()),
                "{} stored twice",
                f.message.envelope.message_id
            );
        }
        dest.confirm("reader", last, "local").await.unwrap();
    }
    let expected: BTreeSet<String> = (0..300).map(|i| format!("x-{i}")).collect();
    assert_eq!(ids, expected);
    eprintln!("drained with {failures} failed steps");
    assert!(
        relay
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    g.stop().await;
    drop(dest_nats);
}

#[tokio::test]
async fn a_64_mib_object_crosses_5_percent_loss_with_its_digest() {
    let p = pkis();
    let mut g = plant(&p).await;
    let lossy = Profile {
        loss: 0.05,
        delay: Duration::from_millis(10),
        ..Profile::default()
    };
    let relay = UdpRelay::start(g.addr, lossy, lossy, 7).await.unwrap();
    // BBR: random loss is not congestion (cubic would crawl at 5 % loss).
    let bbr = ClientConfig {
        tuning: Tuning {
            congestion: Congestion::Bbr,
            ..Tuning::default()
        },
        ..ClientConfig::default()
    };
    let c = client(&p, relay.addr(), bbr);
    let mut hasher = sha2::Sha256::new();
    let chunks: Vec<Result<Bytes, BoundaryError>> = (0..64u32)
        .map(|i| {
            let b: Vec<u8> = (0..1024 * 1024u32)
                .map(|j| (j.wrapping_mul(31) ^ i) as u8)
                .collect();
            hasher.update(&b);
            Ok(Bytes::from(b))
        })
        .collect();
    let want = format!("sha256:{}", hex::encode(hasher.finalize()));
    let info = c
        .put_object(
            "batch-files",
            "64mib.bin",
            futures::stream::iter(chunks).boxed(),
        )
        .await
        .unwrap();
    assert_eq!((info.size, info.digest), (64 * 1024 * 1024, want));
    assert!(
        relay
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            > 100
    );
    g.stop().await;
}

#[tokio::test]
async fn the_client_reconnects_by_itself_after_a_blackhole_and_a_server_restart() {
    let p = pkis();
    let mut g = plant(&p).await;
    let relay = UdpRelay::start(g.addr, Profile::default(), Profile::default(), 1)
        .await
        .unwrap();
    let tuning = Tuning {
        keep_alive: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(3),
        ..Tuning::default()
    };
    let c = client(
        &p,
        relay.addr(),
        ClientConfig {
            tuning,
            request_timeout: Duration::from_secs(2),
            ..ClientConfig::default()
        },
    );
    c.append_fact(fact("r-1", 1)).await.unwrap();
    relay.blackhole(Duration::from_secs(5));
    let e = c.append_fact(fact("r-2", 2)).await.unwrap_err();
    assert_eq!(e.reason(), Reason::Unavailable, "{e}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The path is back; the connection timed out meanwhile and is replaced.
    let mut ok = None;
    for _ in 0..10 {
        if let Ok(o) = c.append_fact(fact("r-2", 2)).await {
            ok = Some(o);
            break;
        }
    }
    assert!(ok.is_some(), "no recovery after the blackhole");
    assert!(c.connects() >= 2, "a new connection replaced the dead one");

    // Restart the server on the same port: the client notices and reconnects.
    let before = c.connects();
    g.stop().await;
    let (addr, _, _, stop, task) = serve(g.zone.clone(), &p, g.addr, ServerConfig::default()).await;
    assert_eq!(addr, g.addr);
    let mut ok = None;
    for _ in 0..10 {
        if let Ok(o) = c.append_fact(fact("r-3", 3)).await {
            ok = Some(o);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok.is_some(), "no recovery after the server restart");
    assert!(c.connects() > before);
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn a_client_whose_address_changes_keeps_its_connection() {
    let p = pkis();
    let mut g = plant(&p).await;
    let c = client(&p, g.addr, ClientConfig::default());
    c.append_fact(fact("a-1", 1)).await.unwrap();
    c.rebind("127.0.0.1:0".parse().unwrap()).unwrap();
    c.append_fact(fact("a-2", 2)).await.unwrap();
    c.rebind("127.0.0.1:0".parse().unwrap()).unwrap();
    let page = c.fetch_facts(fetch("to-idmz", 10)).await.unwrap();
    assert_eq!(page.facts.len(), 2);
    assert_eq!(
        c.connects(),
        1,
        "the connection migrated instead of being rebuilt"
    );
    g.stop().await;
}

/// Sends raw bytes as one call on a fresh stream and returns the decoded error.
async fn raw_call(conn: &quinn::Connection, bytes: &[u8]) -> bsfg_proto::v1::CallError {
    use prost::Message as _;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let answer = recv.read_to_end(1 << 20).await.unwrap();
    assert_eq!(
        answer.first(),
        Some(&bsfg_transport_quic::wire::STATUS_ERROR)
    );
    bsfg_proto::v1::CallError::decode(&answer[5..]).unwrap()
}

#[tokio::test]
async fn malformed_calls_get_a_clear_error_naming_the_field_and_the_listener_keeps_serving() {
    let p = pkis();
    let mut g = plant(&p).await;
    let tls = client_tls(&p, &p.idmz, "idmz-bsfg");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.config()).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(g.addr, "plant-bsfg")
        .unwrap()
        .await
        .unwrap();

    let e = raw_call(&conn, &[9]).await;
    assert_eq!(
        (
            e.reason.as_str(),
            e.metadata.get("field").map(String::as_str)
        ),
        ("invalid_argument", Some("op"))
    );
    // An AppendFact whose frame is not protobuf.
    let e = raw_call(&conn, &[1, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(
        e.metadata.get("field").map(String::as_str),
        Some("request"),
        "{e:?}"
    );
    assert!(e.message.contains("not a valid AppendFactRequest"), "{e:?}");
    // A frame announcing 4 GiB is refused before anything is read.
    let e = raw_call(&conn, &[2, 0xff, 0xff, 0xff, 0xff]).await;
    assert!(e.message.contains("exceeds max_message_bytes"), "{e:?}");
    // A stream that ends inside its frame.
    let e = raw_call(&conn, &[3, 0, 0, 0, 40, 1, 2]).await;
    assert!(e.message.contains("ended inside a frame"), "{e:?}");
    // Nothing was stored, and the listener still serves well-formed calls.
    let c = client(&p, g.addr, ClientConfig::default());
    let ok = c.append_fact(fact("ok-1", 1)).await.unwrap();
    assert!(!ok.duplicate && ok.offset > 0);
    assert_eq!(
        g.zone
            .fetch(
                &FetchRequest {
                    consumer: "to-idmz".into(),
                    limit: 10,
                    wait: Duration::ZERO,
                },
                "local",
            )
            .await
            .unwrap()
            .facts
            .len(),
        1,
        "only the well-formed call stored a fact"
    );
    assert!(
        g.stats
            .errors()
            .get(&("idmz-bsfg".to_owned(), "invalid_argument"))
            .copied()
            >= Some(4)
    );
    g.stop().await;
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    bsfg_testkit::memory_bytes("self").unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_large_frames_on_every_stream_it_may_open_pins_little_memory() {
    let p = pkis();
    let mut g = plant(&p).await;
    let tls = client_tls(&p, &p.idmz, "idmz-bsfg");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.config()).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let limits = bsfg_core::component::ServeLimits::default();
    let c = client(&p, g.addr, ClientConfig::default());
    c.append_fact(fact("before", 1)).await.unwrap();
    let before = rss();

    // As many connections as one identity may hold (the client above holds one),
    // each with as many streams as the server allows; every stream announces a 16 MiB
    // AppendFact frame, sends 1 KiB of it and stalls.
    let mut held = Vec::new();
    let mut conns = Vec::new();
    for _ in 1..limits.max_connections_per_peer {
        let conn = endpoint
            .connect(g.addr, "plant-bsfg")
            .unwrap()
            .await
            .unwrap();
        for _ in 0..limits.max_concurrent_streams {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            let mut head = vec![1u8];
            head.extend_from_slice(&(16u32 << 20).to_be_bytes());
            head.extend_from_slice(&[0u8; 1024]);
            send.write_all(&head).await.unwrap();
            held.push((send, recv));
        }
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "{} streams announcing 16 MiB each grew the process by {} MiB",
        held.len(),
        grown >> 20
    );

    // One more connection of that identity is refused; other callers are served.
    let extra = endpoint
        .connect(g.addr, "plant-bsfg")
        .unwrap()
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), extra.closed())
        .await
        .expect("the connection over the cap is closed");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(a)
            if a.error_code == quinn::VarInt::from_u32(bsfg_transport_quic::server::CLOSE_TOO_MANY)),
        "{closed:?}"
    );
    assert!(
        g.tls_stats
            .handshake_failures()
            .keys()
            .any(|(_, r)| *r == "too_many_connections")
    );
    let ok = c.append_fact(fact("during", 2)).await.unwrap();
    assert!(!ok.duplicate);
    drop((held, conns));
    g.stop().await;
}
