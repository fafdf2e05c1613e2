//! The zone's quarantine: facts a link could not append (an intake policy denied
//! them, or this zone refused them), one message per (message_id, payload) in stream
//! `bsfg_quarantine` (`bsfg.quarantine.<id token>.<payload token>`), kept until an
//! operator releases or drops them. Never aged out: a set-aside fact is evidence.
//!
//! An entry's body is `{"entry": <the entry without its fact's object>, "message":
//! <the fact>}`, the fact in the zone's stored form (its object embedded, not escaped
//! again) when its object is JSON that reads back as the same text, else with the
//! object as an escaped string; either way it decodes exactly as fetched. When even that is larger than the
//! server accepts, the entry is kept without the object (`payload_omitted_bytes`), so
//! the link still moves and the evidence stays.

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    context::PublishErrorKind,
    stream::{Config, DirectGetErrorKind, DiscardPolicy, StorageType, Stream},
};
use bsfg_core::{BoundaryError, QuarantineEntry};
use serde::Deserialize;

use crate::append::id_token;
use crate::config::JetStreamConfig;

/// Name of the quarantine stream.
pub const QUARANTINE_STREAM: &str = "bsfg_quarantine";
/// Subject prefix of quarantine entries (`bsfg.quarantine.<id token>.<payload token>`).
pub const QUARANTINE_PREFIX: &str = "bsfg.quarantine";

/// Room left under `max_payload` for the entry's headers.
const HEADROOM: usize = 1024;

pub(crate) fn stream_config(cfg: &JetStreamConfig) -> Config {
    Config {
        name: QUARANTINE_STREAM.into(),
        description: Some(format!(
            "BSFG quarantine: facts an intake policy denied, until released or dropped (zone {})",
            cfg.zone
        )),
        subjects: vec![format!("{QUARANTINE_PREFIX}.*.*")],
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

fn subject(entry: &QuarantineEntry) -> String {
    format!(
        "{QUARANTINE_PREFIX}.{}.{}",
        id_token(entry.message_id()),
        entry.payload_digest.get(..32).unwrap_or("0")
    )
}

fn subjects_of(message_id: &str) -> String {
    format!("{QUARANTINE_PREFIX}.{}.*", id_token(message_id))
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BoundaryError {
    BoundaryError::Unavailable(format!("quarantine {what}: {e}"))
}

fn internal(e: impl std::fmt::Display) -> BoundaryError {
    BoundaryError::Internal(format!("quarantine entry: {e}"))
}

/// The body of an entry; see the module docs.
pub(crate) fn encode(
    entry: &QuarantineEntry,
    max_payload: usize,
) -> Result<Vec<u8>, BoundaryError> {
    let mut meta = entry.clone();
    meta.message.fact.object_json = String::new();
    // Embedded only when it reads back as the same text (JSON whose raw value has no
    // surrounding whitespace); anything else keeps the escaped string form.
    let object = &entry.message.fact.object_json;
    let embeddable = serde_json::from_str::<&serde_json::value::RawValue>(object)
        .is_ok_and(|raw| raw.get() == object);
    let message = if embeddable {
        bsfg_core::model::encode_stored(&entry.message)?
    } else {
        serde_json::to_vec(&entry.message).map_err(internal)?
    };
    let body = |meta: &QuarantineEntry, message: &[u8]| -> Result<Vec<u8>, BoundaryError> {
        let mut out = b"{\"entry\":".to_vec();
        serde_json::to_writer(&mut out, meta).map_err(internal)?;
        out.extend_from_slice(b",\"message\":");
        out.extend_from_slice(message);
        out.push(b'}');
        Ok(out)
    };
    let full = body(&meta, &message)?;
    if full.len() + HEADROOM <= max_payload {
        return Ok(full);
    }
    // Too large to keep whole: keep the entry, say what was left out.
    meta.payload_omitted_bytes = Some(message.len() as u64);
    let mut without = entry.message.clone();
    without.fact.object_json = "null".into();
    let slim = bsfg_core::model::encode_stored(&without)?;
    body(&meta, &slim)
}

#[derive(Deserialize)]
struct Body {
    entry: QuarantineEntry,
    message: Box<serde_json::value::RawValue>,
}

pub(crate) fn decode(payload: &[u8]) -> Result<QuarantineEntry, BoundaryError> {
    let b: Body = serde_json::from_slice(payload).map_err(internal)?;
    let mut entry = b.entry;
    let mut message =
        bsfg_core::model::decode_stored(b.message.get().as_bytes()).map_err(internal)?;
    if entry.payload_omitted_bytes.is_some() {
        message.fact.object_json = String::new();
    }
    entry.message = message;
    Ok(entry)
}

/// Keeps `entry` unless the same (message_id, payload) already has one
/// (compare-and-set on the subject, so two receivers of the same page keep it once).
pub(crate) async fn put(
    js: &jetstream::Context,
    entry: &QuarantineEntry,
    max_payload: usize,
) -> Result<bool, BoundaryError> {
    let payload = encode(entry, max_payload)?;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let ack = js
        .publish_with_headers(subject(entry), headers, payload.into())
        .await
        .map_err(|e| unavailable("put", e))?;
    match ack.await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
        Err(e) => Err(unavailable("put", e)),
    }
}

/// Entries on subjects matching `filter`, oldest first, at most `limit`.
async fn scan(
    stream: &Stream,
    filter: String,
    limit: usize,
) -> Result<Vec<QuarantineEntry>, BoundaryError> {
    let mut out = Vec::new();
    let mut seq = 1;
    while out.len() < limit {
        match stream
            .direct_get_next_for_subject(filter.clone(), Some(seq))
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

/// Entries, oldest first.
pub(crate) async fn list(
    stream: &Stream,
    limit: usize,
) -> Result<Vec<QuarantineEntry>, BoundaryError> {
    scan(stream, format!("{QUARANTINE_PREFIX}.*.*"), limit).await
}

/// The entries of `message_id`, one per payload.
pub(crate) async fn of(
    stream: &Stream,
    message_id: &str,
) -> Result<Vec<QuarantineEntry>, BoundaryError> {
    scan(stream, subjects_of(message_id), usize::MAX).await
}

/// Removes exactly `entry`.
pub(crate) async fn remove(
    stream: &Stream,
    entry: &QuarantineEntry,
) -> Result<bool, BoundaryError> {
    let r = stream
        .purge()
        .filter(subject(entry))
        .await
        .map_err(|e| unavailable("remove", e))?;
    Ok(r.purged > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bsfg_core::{Denial, Provenance};

    fn entry(object_json: &str) -> QuarantineEntry {
        let mut m = fact();
        m.fact.object_json = object_json.into();
        QuarantineEntry::new(
            m,
            "invalid_argument",
            Denial {
                policy: String::new(),
                reason: "r".into(),
                module_sha256: String::new(),
            },
            Provenance {
                zone: "plant-a".into(),
                stream: "facts_operational".into(),
                offset: 7,
                link: "from-plant".into(),
            },
            1,
        )
    }

    fn fact() -> bsfg_core::Message {
        bsfg_core::Message {
            envelope: bsfg_core::Envelope {
                message_id: "m-1".into(),
                from_zone: "plant-a".into(),
                to_zone: "enterprise".into(),
                produced_at_unix_ms: 1,
                ..Default::default()
            },
            fact: bsfg_core::Fact {
                subject: "batch:B1".into(),
                predicate: "step_completed".into(),
                object_json: String::new(),
                artifacts: vec![],
            },
        }
    }

    #[test]
    fn every_kept_fact_reads_back_exactly_as_fetched() {
        for object in [
            r#"{"a":1}"#,
            r#" {"x":1,"x":2} "#,
            "{not json",
            "null",
            r#""secret""#,
            "",
        ] {
            let e = entry(object);
            let back = decode(&encode(&e, 1 << 20).expect("encodes")).expect("decodes");
            assert_eq!(back, e, "{object:?}");
        }
    }

    #[test]
    fn a_fact_too_large_to_keep_leaves_its_entry_without_the_object() {
        let e = entry(&format!("\"{}\"", "x".repeat(10_000)));
        let back = decode(&encode(&e, 4096).expect("encodes")).expect("decodes");
        assert_eq!(back.payload_omitted_bytes.map(|b| b > 10_000), Some(true));
        assert!(back.message.fact.object_json.is_empty());
        assert_eq!(back.message.envelope, e.message.envelope);
        assert_eq!(back.payload_digest, e.payload_digest);
    }
}
