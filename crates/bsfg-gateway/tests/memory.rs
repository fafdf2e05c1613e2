//! Memory a gRPC peer can pin: every stream it may open announces a 16 MiB message,
//! sends 1 KiB of it and stalls; the gateway's resident memory grows by less than
//! 64 MiB and other callers are served meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bsfg_core::BoundaryApi;
use bsfg_testkit::NatsServer;
use bsfg_transport_grpc::{ClientConfig, GrpcClient};
use bytes::Bytes;
use common::{Gateway, ZoneFile};

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    bsfg_testkit::memory_bytes(&pid.to_string()).unwrap().0
}

type Frames =
    tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>;

/// Opens one HTTP/2 connection to `port` and `streams` AppendFact calls on it, each
/// announcing a 16 MiB message and sending 1 KiB of it; returns what keeps them open.
async fn stall(port: u16, streams: u32) -> Vec<Frames> {
    use http_body_util::StreamBody;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..streams {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut head = vec![0u8];
        head.extend_from_slice(&(16u32 << 20).to_be_bytes());
        head.extend_from_slice(&[0u8; 1024]);
        tx.send(Ok(hyper::body::Frame::data(Bytes::from(head))))
            .await
            .unwrap();
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!(
                "http://127.0.0.1:{port}/bsfg.v1.Boundary/AppendFact"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        sender.ready().await.unwrap();
        let answer = sender.send_request(req);
        tokio::spawn(async move {
            let _ = answer.await;
        });
        held.push(tx);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_peer_announcing_large_messages_on_every_stream_pins_little_gateway_memory() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().unwrap();
    let port = common::free_port();
    let config = ZoneFile::new("plant-a", &nats)
        .consumer("reporting", "operational")
        .plaintext(port)
        .write(&dir.path().join("zone.toml"));
    let gw = Gateway::spawn(config, format!("grpc://127.0.0.1:{port}"));
    let pid = gw.child.id();
    let api = GrpcClient::connect_lazy(&gw.url, ClientConfig::default()).unwrap();
    api.append_fact(common::plant_fact("M", 0)).await.unwrap();
    let before = rss(pid);

    // Four connections with every stream the listener allows (256 each).
    let mut held = Vec::new();
    for _ in 0..4 {
        held.extend(stall(port, 256).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "{} streams announcing 16 MiB each grew the gateway by {} MiB",
        held.len(),
        grown >> 20
    );
    // Served meanwhile.
    let ok = api.append_fact(common::plant_fact("M", 1)).await.unwrap();
    assert!(!ok.duplicate);
    drop(held);
}
