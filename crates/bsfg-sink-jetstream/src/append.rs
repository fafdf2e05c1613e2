//! The append pipeline: group commit with permanent, crash-safe idempotency.
//!
//! ## Write order (per page of concurrent appends)
//! 1. **Reserve** in the index stream `bsfg_ids`: one message per fact on subject
//!    `bsfg.ids.<token>` (token = first 128 bits of SHA-256(message_id)) carrying
//!    `{id, digest, stream, subject}`, published as one atomic batch with
//!    `Nats-Expected-Last-Subject-Sequence: 0` on every message. The server commits
//!    the batch only if no message_id in it was ever reserved: exactly one appender
//!    (task, process or gateway instance) wins each id.
//! 2. **Publish** the facts to their class stream on per-id subjects
//!    `facts.<class>.<kind>.<token>`, again one atomic batch with
//!    `Nats-Expected-Last-Subject-Sequence: 0`: a fact subject can hold one fact only.
//! 3. Answer the callers with their offsets, then **record** the offsets in the index
//!    (one more batch, replacing the reservation since the index keeps one message
//!    per subject). Step 3 only speeds up later duplicate look-ups.
//!
//! ## Why no crash point stores two copies or loses one
//! - Crash before 1 commits: nothing stored, the caller got no offset and retries.
//! - Crash between 1 and 2: a reservation without a fact. A retry finds the
//!   reservation with the same digest, looks for the fact under its subject, finds
//!   none, and publishes it (step 2's compare-and-set stops two completers).
//! - Crash between 2 and 3: a retry finds the fact under its subject and returns its
//!   offset as a duplicate (and repairs the index).
//! - Same id, different payload: the reservation's digest differs, so the append is
//!   `conflicting_duplicate` whatever the class label says.
//!
//! Every write is a server-side compare-and-set on one id, so the argument holds per
//! fact whichever way the writes travel ([`PublishMode`]):
//! - `AtomicBatch`: each step is one atomic batch (ADR-50), one disk sync per batch
//!   under `sync_interval: always`, instead of one per fact;
//! - `Pipelined`: each write is its own publish, all in flight at once; faster when
//!   the server flushes lazily, where an atomic batch only adds its staging cost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream::Stream};
use bsfg_core::{AppendOutcome, BoundaryError, ValidatedMessage};
use bytes::Bytes;
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::streams::INDEX_PREFIX;

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

/// Rounds of compare-and-set before an append gives up with `unavailable`.
const MAX_ATTEMPTS: usize = 5;

/// How the pipeline's writes travel to JetStream. Correctness is the same in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishMode {
    /// One atomic batch per step: one disk sync per batch. Best under
    /// `sync_interval: always`.
    AtomicBatch,
    /// One publish per write, all in flight together. Best when the server flushes
    /// lazily.
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
        + line(HDR_EXPECTED_LAST_SUBJECT_SEQ, 1)
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

/// 128-bit subject token of a message_id: a valid NATS token whatever the id holds.
pub fn id_token(message_id: &str) -> String {
    let d = Sha256::digest(message_id.as_bytes());
    hex::encode(&d[..16])
}

/// Index entry stored at `bsfg.ids.<token>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IndexEntry {
    pub id: String,
    pub digest: String,
    pub stream: String,
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

pub(crate) struct Job {
    pub msg: ValidatedMessage,
    /// Class stream chosen from the labels (or, when completing a reservation, the
    /// stream the reservation names).
    pub stream: String,
    /// Fact subject in that stream.
    pub subject: String,
    pub reply: oneshot::Sender<Result<AppendOutcome, BoundaryError>>,
}

/// Shared handles of the pipeline.
pub(crate) struct Appender {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub index: Stream,
    pub streams: HashMap<String, Stream>,
    pub max_batch: usize,
    pub mode: PublishMode,
    pub zone: String,
}

/// What became of a job whose id was already reserved.
enum Resolved {
    /// Answered (duplicate or conflict); maybe with an offset to record in the index.
    Answered(Option<IndexEntry>),
    /// Reserved but never published: publish it to the reservation's stream.
    Complete(Box<Job>),
}

/// Why one write did not land.
#[derive(Debug, Clone)]
enum WriteError {
    /// A compare-and-set failed: the subject already holds a message (for an atomic
    /// batch: some subject of the batch did, so nothing of it landed).
    Taken,
    /// Anything else; the write may or may not have landed, a retry is safe.
    Other(String),
}

type Outbound = (String, HeaderMap, Bytes);

/// The two stages of a round, each a gate: reserving in the index stream, then
/// publishing to the class streams. With atomic batches each gate admits one round,
/// so round k+1 reserves while round k publishes (different streams, different
/// locks) and a batch forms while the previous reservation runs.
struct Stages {
    reserve: Arc<Semaphore>,
    publish: Arc<Semaphore>,
}

/// Runs the batcher: takes jobs off the queue, forms rounds, runs up to
/// `max_inflight` of them at once. Ends when every sender is dropped.
pub(crate) async fn run(appender: Arc<Appender>, mut rx: mpsc::Receiver<Job>, max_inflight: usize) {
    let max_inflight = max_inflight.max(1);
    let per_stage = match appender.mode {
        PublishMode::AtomicBatch => 1,
        PublishMode::Pipelined => max_inflight,
    };
    let stages = Arc::new(Stages {
        reserve: Arc::new(Semaphore::new(per_stage)),
        publish: Arc::new(Semaphore::new(per_stage)),
    });
    let slots = Arc::new(Semaphore::new(max_inflight));
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
            let commits = a.process(jobs, gate, &stages).await;
            // Callers have their answers; free the slot before the index bookkeeping.
            drop(slot);
            a.record_offsets(commits).await;
        });
    }
    // Wait for in-flight rounds before returning, so shutdown loses no answer.
    let _ = slots.acquire_many(max_inflight as u32).await;
}

fn header(h: &mut HeaderMap, k: &'static str, v: &str) {
    h.insert(k, v);
}

fn index_subject(message_id: &str) -> String {
    format!("{INDEX_PREFIX}.{}", id_token(message_id))
}

impl Appender {
    /// Processes one round of jobs and returns the index entries whose offsets are
    /// still to be recorded (step 3). Jobs sharing a message_id are handled in later
    /// rounds, so each round holds every id once and sees the earlier rounds' result.
    async fn process(
        &self,
        jobs: Vec<Job>,
        gate: OwnedSemaphorePermit,
        stages: &Stages,
    ) -> Vec<IndexEntry> {
        let mut rest = jobs;
        let mut commits = Vec::new();
        let mut gate = Some(gate);
        while !rest.is_empty() {
            let mut seen = HashSet::new();
            let (round, later): (Vec<Job>, Vec<Job>) = rest
                .into_iter()
                .partition(|j| seen.insert(j.msg.message_id().to_owned()));
            let permit = match gate.take() {
                Some(p) => p,
                None => match stages.reserve.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => {
                        fail_all(round, "append pipeline stopped");
                        fail_all(later, "append pipeline stopped");
                        return commits;
                    }
                },
            };
            commits.extend(self.round(round, permit, &stages.publish).await);
            rest = later;
        }
        commits
    }

    /// Step 3: records offsets in the index, replacing the reservations. Best effort:
    /// a missing record is repaired by the next look-up of that id.
    async fn record_offsets(&self, commits: Vec<IndexEntry>) {
        if commits.is_empty() {
            return;
        }
        let msgs = commits
            .iter()
            .map(|e| (index_subject(&e.id), HeaderMap::new(), to_json(e)))
            .collect();
        let failed = self
            .publish_all(msgs)
            .await
            .into_iter()
            .filter(Result::is_err)
            .count();
        if failed > 0 {
            tracing::warn!(zone = %self.zone, failed, "recording offsets in the idempotency index failed; look-ups repair it");
        }
    }

    async fn round(
        &self,
        jobs: Vec<Job>,
        reserve_stage: OwnedSemaphorePermit,
        publish_stage: &Semaphore,
    ) -> Vec<IndexEntry> {
        // Step 1: reserve.
        let mut to_reserve: Vec<Job> = jobs;
        let mut to_publish: Vec<Job> = Vec::new();
        let mut commits: Vec<IndexEntry> = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            if to_reserve.is_empty() {
                break;
            }
            let msgs = to_reserve
                .iter()
                .map(|j| {
                    let entry = IndexEntry {
                        id: j.msg.message_id().to_owned(),
                        digest: j.msg.digest().to_hex(),
                        stream: j.stream.clone(),
                        subject: j.subject.clone(),
                        offset: None,
                    };
                    let mut h = HeaderMap::new();
                    header(&mut h, HDR_EXPECTED_LAST_SUBJECT_SEQ, "0");
                    (index_subject(j.msg.message_id()), h, to_json(&entry))
                })
                .collect();
            let results = self.publish_all(msgs).await;
            let mut taken = Vec::new();
            for (j, r) in to_reserve.drain(..).zip(results) {
                match r {
                    Ok(_) => to_publish.push(j),
                    Err(WriteError::Taken) => taken.push(j),
                    Err(WriteError::Other(e)) => reply(j, Err(BoundaryError::Unavailable(e))),
                }
            }
            // Someone may hold these ids: look them up, then resolve them all at once
            // (a replayed page is mostly ids that exist already).
            let lookups = join_all(taken.iter().map(|j| self.lookup_index(j))).await;
            let mut existing = Vec::new();
            for (j, found) in taken.into_iter().zip(lookups) {
                match found {
                    Err(e) => reply(j, Err(e)),
                    Ok(None) => to_reserve.push(j),
                    Ok(Some(entry)) => existing.push(self.resolve_existing(j, entry)),
                }
            }
            for r in join_all(existing).await {
                match r {
                    Resolved::Answered(commit) => commits.extend(commit),
                    Resolved::Complete(j) => to_publish.push(*j),
                }
            }
        }
        fail_all(to_reserve, "index reservation did not settle");
        // The next round may reserve while this one publishes.
        drop(reserve_stage);
        let Ok(_publishing) = publish_stage.acquire().await else {
            fail_all(to_publish, "append pipeline stopped");
            return commits;
        };

        // Step 2: publish per stream.
        let mut by_stream: HashMap<String, Vec<Job>> = HashMap::new();
        for j in to_publish {
            by_stream.entry(j.stream.clone()).or_default().push(j);
        }
        let results = join_all(
            by_stream
                .into_iter()
                .map(|(stream, jobs)| self.publish_facts(stream, jobs)),
        )
        .await;
        for r in results {
            commits.extend(r);
        }
        commits
    }

    /// An id is already reserved: decide duplicate, conflict, or completion. Answers
    /// the caller unless the job must be completed.
    async fn resolve_existing(&self, mut job: Job, entry: IndexEntry) -> Resolved {
        let stored_offset = match entry.offset {
            Some(o) => Ok(Some(o)),
            None => self
                .lookup_fact(&entry.stream, &entry.subject)
                .await
                .map(|f| f.map(|(seq, _)| seq)),
        };
        let stored_offset = match stored_offset {
            Ok(o) => o,
            Err(e) => {
                reply(job, Err(e));
                return Resolved::Answered(None);
            }
        };
        if entry.digest != job.msg.digest().to_hex() {
            reply(
                job,
                Err(BoundaryError::ConflictingDuplicate {
                    message_id: entry.id,
                    stream: entry.stream,
                    offset: stored_offset.unwrap_or(0),
                }),
            );
            return Resolved::Answered(None);
        }
        match stored_offset {
            Some(offset) => {
                let commit = entry.offset.is_none().then(|| IndexEntry {
                    offset: Some(offset),
                    ..entry.clone()
                });
                reply(
                    job,
                    Ok(AppendOutcome {
                        stream: entry.stream,
                        offset,
                        duplicate: true,
                    }),
                );
                Resolved::Answered(commit)
            }
            // Reserved but never published (a crash between steps 1 and 2, or the
            // winner is still in flight): complete it in the reserved stream.
            None => {
                job.stream = entry.stream;
                job.subject = entry.subject;
                Resolved::Complete(Box::new(job))
            }
        }
    }

    async fn publish_facts(&self, stream: String, mut jobs: Vec<Job>) -> Vec<IndexEntry> {
        let mut commits = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            if jobs.is_empty() {
                return commits;
            }
            let msgs = jobs
                .iter()
                .map(|j| {
                    let mut h = HeaderMap::new();
                    header(&mut h, HDR_EXPECTED_LAST_SUBJECT_SEQ, "0");
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
            let results = self.publish_all(msgs).await;
            let mut taken = Vec::new();
            for (j, r) in jobs.drain(..).zip(results) {
                match r {
                    Ok(seq) => {
                        commits.push(IndexEntry {
                            id: j.msg.message_id().to_owned(),
                            digest: j.msg.digest().to_hex(),
                            stream: stream.clone(),
                            subject: j.subject.clone(),
                            offset: Some(seq),
                        });
                        reply(
                            j,
                            Ok(AppendOutcome {
                                stream: stream.clone(),
                                offset: seq,
                                duplicate: false,
                            }),
                        );
                    }
                    Err(WriteError::Taken) => taken.push(j),
                    Err(WriteError::Other(e)) => reply(j, Err(BoundaryError::Unavailable(e))),
                }
            }
            // Another completer may have published some of these: find which.
            let found = join_all(taken.iter().map(|j| self.lookup_fact(&stream, &j.subject))).await;
            for (j, f) in taken.into_iter().zip(found) {
                match f {
                    Err(e) => reply(j, Err(e)),
                    Ok(None) => jobs.push(j),
                    Ok(Some((seq, digest))) if digest == j.msg.digest().to_hex() => reply(
                        j,
                        Ok(AppendOutcome {
                            stream: stream.clone(),
                            offset: seq,
                            duplicate: true,
                        }),
                    ),
                    Ok(Some((seq, _))) => {
                        let subject = j.subject.clone();
                        reply(
                            j,
                            Err(BoundaryError::Internal(format!(
                                "fact subject {subject} holds offset {seq} with another digest than its index reservation"
                            ))),
                        )
                    }
                }
            }
        }
        fail_all(jobs, "fact publish did not settle");
        commits
    }

    async fn lookup_index(&self, job: &Job) -> Result<Option<IndexEntry>, BoundaryError> {
        let subject = index_subject(job.msg.message_id());
        match self.index.direct_get_last_for_subject(subject).await {
            Ok(m) => serde_json::from_slice(&m.payload).map(Some).map_err(|e| {
                BoundaryError::Internal(format!("corrupt idempotency index entry: {e}"))
            }),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(BoundaryError::Unavailable(format!("index look-up: {e}"))),
        }
    }

    /// Finds the fact stored under `subject`: its offset and digest.
    async fn lookup_fact(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<Option<(u64, String)>, BoundaryError> {
        let Some(s) = self.streams.get(stream) else {
            return Err(BoundaryError::Internal(format!(
                "index refers to stream {stream}, which this zone does not configure"
            )));
        };
        match s.direct_get_last_for_subject(subject).await {
            Ok(m) => {
                let digest = m
                    .headers
                    .get(HDR_DIGEST)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                Ok(Some((m.sequence, digest)))
            }
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(BoundaryError::Unavailable(format!("fact look-up: {e}"))),
        }
    }

    /// Publishes every message and returns one result per message, in order.
    async fn publish_all(&self, msgs: Vec<Outbound>) -> Vec<Result<u64, WriteError>> {
        match self.mode {
            PublishMode::Pipelined => self.publish_pipelined(msgs).await,
            PublishMode::AtomicBatch => {
                let mut out = Vec::with_capacity(msgs.len());
                let mut msgs = msgs.into_iter().peekable();
                while msgs.peek().is_some() {
                    let chunk: Vec<_> = msgs.by_ref().take(self.max_batch.clamp(1, 1000)).collect();
                    let n = chunk.len();
                    match self.publish_atomic(chunk).await {
                        Ok(seqs) => out.extend(seqs.into_iter().map(Ok)),
                        Err(e) => out.extend(std::iter::repeat_n(Err(e), n)),
                    }
                }
                out
            }
        }
    }

    async fn publish_pipelined(&self, msgs: Vec<Outbound>) -> Vec<Result<u64, WriteError>> {
        let mut acks = Vec::with_capacity(msgs.len());
        for (subject, h, payload) in msgs {
            acks.push(self.js.publish_with_headers(subject, h, payload).await);
        }
        join_all(acks.into_iter().map(|a| async move {
            match a {
                Err(e) => Err(WriteError::Other(format!("publish: {e}"))),
                Ok(ack) => ack.await.map(|a| a.sequence).map_err(|e| {
                    if e.kind() == PublishErrorKind::WrongLastSequence {
                        WriteError::Taken
                    } else {
                        WriteError::Other(format!("publish ack: {e}"))
                    }
                }),
            }
        }))
        .await
    }

    /// Publishes messages as one atomic batch (ADR-50) and returns the stream sequence
    /// of every message, in order. At most 1000 messages.
    async fn publish_atomic(&self, chunk: Vec<Outbound>) -> Result<Vec<u64>, WriteError> {
        let n = chunk.len() as u64;
        let batch_id = nuid::next().to_string();
        let mut ack = None;
        for (i, (subject, mut h, payload)) in chunk.into_iter().enumerate() {
            header(&mut h, "Nats-Batch-Id", &batch_id);
            header(&mut h, "Nats-Batch-Sequence", &(i as u64 + 1).to_string());
            if i as u64 + 1 == n {
                header(&mut h, "Nats-Batch-Commit", "1");
                ack = Some(
                    self.js
                        .publish_with_headers(subject, h, payload)
                        .await
                        .map_err(|e| WriteError::Other(format!("publish: {e}")))?,
                );
            } else {
                self.client
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
