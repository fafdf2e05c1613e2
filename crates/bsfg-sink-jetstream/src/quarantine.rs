//! The zone's quarantine: facts an intake policy denied, one message per message_id
//! in stream `bsfg_quarantine` (`bsfg.quarantine.<id token>`), kept until an operator
//! releases or drops them. Never aged out: a denied fact is evidence.

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    context::PublishErrorKind,
    stream::{Config, DirectGetErrorKind, DiscardPolicy, StorageType, Stream},
};
use bsfg_core::{BoundaryError, QuarantineEntry};

use crate::append::id_token;
use crate::config::JetStreamConfig;

/// Name of the quarantine stream.
pub const QUARANTINE_STREAM: &str = "bsfg_quarantine";
/// Subject prefix of quarantine entries (`bsfg.quarantine.<id token>`).
pub const QUARANTINE_PREFIX: &str = "bsfg.quarantine";

pub(crate) fn stream_config(cfg: &JetStreamConfig) -> Config {
    Config {
        name: QUARANTINE_STREAM.into(),
        description: Some(format!(
            "BSFG quarantine: facts an intake policy denied, until released or dropped (zone {})",
            cfg.zone
        )),
        subjects: vec![format!("{QUARANTINE_PREFIX}.*")],
        max_messages_per_subject: 1,
        storage: StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: cfg
            .duplicate_window
            .min(std::time::Duration::from_secs(120)),
        allow_direct: true,
        allow_atomic_publish: false,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

fn subject(message_id: &str) -> String {
    format!("{QUARANTINE_PREFIX}.{}", id_token(message_id))
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BoundaryError {
    BoundaryError::Unavailable(format!("quarantine {what}: {e}"))
}

fn decode(payload: &[u8]) -> Result<QuarantineEntry, BoundaryError> {
    serde_json::from_slice(payload)
        .map_err(|e| BoundaryError::Internal(format!("corrupt quarantine entry: {e}")))
}

/// Keeps `entry` unless its message_id already has one (compare-and-set on the
/// subject, so two receivers of the same page keep it once).
pub(crate) async fn put(
    js: &jetstream::Context,
    entry: &QuarantineEntry,
) -> Result<bool, BoundaryError> {
    let payload = serde_json::to_vec(entry)
        .map_err(|e| BoundaryError::Internal(format!("encoding a quarantine entry: {e}")))?;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let ack = js
        .publish_with_headers(
            subject(&entry.message.envelope.message_id),
            headers,
            payload.into(),
        )
        .await
        .map_err(|e| unavailable("put", e))?;
    match ack.await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
        Err(e) => Err(unavailable("put", e)),
    }
}

/// Entries, oldest first.
pub(crate) async fn list(
    stream: &Stream,
    limit: usize,
) -> Result<Vec<QuarantineEntry>, BoundaryError> {
    let mut out = Vec::new();
    let mut seq = 1;
    while out.len() < limit {
        match stream
            .direct_get_next_for_subject(format!("{QUARANTINE_PREFIX}.*"), Some(seq))
            .await
        {
            Ok(m) => {
                out.push(decode(&m.payload)?);
                seq = m.sequence + 1;
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(unavailable("list", e)),
        }
    }
    Ok(out)
}

/// The entry of `message_id`.
pub(crate) async fn get(
    stream: &Stream,
    message_id: &str,
) -> Result<Option<QuarantineEntry>, BoundaryError> {
    match stream
        .direct_get_last_for_subject(subject(message_id))
        .await
    {
        Ok(m) => decode(&m.payload).map(Some),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable("get", e)),
    }
}

/// Removes the entry of `message_id`.
pub(crate) async fn remove(stream: &Stream, message_id: &str) -> Result<bool, BoundaryError> {
    let r = stream
        .purge()
        .filter(subject(message_id))
        .await
        .map_err(|e| unavailable("remove", e))?;
    Ok(r.purged > 0)
}
