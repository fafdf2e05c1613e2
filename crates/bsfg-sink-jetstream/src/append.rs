//! The append pipeline: group commit with permanent, crash-safe idempotency, one
//! durable commit per round (see [`crate::index`] for the layout).
//!
//! ## Write order (per round of concurrent appends, each id in at most one round)
//! 1. **Look up** every id in the gateway's on-disk look-up ([`crate::lookup`]), which
//!    holds every reservation of the log up to a known sequence: a known id is
//!    answered at once (`duplicate` with its offset, or `conflicting_duplicate`).
//! 2. **Commit** the unknown ids as one atomic batch of the log stream: per bucket one
//!    message holding the bucket's reservations (the first with
//!    `Nats-Expected-Last-Subject-Sequence` = the bucket's last sequence the look-up
//!    holds), then the facts class by class, each class followed by its head (with a
//!    compare-and-set on the head). The batch commits whole or not at all, with one
//!    disk sync under `sync_interval: always`. It commits only if no gateway
//!    reserved in those buckets or wrote those classes since: exactly one appender
//!    (task, process or gateway) wins each id. When a compare-and-set fails, the
//!    gateway reads the index to its end into the look-up, reads the heads again,
//!    looks the ids up again and commits what is still unknown.
//! 3. Answer the callers with their offsets (the batch's sequences are contiguous,
//!    ending at the commit's acknowledgement).
//!
//! ## Why no crash point stores two copies or loses one
//! - A reservation and its fact are one batch: either both are stored or neither.
//! - Crash before the commit: nothing stored, the caller got no offset and retries.
//! - Crash (or a lost acknowledgement) after the commit: the caller retries; the
//!   retry's look-up may not know the id yet, but its batch names the bucket's
//!   sequence from before the commit, so the compare-and-set fails, the gateway reads
//!   the index, finds the reservation and answers `duplicate` with the stored offset.
//! - Same id, different payload: the reservation's digest differs, so the append is
//!   `conflicting_duplicate` whatever the class label says (one index for the zone).
//! - The look-up lost or behind: it is a cache of the log's reservations; start-up
//!   reads them after its watermark (or all of them), and a compare-and-set fails for
//!   any bucket it has not read to the end.
//!
//! Rounds commit one at a time per gateway (each names the sequences the previous
//! one left); appends arriving meanwhile form the next round, so a lone append is
//! committed at once and a busy zone commits large rounds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream::Stream};
use bsfg_core::{AppendOutcome, BoundaryError, ValidatedMessage};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::index::{self, BucketRecord, Head, HeadRecord, Reservation};
use crate::lookup::{Entry, Lookup, Update};

/// Header carrying the message_id on facts of the older layouts (read by the
/// migration, kept on the facts it copies). New facts do not carry it: the id and
/// digest are in the stored form and in the fact's reservation.
pub const HDR_MESSAGE_ID: &str = "Bsfg-Message-Id";
/// Header carrying the payload digest (hex) on facts of the older layouts (see
/// [`HDR_MESSAGE_ID`]).
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

/// Rounds of compare-and-set an append tries at least before it may give up with
/// `unavailable`.
const MAX_ATTEMPTS: usize = 8;

/// How long a batch keeps trying after [`MAX_ATTEMPTS`] lost rounds: several gateways
/// appending to one class contend on its head every round, and an append that waits
/// its turn is better than one that fails under load.
const SETTLE_BUDGET: Duration = Duration::from_secs(15);

/// How many rounds a gateway prepares while one commits. Correctness is the same in
/// both: every round is one atomic batch with per-bucket and per-class
/// compare-and-set, and rounds commit one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishMode {
    /// Two rounds at once (one committing, the next forming). Best under
    /// `sync_interval: always`.
    AtomicBatch,
    /// More rounds queued (8). Writes are atomic batches all the same.
    Pipelined,
}

/// Most messages in one atomic batch (the server's limit).
pub const MAX_BATCH_MESSAGES: usize = 1000;

/// Most reservations in one bucket message.
const RESERVATIONS_PER_MESSAGE: usize = 64;

/// Header bytes an atomic batch adds to each message (`Nats-Batch-Id` with a nuid,
/// `Nats-Batch-Sequence` up to 1000, `Nats-Batch-Commit`), with room to spare.
const BATCH_HEADER_BYTES: usize = 128;

/// Longest name in provenance (zone, stream, link are checked as names of at most
/// 128 bytes).
const NAME_MAX_BYTES: usize = 128;

/// Bytes of the headers a fact whose message_id is `id_len` bytes long can carry in
/// the log, with provenance names (zone, stream, link) of these lengths: the
/// `NATS/1.0` line, one `Key: value` line each (the id and digest lines only on facts
/// a migration copied), the closing blank line, and the atomic batch's own headers.
fn header_bytes(id_len: usize, provenance: Option<[usize; 3]>) -> usize {
    let line = |key: &str, value: usize| key.len() + 2 + value + 2;
    let provenance = provenance.map_or(0, |[zone, stream, link]| {
        line(HDR_SOURCE_ZONE, zone)
            + line(HDR_SOURCE_STREAM, stream)
            + line(HDR_SOURCE_OFFSET, 20)
            + line(HDR_LINK, link)
    });
    "NATS/1.0\r\n\r\n".len()
        + line(HDR_MESSAGE_ID, id_len)
        + line("Nats-TTL", 21)
        + line(index::HDR_PREV, 20)
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
    /// The class's stream name as the API shows it (`facts_<class>`).
    pub stream: String,
    /// The class.
    pub class: String,
    /// Fact subject.
    pub subject: String,
    /// The class's retention (`None`: forever), the fact's `Nats-TTL`.
    pub ttl: Option<Duration>,
    pub reply: oneshot::Sender<Result<AppendOutcome, BoundaryError>>,
}

/// The index as this gateway has read it.
struct IndexState {
    /// Last known reservation sequence per bucket.
    buckets: Vec<u64>,
    /// Log sequence up to which the look-up holds every reservation.
    applied: u64,
}

/// Shared handles of the pipeline.
pub(crate) struct Appender {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub log: Stream,
    pub max_batch: usize,
    pub zone: String,
    pub lookup: Lookup,
    /// Reservations older than this are forgotten (zero: never).
    pub horizon: Duration,
    state: Mutex<IndexState>,
    /// Class heads as this gateway knows them.
    heads: Mutex<HashMap<String, Head>>,
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

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn unavailable(e: impl std::fmt::Display) -> BoundaryError {
    BoundaryError::Unavailable(e.to_string())
}

/// Messages a batch of these jobs takes: one per fact, per started
/// [`RESERVATIONS_PER_MESSAGE`] of a bucket, and one head per class.
#[derive(Default)]
struct Fit {
    buckets: HashMap<u16, usize>,
    classes: HashSet<String>,
    messages: usize,
}

impl Fit {
    /// Adds a job if the batch stays within [`MAX_BATCH_MESSAGES`].
    fn add(&mut self, j: &Job) -> bool {
        let b = index::bucket(&j.token);
        let in_bucket = self.buckets.get(&b).copied().unwrap_or(0);
        let more = 1
            + usize::from(in_bucket % RESERVATIONS_PER_MESSAGE == 0)
            + usize::from(!self.classes.contains(&j.class));
        if self.messages + more > MAX_BATCH_MESSAGES {
            return false;
        }
        self.messages += more;
        self.buckets.insert(b, in_bucket + 1);
        self.classes.insert(j.class.clone());
        true
    }
}

/// One batch laid out: its messages and where each part lies in it.
struct Layout {
    msgs: Vec<Outbound>,
    /// Position of each job's fact.
    fact_at: Vec<usize>,
    /// Each bucket's last message.
    bucket_at: Vec<(u16, usize)>,
    /// Each class's head and its last fact.
    head_at: Vec<(String, usize, usize)>,
}

impl Appender {
    /// Opens the pipeline's view of the index: reads the log's reservations after the
    /// look-up's watermark (all of them when the look-up is new or was lost).
    pub(crate) async fn open(
        client: async_nats::Client,
        js: jetstream::Context,
        log: Stream,
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
            log,
            max_batch,
            zone,
            lookup,
            horizon,
            state: Mutex::new(IndexState {
                buckets: st.buckets,
                applied: st.applied,
            }),
            heads: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            freed: Notify::new(),
        };
        let started = std::time::Instant::now();
        let from = st.applied;
        a.catch_up().await?;
        let to = a.state.lock().map(|s| s.applied).unwrap_or(0);
        if to > from {
            tracing::info!(zone = %a.zone, from, to, secs = started.elapsed().as_secs_f64(), "idempotency look-up read the index");
        }
        Ok(a)
    }

    /// Reads the index to its end into the look-up.
    async fn catch_up(&self) -> Result<(), BoundaryError> {
        let applied = self
            .state
            .lock()
            .map_err(|_| BoundaryError::Internal("index state poisoned".into()))?
            .applied;
        let (upto, seen) = index::catch_up(&self.log, &self.lookup, applied)
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

    /// Reads the heads of these classes from the log.
    async fn read_heads(&self, classes: &HashSet<String>) -> Result<(), BoundaryError> {
        for class in classes {
            let head = index::read_head(&self.log, class)
                .await
                .map_err(BoundaryError::Unavailable)?;
            if let Ok(mut h) = self.heads.lock() {
                h.insert(class.clone(), head);
            }
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
        // Past the horizon an id is forgotten, as the log forgets its reservation.
        Ok(found
            .into_iter()
            .map(|e| e.filter(|e| horizon_ms == 0 || now - e.at_unix_ms < horizon_ms))
            .collect())
    }
}

/// Runs the batcher: takes jobs off the queue, forms rounds, commits them one at a
/// time with up to `max_inflight` rounds formed. Ends when every sender is dropped.
pub(crate) async fn run(appender: Arc<Appender>, mut rx: mpsc::Receiver<Job>, max_inflight: usize) {
    let max_inflight = max_inflight.max(1);
    let commit = Arc::new(Semaphore::new(1));
    let slots = Arc::new(Semaphore::new(max_inflight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = rx.recv().await else { break };
        // Take the commit stage before draining the queue, so that appends arriving
        // while the previous round commits join this round. (Never held while idle:
        // a follow-up round of a batch may need it.)
        let Ok(gate) = commit.clone().acquire_owned().await else {
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
        let commit = commit.clone();
        tokio::spawn(async move {
            a.process(jobs, gate, &commit).await;
            drop(slot);
        });
    }
    // Wait for in-flight rounds before returning, so shutdown loses no answer.
    let _ = slots.acquire_many(max_inflight as u32).await;
    appender.sync().await;
}

fn header(h: &mut HeaderMap, k: &'static str, v: &str) {
    h.insert(k, v);
}

impl Appender {
    /// Processes one batch of jobs in rounds: each round holds every id once and no
    /// id that another round has in flight.
    async fn process(&self, jobs: Vec<Job>, gate: OwnedSemaphorePermit, commit: &Arc<Semaphore>) {
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
                // commit stage it needs).
                gate = None;
                freed.await;
                rest = later;
                continue;
            }
            let permit = match gate.take() {
                Some(p) => p,
                None => match commit.clone().acquire_owned().await {
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
            self.round(round).await;
            drop(permit);
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

    /// Answers the jobs whose ids the look-up knows (duplicate, conflict); returns
    /// the unknown ones.
    fn classify(&self, jobs: Vec<Job>, found: Vec<Option<Entry>>) -> Vec<Job> {
        let mut unknown = Vec::new();
        for (j, e) in jobs.into_iter().zip(found) {
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
            // An id whose fact the zone no longer holds (retention took it) is
            // answered as a duplicate without an offset: never stored twice.
            reply(
                j,
                Ok(AppendOutcome {
                    stream: e.stream,
                    offset: e.offset.unwrap_or(0),
                    duplicate: true,
                }),
            );
        }
        unknown
    }

    /// Looks the jobs up and returns those still unknown (the rest answered).
    async fn unknown(&self, jobs: Vec<Job>) -> Vec<Job> {
        let tokens = jobs.iter().map(|j| j.token).collect();
        match self.get_many(tokens).await {
            Ok(found) => self.classify(jobs, found),
            Err(e) => {
                fail_with(jobs, &e);
                Vec::new()
            }
        }
    }

    /// One round: look up, then commit the unknown ids in as few batches as fit.
    async fn round(&self, jobs: Vec<Job>) {
        let mut todo = self.unknown(jobs).await;
        let classes: HashSet<String> = todo.iter().map(|j| j.class.clone()).collect();
        let missing: HashSet<String> = match self.heads.lock() {
            Ok(h) => classes.into_iter().filter(|c| !h.contains_key(c)).collect(),
            Err(_) => {
                fail_all(todo, "append pipeline state poisoned");
                return;
            }
        };
        if let Err(e) = self.read_heads(&missing).await {
            fail_with(todo, &e);
            return;
        }
        while !todo.is_empty() {
            let mut fit = Fit::default();
            let mut batch = Vec::new();
            let mut rest = Vec::new();
            for j in todo {
                if rest.is_empty() && fit.add(&j) {
                    batch.push(j);
                } else {
                    rest.push(j);
                }
            }
            self.commit_settled(batch).await;
            todo = rest;
        }
    }

    /// Commits a batch that fits, again after each lost compare-and-set (reading the
    /// index and the heads, answering what became known), for at least
    /// [`MAX_ATTEMPTS`] rounds and [`SETTLE_BUDGET`].
    async fn commit_settled(&self, mut jobs: Vec<Job>) {
        let started = std::time::Instant::now();
        for attempt in 0.. {
            if jobs.is_empty() {
                return;
            }
            if attempt >= MAX_ATTEMPTS && started.elapsed() >= SETTLE_BUDGET {
                break;
            }
            if attempt > 0 {
                // Somebody reserved in one of our buckets or wrote one of our
                // classes: read the index to its end, the heads again, and look the
                // ids up again.
                let classes = jobs.iter().map(|j| j.class.clone()).collect();
                let reread = async {
                    // Re-reading the buckets ends by reading the index to its end.
                    if attempt >= 2 {
                        self.reread_buckets(&jobs).await?;
                    } else {
                        self.catch_up().await?;
                    }
                    self.read_heads(&classes).await
                };
                match reread.await {
                    Ok(()) => {}
                    // A read that fails in the middle of a contended round (a cluster
                    // node electing, a replica behind) is tried again within the budget.
                    Err(e) if started.elapsed() < SETTLE_BUDGET => {
                        tracing::debug!(error = %e, attempt, "re-reading the index failed; retrying");
                        backoff(attempt).await;
                        continue;
                    }
                    Err(e) => {
                        fail_with(jobs, &e);
                        return;
                    }
                }
                jobs = self.unknown(jobs).await;
                if jobs.is_empty() {
                    return;
                }
            }
            match self.commit(jobs).await {
                Ok(()) => return,
                Err((back, WriteError::Taken)) => {
                    jobs = back;
                    backoff(attempt).await;
                }
                Err((back, WriteError::Other(e))) => {
                    fail_all(back, &e);
                    return;
                }
            }
        }
        fail_all(jobs, "append did not settle: other writers kept winning");
    }

    /// Takes the buckets' last sequences from the log rather than from what this
    /// gateway read (a bucket whose reservations expired ends lower than it knew),
    /// then reads the index to its end, so the look-up holds every reservation up to
    /// the sequences the next compare-and-set names.
    async fn reread_buckets(&self, jobs: &[Job]) -> Result<(), BoundaryError> {
        let buckets: HashSet<u16> = jobs.iter().map(|j| index::bucket(&j.token)).collect();
        let mut lasts = Vec::with_capacity(buckets.len());
        for b in buckets {
            let last = index::last_of(&self.log, &index::bucket_subject(b))
                .await
                .map_err(BoundaryError::Unavailable)?;
            lasts.push((b, last));
        }
        self.catch_up().await?;
        let mut st = self
            .state
            .lock()
            .map_err(|_| BoundaryError::Internal("index state poisoned".into()))?;
        for (b, last) in lasts {
            if let Some(slot) = st.buckets.get_mut(usize::from(b)) {
                *slot = last;
            }
        }
        Ok(())
    }

    /// Lays a batch out: bucket messages, then each class's facts and head.
    fn layout(&self, jobs: &[Job]) -> Result<Layout, String> {
        let (expected_buckets, heads) = {
            let st = self.state.lock().map_err(|_| "index state poisoned")?;
            let heads = self.heads.lock().map_err(|_| "class heads poisoned")?;
            (st.buckets.clone(), heads.clone())
        };
        let mut by_bucket: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        let mut by_class: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, j) in jobs.iter().enumerate() {
            by_bucket
                .entry(index::bucket(&j.token))
                .or_default()
                .push(i);
            by_class.entry(j.class.as_str()).or_default().push(i);
        }
        // Positions first: bucket messages, then per class its facts and its head.
        let mut pos = 0usize;
        let mut bucket_msgs: Vec<(u16, usize, &[usize])> = Vec::new();
        for (b, members) in &by_bucket {
            for part in members.chunks(RESERVATIONS_PER_MESSAGE) {
                bucket_msgs.push((*b, pos, part));
                pos += 1;
            }
        }
        let mut fact_at = vec![0usize; jobs.len()];
        let mut head_at = Vec::new();
        for (class, members) in &by_class {
            for &i in members {
                fact_at[i] = pos;
                pos += 1;
            }
            head_at.push(((*class).to_owned(), pos, pos - 1));
            pos += 1;
        }
        let ttl = (!self.horizon.is_zero()).then(|| index::ttl_header(self.horizon));
        let mut msgs: Vec<Outbound> = Vec::with_capacity(pos);
        let mut bucket_at: Vec<(u16, usize)> = Vec::new();
        let mut seen = HashSet::new();
        for (b, at, part) in &bucket_msgs {
            let record = BucketRecord {
                r: part
                    .iter()
                    .map(|&i| {
                        let j = &jobs[i];
                        Reservation {
                            id: j.msg.message_id().to_owned(),
                            digest: j.msg.digest().to_hex(),
                            stream: j.stream.clone(),
                            subject: j.subject.clone(),
                            d: Some((fact_at[i] - at) as u64),
                        }
                    })
                    .collect(),
            };
            let mut h = HeaderMap::new();
            if seen.insert(*b) {
                let e = expected_buckets.get(usize::from(*b)).copied().unwrap_or(0);
                header(&mut h, HDR_EXPECTED_LAST_SUBJECT_SEQ, &e.to_string());
            }
            if let Some(t) = &ttl {
                header(&mut h, "Nats-TTL", t);
            }
            msgs.push((index::bucket_subject(*b), h, to_json(&record)));
            match bucket_at.last_mut() {
                Some((last_b, last_at)) if last_b == b => *last_at = *at,
                _ => bucket_at.push((*b, *at)),
            }
        }
        for (class, members) in &by_class {
            let head = heads.get(*class).copied().unwrap_or_default();
            for (k, &i) in members.iter().enumerate() {
                let j = &jobs[i];
                let mut h = HeaderMap::new();
                if let Some(p) = j.msg.provenance() {
                    header(&mut h, HDR_SOURCE_ZONE, &p.zone);
                    header(&mut h, HDR_SOURCE_STREAM, &p.stream);
                    header(&mut h, HDR_SOURCE_OFFSET, &p.offset.to_string());
                    header(&mut h, HDR_LINK, &p.link);
                }
                if let Some(t) = j.ttl {
                    header(&mut h, "Nats-TTL", &index::ttl_header(t));
                }
                if k == 0 {
                    header(&mut h, index::HDR_PREV, &head.last_fact.to_string());
                }
                msgs.push((j.subject.clone(), h, j.msg.stored_form().clone()));
            }
            let mut h = HeaderMap::new();
            header(&mut h, HDR_EXPECTED_LAST_SUBJECT_SEQ, &head.seq.to_string());
            header(&mut h, "Nats-Rollup", "sub");
            msgs.push((
                index::head_subject(class),
                h,
                to_json(&HeadRecord { back: 1 }),
            ));
        }
        debug_assert_eq!(msgs.len(), pos);
        Ok(Layout {
            msgs,
            fact_at,
            bucket_at,
            head_at,
        })
    }

    /// Commits one batch; answers its jobs when it lands, hands them back when not.
    async fn commit(&self, jobs: Vec<Job>) -> Result<(), (Vec<Job>, WriteError)> {
        let layout = match self.layout(&jobs) {
            Ok(l) => l,
            Err(e) => return Err((jobs, WriteError::Other(e))),
        };
        let seqs = match self.publish_atomic(layout.msgs).await {
            Ok(s) => s,
            Err(e) => return Err((jobs, e)),
        };
        let at = |p: usize| seqs.get(p).copied().unwrap_or(0);
        self.advance_applied(&seqs);
        let now = now_unix_ms();
        let mut update = Update {
            won: true,
            ..Update::default()
        };
        if let Ok(mut st) = self.state.lock() {
            for (b, p) in &layout.bucket_at {
                let seq = at(*p);
                if let Some(slot) = st.buckets.get_mut(usize::from(*b)) {
                    *slot = (*slot).max(seq);
                }
                update.buckets.push((*b, seq));
            }
            update.applied = Some(st.applied);
        }
        if let Ok(mut heads) = self.heads.lock() {
            for (class, head, last) in &layout.head_at {
                heads.insert(
                    class.clone(),
                    Head {
                        seq: at(*head),
                        last_fact: at(*last),
                    },
                );
            }
        }
        let mut answers = Vec::with_capacity(jobs.len());
        for (j, p) in jobs.into_iter().zip(&layout.fact_at) {
            let offset = at(*p);
            update.reserve.push((
                j.token,
                Entry {
                    id: j.msg.message_id().to_owned(),
                    digest: j.msg.digest().to_hex(),
                    stream: j.stream.clone(),
                    subject: j.subject.clone(),
                    after: 0,
                    offset: Some(offset),
                    at_unix_ms: now,
                },
            ));
            answers.push((j, offset));
        }
        if let Err(e) = self.apply(update).await {
            // The reservations stand in the log; the look-up reads them again at
            // the next catch-up.
            tracing::warn!(zone = %self.zone, error = %e, "could not keep reservations in the look-up store");
        }
        for (j, offset) in answers {
            let stream = j.stream.clone();
            reply(
                j,
                Ok(AppendOutcome {
                    stream,
                    offset,
                    duplicate: false,
                }),
            );
        }
        Ok(())
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
            Err(e) if lost_compare_and_set(&e) => Err(WriteError::Taken),
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
        Err(e) if lost_compare_and_set(&e) => Err(WriteError::Taken),
        Err(e) => Err(WriteError::Other(format!("batch commit: {e}"))),
    }
}

/// True when a publish was refused because a compare-and-set header no longer held
/// (another writer went first): error 10071 for a plain publish, 10164 for an
/// atomic batch (which async-nats does not map to `WrongLastSequence`).
pub(crate) fn lost_compare_and_set(e: &jetstream::context::PublishError) -> bool {
    e.kind() == PublishErrorKind::WrongLastSequence || e.to_string().contains("wrong last sequence")
}

/// A short, jittered pause after a lost compare-and-set, growing with the attempt, so
/// racing gateways stop colliding.
async fn backoff(attempt: usize) {
    let cap = 2u64 << attempt.min(6);
    let ms = u64::from(nuid::next().as_bytes()[21]) % cap;
    tokio::time::sleep(Duration::from_millis(ms)).await;
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
