//! The append pipeline: group commit with permanent, crash-safe idempotency on a
//! bounded index (see [`crate::index`] for the layout).
//!
//! ## Write order (per round of concurrent appends, each id in at most one round)
//! 1. **Look up** every id in the gateway's on-disk look-up ([`crate::lookup`]), which
//!    holds every reservation of the index stream up to a known sequence.
//! 2. **Reserve** the unknown ids: one reservation per id on its bucket subject
//!    `bsfg.index.<bbb>`, `{id, digest, stream, subject, after}`, all in one atomic
//!    batch; the first message of each bucket carries
//!    `Nats-Expected-Last-Subject-Sequence` = the bucket's last sequence the look-up
//!    holds. The batch commits only if no gateway reserved in those buckets since,
//!    so none of its ids was reserved before: exactly one appender (task, process or
//!    gateway) wins each id. When the compare-and-set fails, the gateway reads the
//!    index stream up to its end into the look-up and looks the ids up again.
//! 3. **Publish** the facts to their class stream on bounded subjects
//!    `facts.<class>.<kind>.<wwww><bb>` (this gateway's writer number, a bucket of the
//!    id), one atomic batch per stream; the first fact of each
//!    subject carries `Nats-Expected-Last-Subject-Sequence` = the subject's last
//!    sequence up to which this gateway knows the subject holds none of the batch's
//!    ids. `after` in the reservation is such a sequence from before the
//!    reservation, so a fact of the id can only lie after it.
//! 4. Answer the callers with their offsets, then **record** the offsets
//!    (`bsfg.index.offsets`, written with the next reservation batch or on its own).
//!    Step 4 only speeds up later look-ups.
//!
//! ## Why no crash point stores two copies or loses one
//! - Crash before 2 commits: nothing stored, the caller got no offset and retries.
//! - Crash between 2 and 3: a reservation without a fact. A retry finds the
//!   reservation with the same digest and no offset, reads the fact subject after
//!   `after`, finds no fact of the id, and publishes it with the compare-and-set on
//!   the last sequence it read: if the original appender (slow, not dead) or another
//!   completer published meanwhile, the set fails, the retry reads again, finds that
//!   fact and answers `duplicate`. Every publish of an id is made only after
//!   reading, under compare-and-set, that the subject holds no fact of it.
//! - Crash between 3 and 4: a retry finds the reservation without offset, reads the
//!   fact subject after `after`, finds the fact and returns its offset as a
//!   duplicate (and records it).
//! - Same id, different payload: the reservation's digest differs, so the append is
//!   `conflicting_duplicate` whatever the class label says.
//! - The look-up lost or behind: it is a cache of the index stream; start-up reads the
//!   stream after its watermark (or all of it), and a compare-and-set fails for any
//!   bucket it has not read to the end.
//!
//! Every write of several messages is an atomic batch (ADR-50): one disk sync per
//! step under `sync_interval: always`; a lone message is a plain publish (atomic by
//! itself, without the batch's staging). Reservations of one gateway are written one round at a
//! time (their compare-and-set needs the previous round's sequences); round k+1
//! reserves while round k publishes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream::Stream};
use bsfg_core::{AppendOutcome, BoundaryError, ValidatedMessage};
use bytes::Bytes;
use futures::future::join_all;
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::index::{self, Offsets, Reservation};
use crate::lookup::{Entry, Lookup, Update};

/// Header carrying the message_id on stored facts.
pub const HDR_MESSAGE_ID: &str = "Bsfg-Message-Id";
/// Header carrying the payload digest (hex) on stored facts.
pub const HDR_DIGEST: &str = "Bsfg-Digest";
/// Provenance of a replicated fact: the zone it was fetched from.
pub const HDR_SOURCE_ZONE: &str = "Bsfg-Source-Zone";
/// Provenance: the stream in the source zone.
pub const HDR_SOURCE_STREAM: &str = "Bsfg-Source-Stream";
/// Provenance: the offset in the source stream.
pub const HDR_SOURCE_OFFSET: &str = "Bsfg-Source-Offset";
/// Provenance: the link that carried it.
pub const HDR_LINK: &str = "Bsfg-Link";
const HDR_EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";

/// How often offsets that no reservation batch carried are recorded on their own.
const RECORD_EVERY: Duration = Duration::from_millis(250);

/// Rounds of compare-and-set before an append gives up with `unavailable`.
const MAX_ATTEMPTS: usize = 8;

/// How many rounds a gateway keeps in flight by default. Correctness is the same in
/// both: every write of several messages is an atomic batch with per-bucket
/// compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishMode {
    /// Two rounds in flight (one reserving, one publishing). Best under
    /// `sync_interval: always`.
    AtomicBatch,
    /// More rounds queued (8), so smaller rounds form while the server flushes
    /// lazily. Writes are atomic batches all the same.
    Pipelined,
}

/// Header bytes an atomic batch adds to each message (`Nats-Batch-Id` with a nuid,
/// `Nats-Batch-Sequence` up to 1000, `Nats-Batch-Commit`), with room to spare.
const BATCH_HEADER_BYTES: usize = 128;

/// Longest name in provenance (zone, stream, link are checked as names of at most
/// 128 bytes).
const NAME_MAX_BYTES: usize = 128;

/// Bytes of the headers the pipeline puts beside a fact whose message_id is `id_len`
/// bytes long, with provenance names (zone, stream, link) of these lengths: the
/// `NATS/1.0` line, one `Key: value` line each, the closing blank line, and the
/// atomic batch's own headers.
fn header_bytes(id_len: usize, provenance: Option<[usize; 3]>) -> usize {
    let line = |key: &str, value: usize| key.len() + 2 + value + 2;
    let provenance = provenance.map_or(0, |[zone, stream, link]| {
        line(HDR_SOURCE_ZONE, zone)
            + line(HDR_SOURCE_STREAM, stream)
            + line(HDR_SOURCE_OFFSET, 20)
            + line(HDR_LINK, link)
    });
    "NATS/1.0\r\n\r\n".len()
        + line(HDR_EXPECTED_LAST_SUBJECT_SEQ, 20)
        + line(HDR_MESSAGE_ID, id_len)
        + line(HDR_DIGEST, 64)
        + provenance
        + BATCH_HEADER_BYTES
}

/// The bytes a fact takes against the server's `max_payload`: its stored form plus
/// every header the pipeline puts beside it.
pub fn wire_size(msg: &ValidatedMessage) -> usize {
    let provenance = msg
        .provenance()
        .map(|p| [p.zone.len(), p.stream.len(), p.link.len()]);
    msg.stored_form().len() + header_bytes(msg.message_id().len(), provenance)
}

/// The most header bytes a fact can carry given the id limit: what a zone's
/// `max_fact_bytes` must leave room for under `max_payload`.
pub fn max_header_bytes(max_id_bytes: usize) -> usize {
    header_bytes(max_id_bytes, Some([NAME_MAX_BYTES; 3]))
}

/// 128-bit subject token of a message_id, in hex: a valid NATS token whatever the
/// id holds.
pub fn id_token(message_id: &str) -> String {
    hex::encode(index::token(message_id))
}

pub(crate) struct Job {
    pub msg: ValidatedMessage,
    /// `index::token` of the message_id.
    pub token: [u8; 16],
    /// Class stream chosen from the labels (or, when completing a reservation, the
    /// stream the reservation names).
    pub stream: String,
    /// Fact subject in that stream.
    pub subject: String,
    pub reply: oneshot::Sender<Result<AppendOutcome, BoundaryError>>,
}

/// A job on its way to the class stream, with the subject's last sequence up to
/// which the subject is known to hold no fact of its id.
struct ToPublish {
    job: Job,
    checked_upto: u64,
    /// Whether every fact this gateway published on the subject after
    /// `checked_upto` is known to be of another id: true for an id this round
    /// reserved (nobody could publish it before the reservation, and this gateway
    /// has it in one round only) and after a read of the subject; false for a
    /// reservation found without offset, which is always read first.
    verified: bool,
}

/// What this gateway knows of one fact subject.
#[derive(Debug, Clone, Copy)]
struct SubjectState {
    /// The subject's last sequence as this gateway knows it.
    last: u64,
    /// Every fact on the subject after `clean_from` was published by this gateway
    /// (never of an id in flight now).
    clean_from: u64,
}

/// The index as this gateway has read it.
struct IndexState {
    /// Last known reservation sequence per bucket.
    buckets: Vec<u64>,
    /// Index sequence up to which the look-up holds every message.
    applied: u64,
}

/// Shared handles of the pipeline.
pub(crate) struct Appender {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub index: Stream,
    pub streams: HashMap<String, Stream>,
    pub max_batch: usize,
    pub zone: String,
    pub lookup: Lookup,
    /// Reservations older than this are forgotten (zero: never).
    pub horizon: Duration,
    state: Mutex<IndexState>,
    subjects: Mutex<HashMap<String, SubjectState>>,
    /// Offsets learnt and not yet recorded in the index stream.
    unrecorded: Mutex<Vec<([u8; 16], u64)>>,
    /// Ids in flight: an id is in at most one round at a time.
    busy: Mutex<HashSet<[u8; 16]>>,
    freed: Notify,
}

/// Why one write did not land.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum WriteError {
    /// A compare-and-set failed: nothing of the batch landed.
    #[error("a compare-and-set failed: another writer was first")]
    Taken,
    /// Anything else; the write may or may not have landed, a retry is safe.
    #[error("{0}")]
    Other(String),
}

pub(crate) type Outbound = (String, HeaderMap, Bytes);

/// The two stages of a round, each admitting one round: reserving in the index
/// stream, then publishing to the class streams. Round k+1 reserves while round k
/// publishes (different streams, different locks).
struct Stages {
    reserve: Arc<Semaphore>,
    publish: Arc<Semaphore>,
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn unavailable(e: impl std::fmt::Display) -> BoundaryError {
    BoundaryError::Unavailable(e.to_string())
}

impl Appender {
    /// Opens the pipeline's view of the index: reads the stream after the look-up's
    /// watermark (all of it when the look-up is new or was lost).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn open(
        client: async_nats::Client,
        js: jetstream::Context,
        index: Stream,
        streams: HashMap<String, Stream>,
        max_batch: usize,
        zone: String,
        lookup: Lookup,
        horizon: Duration,
    ) -> Result<Appender, BoundaryError> {
        let l = lookup.clone();
        let st = tokio::task::spawn_blocking(move || l.state(index::BUCKETS))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        let a = Appender {
            client,
            js,
            index,
            streams,
            max_batch,
            zone,
            lookup,
            horizon,
            state: Mutex::new(IndexState {
                buckets: st.buckets,
                applied: st.applied,
            }),
            subjects: Mutex::new(HashMap::new()),
            unrecorded: Mutex::new(Vec::new()),
            busy: Mutex::new(HashSet::new()),
            freed: Notify::new(),
        };
        let started = std::time::Instant::now();
        let from = st.applied;
        a.catch_up().await?;
        let to = a.state.lock().map(|s| s.applied).unwrap_or(0);
        if to > from {
            tracing::info!(zone = %a.zone, from, to, secs = started.elapsed().as_secs_f64(), "idempotency look-up read the index stream");
        }
        Ok(a)
    }

    /// Reads the index stream to its end into the look-up.
    async fn catch_up(&self) -> Result<(), BoundaryError> {
        let applied = self
            .state
            .lock()
            .map_err(|_| BoundaryError::Internal("index state poisoned".into()))?
            .applied;
        let (upto, seen) = index::catch_up(&self.index, &self.lookup, applied)
            .await
            .map_err(BoundaryError::Unavailable)?;
        let mut st = self
            .state
            .lock()
            .map_err(|_| BoundaryError::Internal("index state poisoned".into()))?;
        st.applied = st.applied.max(upto);
        for (slot, seq) in st.buckets.iter_mut().zip(seen) {
            *slot = (*slot).max(seq);
        }
        Ok(())
    }

    /// Applies an update to the look-up on the blocking pool.
    async fn apply(&self, u: Update) -> Result<(), BoundaryError> {
        let l = self.lookup.clone();
        tokio::task::spawn_blocking(move || l.apply(&u, false))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }

    /// Syncs the look-up to disk (at shutdown).
    pub(crate) async fn sync(&self) {
        let l = self.lookup.clone();
        let _ = tokio::task::spawn_blocking(move || l.flush()).await;
    }

    async fn get_many(&self, tokens: Vec<[u8; 16]>) -> Result<Vec<Option<Entry>>, BoundaryError> {
        let l = self.lookup.clone();
        let horizon_ms = self.horizon.as_millis() as i64;
        let now = now_unix_ms();
        let found = tokio::task::spawn_blocking(move || l.get_many(&tokens))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        // Past the horizon an id is forgotten, as the index stream forgets it.
        Ok(found
            .into_iter()
            .map(|e| e.filter(|e| horizon_ms == 0 || now - e.at_unix_ms < horizon_ms))
            .collect())
    }
}

/// Runs the batcher: takes jobs off the queue, forms rounds, runs up to
/// `max_inflight` of them at once. Ends when every sender is dropped.
pub(crate) async fn run(appender: Arc<Appender>, mut rx: mpsc::Receiver<Job>, max_inflight: usize) {
    let max_inflight = max_inflight.max(1);
    let stages = Arc::new(Stages {
        reserve: Arc::new(Semaphore::new(1)),
        publish: Arc::new(Semaphore::new(1)),
    });
    let slots = Arc::new(Semaphore::new(max_inflight));
    // Offsets not carried by a reservation batch are recorded every so often, not
    // after each round: at low load a round would otherwise wait for that commit.
    let recorder = {
        let a = appender.clone();
        let stages = stages.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RECORD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                a.flush_offsets(&stages).await;
            }
        })
    };
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = rx.recv().await else { break };
        // Take the reservation stage before draining the queue, so that appends
        // arriving while the previous round reserves join this batch. (Never held
        // while idle: a follow-up round of a batch may need it.)
        let Ok(gate) = stages.reserve.clone().acquire_owned().await else {
            break;
        };
        let mut jobs = vec![first];
        while jobs.len() < appender.max_batch {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let a = appender.clone();
        let stages = stages.clone();
        tokio::spawn(async move {
            a.process(jobs, gate, &stages).await;
            drop(slot);
        });
    }
    recorder.abort();
    // Wait for in-flight rounds before returning, so shutdown loses no answer.
    let _ = slots.acquire_many(max_inflight as u32).await;
    appender.flush_offsets(&stages).await;
    appender.sync().await;
}

fn header(h: &mut HeaderMap, k: &'static str, v: &str) {
    h.insert(k, v);
}

impl Appender {
    /// Processes one batch of jobs in rounds: each round holds every id once and no
    /// id that another round has in flight.
    async fn process(&self, jobs: Vec<Job>, gate: OwnedSemaphorePermit, stages: &Stages) {
        let mut rest = jobs;
        let mut gate = Some(gate);
        while !rest.is_empty() {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (round, later) = {
                let Ok(mut busy) = self.busy.lock() else {
                    fail_all(rest, "append pipeline state poisoned");
                    return;
                };
                let mut round = Vec::new();
                let mut later = Vec::new();
                for j in rest {
                    if busy.insert(j.token) {
                        round.push(j);
                    } else {
                        later.push(j);
                    }
                }
                (round, later)
            };
            if round.is_empty() {
                // Every id is in another round: let it finish (without holding the
                // reservation stage it may need).
                gate = None;
                freed.await;
                rest = later;
                continue;
            }
            let permit = match gate.take() {
                Some(p) => p,
                None => match stages.reserve.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => {
                        self.release(&round);
                        fail_all(round, "append pipeline stopped");
                        fail_all(later, "append pipeline stopped");
                        return;
                    }
                },
            };
            let tokens: Vec<[u8; 16]> = round.iter().map(|j| j.token).collect();
            self.round(round, permit, &stages.publish).await;
            self.release_tokens(&tokens);
            rest = later;
        }
    }

    fn release(&self, jobs: &[Job]) {
        let tokens: Vec<[u8; 16]> = jobs.iter().map(|j| j.token).collect();
        self.release_tokens(&tokens);
    }

    fn release_tokens(&self, tokens: &[[u8; 16]]) {
        if let Ok(mut busy) = self.busy.lock() {
            for t in tokens {
                busy.remove(t);
            }
        }
        self.freed.notify_waiters();
    }

    /// Records offsets not yet recorded with a reservation batch. Best effort: a
    /// missing record is found again in the fact subject by the next look-up.
    async fn flush_offsets(&self, stages: &Stages) {
        let empty = self.unrecorded.lock().map(|u| u.is_empty()).unwrap_or(true);
        if empty {
            return;
        }
        let Ok(_gate) = stages.reserve.acquire().await else {
            return;
        };
        let Some((subject, h, body, n)) = self.offsets_message(usize::MAX) else {
            return;
        };
        match self.publish_atomic(vec![(subject, h, body)]).await {
            Ok(seqs) => self.advance_applied(&seqs),
            Err(e) => {
                tracing::warn!(zone = %self.zone, records = n, error = ?e, "recording offsets in the idempotency index failed; look-ups find them in the fact subjects")
            }
        }
    }

    /// Takes up to `max` unrecorded offsets as one offset record message.
    fn offsets_message(&self, max: usize) -> Option<(String, HeaderMap, Bytes, usize)> {
        let mut u = self.unrecorded.lock().ok()?;
        if u.is_empty() || max == 0 {
            return None;
        }
        let take = u.len().min(max).min(5000);
        let o: Vec<(String, u64)> = u
            .drain(..take)
            .map(|(t, off)| (hex::encode(t), off))
            .collect();
        Some((
            index::OFFSETS_SUBJECT.to_owned(),
            HeaderMap::new(),
            to_json(&Offsets { o }),
            take,
        ))
    }

    /// Raises the applied watermark over our own contiguous writes.
    fn advance_applied(&self, seqs: &[u64]) {
        let (Some(first), Some(last)) = (seqs.first(), seqs.last()) else {
            return;
        };
        if let Ok(mut st) = self.state.lock()
            && st.applied + 1 == *first
        {
            st.applied = *last;
        }
    }

    /// Sorts looked-up jobs: answered (duplicate, conflict), to complete (reserved,
    /// offset unknown), or unknown.
    fn classify(
        &self,
        jobs: Vec<Job>,
        found: Vec<Option<Entry>>,
        unknown: &mut Vec<Job>,
        complete: &mut Vec<ToPublish>,
    ) {
        for (mut j, e) in jobs.into_iter().zip(found) {
            let Some(e) = e else {
                unknown.push(j);
                continue;
            };
            if e.id != j.msg.message_id() {
                reply(
                    j,
                    Err(BoundaryError::Internal(format!(
                        "message_id token collision with `{}`",
                        e.id
                    ))),
                );
                continue;
            }
            if e.digest != j.msg.digest().to_hex() {
                reply(
                    j,
                    Err(BoundaryError::ConflictingDuplicate {
                        message_id: e.id,
                        stream: e.stream,
                        offset: e.offset.unwrap_or(0),
                    }),
                );
                continue;
            }
            match e.offset {
                Some(offset) => reply(
                    j,
                    Ok(AppendOutcome {
                        stream: e.stream,
                        offset,
                        duplicate: true,
                    }),
                ),
                // Reserved, offset unknown: a crash between the steps, or another
                // gateway's append in flight. Find the fact or complete it.
                None => {
                    j.stream = e.stream;
                    j.subject = e.subject;
                    complete.push(ToPublish {
                        job: j,
                        checked_upto: e.after,
                        verified: false,
                    });
                }
            }
        }
    }

    async fn round(
        &self,
        jobs: Vec<Job>,
        reserve_stage: OwnedSemaphorePermit,
        publish_stage: &Semaphore,
    ) {
        let mut to_publish: Vec<ToPublish> = Vec::new();
        let tokens = jobs.iter().map(|j| j.token).collect();
        let found = match self.get_many(tokens).await {
            Ok(f) => f,
            Err(e) => {
                fail_with(jobs, &e);
                return;
            }
        };
        let mut to_reserve = Vec::new();
        self.classify(jobs, found, &mut to_reserve, &mut to_publish);

        // Step 2: reserve.
        for attempt in 0..MAX_ATTEMPTS {
            if to_reserve.is_empty() {
                break;
            }
            if attempt > 0 {
                // Somebody reserved in one of our buckets: read the index to its end
                // and look the ids up again.
                if let Err(e) = self.catch_up().await {
                    fail_with(std::mem::take(&mut to_reserve), &e);
                    break;
                }
                let tokens = to_reserve.iter().map(|j| j.token).collect();
                let jobs = std::mem::take(&mut to_reserve);
                match self.get_many(tokens).await {
                    Ok(found) => self.classify(jobs, found, &mut to_reserve, &mut to_publish),
                    Err(e) => {
                        fail_with(jobs, &e);
                        break;
                    }
                }
                if to_reserve.is_empty() {
                    break;
                }
            }
            // After a lost compare-and-set, reserve bucket by bucket, so that a
            // gateway racing in a few buckets holds back only those.
            let batches = if attempt < 2 {
                vec![std::mem::take(&mut to_reserve)]
            } else {
                let mut by_bucket: HashMap<u16, Vec<Job>> = HashMap::new();
                for j in to_reserve.drain(..) {
                    by_bucket
                        .entry(index::bucket(&j.token))
                        .or_default()
                        .push(j);
                }
                by_bucket.into_values().collect()
            };
            let results = join_all(batches.into_iter().map(|b| self.reserve(b))).await;
            let mut taken = false;
            for r in results {
                match r {
                    Ok(done) => to_publish.extend(done),
                    Err((jobs, WriteError::Taken)) => {
                        taken = true;
                        to_reserve.extend(jobs);
                    }
                    Err((jobs, WriteError::Other(e))) => fail_all(jobs, &e),
                }
            }
            if taken {
                backoff(attempt).await;
            }
        }
        fail_all(to_reserve, "index reservation did not settle");
        // The next round may reserve while this one publishes.
        drop(reserve_stage);
        let Ok(_publishing) = publish_stage.acquire().await else {
            fail_all(
                to_publish.into_iter().map(|p| p.job).collect(),
                "append pipeline stopped",
            );
            return;
        };

        // Step 3: publish per stream.
        let mut by_stream: HashMap<String, Vec<ToPublish>> = HashMap::new();
        for p in to_publish {
            by_stream.entry(p.job.stream.clone()).or_default().push(p);
        }
        let learnt: Vec<([u8; 16], u64)> = join_all(
            by_stream
                .into_iter()
                .map(|(stream, jobs)| self.publish_facts(stream, jobs)),
        )
        .await
        .into_iter()
        .flatten()
        .collect();
        if !learnt.is_empty() {
            if let Err(e) = self
                .apply(Update {
                    offsets: learnt.clone(),
                    ..Default::default()
                })
                .await
            {
                tracing::warn!(zone = %self.zone, error = %e, "could not keep offsets in the look-up store");
            }
            if let Ok(mut u) = self.unrecorded.lock() {
                u.extend(learnt);
            }
        }
    }

    /// The last sequence of a fact subject this gateway knows (read from the stream
    /// the first time).
    async fn subject_last(&self, stream: &Stream, subject: &str) -> Result<u64, BoundaryError> {
        if let Some(s) = self
            .subjects
            .lock()
            .ok()
            .and_then(|m| m.get(subject).copied())
        {
            return Ok(s.last);
        }
        let last = read_last(stream, subject).await?;
        if let Ok(mut m) = self.subjects.lock() {
            m.entry(subject.to_owned()).or_insert(SubjectState {
                last,
                clean_from: last,
            });
        }
        Ok(last)
    }

    /// Step 2 for one batch of unknown ids. On success returns them with `after` as
    /// the sequence checked; on failure hands the jobs back.
    async fn reserve(&self, jobs: Vec<Job>) -> Result<Vec<ToPublish>, (Vec<Job>, WriteError)> {
        let mut afters = Vec::with_capacity(jobs.len());
        for j in &jobs {
            let Some(stream) = self.streams.get(&j.stream) else {
                return Err((
                    jobs,
                    WriteError::Other("class stream not configured".into()),
                ));
            };
            match self.subject_last(stream, &j.subject).await {
                Ok(a) => afters.push(a),
                Err(e) => return Err((jobs, WriteError::Other(e.to_string()))),
            }
        }
        let expected: Vec<u64> = match self.state.lock() {
            Ok(st) => st.buckets.clone(),
            Err(_) => {
                return Err((jobs, WriteError::Other("index state poisoned".into())));
            }
        };
        let mut first_of_bucket = HashSet::new();
        let mut msgs: Vec<Outbound> = Vec::with_capacity(jobs.len() + 1);
        let mut buckets = Vec::with_capacity(jobs.len());
        let mut reservations = Vec::with_capacity(jobs.len());
        for (j, after) in jobs.iter().zip(&afters) {
            let b = index::bucket(&j.token);
            let r = Reservation {
                id: j.msg.message_id().to_owned(),
                digest: j.msg.digest().to_hex(),
                stream: j.stream.clone(),
                subject: j.subject.clone(),
                after: *after,
                offset: None,
            };
            let mut h = HeaderMap::new();
            if first_of_bucket.insert(b) {
                let e = expected.get(usize::from(b)).copied().unwrap_or(0);
                header(&mut h, HDR_EXPECTED_LAST_SUBJECT_SEQ, &e.to_string());
            }
            buckets.push(b);
            msgs.push((index::bucket_subject(b), h, to_json(&r)));
            reservations.push(r);
        }
        // Offsets of earlier rounds travel with this batch when it is a batch anyway
        // (a lone reservation goes as a plain publish) and there is room.
        let room = if msgs.len() >= 2 {
            1000usize.saturating_sub(msgs.len())
        } else {
            0
        };
        let record = self.offsets_message(room);
        let record_n = record.as_ref().map_or(0, |r| r.3);
        if let Some((s, h, b, _)) = record.clone() {
            msgs.push((s, h, b));
        }
        match self.publish_atomic(msgs).await {
            Ok(seqs) => {
                self.advance_applied(&seqs);
                let at = now_unix_ms();
                let mut update = Update {
                    won: true,
                    ..Update::default()
                };
                if let Ok(mut st) = self.state.lock() {
                    for (b, seq) in buckets.iter().zip(&seqs) {
                        if let Some(slot) = st.buckets.get_mut(usize::from(*b)) {
                            *slot = (*slot).max(*seq);
                        }
                        update.buckets.push((*b, *seq));
                    }
                    update.applied = Some(st.applied);
                }
                update
                    .reserve
                    .extend(reservations.into_iter().map(|r| r.into_entry(at)));
                if let Err(e) = self.apply(update).await {
                    // The reservations stand in the stream; the look-up reads them
                    // again at the next catch-up.
                    tracing::warn!(zone = %self.zone, error = %e, "could not keep reservations in the look-up store");
                }
                Ok(jobs
                    .into_iter()
                    .zip(afters)
                    .map(|(job, checked_upto)| ToPublish {
                        job,
                        checked_upto,
                        verified: true,
                    })
                    .collect())
            }
            Err(e) => {
                // The record did not land either: keep it for the next batch.
                if let Some((_, _, body, _)) = record
                    && let Ok(mut u) = self.unrecorded.lock()
                {
                    let back = index::offsets_of(&body);
                    debug_assert_eq!(back.len(), record_n);
                    u.extend(back);
                }
                Err((jobs, e))
            }
        }
    }

    /// Step 3 for one class stream. Returns the offsets learnt (published or found).
    async fn publish_facts(
        &self,
        stream_name: String,
        mut jobs: Vec<ToPublish>,
    ) -> Vec<([u8; 16], u64)> {
        let mut learnt = Vec::new();
        let Some(stream) = self.streams.get(&stream_name) else {
            fail_all(
                jobs.into_iter().map(|p| p.job).collect(),
                "index refers to a stream this zone does not configure",
            );
            return learnt;
        };
        for attempt in 0..MAX_ATTEMPTS {
            if jobs.is_empty() {
                return learnt;
            }
            // Make sure each job's subject is known free of its id up to the
            // subject's last sequence: read what others wrote since.
            let mut subjects: HashMap<String, SubjectState> = HashMap::new();
            for p in &jobs {
                if subjects.contains_key(&p.job.subject) {
                    continue;
                }
                if let Err(e) = self.subject_last(stream, &p.job.subject).await {
                    fail_with(jobs.into_iter().map(|p| p.job).collect(), &e);
                    return learnt;
                }
                if let Some(s) = self
                    .subjects
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&p.job.subject).copied())
                {
                    subjects.insert(p.job.subject.clone(), s);
                }
            }
            let mut ready = Vec::with_capacity(jobs.len());
            let mut to_scan: HashMap<String, Vec<ToPublish>> = HashMap::new();
            for p in jobs.drain(..) {
                let s = subjects
                    .get(&p.job.subject)
                    .copied()
                    .unwrap_or(SubjectState {
                        last: 0,
                        clean_from: 0,
                    });
                // What lies after `checked_upto` up to `last` is this gateway's own
                // facts (after `clean_from`), never of a verified job's id.
                if p.checked_upto >= s.last || (p.verified && p.checked_upto >= s.clean_from) {
                    ready.push(p);
                } else {
                    to_scan.entry(p.job.subject.clone()).or_default().push(p);
                }
            }
            for (subject, waiting) in to_scan {
                let upto = subjects.get(&subject).map_or(0, |s| s.last);
                let (found, rest) = self
                    .scan(stream, &stream_name, &subject, waiting, upto)
                    .await;
                learnt.extend(found);
                ready.extend(rest);
            }
            if ready.is_empty() {
                continue;
            }
            // After a lost compare-and-set, publish subject by subject, so that a
            // gateway racing on a few subjects holds back only those.
            let groups: Vec<Vec<ToPublish>> = if attempt < 2 {
                vec![ready]
            } else {
                let mut by_subject: HashMap<String, Vec<ToPublish>> = HashMap::new();
                for p in ready {
                    by_subject.entry(p.job.subject.clone()).or_default().push(p);
                }
                by_subject.into_values().collect()
            };
            let results = join_all(groups.iter().map(|g| {
                let mut first_of_subject = HashSet::new();
                let msgs: Vec<Outbound> = g
                    .iter()
                    .map(|p| {
                        let j = &p.job;
                        let mut h = HeaderMap::new();
                        if first_of_subject.insert(j.subject.clone()) {
                            let e = subjects.get(&j.subject).map_or(0, |s| s.last);
                            header(&mut h, HDR_EXPECTED_LAST_SUBJECT_SEQ, &e.to_string());
                        }
                        header(&mut h, HDR_MESSAGE_ID, j.msg.message_id());
                        header(&mut h, HDR_DIGEST, &j.msg.digest().to_hex());
                        if let Some(p) = j.msg.provenance() {
                            header(&mut h, HDR_SOURCE_ZONE, &p.zone);
                            header(&mut h, HDR_SOURCE_STREAM, &p.stream);
                            header(&mut h, HDR_SOURCE_OFFSET, &p.offset.to_string());
                            header(&mut h, HDR_LINK, &p.link);
                        }
                        (j.subject.clone(), h, j.msg.stored_form().clone())
                    })
                    .collect();
                self.publish_atomic(msgs)
            }))
            .await;
            let mut stale: HashSet<String> = HashSet::new();
            for (group, r) in groups.into_iter().zip(results) {
                match r {
                    Ok(seqs) => {
                        if let Ok(mut m) = self.subjects.lock() {
                            for (p, seq) in group.iter().zip(&seqs) {
                                let s = m.entry(p.job.subject.clone()).or_insert(SubjectState {
                                    last: 0,
                                    clean_from: 0,
                                });
                                s.last = s.last.max(*seq);
                            }
                        }
                        for (p, seq) in group.into_iter().zip(seqs) {
                            learnt.push((p.job.token, seq));
                            reply(
                                p.job,
                                Ok(AppendOutcome {
                                    stream: stream_name.clone(),
                                    offset: seq,
                                    duplicate: false,
                                }),
                            );
                        }
                    }
                    Err(WriteError::Taken) => {
                        stale.extend(group.iter().map(|p| p.job.subject.clone()));
                        jobs.extend(group);
                    }
                    Err(WriteError::Other(e)) => {
                        fail_all(group.into_iter().map(|p| p.job).collect(), &e);
                    }
                }
            }
            if stale.is_empty() {
                continue;
            }
            // Another writer published on these subjects: read their last sequences
            // again; the next attempt reads what is new.
            let lasts = join_all(stale.iter().map(|s| read_last(stream, s))).await;
            for (subject, last) in stale.into_iter().zip(lasts) {
                match last {
                    Ok(last) => {
                        if let Ok(mut m) = self.subjects.lock() {
                            let s = m.entry(subject).or_insert(SubjectState {
                                last,
                                clean_from: last,
                            });
                            if s.last != last {
                                s.last = last;
                                s.clean_from = last;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(zone = %self.zone, %subject, error = %e, "reading a fact subject's last sequence failed")
                    }
                }
            }
            backoff(attempt).await;
        }
        fail_all(
            jobs.into_iter().map(|p| p.job).collect(),
            "fact publish did not settle",
        );
        learnt
    }

    /// Reads `subject` after the lowest `checked_upto` of `jobs` up to `upto`, looking
    /// for facts of their ids. Found ones are answered (duplicate, with the stored
    /// offset); the rest come back checked up to `upto`. When the subject cannot be
    /// read, every job is answered with the error.
    async fn scan(
        &self,
        stream: &Stream,
        stream_name: &str,
        subject: &str,
        jobs: Vec<ToPublish>,
        upto: u64,
    ) -> (Vec<([u8; 16], u64)>, Vec<ToPublish>) {
        let mut wanted: HashMap<String, ToPublish> = jobs
            .into_iter()
            .map(|p| (p.job.msg.message_id().to_owned(), p))
            .collect();
        let mut learnt = Vec::new();
        match self
            .scan_into(stream, stream_name, subject, &mut wanted, &mut learnt, upto)
            .await
        {
            Ok(rest) => (learnt, rest),
            Err(e) => {
                tracing::warn!(zone = %self.zone, %subject, error = %e, "reading a fact subject failed");
                fail_with(wanted.into_values().map(|p| p.job).collect(), &e);
                (learnt, Vec::new())
            }
        }
    }

    async fn scan_into(
        &self,
        stream: &Stream,
        stream_name: &str,
        subject: &str,
        wanted: &mut HashMap<String, ToPublish>,
        learnt: &mut Vec<([u8; 16], u64)>,
        upto: u64,
    ) -> Result<Vec<ToPublish>, BoundaryError> {
        let from = wanted
            .values()
            .map(|p| p.checked_upto)
            .min()
            .unwrap_or(upto)
            + 1;
        // Facts before the stream's first sequence are gone: a reservation whose fact
        // may have been among them cannot be told apart from one never published.
        let first = {
            let mut s = stream.clone();
            s.info()
                .await
                .map_err(|e| unavailable(format!("stream info: {e}")))?
                .state
                .first_sequence
        };
        let mut seq = from;
        while seq <= upto && !wanted.is_empty() {
            let m = match stream.direct_get_next_for_subject(subject, Some(seq)).await {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(unavailable(format!("fact look-up: {e}"))),
            };
            if m.sequence > upto {
                break;
            }
            seq = m.sequence + 1;
            let id = m.headers.get(HDR_MESSAGE_ID).map(|v| v.as_str().to_owned());
            let Some(p) = id.and_then(|id| wanted.remove(&id)) else {
                continue;
            };
            let digest = m.headers.get(HDR_DIGEST).map(|v| v.as_str().to_owned());
            if digest.as_deref() == Some(p.job.msg.digest().to_hex().as_str()) {
                learnt.push((p.job.token, m.sequence));
                reply(
                    p.job,
                    Ok(AppendOutcome {
                        stream: stream_name.to_owned(),
                        offset: m.sequence,
                        duplicate: true,
                    }),
                );
            } else {
                reply(
                    p.job,
                    Err(BoundaryError::Internal(format!(
                        "fact subject {subject} holds offset {} for this message_id with another digest than its reservation",
                        m.sequence
                    ))),
                );
            }
        }
        let mut rest = Vec::with_capacity(wanted.len());
        for (_, mut p) in wanted.drain() {
            if p.checked_upto + 1 < first {
                // Retention took facts after the reservation: whether this one was
                // among them cannot be known. Never store it a second time.
                tracing::warn!(zone = %self.zone, message_id = p.job.msg.message_id(), stream = stream_name, "reservation without a recorded offset whose fact subject expired past it; answering duplicate without an offset");
                reply(
                    p.job,
                    Ok(AppendOutcome {
                        stream: stream_name.to_owned(),
                        offset: 0,
                        duplicate: true,
                    }),
                );
                continue;
            }
            p.checked_upto = upto;
            p.verified = true;
            rest.push(p);
        }
        Ok(rest)
    }

    async fn publish_atomic(&self, chunk: Vec<Outbound>) -> Result<Vec<u64>, WriteError> {
        publish_batch(&self.client, &self.js, chunk).await
    }
}

/// Publishes messages as one atomic batch (ADR-50), a lone message as a plain
/// publish, and returns the stream sequence of every message, in order. At most
/// 1000 messages.
pub(crate) async fn publish_batch(
    client: &async_nats::Client,
    js: &jetstream::Context,
    mut chunk: Vec<Outbound>,
) -> Result<Vec<u64>, WriteError> {
    let n = chunk.len() as u64;
    if n == 1
        && let Some((subject, h, payload)) = chunk.pop()
    {
        // One message is atomic by itself, without the batch's staging.
        let ack = js
            .publish_with_headers(subject, h, payload)
            .await
            .map_err(|e| WriteError::Other(format!("publish: {e}")))?;
        return match ack.await {
            Ok(a) => Ok(vec![a.sequence]),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(WriteError::Taken),
            Err(e) => Err(WriteError::Other(format!("publish ack: {e}"))),
        };
    }
    let batch_id = nuid::next().to_string();
    let mut ack = None;
    for (i, (subject, mut h, payload)) in chunk.into_iter().enumerate() {
        header(&mut h, "Nats-Batch-Id", &batch_id);
        header(&mut h, "Nats-Batch-Sequence", &(i as u64 + 1).to_string());
        if i as u64 + 1 == n {
            header(&mut h, "Nats-Batch-Commit", "1");
            ack = Some(
                js.publish_with_headers(subject, h, payload)
                    .await
                    .map_err(|e| WriteError::Other(format!("publish: {e}")))?,
            );
        } else {
            client
                .publish_with_headers(subject, h, payload)
                .await
                .map_err(|e| WriteError::Other(format!("publish: {e}")))?;
        }
    }
    let Some(ack) = ack else {
        return Ok(Vec::new());
    };
    match ack.await {
        Ok(a) => {
            let count = a.batch_size.unwrap_or(n);
            if count != n || a.sequence < n {
                return Err(WriteError::Other(format!(
                    "atomic batch committed {count} of {n} messages (ack seq {})",
                    a.sequence
                )));
            }
            // An atomic batch is stored as one contiguous run ending at the ack's
            // sequence.
            Ok((a.sequence + 1 - n..=a.sequence).collect())
        }
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(WriteError::Taken),
        Err(e) => Err(WriteError::Other(format!("batch commit: {e}"))),
    }
}

/// A short, jittered pause after a lost compare-and-set, growing with the attempt, so
/// racing gateways stop colliding.
async fn backoff(attempt: usize) {
    let cap = 2u64 << attempt.min(6);
    let ms = u64::from(nuid::next().as_bytes()[21]) % cap;
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The last sequence of `subject` in `stream` (0 when it holds none).
async fn read_last(stream: &Stream, subject: &str) -> Result<u64, BoundaryError> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(m) => Ok(m.sequence),
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(0),
        Err(e) => Err(unavailable(format!("fact subject look-up: {e}"))),
    }
}

fn to_json<T: Serialize>(v: &T) -> Bytes {
    // Serializing plain structs of strings and integers cannot fail.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn reply(job: Job, result: Result<AppendOutcome, BoundaryError>) {
    // A caller that went away no longer needs the answer; the write stands.
    let _ = job.reply.send(result);
}

fn fail_all(jobs: Vec<Job>, why: &str) {
    for j in jobs {
        reply(j, Err(BoundaryError::Unavailable(why.to_owned())));
    }
}

fn fail_with(jobs: Vec<Job>, e: &BoundaryError) {
    for j in jobs {
        reply(j, Err(e.clone()));
    }
}
