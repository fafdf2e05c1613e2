//! Tells whether a zone's nats-server syncs every write to disk.
//!
//! nats-server acknowledges JetStream writes before they are flushed unless it runs
//! with `sync_interval: always`; ConfirmReceipt must mean durable, so the sink warns
//! at start-up when the server's monitoring endpoint says it flushes lazily.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the server's `/varz` says about JetStream flushing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `sync_interval: always`: every acknowledged write is on disk.
    SyncAlways,
    /// Writes are flushed periodically; acknowledged writes can be lost on power loss.
    Lazy,
    /// The monitoring endpoint could not be read or did not say.
    Unknown,
}

/// Reads `<monitor_url>/varz` (plain HTTP on loopback or a zone-internal address)
/// once: how the server flushes, and its resident memory in bytes (`mem`).
pub async fn probe(monitor_url: &str) -> (Durability, Option<u64>) {
    let v = varz(monitor_url).await;
    (flushing(v.as_ref()), memory(v.as_ref()))
}

/// The server's resident memory in bytes (`mem` in `/varz`), if it can be read.
pub async fn server_memory(monitor_url: &str) -> Option<u64> {
    memory(varz(monitor_url).await.as_ref())
}

fn flushing(v: Option<&serde_json::Value>) -> Durability {
    let sync = v
        .and_then(|v| v.get("jetstream"))
        .and_then(|j| j.get("config"))
        .map(|c| c.get("sync_always").and_then(serde_json::Value::as_bool));
    match sync {
        None => Durability::Unknown,
        Some(Some(true)) => Durability::SyncAlways,
        Some(_) => Durability::Lazy,
    }
}

fn memory(v: Option<&serde_json::Value>) -> Option<u64> {
    v?.get("mem").and_then(serde_json::Value::as_u64)
}

/// `GET <monitor_url>/varz` as JSON, within 3 s; `None` on any failure.
pub(crate) async fn varz(monitor_url: &str) -> Option<serde_json::Value> {
    let hostport = monitor_url
        .strip_prefix("http://")
        .map(|r| r.trim_end_matches('/'))?;
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await.ok()?;
        s.write_all(format!("GET /varz HTTP/1.0\r\nHost: {hostport}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let body = text.split_once("\r\n\r\n")?.1;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), fut)
        .await
        .ok()
        .flatten()
}
