//! The bounded idempotency index: its stream layout, its messages, and how a gateway
//! reads the stream into its [`crate::lookup::Lookup`].
//!
//! ## Layout
//! - Stream `bsfg_index`, subjects `bsfg.index.*`, no per-subject limit, `max_age` =
//!   the zone's `index_max_age` (zero: permanent).
//! - **Reservations** on one of [`BUCKETS`] bucket subjects `bsfg.index.<bbb>` (the
//!   first 12 bits of the id's token, in hex): one message per id,
//!   `{id, digest, stream, subject, after}`. The first reservation of a bucket in an
//!   atomic batch carries `Nats-Expected-Last-Subject-Sequence` = the bucket's last
//!   sequence the writer has read, so a batch commits only if nobody reserved in
//!   any of its buckets since: zone-wide uniqueness for every gateway of the zone,
//!   with server state for 4097 subjects however many ids the zone remembers.
//! - **Offset records** on `bsfg.index.offsets`: `{"o": [[token, offset], ...]}`, the
//!   offsets where reserved facts landed; they only speed up later look-ups (a
//!   missing record is found again in the fact subject).
//!
//! Facts are stored on bounded subjects too: `facts.<class>.<kind>.<wwww><bb>`, the
//! writing gateway's number and one of [`FACT_BUCKETS`] buckets (see
//! `crate::append`): server state for 256 subjects per class, kind and gateway.
//!
//! The layout before this one kept one subject per id (`bsfg_ids`, `bsfg.ids.<token>`)
//! and one per fact: server memory grew by ~400 bytes per id ever appended. A zone
//! with that stream is refused at start-up until `bsfg index migrate` has moved it.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
    stream::{Config, DiscardPolicy, StorageType, Stream},
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::JetStreamConfig;
use crate::error::SinkError;
use crate::lookup::{Entry, Lookup, Update};

/// Name of the idempotency index stream.
pub const INDEX_STREAM: &str = "bsfg_index";
/// Subject prefix of the index (`bsfg.index.<bucket>`, `bsfg.index.offsets`).
pub const INDEX_PREFIX: &str = "bsfg.index";
/// Subject of offset records.
pub const OFFSETS_SUBJECT: &str = "bsfg.index.offsets";
/// Number of reservation buckets.
pub const BUCKETS: usize = 4096;
/// Number of fact subjects per class and subject kind.
pub const FACT_BUCKETS: usize = 256;
/// The index stream of the layout before this one (one subject per id).
pub const LEGACY_INDEX_STREAM: &str = "bsfg_ids";

/// 128-bit token of a message_id.
pub fn token(message_id: &str) -> [u8; 16] {
    let d = Sha256::digest(message_id.as_bytes());
    let mut t = [0u8; 16];
    t.copy_from_slice(&d[..16]);
    t
}

/// The reservation bucket of a token: its first 12 bits.
pub fn bucket(token: &[u8; 16]) -> u16 {
    (u16::from(token[0]) << 4) | u16::from(token[1] >> 4)
}

/// `bsfg.index.<bbb>`.
pub fn bucket_subject(bucket: u16) -> String {
    format!("{INDEX_PREFIX}.{bucket:03x}")
}

/// The fact bucket of a token (other bits than the reservation bucket's).
pub fn fact_bucket(token: &[u8; 16]) -> u8 {
    token[2]
}

/// A reservation as stored on a bucket subject.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reservation {
    /// The message_id.
    pub id: String,
    /// Payload digest, hex.
    pub digest: String,
    /// Class stream.
    pub stream: String,
    /// Fact subject.
    pub subject: String,
    /// The fact subject's last sequence the writer knew before reserving.
    pub after: u64,
    /// Where the fact landed, when the reservation is written together with it
    /// (migrated entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl Reservation {
    /// The look-up entry this reservation stands for, reserved at `at_unix_ms`.
    pub(crate) fn into_entry(self, at_unix_ms: i64) -> ([u8; 16], Entry) {
        (
            token(&self.id),
            Entry {
                id: self.id,
                digest: self.digest,
                stream: self.stream,
                subject: self.subject,
                after: self.after,
                offset: self.offset,
                at_unix_ms,
            },
        )
    }
}

/// Offset records: `[token hex, offset]` pairs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Offsets {
    /// The pairs.
    pub o: Vec<(String, u64)>,
}

/// Stream settings of the index.
pub(crate) fn stream_config(cfg: &JetStreamConfig) -> Config {
    Config {
        name: INDEX_STREAM.into(),
        description: Some(format!(
            "BSFG idempotency index: reservations in {BUCKETS} buckets and offset records (zone {})",
            cfg.zone
        )),
        subjects: vec![format!("{INDEX_PREFIX}.*")],
        max_age: cfg.index_max_age,
        storage: StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window.min(Duration::from_secs(120)),
        allow_direct: true,
        allow_atomic_publish: true,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Refuses a zone whose JetStream still holds the per-id index of the layout before
/// this one; nothing is changed.
pub(crate) async fn refuse_legacy(js: &jetstream::Context, zone: &str) -> Result<(), SinkError> {
    match js.get_stream(LEGACY_INDEX_STREAM).await {
        Ok(_) => Err(SinkError::Layout(format!(
            "zone {zone} holds an idempotency index of the per-id layout (stream {LEGACY_INDEX_STREAM}, one subject per id), which costs server memory for every id ever appended; stop the gateway and run `bsfg index migrate --config <zone.toml>` once to move it to the bounded layout ({INDEX_STREAM}); nothing was changed"
        ))),
        Err(e) if crate::streams::is_not_found(&e) => Ok(()),
        Err(e) => Err(SinkError::js("get stream", e)),
    }
}

/// Parses a reservation message into the look-up entry it stands for.
pub(crate) fn entry_of(payload: &[u8], at_unix_ms: i64) -> Option<([u8; 16], Entry)> {
    let r: Reservation = serde_json::from_slice(payload).ok()?;
    Some(r.into_entry(at_unix_ms))
}

/// Parses an offset record.
pub(crate) fn offsets_of(payload: &[u8]) -> Vec<([u8; 16], u64)> {
    let Ok(r) = serde_json::from_slice::<Offsets>(payload) else {
        return Vec::new();
    };
    r.o.into_iter()
        .filter_map(|(t, o)| {
            let mut k = [0u8; 16];
            hex::decode_to_slice(t, &mut k).ok()?;
            Some((k, o))
        })
        .collect()
}

/// The bucket a subject names (`bsfg.index.<bbb>`), if it is a bucket subject.
pub(crate) fn bucket_of_subject(subject: &str) -> Option<u16> {
    let b = subject.strip_prefix(INDEX_PREFIX)?.strip_prefix('.')?;
    if b.len() != 3 {
        return None;
    }
    u16::from_str_radix(b, 16).ok()
}

/// Reads the index stream after `applied` up to its last message into the look-up,
/// and returns the new watermark with the last sequence it saw of every bucket (0:
/// none). Applies in chunks
/// so a rebuild of millions of ids keeps memory flat.
pub(crate) async fn catch_up(
    stream: &Stream,
    lookup: &Lookup,
    applied: u64,
) -> Result<(u64, Vec<u64>), String> {
    let mut s = stream.clone();
    let info = s
        .info()
        .await
        .map_err(|e| format!("index stream info: {e}"))?;
    let last = info.state.last_sequence;
    if last <= applied || info.state.messages == 0 {
        return Ok((applied.max(last), vec![0; BUCKETS]));
    }
    let start = applied.max(info.state.first_sequence.saturating_sub(1)) + 1;
    // A plain ephemeral consumer without acks, pulled in large batches: several
    // times faster than an ordered consumer's batches of 500 for a full rebuild.
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("index read: {e}"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(10_000)
        .messages()
        .await
        .map_err(|e| format!("index read: {e}"))?;
    let mut seen_buckets = vec![0u64; BUCKETS];
    let mut update = Update::default();
    let mut pending = 0usize;
    let mut upto = applied;
    let started = std::time::Instant::now();
    let mut applying = Duration::ZERO;
    while upto < last {
        let Some(m) = messages.next().await else {
            return Err("index read ended early".into());
        };
        let m = m.map_err(|e| format!("index read: {e}"))?;
        let info = m.info().map_err(|e| format!("index read: {e}"))?;
        let seq = info.stream_sequence;
        let at = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
        if let Some(b) = bucket_of_subject(&m.subject) {
            if let Some(e) = entry_of(&m.payload, at) {
                update.reserve.push(e);
            }
            update.buckets.push((b, seq));
            if let Some(slot) = seen_buckets.get_mut(usize::from(b)) {
                *slot = seq;
            }
        } else if m.subject.as_str() == OFFSETS_SUBJECT {
            update.offsets.extend(offsets_of(&m.payload));
        }
        pending += 1;
        upto = seq;
        if pending >= 50_000 || upto >= last || info.pending == 0 {
            update.applied = Some(upto);
            let u = std::mem::take(&mut update);
            let l = lookup.clone();
            let t = std::time::Instant::now();
            tokio::task::spawn_blocking(move || l.apply(&u, false))
                .await
                .map_err(|e| format!("look-up store: {e}"))?
                .map_err(|e| e.to_string())?;
            applying += t.elapsed();
            pending = 0;
            if info.pending == 0 {
                break;
            }
        }
    }
    if upto > applied {
        tracing::debug!(
            messages = upto - applied,
            secs = started.elapsed().as_secs_f64(),
            applying_secs = applying.as_secs_f64(),
            "index stream read into the look-up"
        );
        let l = lookup.clone();
        tokio::task::spawn_blocking(move || l.flush())
            .await
            .map_err(|e| format!("look-up store: {e}"))?
            .map_err(|e| e.to_string())?;
    }
    Ok((upto.max(applied), seen_buckets))
}

/// What `bsfg index migrate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    /// Entries read from the per-id index.
    pub read: u64,
    /// Reservations written to the bounded index.
    pub written: u64,
    /// Entries that could not be read as index entries (reported, skipped).
    pub skipped: u64,
    /// Whether the per-id index stream was deleted at the end.
    pub removed_legacy: bool,
}

/// An entry of the per-id index (`bsfg.ids.<token>`).
#[derive(Debug, Deserialize)]
struct LegacyEntry {
    id: String,
    digest: String,
    stream: String,
    subject: String,
    #[serde(default)]
    offset: Option<u64>,
}

/// Moves a zone's per-id index (`bsfg_ids`) to the bounded layout: every entry
/// becomes a reservation in `bsfg_index` on its bucket subject, with its offset
/// when it had one (its fact stays on its old per-id subject until the class's
/// retention removes it; a reservation whose fact was never recorded keeps `after`
/// = 0, so a retry reads that one-fact subject before completing). Written in
/// atomic batches; the per-id stream is deleted only after every entry is written.
/// Run it with every gateway of the zone stopped. Running it again after an
/// interruption writes the same reservations again, which the look-up reads as one.
pub async fn migrate_legacy(
    js: &jetstream::Context,
    client: &async_nats::Client,
    cfg: &JetStreamConfig,
) -> Result<Migration, SinkError> {
    let mut report = Migration::default();
    let legacy = match js.get_stream(LEGACY_INDEX_STREAM).await {
        Ok(s) => s,
        Err(e) if crate::streams::is_not_found(&e) => return Ok(report),
        Err(e) => return Err(SinkError::js("get stream", e)),
    };
    crate::streams::ensure(js, stream_config(cfg)).await?;
    let mut info_stream = legacy.clone();
    let info = info_stream
        .info()
        .await
        .map_err(|e| SinkError::js("stream info", e))?;
    let last = info.state.last_sequence;
    if info.state.messages > 0 {
        let consumer = legacy
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| SinkError::js("create consumer", e))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| SinkError::js("read index", e))?;
        let mut batch: Vec<(String, bytes::Bytes)> = Vec::new();
        let mut classes: std::collections::HashMap<String, Stream> = Default::default();
        loop {
            let Some(m) = messages.next().await else {
                break;
            };
            let m = m.map_err(|e| SinkError::js("read index", e))?;
            let mi = m.info().map_err(|e| SinkError::js("read index", e))?;
            let (seq, pending) = (mi.stream_sequence, mi.pending);
            report.read += 1;
            match serde_json::from_slice::<LegacyEntry>(&m.payload) {
                Ok(mut e) => {
                    let t = token(&e.id);
                    // A reservation the old index never recorded an offset for: look
                    // for its fact on its per-id subject now, while that is cheap.
                    let mut after = e.offset.map_or(0, |o| o.saturating_sub(1));
                    if e.offset.is_none() {
                        let (found, first) = legacy_fact(js, &mut classes, &e).await?;
                        match found {
                            Some(o) => e.offset = Some(o),
                            None => after = first.saturating_sub(1),
                        }
                    }
                    let r = Reservation {
                        after,
                        id: e.id,
                        digest: e.digest,
                        stream: e.stream,
                        subject: e.subject,
                        offset: e.offset,
                    };
                    let body = serde_json::to_vec(&r).unwrap_or_default();
                    batch.push((bucket_subject(bucket(&t)), body.into()));
                }
                Err(_) => report.skipped += 1,
            }
            if batch.len() >= 1000 || pending == 0 || seq >= last {
                report.written += write_batch(js, client, std::mem::take(&mut batch)).await?;
            }
            if pending == 0 || seq >= last {
                break;
            }
        }
        report.written += write_batch(js, client, batch).await?;
    }
    js.delete_stream(LEGACY_INDEX_STREAM)
        .await
        .map_err(|e| SinkError::js("delete stream", e))?;
    report.removed_legacy = true;
    Ok(report)
}

/// The offset of an unrecorded entry's fact on its per-id subject, if stored, and
/// the class stream's first sequence.
async fn legacy_fact(
    js: &jetstream::Context,
    classes: &mut std::collections::HashMap<String, Stream>,
    e: &LegacyEntry,
) -> Result<(Option<u64>, u64), SinkError> {
    if !classes.contains_key(&e.stream) {
        let s = js
            .get_stream(&e.stream)
            .await
            .map_err(|err| SinkError::js("get stream", err))?;
        classes.insert(e.stream.clone(), s);
    }
    let Some(s) = classes.get_mut(&e.stream) else {
        return Ok((None, 0));
    };
    let first = s
        .info()
        .await
        .map_err(|err| SinkError::js("stream info", err))?
        .state
        .first_sequence;
    match s.direct_get_last_for_subject(e.subject.as_str()).await {
        Ok(m) => {
            let digest = m
                .headers
                .get(crate::append::HDR_DIGEST)
                .map(|v| v.as_str().to_owned());
            Ok((
                (digest.as_deref() == Some(e.digest.as_str())).then_some(m.sequence),
                first,
            ))
        }
        Err(err) if err.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
            Ok((None, first))
        }
        Err(err) => Err(SinkError::js("fact look-up", err)),
    }
}

/// Writes reservations as one atomic batch; returns how many.
async fn write_batch(
    js: &jetstream::Context,
    client: &async_nats::Client,
    batch: Vec<(String, bytes::Bytes)>,
) -> Result<u64, SinkError> {
    let n = batch.len() as u64;
    if n == 0 {
        return Ok(0);
    }
    let msgs = batch
        .into_iter()
        .map(|(subject, body)| (subject, async_nats::HeaderMap::new(), body))
        .collect();
    crate::append::publish_batch(client, js, msgs)
        .await
        .map_err(|e| SinkError::JetStream {
            op: "publish index batch",
            message: e.to_string(),
        })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buckets_cover_4096_subjects_and_parse_back() {
        let t = token("m-1");
        let b = bucket(&t);
        assert!(usize::from(b) < BUCKETS);
        assert_eq!(bucket_of_subject(&bucket_subject(b)), Some(b));
        assert_eq!(bucket_of_subject(OFFSETS_SUBJECT), None);
        assert_eq!(bucket(&[0xff; 16]), 0xfff);
        assert_eq!(bucket(&[0; 16]), 0);
    }

    #[test]
    fn offset_records_round_trip_and_bad_tokens_are_skipped() {
        let t = token("m-2");
        let o = Offsets {
            o: vec![(hex::encode(t), 42), ("zz".into(), 1)],
        };
        let got = offsets_of(&serde_json::to_vec(&o).unwrap());
        assert_eq!(got, vec![(t, 42)]);
    }
}
