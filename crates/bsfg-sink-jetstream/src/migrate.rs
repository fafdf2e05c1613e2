//! `bsfg index migrate`: moves a zone of an earlier layout to the one-stream log
//! ([`crate::index`]). Run it once with every gateway of the zone stopped.
//!
//! - **Per-id layout** (`bsfg_ids`, one subject per id): first moved to the
//!   two-stream layout, as before ([`migrate_legacy`]), then on.
//! - **Two-stream layout** (`bsfg_index` beside one stream per class,
//!   `facts_<class>`): every retained fact is copied, class by class in its order,
//!   into `bsfg_log` with its reservation in the same atomic batch (its remaining
//!   retention as `Nats-TTL`, its headers kept); every remembered id whose fact the
//!   zone no longer holds keeps a reservation without offset (answered `duplicate`);
//!   a reservation whose fact was never stored (a crash between the old steps) is
//!   dropped, so a retry stores the fact. Each durable consumer is created on the log
//!   with the same name, filter and settings, its frontier at the new offset of the
//!   last fact it had confirmed. Only then is `bsfg_index` deleted (from here on the
//!   zone is of the new layout), then the class streams.
//!
//! Offsets change: a fact's offset in the log is not its old one. Receivers keep
//! working (their next fetch starts after the consumer's new frontier and their
//! checkpoints only bound the gap check from below); a migration interrupted before
//! `bsfg_index` is deleted is run again from the start (the half-written log is
//! deleted first).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull::OrderedConfig},
    stream::{Config, DiscardPolicy, StorageType, Stream},
};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::append::{HDR_DIGEST, HDR_MESSAGE_ID, Outbound, publish_batch};
use crate::config::JetStreamConfig;
use crate::error::SinkError;
use crate::index::{self, BucketRecord, HeadRecord, Reservation, token};

/// The index stream of the per-id layout (one subject per id).
pub const LEGACY_INDEX_STREAM: &str = "bsfg_ids";
/// The index stream of the two-stream layout.
pub const V2_INDEX_STREAM: &str = "bsfg_index";
const V2_PREFIX: &str = "bsfg.index";
const V2_BUCKETS: usize = 4096;

/// Facts per batch of a copy (with their bucket messages and the head they stay
/// well under the server's 1000 messages).
const COPY_CHUNK: usize = 400;
/// Reservations without a fact per batch.
const ORPHAN_CHUNK: usize = 4000;
/// Gateway number written into the subjects of copied facts.
const MIGRATED_WRITER: u16 = 0xffff;

/// What `bsfg index migrate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    /// Entries read from the per-id index (0 when there was none).
    pub read: u64,
    /// Reservations written to the two-stream index from the per-id one.
    pub written: u64,
    /// Entries or messages that could not be read as BSFG's (reported, skipped).
    pub skipped: u64,
    /// Whether the per-id index stream was deleted at the end.
    pub removed_legacy: bool,
    /// Facts copied into the log with their reservations.
    pub facts: u64,
    /// Ids kept without a fact (their class's retention took it).
    pub kept_without_fact: u64,
    /// Reservations whose fact was never stored, dropped (a retry stores it).
    pub dropped_unstored: u64,
    /// Durable consumers created on the log.
    pub consumers: u64,
    /// Whether the two-stream layout was moved (and its streams deleted).
    pub moved_two_stream: bool,
}

/// A reservation of the two-stream layout (`bsfg.index.<bbb>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct V2Reservation {
    id: String,
    digest: String,
    stream: String,
    subject: String,
    #[serde(default)]
    after: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

fn v2_bucket_subject(token: &[u8; 16]) -> String {
    let b = (u16::from(token[0]) << 4) | u16::from(token[1] >> 4);
    format!("{V2_PREFIX}.{b:03x}")
}

fn v2_stream_config(cfg: &JetStreamConfig) -> Config {
    Config {
        name: V2_INDEX_STREAM.into(),
        description: Some(format!(
            "BSFG idempotency index: reservations in {V2_BUCKETS} buckets and offset records (zone {})",
            cfg.zone
        )),
        subjects: vec![format!("{V2_PREFIX}.*")],
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

async fn existing(js: &jetstream::Context, name: &str) -> Result<Option<Stream>, SinkError> {
    match js.get_stream(name).await {
        Ok(s) => Ok(Some(s)),
        Err(e) if crate::streams::is_not_found(&e) => Ok(None),
        Err(e) => Err(SinkError::js("get stream", e)),
    }
}

/// Every message of a stream (on `filter`, when given), in order, through an ordered
/// consumer.
async fn read_all(
    stream: &Stream,
    filter: Option<String>,
    op: &'static str,
) -> Result<jetstream::consumer::pull::Ordered, SinkError> {
    stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            filter_subject: filter.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(|e| SinkError::js("create consumer", e))?
        .messages()
        .await
        .map_err(|e| SinkError::js(op, e))
}

/// A message read by [`read_all`] with its sequence, the messages still pending and
/// when it was stored.
fn next_of(
    m: Option<Result<jetstream::Message, jetstream::consumer::pull::OrderedError>>,
    op: &'static str,
) -> Result<Option<(jetstream::Message, u64, u64, time::OffsetDateTime)>, SinkError> {
    let Some(m) = m else { return Ok(None) };
    let m = m.map_err(|e| SinkError::js(op, e))?;
    let i = m.info().map_err(|e| SinkError::js(op, e))?;
    let (seq, pending, published) = (i.stream_sequence, i.pending, i.published);
    Ok(Some((m, seq, pending, published)))
}

fn js_err(op: &'static str) -> impl Fn(String) -> SinkError {
    move |message| SinkError::JetStream { op, message }
}

/// Moves whatever earlier layout the zone holds to the one-stream log.
pub async fn migrate(
    js: &jetstream::Context,
    client: &async_nats::Client,
    cfg: &JetStreamConfig,
) -> Result<Migration, SinkError> {
    let mut report = migrate_legacy(js, client, cfg).await?;
    if existing(js, V2_INDEX_STREAM).await?.is_some() {
        migrate_two_stream(js, client, cfg, &mut report).await?;
    } else if existing(js, index::LOG_STREAM).await?.is_some() {
        // An earlier run deleted the index and stopped before the class streams.
        for class in &cfg.classes {
            if existing(js, &class.stream_name()).await?.is_some() {
                js.delete_stream(class.stream_name())
                    .await
                    .map_err(|e| SinkError::js("delete stream", e))?;
                report.moved_two_stream = true;
            }
        }
    }
    Ok(report)
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

/// Moves a zone's per-id index (`bsfg_ids`) to the two-stream layout: every entry
/// becomes a reservation in `bsfg_index`, with its offset when it had one or its
/// fact is found on its per-id subject. The per-id stream is deleted only after
/// every entry is written; running it again after an interruption writes the same
/// reservations again, which are read as one.
pub async fn migrate_legacy(
    js: &jetstream::Context,
    client: &async_nats::Client,
    cfg: &JetStreamConfig,
) -> Result<Migration, SinkError> {
    let mut report = Migration::default();
    let Some(legacy) = existing(js, LEGACY_INDEX_STREAM).await? else {
        return Ok(report);
    };
    crate::streams::ensure(js, v2_stream_config(cfg)).await?;
    let info = legacy
        .clone()
        .info()
        .await
        .map_err(|e| SinkError::js("stream info", e))?
        .clone();
    let last = info.state.last_sequence;
    if info.state.messages > 0 {
        let mut messages = read_all(&legacy, None, "read index").await?;
        let mut batch: Vec<Outbound> = Vec::new();
        let mut classes: HashMap<String, Stream> = HashMap::new();
        while let Some((m, seq, pending, _)) = next_of(messages.next().await, "read index")? {
            report.read += 1;
            match serde_json::from_slice::<LegacyEntry>(&m.payload) {
                Ok(mut e) => {
                    let t = token(&e.id);
                    let mut after = e.offset.map_or(0, |o| o.saturating_sub(1));
                    if e.offset.is_none() {
                        let (found, first) = legacy_fact(js, &mut classes, &e).await?;
                        match found {
                            Some(o) => e.offset = Some(o),
                            None => after = first.saturating_sub(1),
                        }
                    }
                    let r = V2Reservation {
                        after,
                        id: e.id,
                        digest: e.digest,
                        stream: e.stream,
                        subject: e.subject,
                        offset: e.offset,
                    };
                    batch.push((v2_bucket_subject(&t), HeaderMap::new(), to_json(&r)));
                }
                Err(_) => report.skipped += 1,
            }
            if batch.len() >= 1000 || pending == 0 || seq >= last {
                report.written += write(js, client, std::mem::take(&mut batch)).await?;
            }
            if pending == 0 || seq >= last {
                break;
            }
        }
        report.written += write(js, client, batch).await?;
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
    classes: &mut HashMap<String, Stream>,
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
            let digest = m.headers.get(HDR_DIGEST).map(|v| v.as_str().to_owned());
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

/// Writes messages in atomic batches of at most 1000; returns how many.
async fn write(
    js: &jetstream::Context,
    client: &async_nats::Client,
    msgs: Vec<Outbound>,
) -> Result<u64, SinkError> {
    let n = msgs.len() as u64;
    let mut rest = msgs;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(1000));
        publish_batch(client, js, rest)
            .await
            .map_err(|e| js_err("publish batch")(e.to_string()))?;
        rest = tail;
    }
    Ok(n)
}

fn to_json<T: Serialize>(v: &T) -> bytes::Bytes {
    // Plain structs of strings and integers always serialize.
    bytes::Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// One fact read from a class stream, ready to copy.
struct Copied {
    old: u64,
    token: [u8; 16],
    reservation: Reservation,
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
}

/// Copies a chunk of one class's facts with their reservations and the class head
/// as one atomic batch; returns the new offsets and the head.
async fn copy_chunk(
    js: &jetstream::Context,
    client: &async_nats::Client,
    class: &str,
    chunk: Vec<Copied>,
    head: index::Head,
    ttl: Option<String>,
) -> Result<(Vec<(u64, u64)>, index::Head), SinkError> {
    let mut by_bucket: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, c) in chunk.iter().enumerate() {
        by_bucket
            .entry(index::bucket(&c.token))
            .or_default()
            .push(i);
    }
    let buckets: Vec<(u16, Vec<usize>)> = by_bucket
        .into_iter()
        .flat_map(|(b, v)| v.chunks(64).map(|p| (b, p.to_vec())).collect::<Vec<_>>())
        .collect();
    let first_fact = buckets.len();
    let mut msgs: Vec<Outbound> = Vec::with_capacity(first_fact + chunk.len() + 1);
    for (at, (b, members)) in buckets.iter().enumerate() {
        let record = BucketRecord {
            r: members
                .iter()
                .map(|&i| {
                    let mut r = chunk[i].reservation.clone();
                    r.d = Some((first_fact + i - at) as u64);
                    r
                })
                .collect(),
        };
        let mut h = HeaderMap::new();
        if let Some(t) = &ttl {
            h.insert("Nats-TTL", t.as_str());
        }
        msgs.push((index::bucket_subject(*b), h, to_json(&record)));
    }
    let olds: Vec<u64> = chunk.iter().map(|c| c.old).collect();
    for (k, c) in chunk.into_iter().enumerate() {
        let mut h = c.headers;
        if k == 0 {
            h.insert(index::HDR_PREV, head.last_fact.to_string().as_str());
        }
        msgs.push((c.subject, h, c.payload));
    }
    let mut h = HeaderMap::new();
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        head.seq.to_string().as_str(),
    );
    h.insert("Nats-Rollup", "sub");
    msgs.push((
        index::head_subject(class),
        h,
        to_json(&HeadRecord { back: 1 }),
    ));
    let seqs = publish_batch(client, js, msgs)
        .await
        .map_err(|e| js_err("copy facts")(e.to_string()))?;
    let n = olds.len();
    let news = &seqs[first_fact..first_fact + n];
    let head = index::Head {
        seq: seqs.last().copied().unwrap_or(0),
        last_fact: news.last().copied().unwrap_or(head.last_fact),
    };
    Ok((olds.into_iter().zip(news.iter().copied()).collect(), head))
}

/// A fact's headers as copied: BSFG's own, without the server's and the batch's.
fn copied_headers(h: Option<&HeaderMap>, ttl: Option<&str>) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(h) = h {
        for (k, values) in h.iter() {
            let name: &str = k.as_ref();
            if name.starts_with("Nats-") {
                continue;
            }
            for v in values {
                out.append(name, v.as_str());
            }
        }
    }
    if let Some(t) = ttl {
        out.insert("Nats-TTL", t);
    }
    out
}

async fn migrate_two_stream(
    js: &jetstream::Context,
    client: &async_nats::Client,
    cfg: &JetStreamConfig,
    report: &mut Migration,
) -> Result<(), SinkError> {
    // A log next to the old index is what an interrupted run left: start over.
    if existing(js, index::LOG_STREAM).await?.is_some() {
        js.delete_stream(index::LOG_STREAM)
            .await
            .map_err(|e| SinkError::js("delete stream", e))?;
    }
    let log = crate::streams::ensure(js, index::stream_config(cfg)).await?;
    let now = time::OffsetDateTime::now_utc();
    let mut moved: HashSet<[u8; 16]> = HashSet::new();
    let mut mapping: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    let mut firsts: HashMap<String, u64> = HashMap::new();
    let mut class_streams = Vec::new();

    // Facts, class by class, in their order.
    for class in &cfg.classes {
        let Some(old) = existing(js, &class.stream_name()).await? else {
            continue;
        };
        class_streams.push(old.clone());
        let info = old
            .clone()
            .info()
            .await
            .map_err(|e| SinkError::js("stream info", e))?
            .clone();
        firsts.insert(class.stream_name(), info.state.first_sequence);
        let map = mapping.entry(class.stream_name()).or_default();
        let mut head = index::Head::default();
        if info.state.messages == 0 {
            continue;
        }
        let last = info.state.last_sequence;
        let mut messages = read_all(&old, None, "read facts").await?;
        let mut chunk = Vec::new();
        while let Some((m, seq, pending, published)) = next_of(messages.next().await, "read facts")?
        {
            let get = |k: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(k))
                    .map(|v| v.as_str().to_owned())
            };
            match (get(HDR_MESSAGE_ID), get(HDR_DIGEST)) {
                (Some(id), Some(digest)) if moved.insert(token(&id)) => {
                    let t = token(&id);
                    let kind = m.subject.split('.').nth(2).unwrap_or("other").to_owned();
                    let subject = index::fact_subject(&class.name, &kind, MIGRATED_WRITER, &t);
                    let ttl = (!class.max_age.is_zero()).then(|| {
                        let age = (now - published).max(time::Duration::ZERO);
                        let left = class
                            .max_age
                            .saturating_sub(Duration::from_secs(age.whole_seconds() as u64));
                        index::ttl_header(left)
                    });
                    chunk.push(Copied {
                        old: seq,
                        token: t,
                        reservation: Reservation {
                            id,
                            digest,
                            stream: class.stream_name(),
                            subject: subject.clone(),
                            d: None,
                        },
                        subject,
                        headers: copied_headers(m.headers.as_ref(), ttl.as_deref()),
                        payload: m.payload.clone(),
                    });
                }
                _ => report.skipped += 1,
            }
            let done = pending == 0 || seq >= last;
            if chunk.len() >= COPY_CHUNK || (done && !chunk.is_empty()) {
                let ttl =
                    (!cfg.index_max_age.is_zero()).then(|| index::ttl_header(cfg.index_max_age));
                let n = chunk.len() as u64;
                let (pairs, h) = copy_chunk(
                    js,
                    client,
                    &class.name,
                    std::mem::take(&mut chunk),
                    head,
                    ttl,
                )
                .await?;
                head = h;
                map.extend(pairs);
                report.facts += n;
            }
            if done {
                break;
            }
        }
    }

    // Ids whose facts are gone.
    if let Some(v2) = existing(js, V2_INDEX_STREAM).await? {
        let info = v2
            .clone()
            .info()
            .await
            .map_err(|e| SinkError::js("stream info", e))?
            .clone();
        if info.state.messages > 0 {
            let last = info.state.last_sequence;
            let mut messages = read_all(&v2, Some(format!("{V2_PREFIX}.*")), "read index").await?;
            let mut kept: BTreeMap<u16, Vec<Reservation>> = BTreeMap::new();
            let mut pending_n = 0usize;
            while let Some((m, seq, pending, _)) = next_of(messages.next().await, "read index")? {
                if m.subject.as_str() != "bsfg.index.offsets" {
                    match serde_json::from_slice::<V2Reservation>(&m.payload) {
                        Ok(r) if moved.insert(token(&r.id)) => {
                            let first = firsts.get(&r.stream).copied().unwrap_or(u64::MAX);
                            // Recorded once, or facts after it expired: it may have
                            // been stored. Otherwise it never was.
                            if r.offset.is_some() || r.after + 1 < first {
                                let t = token(&r.id);
                                kept.entry(index::bucket(&t))
                                    .or_default()
                                    .push(Reservation {
                                        id: r.id,
                                        digest: r.digest,
                                        stream: r.stream,
                                        subject: r.subject,
                                        d: None,
                                    });
                                report.kept_without_fact += 1;
                                pending_n += 1;
                            } else {
                                report.dropped_unstored += 1;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => report.skipped += 1,
                    }
                }
                let done = pending == 0 || seq >= last;
                if pending_n >= ORPHAN_CHUNK || (done && pending_n > 0) {
                    let ttl = (!cfg.index_max_age.is_zero())
                        .then(|| index::ttl_header(cfg.index_max_age));
                    let msgs: Vec<Outbound> = std::mem::take(&mut kept)
                        .into_iter()
                        .flat_map(|(b, rs)| {
                            rs.chunks(64)
                                .map(|p| {
                                    let mut h = HeaderMap::new();
                                    if let Some(t) = &ttl {
                                        h.insert("Nats-TTL", t.as_str());
                                    }
                                    (
                                        index::bucket_subject(b),
                                        h,
                                        to_json(&BucketRecord { r: p.to_vec() }),
                                    )
                                })
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    write(js, client, msgs).await?;
                    pending_n = 0;
                }
                if done {
                    break;
                }
            }
        }
    }

    // Durable consumers, at the new offset of what they had confirmed.
    for old in &class_streams {
        let name = old.cached_info().config.name.clone();
        let map = mapping.get(&name).cloned().unwrap_or_default();
        let infos: Vec<jetstream::consumer::Info> = old
            .consumers()
            .try_collect()
            .await
            .map_err(|e| SinkError::js("list consumers", e))?;
        for info in infos {
            let Some(durable) = info.config.durable_name.clone() else {
                continue;
            };
            let floor_old = info.ack_floor.stream_sequence;
            let floor = match map.partition_point(|(o, _)| *o <= floor_old) {
                0 => 0,
                k => map[k - 1].1,
            };
            let mut filters = info.config.filter_subjects.clone();
            if !info.config.filter_subject.is_empty() {
                filters.push(info.config.filter_subject.clone());
            }
            let filters = filters
                .into_iter()
                .map(|f| format!("bsfg.log.{f}"))
                .collect();
            log.create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(durable),
                description: info.config.description.clone(),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: if floor == 0 {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::ByStartSequence {
                        start_sequence: floor + 1,
                    }
                },
                ack_wait: info.config.ack_wait,
                max_ack_pending: info.config.max_ack_pending,
                filter_subjects: filters,
                ..Default::default()
            })
            .await
            .map_err(|e| SinkError::js("create consumer", e))?;
            report.consumers += 1;
        }
    }

    // From here on the zone is of the new layout.
    js.delete_stream(V2_INDEX_STREAM)
        .await
        .map_err(|e| SinkError::js("delete stream", e))?;
    for old in class_streams {
        let name = old.cached_info().config.name.clone();
        js.delete_stream(&name)
            .await
            .map_err(|e| SinkError::js("delete stream", e))?;
    }
    report.moved_two_stream = true;
    Ok(())
}
