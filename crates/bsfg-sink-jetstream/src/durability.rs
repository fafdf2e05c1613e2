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

/// Reads `<monitor_url>/varz` (plain HTTP on loopback or a zone-internal address).
pub async fn probe(monitor_url: &str) -> Durability {
    let Some(hostport) = monitor_url
        .strip_prefix("http://")
        .map(|r| r.trim_end_matches('/'))
    else {
        return Durability::Unknown;
    };
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await.ok()?;
        s.write_all(format!("GET /varz HTTP/1.0\r\nHost: {hostport}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let body = text.split_once("\r\n\r\n")?.1;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let cfg = v.get("jetstream")?.get("config")?;
        Some(
            if cfg.get("sync_always").and_then(serde_json::Value::as_bool) == Some(true) {
                Durability::SyncAlways
            } else {
                Durability::Lazy
            },
        )
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), fut)
        .await
        .ok()
        .flatten()
        .unwrap_or(Durability::Unknown)
}
