//! The zone log's layout (one stream for facts and the idempotency index), its
//! index messages, and how a gateway reads the index into its
//! [`crate::lookup::Lookup`].
//!
//! ## Layout
//! One stream, [`LOG_STREAM`] (`bsfg_log`), holds everything an append writes, so
//! that a round of appends is **one atomic batch: one durable commit**:
//! All its subjects lie under `bsfg.log.`, apart from every stream of the layouts
//! before it, so a zone can be migrated while those still exist.
//! - **Facts** on `bsfg.log.facts.<class>.<kind>.<wwww><bb>` (the writing gateway's number and a
//!   bucket of the id: server state for 256 subjects per class, kind and gateway),
//!   each with `Nats-TTL` = its class's retention (none when the class keeps facts
//!   forever). The API names a class's facts `facts_<class>`, as a stream of its own;
//!   offsets are sequences of the log stream, so one class's offsets skip the
//!   sequences of other classes and of index messages.
//! - **Reservations** on one of [`BUCKETS`] bucket subjects `bsfg.log.ids.<bb>` (the
//!   first 8 bits of the id's token): one message per bucket of a batch,
//!   `{"r": [{id, digest, stream, subject, d}, ...]}`, where `d` is how many sequences
//!   after the message its fact lies (written in the same batch). The first message
//!   of each bucket carries `Nats-Expected-Last-Subject-Sequence` = the bucket's last
//!   sequence the writer has read, so a batch commits only if nobody reserved in any
//!   of its buckets since: zone-wide uniqueness for every gateway of the zone, with
//!   server state for 256 subjects however many ids the zone remembers. Kept forever
//!   unless `index_max_age` gives them a `Nats-TTL`.
//! - **Class heads** on `bsfg.log.head.<class>`: one message per class and batch,
//!   `{"back": n}` (the class's last fact lies n sequences before it), written with
//!   `Nats-Rollup: sub` (only the newest stays) and a compare-and-set on the head's
//!   last sequence, so the facts of a class form one chain across gateways: the first
//!   fact of a class in a batch carries `Bsfg-Prev` = the class's previous fact (the
//!   others follow their predecessor directly). FetchFacts reads from the chain where
//!   the retained facts of a class begin (`first_offset`) and from the head where
//!   they end (`last_offset`), so expired facts are told apart from other classes'
//!   sequences and a gap is never missed.
//!
//! The layouts before this one kept facts in one stream per class and the index in
//! `bsfg_index` (two commits per round), or one subject per id in `bsfg_ids`. A zone
//! holding either is refused at start-up until `bsfg index migrate` has moved it
//! ([`crate::migrate`]).

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::DeliverPolicy,
    stream::{Config, DiscardPolicy, StorageType, Stream},
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::JetStreamConfig;
use crate::error::SinkError;
use crate::lookup::{Entry, Lookup, Update};

/// Name of the zone log stream (facts, reservations, class heads).
pub const LOG_STREAM: &str = "bsfg_log";
/// Subject prefix of facts (`bsfg.log.facts.<class>.<kind>.<wwww><bb>`).
pub const FACTS_PREFIX: &str = "bsfg.log.facts";
/// Subject prefix of reservations (`bsfg.log.ids.<bucket>`).
pub const INDEX_PREFIX: &str = "bsfg.log.ids";
/// Subject prefix of class heads (`bsfg.log.head.<class>`).
pub const HEAD_PREFIX: &str = "bsfg.log.head";
/// Number of reservation buckets.
pub const BUCKETS: usize = 256;
/// Number of fact subjects per class, subject kind and gateway.
pub const FACT_BUCKETS: usize = 256;
/// Header on the first fact of a class in a batch: the class's previous fact.
pub const HDR_PREV: &str = "Bsfg-Prev";

/// 128-bit token of a message_id.
pub fn token(message_id: &str) -> [u8; 16] {
    let d = Sha256::digest(message_id.as_bytes());
    let mut t = [0u8; 16];
    t.copy_from_slice(&d[..16]);
    t
}

/// The reservation bucket of a token: its first 8 bits.
pub fn bucket(token: &[u8; 16]) -> u16 {
    u16::from(token[0])
}

/// `bsfg.log.ids.<bb>`.
pub fn bucket_subject(bucket: u16) -> String {
    format!("{INDEX_PREFIX}.{bucket:02x}")
}

/// Every fact subject of a class: `bsfg.log.facts.<class>.>`.
pub fn class_filter(class: &str) -> String {
    format!("{FACTS_PREFIX}.{class}.>")
}

/// The fact subject of an id of this class and subject kind, written by gateway
/// `writer`.
pub fn fact_subject(class: &str, kind: &str, writer: u16, token: &[u8; 16]) -> String {
    format!(
        "{FACTS_PREFIX}.{class}.{kind}.{writer:04x}{:02x}",
        fact_bucket(token)
    )
}

/// `bsfg.log.head.<class>`.
pub fn head_subject(class: &str) -> String {
    format!("{HEAD_PREFIX}.{class}")
}

/// The fact bucket of a token (other bits than the reservation bucket's).
pub fn fact_bucket(token: &[u8; 16]) -> u8 {
    token[2]
}

/// One reservation of a bucket message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reservation {
    /// The message_id.
    pub id: String,
    /// Payload digest, hex.
    pub digest: String,
    /// The class's stream name as the API shows it (`facts_<class>`).
    pub stream: String,
    /// Fact subject.
    pub subject: String,
    /// How many sequences after this message the fact lies; absent for an id whose
    /// fact the zone no longer holds (migrated after its class's retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<u64>,
}

/// A bucket message: the reservations of one bucket in one batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BucketRecord {
    /// The reservations.
    pub r: Vec<Reservation>,
}

/// A class head: the class's last fact lies `back` sequences before it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct HeadRecord {
    /// Distance back to the class's last fact.
    pub back: u64,
}

impl Reservation {
    /// The look-up entry this reservation stands for, written at `seq` (its fact at
    /// `seq + d`) and `at_unix_ms`.
    pub(crate) fn into_entry(self, seq: u64, at_unix_ms: i64) -> ([u8; 16], Entry) {
        (
            token(&self.id),
            Entry {
                offset: self.d.map(|d| seq + d),
                id: self.id,
                digest: self.digest,
                stream: self.stream,
                subject: self.subject,
                after: 0,
                at_unix_ms,
            },
        )
    }
}

/// Settings of the log stream.
pub(crate) fn stream_config(cfg: &JetStreamConfig) -> Config {
    Config {
        name: LOG_STREAM.into(),
        description: Some(format!(
            "BSFG zone log: facts of every class, the idempotency index in {BUCKETS} buckets and class heads (zone {})",
            cfg.zone
        )),
        subjects: vec![
            format!("{FACTS_PREFIX}.>"),
            format!("{INDEX_PREFIX}.*"),
            format!("{HEAD_PREFIX}.*"),
        ],
        storage: StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window,
        allow_direct: true,
        allow_atomic_publish: true,
        allow_message_ttl: true,
        allow_rollup: true,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

/// `Nats-TTL` value for a retention (whole seconds, at least one).
pub(crate) fn ttl_header(retention: Duration) -> String {
    format!("{}s", retention.as_secs().max(1))
}

/// Refuses a zone whose JetStream holds a layout before this one; nothing is
/// changed.
pub(crate) async fn refuse_old(js: &jetstream::Context, zone: &str) -> Result<(), SinkError> {
    for (stream, what) in [
        (
            crate::migrate::LEGACY_INDEX_STREAM,
            "an idempotency index of the per-id layout (one subject per id, server memory for every id)",
        ),
        (
            crate::migrate::V2_INDEX_STREAM,
            "the two-stream layout (the index apart from the class streams: two disk commits per append round)",
        ),
    ] {
        match js.get_stream(stream).await {
            Ok(_) => {
                return Err(SinkError::Layout(format!(
                    "zone {zone} holds {what} (stream {stream}); stop every gateway of the zone and run `bsfg index migrate --config <zone.toml>` once to move it to the one-stream log ({LOG_STREAM}); nothing was changed"
                )));
            }
            Err(e) if crate::streams::is_not_found(&e) => {}
            Err(e) => return Err(SinkError::js("get stream", e)),
        }
    }
    Ok(())
}

/// Parses a bucket message (written at `seq`) into the look-up entries it stands for.
pub(crate) fn entries_of(payload: &[u8], seq: u64, at_unix_ms: i64) -> Vec<([u8; 16], Entry)> {
    serde_json::from_slice::<BucketRecord>(payload)
        .map(|r| {
            r.r.into_iter()
                .map(|r| r.into_entry(seq, at_unix_ms))
                .collect()
        })
        .unwrap_or_default()
}

/// The bucket a subject names (`bsfg.log.ids.<bb>`), if it is a bucket subject.
pub(crate) fn bucket_of_subject(subject: &str) -> Option<u16> {
    let b = subject.strip_prefix(INDEX_PREFIX)?.strip_prefix('.')?;
    if b.len() != 2 {
        return None;
    }
    u16::from_str_radix(b, 16).ok()
}

/// The sequence of the last message on `subject` (wildcards allowed), 0 when none.
pub(crate) async fn last_of(stream: &Stream, subject: &str) -> Result<u64, String> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(m) => Ok(m.sequence),
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("last of {subject}: {e}")),
    }
}

/// A class head as read from the stream: its own sequence (0: none yet) and the
/// class's last fact (0: none ever).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Head {
    pub seq: u64,
    pub last_fact: u64,
}

/// Reads the head of a class.
pub(crate) async fn read_head(stream: &Stream, class: &str) -> Result<Head, String> {
    match stream
        .direct_get_last_for_subject(head_subject(class))
        .await
    {
        Ok(m) => {
            let back = serde_json::from_slice::<HeadRecord>(&m.payload)
                .map_err(|e| format!("head of class {class} at {}: {e}", m.sequence))?
                .back;
            Ok(Head {
                seq: m.sequence,
                last_fact: m.sequence.saturating_sub(back),
            })
        }
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
            Ok(Head::default())
        }
        Err(e) => Err(format!("head of class {class}: {e}")),
    }
}

/// Where a class's retained facts begin and end: `(first, last)`, `first` the
/// sequence after which every fact of the class is still held (0 when it holds
/// none), `last` its newest fact ever (0: none). Read from the oldest retained fact's
/// place in the class chain and from the class head.
pub(crate) async fn class_range(stream: &Stream, class: &str) -> Result<(u64, u64), String> {
    let head = read_head(stream, class).await?;
    let oldest = match stream
        .direct_get_next_for_subject(class_filter(class), Some(1))
        .await
    {
        Ok(m) => m,
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
            return Ok((0, head.last_fact));
        }
        Err(e) => return Err(format!("oldest fact of class {class}: {e}")),
    };
    let prev = match oldest.headers.get(HDR_PREV) {
        Some(v) => v
            .as_str()
            .parse::<u64>()
            .map_err(|e| format!("{HDR_PREV} of offset {}: {e}", oldest.sequence))?,
        None => oldest.sequence.saturating_sub(1),
    };
    Ok((prev + 1, head.last_fact.max(oldest.sequence)))
}

/// Reads the reservations after `applied` up to the last one into the look-up, and
/// returns the new watermark with the last sequence it saw of every bucket (0: none).
/// Applies in chunks so a rebuild of millions of ids keeps memory flat.
pub(crate) async fn catch_up(
    stream: &Stream,
    lookup: &Lookup,
    applied: u64,
) -> Result<(u64, Vec<u64>), String> {
    // The log's end first, then the last reservation: every reservation up to that
    // end lies at or before `last`, so once read the look-up holds the log's
    // reservations up to `end`.
    let mut s = stream.clone();
    let end = s
        .info()
        .await
        .map_err(|e| format!("log stream info: {e}"))?
        .state
        .last_sequence;
    let last = last_of(stream, &format!("{INDEX_PREFIX}.*")).await?;
    if last <= applied {
        return Ok((applied.max(end), vec![0; BUCKETS]));
    }
    // A plain ephemeral consumer without acks, pulled in large batches: several
    // times faster than an ordered consumer's batches of 500 for a full rebuild.
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: applied + 1,
            },
            filter_subject: format!("{INDEX_PREFIX}.*"),
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
    while upto < last {
        let Some(m) = messages.next().await else {
            return Err("index read ended early".into());
        };
        let m = m.map_err(|e| format!("index read: {e}"))?;
        let info = m.info().map_err(|e| format!("index read: {e}"))?;
        let seq = info.stream_sequence;
        let at = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
        if let Some(b) = bucket_of_subject(&m.subject) {
            update.reserve.extend(entries_of(&m.payload, seq, at));
            update.buckets.push((b, seq));
            if let Some(slot) = seen_buckets.get_mut(usize::from(b)) {
                *slot = seq;
            }
        }
        pending += 1;
        upto = seq;
        if pending >= 50_000 || upto >= last || info.pending == 0 {
            update.applied = Some(upto);
            let u = std::mem::take(&mut update);
            let l = lookup.clone();
            tokio::task::spawn_blocking(move || l.apply(&u, false))
                .await
                .map_err(|e| format!("look-up store: {e}"))?
                .map_err(|e| e.to_string())?;
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
            "index read into the look-up"
        );
        let l = lookup.clone();
        tokio::task::spawn_blocking(move || l.flush())
            .await
            .map_err(|e| format!("look-up store: {e}"))?
            .map_err(|e| e.to_string())?;
    }
    Ok((upto.max(applied).max(end), seen_buckets))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buckets_cover_256_subjects_and_parse_back() {
        let t = token("m-1");
        let b = bucket(&t);
        assert!(usize::from(b) < BUCKETS);
        assert_eq!(bucket_of_subject(&bucket_subject(b)), Some(b));
        assert_eq!(bucket_of_subject("bsfg.log.ids.offsets"), None);
        assert_eq!(bucket(&[0xff; 16]), 0xff);
        assert_eq!(bucket(&[0; 16]), 0);
    }

    #[test]
    fn a_bucket_record_gives_each_reservation_its_fact_offset() {
        let r = BucketRecord {
            r: vec![
                Reservation {
                    id: "a".into(),
                    digest: "d".into(),
                    stream: "facts_operational".into(),
                    subject: "bsfg.log.facts.operational.batch.000001".into(),
                    d: Some(3),
                },
                Reservation {
                    id: "b".into(),
                    digest: "e".into(),
                    stream: "facts_operational".into(),
                    subject: "bsfg.log.facts.operational.batch.000002".into(),
                    d: None,
                },
            ],
        };
        let got = entries_of(&serde_json::to_vec(&r).unwrap(), 10, 5);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, token("a"));
        assert_eq!(got[0].1.offset, Some(13));
        assert_eq!(got[1].1.offset, None);
        assert!(entries_of(b"not json", 1, 1).is_empty());
    }
}
