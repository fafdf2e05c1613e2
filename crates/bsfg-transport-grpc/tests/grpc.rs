//! The gRPC transport end to end: a real zone served over tonic, called through the
//! client, so every operation and error crosses the wire.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bsfg_core::{Boundary, BoundaryApi, BoundaryError, FetchRequest, Gate, Limits, Reason};
use bsfg_sink_jetstream::{ConsumerConfig, JetStreamConfig, JetStreamZone};
use bsfg_testkit::NatsServer;
use bsfg_transport_grpc::{ClientConfig, GrpcClient, Incoming, ServerConfig, bind, serve};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;

struct Gateway {
    _nats: NatsServer,
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn gateway() -> Gateway {
    gateway_with(ServerConfig::default()).await
}

async fn gateway_with(server: ServerConfig) -> Gateway {
    let nats = NatsServer::start().expect("nats-server");
    let mut cfg = JetStreamConfig::new("plant-a", nats.url());
    cfg.consumers = vec![ConsumerConfig::new("to-enterprise", "operational")];
    let zone = Arc::new(JetStreamZone::connect(cfg).await.unwrap());
    let api: Arc<dyn BoundaryApi> = Arc::new(Boundary::new(zone.clone(), zone, Limits::default()));
    let (listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        serve(
            Gate::local_only(api),
            server,
            Incoming::Plain(listener),
            Default::default(),
            async {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
    });
    Gateway {
        _nats: nats,
        url: format!("grpc://{addr}"),
        stop: Some(tx),
        task,
    }
}

fn client(g: &Gateway) -> GrpcClient {
    GrpcClient::connect_lazy(&g.url, ClientConfig::default()).unwrap()
}

use bsfg_testkit::fixtures::step_completed as fact;

#[tokio::test]
async fn every_operation_and_error_crosses_the_wire() {
    let g = gateway().await;
    let c = client(&g);
    let first = c.append_fact(fact("g-1", 1)).await.unwrap();
    assert_eq!(
        (first.stream.as_str(), first.offset, first.duplicate),
        ("facts_operational", 1, false)
    );
    let dup = c.append_fact(fact("g-1", 1)).await.unwrap();
    assert_eq!((dup.offset, dup.duplicate), (1, true));
    // The conflicting duplicate's details come back intact.
    let e = c.append_fact(fact("g-1", 2)).await.unwrap_err();
    assert_eq!(
        e,
        BoundaryError::ConflictingDuplicate {
            message_id: "g-1".into(),
            stream: "facts_operational".into(),
            offset: 1
        }
    );
    let mut bad = fact("g-2", 1);
    bad.fact.subject = "nope".into();
    let e = c.append_fact(bad).await.unwrap_err();
    assert_eq!(
        (e.reason(), e.field()),
        (Reason::InvalidArgument, Some("fact.subject"))
    );

    let page = c
        .fetch_facts(FetchRequest {
            consumer: "to-enterprise".into(),
            limit: 10,
            wait: Duration::from_millis(100),
        })
        .await
        .unwrap();
    assert_eq!(page.facts.len(), 1);
    assert_eq!(page.facts[0].message.envelope.message_id, "g-1");
    assert_eq!((page.last_offset, page.frontier), (1, 0));
    assert_eq!(
        c.confirm_receipt("to-enterprise", 1).await.unwrap().offset,
        1
    );
    let e = c
        .fetch_facts(FetchRequest {
            consumer: "ghost".into(),
            limit: 1,
            wait: Duration::ZERO,
        })
        .await
        .unwrap_err();
    assert_eq!(e, BoundaryError::UnknownConsumer("ghost".into()));
}

#[tokio::test]
async fn an_upload_over_max_object_bytes_is_cut_off_and_stores_nothing() {
    let g = gateway_with(ServerConfig {
        max_object_bytes: 1024 * 1024,
        ..ServerConfig::default()
    })
    .await;
    let c = client(&g);
    let big: Vec<Result<Bytes, BoundaryError>> = vec![Ok(Bytes::from(vec![7u8; 2 * 1024 * 1024]))];
    let e = c
        .put_object(
            "batch-files",
            "huge.bin",
            futures::stream::iter(big).boxed(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BoundaryError::InvalidArgument { field, rule } if field == "chunk" && rule.contains("max_object_bytes")),
        "{e:?}"
    );
    let ok = c
        .put_object(
            "batch-files",
            "huge.bin",
            futures::stream::iter([Ok(Bytes::from_static(b"small"))]).boxed(),
        )
        .await
        .unwrap();
    assert_eq!(ok.size, 5, "the refused upload left the key free");
}

#[tokio::test]
async fn a_page_larger_than_max_message_bytes_is_trimmed_not_refused() {
    let g = gateway_with(ServerConfig {
        max_message_bytes: 64 * 1024,
        ..ServerConfig::default()
    })
    .await;
    let c = client(&g);
    for i in 0..10 {
        c.append_fact(bsfg_testkit::fixtures::padded_fact(
            &format!("big-{i}"),
            i,
            20_000,
        ))
        .await
        .unwrap();
    }
    let page = c
        .fetch_facts(FetchRequest {
            consumer: "to-enterprise".into(),
            limit: 10,
            wait: Duration::ZERO,
        })
        .await
        .unwrap();
    assert!(
        (1..10).contains(&page.facts.len()),
        "{} facts of 20 kB cannot all fit in 64 KiB, one always does",
        page.facts.len()
    );
    assert_eq!(page.facts[0].message.envelope.message_id, "big-0");
}

#[tokio::test]
async fn put_object_streams_and_a_broken_upload_stores_nothing() {
    let g = gateway().await;
    let c = client(&g);
    // 5 MiB in uneven pieces, re-chunked by the client.
    let pieces: Vec<Result<Bytes, BoundaryError>> = (0..5)
        .map(|i| Ok(Bytes::from(vec![i as u8; 1024 * 1024 + 17])))
        .collect();
    let info = c
        .put_object(
            "batch-files",
            "big.bin",
            futures::stream::iter(pieces).boxed(),
        )
        .await
        .unwrap();
    assert_eq!(info.size, 5 * (1024 * 1024 + 17));
    assert!(info.digest.starts_with("sha256:"));

    // The body fails half way: the client reports the body's error and the key
    // stays free, so a later complete upload with other bytes is accepted.
    let broken: Vec<Result<Bytes, BoundaryError>> = vec![
        Ok(Bytes::from_static(b"first half")),
        Err(BoundaryError::Unavailable("disk read failed".into())),
    ];
    let e = c
        .put_object(
            "batch-files",
            "report.pdf",
            futures::stream::iter(broken).boxed(),
        )
        .await
        .unwrap_err();
    assert_eq!(e, BoundaryError::Unavailable("disk read failed".into()));
    let ok = c
        .put_object(
            "batch-files",
            "report.pdf",
            futures::stream::iter([Ok(Bytes::from_static(b"complete"))]).boxed(),
        )
        .await
        .unwrap();
    assert_eq!(ok.size, 8);
}

#[tokio::test]
async fn a_stopped_gateway_is_unavailable_and_a_graceful_stop_ends_the_server() {
    let mut g = gateway().await;
    let c = client(&g);
    c.append_fact(fact("s-1", 1)).await.unwrap();
    g.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), &mut g.task)
        .await
        .unwrap()
        .unwrap();
    let e = c.append_fact(fact("s-2", 1)).await.unwrap_err();
    assert_eq!(e.reason(), Reason::Unavailable);
}
