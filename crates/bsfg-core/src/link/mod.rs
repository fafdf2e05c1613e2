//! Receiver-driven replication: the pull step ([`pull_page`]) and the long-running
//! link loop ([`Link`]) built on it. FetchFacts from the source zone, AppendFact into
//! the local zone with the original message_id and envelope, and only then
//! ConfirmReceipt to the source.
//!
//! Architecture invariants, enforced here and nowhere else:
//! - a confirm never precedes the durable append of every fact of its page, or, for a
//!   fact the intake policies denied or this zone refused for what it is, its durable
//!   entry in the zone's quarantine; any other failure returns before the confirm, so
//!   the page comes again and idempotent append (and the quarantine's one entry per
//!   message_id and payload) absorbs what was already stored;
//! - one poison fact never holds back the facts behind it: each fact is validated
//!   under this zone's rules before the intake policies see it (they judge the
//!   canonical form, as append policies do), and a refusal that would repeat on every
//!   retry ([`BoundaryError::refuses_the_fact`]) sets only that fact aside;
//! - a gap is never skipped silently: when the source's retention removed facts this
//!   link never confirmed, the step stops before appending or confirming anything,
//!   unless the operator accepts exactly that gap, and an accepted gap is recorded as a
//!   fact in the local zone first. The link's own checkpoint (the frontier its last
//!   confirm returned, kept durably in the local zone) is the reference, so a source
//!   frontier that jumps without a confirm from this link cannot hide a gap.
//!
//! This module performs no I/O of its own: it only calls the ports and sleeps.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub mod machine;

use crate::error::BoundaryError;
use crate::model::{ArtifactRef, Envelope, Fact, Limits, Message, Refused, ValidatedMessage};
use crate::observe::{Observed, Observer, Op, Outcome};
use crate::policy::{Candidate, Hook, PolicyChain, PolicyContext, QuarantineEntry};
use crate::ports::{
    ApiResult, AppendOutcome, BoundaryApi, ByteStream, FactPage, FetchRequest, ObjectInfo,
};
use machine::{Action, Appended, Carry, Event, Machine, MachineConfig, Mode, Now};

/// How much of an artifact a zone holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// The object, with the digest and size the fact references.
    Whole,
    /// Not the object; this many bytes of it staged by an interrupted copy (0: none).
    Staged(u64),
    /// Other bytes under the artifact's bucket and key (artifacts are immutable).
    Other(ObjectInfo),
}

impl Held {
    /// What a store's info of `artifact`'s key says: the object itself, other bytes,
    /// or `None` when the key holds nothing.
    pub fn found(info: Option<ObjectInfo>, artifact: &ArtifactRef) -> Option<Held> {
        info.map(|i| {
            if i.matches(artifact) {
                Held::Whole
            } else {
                Held::Other(i)
            }
        })
    }
}

/// Where a link appends: the local zone. Implemented by the [`crate::Boundary`]
/// engine (provenance and checkpoint kept durably in the zone log) and by [`Remote`].
#[async_trait]
pub trait Destination: Send + Sync {
    /// This zone's limits: a fetched fact is validated under them, as AppendFact
    /// would, so policies judge and the zone stores the canonical form.
    fn limits(&self) -> Limits;
    /// Validates a fetched fact under [`Destination::limits`]. A refused fact comes
    /// back untouched with the reason.
    fn validate(&self, message: Message) -> Result<ValidatedMessage, Refused> {
        self.limits().try_validate(message)
    }
    /// Appends durably and idempotently, with the provenance the message carries
    /// stored beside the fact. Same guarantees as [`BoundaryApi::append_fact`].
    async fn append_replicated(
        &self,
        message: ValidatedMessage,
    ) -> Result<AppendOutcome, BoundaryError>;
    /// The link's durable checkpoint: the frontier its last confirm returned.
    async fn checkpoint(&self, link: &str) -> Result<Option<u64>, BoundaryError>;
    /// Records the checkpoint durably before returning.
    async fn record_checkpoint(&self, link: &str, offset: u64) -> Result<(), BoundaryError>;
    /// Keeps a fact the link could not append (denied by an intake policy, or refused
    /// by this zone), durably, before returning. Keeping the same fact (same
    /// message_id and payload) again stores nothing new.
    async fn quarantine(&self, entry: QuarantineEntry) -> Result<(), BoundaryError>;
    /// How much of `artifact` this zone holds.
    async fn artifact_held(&self, artifact: &ArtifactRef) -> ApiResult<Held>;
    /// Adds `body` to what is staged of `artifact` (exactly `from` bytes so far); when
    /// the artifact is whole and its digest checks, it is stored; see
    /// [`crate::ObjectStore::stage`].
    async fn stage_artifact(
        &self,
        artifact: &ArtifactRef,
        from: u64,
        body: ByteStream,
    ) -> ApiResult<ObjectInfo>;
    /// Discards what is staged of `artifact`.
    async fn discard_staged(&self, artifact: &ArtifactRef) -> ApiResult<()>;
}

/// A destination reached through its four operations only (for example a gateway
/// over gRPC, as `bsfg pull` does). It cannot store provenance or a checkpoint, so
/// gaps are judged against the source's frontier alone; facts are validated with the
/// default limits here and again by the destination.
pub struct Remote<'a>(pub &'a dyn BoundaryApi);

#[async_trait]
impl Destination for Remote<'_> {
    fn limits(&self) -> Limits {
        Limits::default()
    }
    async fn append_replicated(
        &self,
        message: ValidatedMessage,
    ) -> Result<AppendOutcome, BoundaryError> {
        self.0.append_fact(message.into_message()).await
    }
    async fn checkpoint(&self, _link: &str) -> Result<Option<u64>, BoundaryError> {
        Ok(None)
    }
    async fn record_checkpoint(&self, _link: &str, _offset: u64) -> Result<(), BoundaryError> {
        Ok(())
    }
    async fn quarantine(&self, entry: QuarantineEntry) -> Result<(), BoundaryError> {
        Err(BoundaryError::Unavailable(format!(
            "a remote destination keeps no quarantine; `{}` was set aside ({}: {}) and is not confirmed",
            entry.message.envelope.message_id, entry.cause, entry.denial.reason
        )))
    }
    async fn artifact_held(&self, artifact: &ArtifactRef) -> ApiResult<Held> {
        let info = match self.0.head_object(&artifact.bucket, &artifact.key).await {
            Ok(info) => Some(info),
            Err(BoundaryError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        Ok(Held::found(info, artifact).unwrap_or(Held::Staged(0)))
    }
    /// A remote zone stages nothing: the copy is one PutObject from the start.
    async fn stage_artifact(
        &self,
        artifact: &ArtifactRef,
        from: u64,
        body: ByteStream,
    ) -> ApiResult<ObjectInfo> {
        if from != 0 {
            return Err(BoundaryError::FailedPrecondition(format!(
                "a remote destination stages nothing; `{}/{}` is copied from its first byte",
                artifact.bucket, artifact.key
            )));
        }
        self.0
            .put_object(&artifact.bucket, &artifact.key, body)
            .await
    }
    async fn discard_staged(&self, _artifact: &ArtifactRef) -> ApiResult<()> {
        Ok(())
    }
}

/// The intake hook of a link: the zone's intake chain and who the source is, so a
/// policy sees the link, the source zone and the source gateway's identity.
/// [`Intake::default`] has no policies and allows everything.
#[derive(Clone, Default)]
pub struct Intake {
    /// The zone's intake policies, in config order.
    pub chain: PolicyChain,
    /// This (the receiving) zone.
    pub zone: String,
    /// The source gateway's identity as this link verifies it.
    pub peer: String,
}

/// Which operation of a pull step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// FetchFacts on the source.
    Fetch,
    /// AppendFact into the destination (including the gap record).
    Append,
    /// Reading or writing the link checkpoint in the destination.
    Checkpoint,
    /// ConfirmReceipt on the source.
    Confirm,
    /// Writing a fact the intake policies denied to the zone's quarantine.
    Quarantine,
    /// Copying an artifact a fact references from the source into this zone.
    Artifact,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Fetch => "fetch",
            Operation::Append => "append",
            Operation::Checkpoint => "checkpoint",
            Operation::Confirm => "confirm",
            Operation::Quarantine => "quarantine",
            Operation::Artifact => "artifact",
        })
    }
}

/// Why a pull step stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// A boundary operation failed; retrying the step is safe.
    #[error("{op} failed: {error}")]
    Boundary {
        /// The operation that failed.
        op: Operation,
        /// What it returned.
        error: BoundaryError,
    },
    /// The source no longer holds offsets `missing_from..=missing_to`, which this
    /// consumer never confirmed. Nothing was appended or confirmed.
    #[error(
        "gapped: the source no longer holds offsets {missing_from}..={missing_to} of consumer `{consumer}` (never confirmed); accept the gap deliberately to go on"
    )]
    Gap {
        /// Consumer on the source.
        consumer: String,
        /// First missing offset (frontier + 1).
        missing_from: u64,
        /// Last missing offset.
        missing_to: u64,
        /// The source zone, as it reported itself.
        source_zone: String,
        /// The consumer's frontier on the source.
        frontier: u64,
        /// The source stream's newest offset.
        last_offset: u64,
    },
}

fn at(op: Operation) -> impl FnOnce(BoundaryError) -> PullError {
    move |error| PullError::Boundary { op, error }
}

/// An operator's deliberate acceptance of one gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapAcceptance {
    /// The local zone, which records the acceptance as a fact.
    pub local_zone: String,
    /// Who accepted it (operator name or identity), kept in the record.
    pub accepted_by: String,
    /// Unix ms of the acceptance.
    pub at_unix_ms: i64,
    /// The exact gap accepted (`missing_from`, `missing_to`); `None` accepts whatever
    /// gap this step finds. A different gap stops the step again.
    pub range: Option<(u64, u64)>,
}

/// The fact that records an accepted gap: subject `link:<consumer>`, predicate
/// `gap_accepted`, message_id derived from the gap so that recording it twice stores
/// it once.
pub fn gap_fact(consumer: &str, missing_from: u64, missing_to: u64, a: &GapAcceptance) -> Message {
    Message {
        envelope: Envelope {
            message_id: format!("gap:{consumer}:{missing_from}-{missing_to}"),
            from_zone: a.local_zone.clone(),
            to_zone: a.local_zone.clone(),
            produced_at_unix_ms: a.at_unix_ms,
            labels: [("class".to_owned(), "audit".to_owned())].into(),
            ..Default::default()
        },
        fact: Fact {
            subject: format!("link:{consumer}"),
            predicate: "gap_accepted".into(),
            object_json: serde_json::json!({
                "consumer": consumer,
                "missing_from": missing_from,
                "missing_to": missing_to,
                "accepted_by": a.accepted_by,
            })
            .to_string(),
            artifacts: vec![],
        },
    }
}

/// A fact an intake policy filtered: not appended, not quarantined, recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filtered {
    /// Its message_id.
    pub message_id: String,
    /// Its offset in the source stream.
    pub source_offset: u64,
    /// The policy that filtered it.
    pub policy: String,
    /// The policy's reason.
    pub reason: String,
}

/// Facts listed one by one in a filter record at most; beyond, only counted.
pub const FILTER_RECORD_LISTED: usize = 200;

/// A running link records its checkpoint durably at most this often (and when it
/// stops): one disk commit per page fewer while it drains a backlog.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// A link's pages between fetch and confirm unless its configuration says otherwise
/// (`pages_in_flight`): chosen from `bsfg bench transports` across round-trip times
/// (docs/benchmarks.md).
pub const PAGES_IN_FLIGHT: usize = 8;

/// The audit fact of what the intake policies filtered from one page of `stream`:
/// subject `link:<link>`, predicate `facts_filtered`, in the receiving zone, its
/// message_id derived from the link, the stream and the filtered offsets, so that
/// recording the same page twice (a replay) stores it once. The first `listed`
/// facts are listed (the machine lists fewer when the record would not fit the
/// zone's fact limit); `count` always says how many there were.
pub fn filter_fact(
    step: &PullStep,
    stream: &str,
    filtered: &[Filtered],
    listed: usize,
    at_unix_ms: i64,
) -> Message {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in filtered {
        h.update(f.source_offset.to_be_bytes());
    }
    let first = filtered.iter().map(|f| f.source_offset).min().unwrap_or(0);
    let last = filtered.iter().map(|f| f.source_offset).max().unwrap_or(0);
    let digest: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Message {
        envelope: Envelope {
            message_id: format!("filtered:{}:{stream}:{first}-{last}:{digest}", step.link),
            from_zone: step.local_zone.clone(),
            to_zone: step.local_zone.clone(),
            produced_at_unix_ms: at_unix_ms,
            labels: [("class".to_owned(), "audit".to_owned())].into(),
            ..Default::default()
        },
        fact: Fact {
            subject: format!("link:{}", step.link),
            predicate: "facts_filtered".into(),
            object_json: serde_json::json!({
                "link": step.link,
                "source_zone": step.source_zone,
                "stream": stream,
                "count": filtered.len(),
                "facts": &filtered[..filtered.len().min(listed)],
            })
            .to_string(),
            artifacts: vec![],
        },
    }
}

/// What one step did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// Facts fetched from the source.
    pub fetched: usize,
    /// Of those, newly stored in the destination.
    pub stored: usize,
    /// Of those, already stored (replays absorbed by idempotency).
    pub duplicates: usize,
    /// Of those, set aside in the zone's quarantine (denied by an intake policy, or
    /// refused by this zone: invalid under its rules, conflicting duplicate).
    pub quarantined: usize,
    /// Of the quarantined, those this zone refused (the rest an intake policy denied).
    pub refused: usize,
    /// Facts an intake policy filtered (dropped, recorded in one audit fact).
    pub filtered: usize,
    /// The source's frontier for the consumer after the step.
    pub frontier: u64,
    /// The source's newest offset of the stream.
    pub last_offset: u64,
    /// Facts the source's consumer holds that this step did not deliver and confirm
    /// (the lag in facts: offsets are positions in the source's log, not counts).
    pub pending: u64,
    /// Zone that served the page.
    pub source_zone: String,
    /// Source append time (Unix ms) of the newest fact of the page, if any.
    pub newest_appended_at_unix_ms: Option<i64>,
    /// A gap that was accepted and recorded on this step.
    pub gap_accepted: Option<(u64, u64)>,
    /// The checkpoint this step recorded, if it recorded one.
    pub checkpoint: Option<u64>,
}

/// One pull step's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullStep {
    /// Link name: keys the checkpoint and is kept in provenance.
    pub link: String,
    /// Durable consumer on the source.
    pub consumer: String,
    /// Page size.
    pub limit: u32,
    /// Long-poll wait when nothing is ready.
    pub wait: Duration,
    /// Source streams this link may pull (`facts_<class>`); empty allows any. A page
    /// from another stream (the source's consumer reads a class the link was not
    /// meant to carry) fails the step before anything is appended.
    pub streams: Vec<String>,
    /// The source zone, as this link's configuration names it. Provenance, the
    /// policy context and quarantine entries take it from here, never from the page
    /// (whose `zone` the source can set to anything).
    pub source_zone: String,
    /// This (the receiving) zone: the zone of the link's own audit records (the
    /// facts an intake policy filtered from a page).
    pub local_zone: String,
}

/// The gap a page shows, judged against `base`, the lower of the link's checkpoint
/// and the source frontier: facts after `base` that the stream no longer holds.
fn find_gap(page: &FactPage, base: u64) -> Option<(u64, u64)> {
    let stream_empty = page.first_offset == 0 || page.first_offset > page.last_offset;
    if !page.facts.is_empty() && page.first_offset > base + 1 {
        return Some((base + 1, page.first_offset - 1));
    }
    // Everything after `base` expired and the stream is empty: JetStream may have
    // moved the consumer's ack floor to the end, but this link never confirmed it.
    if page.facts.is_empty() && stream_empty && page.last_offset > base {
        return Some((base + 1, page.last_offset));
    }
    None
}

/// Pulls one page from `source` into `destination`: checkpoint, fetch, gap check,
/// append every fact (concurrently, so the zone log can commit them together), then
/// confirm, then record the frontier the confirm returned as the new checkpoint.
/// With `accept_gap`, a gap found on this page (and matching its range, if set) is
/// recorded in `destination` and passed over.
pub async fn pull_page(
    source: &dyn BoundaryApi,
    destination: &dyn Destination,
    step: &PullStep,
    accept_gap: Option<&GapAcceptance>,
) -> Result<PullReport, PullError> {
    let ports = Ports {
        source,
        destination,
        intake: &Intake::default(),
        step,
        counters: None,
    };
    drive_once(&ports, accept_gap, None, None).await
}

/// FetchFacts for the step's consumer.
pub async fn fetch_page(source: &dyn BoundaryApi, step: &PullStep) -> Result<FactPage, PullError> {
    source
        .fetch_facts(step.fetch_request())
        .await
        .map_err(at(Operation::Fetch))
}

impl PullStep {
    /// The FetchFacts request of one page.
    fn fetch_request(&self) -> FetchRequest {
        FetchRequest {
            consumer: self.consumer.clone(),
            limit: self.limit,
            wait: self.wait,
        }
    }
}

/// Everything of [`pull_page`] after the fetch: gap check against `checkpoint` (the
/// link's durable checkpoint as last recorded), appends, confirm, new checkpoint. The
/// decisions are the link's state machine's ([`machine::Machine`]); this drives it
/// for one step over the ports.
pub async fn apply_page(
    source: &dyn BoundaryApi,
    destination: &dyn Destination,
    intake: &Intake,
    step: &PullStep,
    page: FactPage,
    checkpoint: Option<u64>,
    accept_gap: Option<&GapAcceptance>,
) -> Result<PullReport, PullError> {
    let ports = Ports {
        source,
        destination,
        intake,
        step,
        counters: None,
    };
    drive_once(&ports, accept_gap, Some(checkpoint), Some(page)).await
}

/// Runs a [`Mode::Once`] machine to its outcome, answering its first checkpoint read
/// and fetch from `checkpoint` and `page` when given.
async fn drive_once(
    ports: &Ports<'_>,
    accept_gap: Option<&GapAcceptance>,
    mut checkpoint: Option<Option<u64>>,
    mut page: Option<FactPage>,
) -> Result<PullReport, PullError> {
    let config = MachineConfig {
        mode: Mode::Once,
        pages_in_flight: 1,
        intake: !ports.intake.chain.is_empty(),
        limits: ports.destination.limits(),
        backoff_min: Duration::ZERO,
        backoff_max: Duration::ZERO,
        seed: 0,
        checkpoint_every: Duration::ZERO,
    };
    let mut machine = Machine::new(ports.step.clone(), config).accepting(accept_gap.cloned());
    machine.start(now());
    loop {
        let Some(action) = machine.poll_action() else {
            return Err(PullError::Boundary {
                op: Operation::Fetch,
                error: BoundaryError::Internal("the link's step stopped without an outcome".into()),
            });
        };
        let event = match action {
            Action::Done(outcome) => return outcome,
            Action::ReadCheckpoint if checkpoint.is_some() => {
                Event::CheckpointRead(Ok(checkpoint.take().flatten()))
            }
            Action::Fetch if page.is_some() => match page.take() {
                Some(p) => Event::Fetched(Ok(p)),
                None => continue,
            },
            other => match ports.run(other) {
                Dispatch::Call(call) => call.await,
                Dispatch::Notice(_) => continue,
            },
        };
        machine.handle(now(), event);
    }
}

/// A port call in flight, answered by one event.
type Call<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Event> + Send + 'a>>;

/// What a machine's actions are executed against.
struct Ports<'a> {
    source: &'a dyn BoundaryApi,
    destination: &'a dyn Destination,
    intake: &'a Intake,
    step: &'a PullStep,
    /// A link's counters (a single step counts nothing).
    counters: Option<&'a LinkCounters>,
}

impl<'a> Ports<'a> {
    /// The call an action asks for, or the action back when it is a notification
    /// (or a timer) the driver handles itself.
    fn run(&self, action: Action) -> Dispatch<'a> {
        let (source, destination, step, intake, counters) = (
            self.source,
            self.destination,
            self.step,
            self.intake,
            self.counters,
        );
        let call: Call<'a> = match action {
            Action::ReadCheckpoint => {
                Box::pin(
                    async move { Event::CheckpointRead(destination.checkpoint(&step.link).await) },
                )
            }
            Action::Fetch => {
                Box::pin(
                    async move { Event::Fetched(source.fetch_facts(step.fetch_request()).await) },
                )
            }
            Action::Prefetch(ticket) => Box::pin(async move {
                Event::Prefetched(ticket, source.fetch_facts(step.fetch_request()).await)
            }),
            Action::Decide(valid) => Box::pin(async move {
                let ctx = PolicyContext {
                    hook: Hook::Intake,
                    zone: &intake.zone,
                    peer: &intake.peer,
                    link: Some(&step.link),
                    source_zone: Some(&step.source_zone),
                };
                let candidates: Vec<Candidate<'_>> = valid
                    .iter()
                    .map(|(offset, v)| Candidate {
                        message: v.message(),
                        source_offset: Some(*offset),
                    })
                    .collect();
                let verdicts = intake.chain.decide(&ctx, &candidates).await;
                drop(candidates);
                Event::Decided(
                    valid
                        .into_iter()
                        .zip(verdicts)
                        .map(|((offset, v), verdict)| (offset, v, verdict))
                        .collect(),
                )
            }),
            Action::Carry(facts) => Box::pin(async move {
                Event::Carried(carry_page(source, destination, step, counters, facts).await)
            }),
            Action::AppendGapRecord(record) => {
                Box::pin(
                    async move { Event::GapRecorded(destination.append_replicated(*record).await) },
                )
            }
            Action::AppendFilterRecord(record) => Box::pin(async move {
                tracing::info!(link = %step.link, message_id = %record.message().envelope.message_id, "facts filtered at intake recorded");
                Event::FilterRecorded(destination.append_replicated(*record).await)
            }),
            Action::Append(facts) => Box::pin(async move {
                let n = facts.len();
                // A refused fact is rebuilt from its stored form (a cheap handle on
                // bytes the message already holds) rather than cloned for every fact
                // that succeeds.
                let appends = facts.into_iter().map(|(offset, v)| {
                    let stored = v.stored_form().clone();
                    async move {
                        let outcome = destination.append_replicated(v).await;
                        Appended {
                            offset,
                            stored,
                            outcome,
                        }
                    }
                });
                Event::Appended(
                    futures::stream::iter(appends)
                        .buffered(page_concurrency(n))
                        .collect()
                        .await,
                )
            }),
            Action::Quarantine(entries) => Box::pin(async move {
                for entry in entries {
                    tracing::warn!(
                        link = %step.link,
                        message_id = %entry.message.envelope.message_id,
                        source_offset = entry.source_offset,
                        cause = %entry.cause,
                        policy = %entry.denial.policy,
                        reason = %entry.denial.reason,
                        "fact quarantined at intake"
                    );
                    if let Err(e) = destination.quarantine(entry).await {
                        return Event::Quarantined(Err(e));
                    }
                }
                Event::Quarantined(Ok(()))
            }),
            Action::Confirm(offset) => Box::pin(async move {
                Event::Confirmed(offset, source.confirm_receipt(&step.consumer, offset).await)
            }),
            Action::RecordCheckpoint(offset) => Box::pin(async move {
                Event::CheckpointRecorded(destination.record_checkpoint(&step.link, offset).await)
            }),
            other => return Dispatch::Notice(other),
        };
        Dispatch::Call(call)
    }
}

/// Makes sure this zone holds every artifact of the page's facts: each distinct
/// artifact once (several facts may share one), one at a time (a copy streams, so
/// memory stays bounded whatever the artifact's size).
async fn carry_page(
    source: &dyn BoundaryApi,
    destination: &dyn Destination,
    step: &PullStep,
    counters: Option<&LinkCounters>,
    facts: Vec<(u64, Vec<ArtifactRef>)>,
) -> Vec<(u64, Carry)> {
    let mut done: std::collections::HashMap<&ArtifactRef, Result<(), Miss>> = Default::default();
    let gauge = counters.map(|c| &c.artifacts_pending);
    if let Some(g) = gauge {
        let distinct: std::collections::HashSet<&ArtifactRef> =
            facts.iter().flat_map(|(_, refs)| refs).collect();
        g.store(distinct.len() as u64, Ordering::Relaxed);
    }
    let mut out = Vec::with_capacity(facts.len());
    for (offset, refs) in &facts {
        let mut verdict = Carry::Ready;
        for (index, a) in refs.iter().enumerate() {
            if !done.contains_key(a) {
                let r = carry_one(source, destination, step, counters, a).await;
                if let Some(g) = gauge {
                    let _ = g.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
                }
                done.insert(a, r);
            }
            if let Some(Err(miss)) = done.get(a) {
                verdict = miss.clone().at(index);
                break;
            }
        }
        out.push((*offset, verdict));
    }
    if let Some(g) = gauge {
        g.store(0, Ordering::Relaxed);
    }
    out
}

/// Why one artifact is not held here after a copy: the two failing [`Carry`]s,
/// before they are told which of a fact's artifacts they concern.
#[derive(Debug, Clone)]
enum Miss {
    /// The source cannot serve it as referenced: the fact goes to the quarantine.
    Unavailable(BoundaryError),
    /// A retry may mend it: the step fails.
    Failed(BoundaryError),
}

impl Miss {
    /// The verdict for a fact whose artifact number `index` this is.
    fn at(self, index: usize) -> Carry {
        match self {
            Miss::Unavailable(error) => Carry::Unavailable { index, error },
            Miss::Failed(e) => Carry::Failed(e),
        }
    }
}

/// How an artifact came to be held here.
enum Got {
    /// It was here already.
    Present,
    /// It was copied from the source.
    Copied,
}

/// Copies one artifact unless this zone holds it (see [`copy_artifact`]), counts
/// the outcome, and discards what an unavailable artifact's copy staged (nothing
/// will resume it).
async fn carry_one(
    source: &dyn BoundaryApi,
    destination: &dyn Destination,
    step: &PullStep,
    counters: Option<&LinkCounters>,
    a: &ArtifactRef,
) -> Result<(), Miss> {
    let r = copy_artifact(source, destination, step, a).await;
    if let Err(Miss::Unavailable(_)) = &r
        && let Err(e) = destination.discard_staged(a).await
    {
        tracing::warn!(link = %step.link, bucket = %a.bucket, key = %a.key, error = %e, "could not discard the staged part of an unavailable artifact");
    }
    if let Some(c) = counters {
        match &r {
            Ok(Got::Present) => &c.artifacts_present,
            Ok(Got::Copied) => &c.artifacts_copied,
            Err(Miss::Unavailable(_)) => &c.artifacts_unavailable,
            Err(Miss::Failed(_)) => &c.artifact_failures,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
    r.map(|_| ())
}

/// The copy of one artifact: nothing when this zone holds it; else the source's
/// info must match the reference (else [`Miss::Unavailable`]), then the bytes stream
/// from where an earlier copy stopped into this zone's staging, which stores the
/// object once it is whole and its digest checks. A resumed copy whose digest does
/// not check starts over once from the first byte (the staged part may be what was
/// damaged).
async fn copy_artifact(
    source: &dyn BoundaryApi,
    destination: &dyn Destination,
    step: &PullStep,
    a: &ArtifactRef,
) -> Result<Got, Miss> {
    let unavailable = |rule: String| {
        Miss::Unavailable(BoundaryError::FailedPrecondition(format!(
            "artifact `{}/{}` ({}, {} bytes) from zone `{}`: {rule}",
            a.bucket, a.key, a.digest, a.size, step.source_zone
        )))
    };
    let mut from = match destination.artifact_held(a).await.map_err(Miss::Failed)? {
        Held::Whole => return Ok(Got::Present),
        Held::Other(info) => {
            return Err(unavailable(format!(
                "this zone holds other bytes under that key ({}, {} bytes)",
                info.digest, info.size
            )));
        }
        Held::Staged(n) => n,
    };
    let at_source = match source.head_object(&a.bucket, &a.key).await {
        Ok(info) => Some(info),
        Err(BoundaryError::NotFound(_)) => None,
        Err(e) => return Err(Miss::Failed(e)),
    };
    match Held::found(at_source, a) {
        Some(Held::Whole) => {}
        Some(Held::Other(info)) => {
            return Err(unavailable(format!(
                "the source holds other bytes under that key ({}, {} bytes)",
                info.digest, info.size
            )));
        }
        _ => return Err(unavailable("the source does not hold it".into())),
    }
    loop {
        tracing::info!(link = %step.link, bucket = %a.bucket, key = %a.key, size = a.size, from, "copying artifact");
        let read = match source.get_object(&a.bucket, &a.key, from).await {
            Ok(read) if read.info.matches(a) && read.offset == from => read,
            Ok(read) => {
                return Err(unavailable(format!(
                    "the source served {} ({} bytes) from byte {}",
                    read.info.digest, read.info.size, read.offset
                )));
            }
            Err(BoundaryError::NotFound(_)) => {
                return Err(unavailable("the source does not hold it".into()));
            }
            Err(e) => return Err(Miss::Failed(e)),
        };
        match destination.stage_artifact(a, from, read.body).await {
            Ok(_) => {
                tracing::info!(link = %step.link, bucket = %a.bucket, key = %a.key, digest = %a.digest, "artifact copied");
                return Ok(Got::Copied);
            }
            // The digest did not check and the staged bytes are gone: a resumed copy
            // starts over once; a copy from the first byte means the source's bytes
            // are not what it says.
            Err(BoundaryError::FailedPrecondition(rule)) if from > 0 => {
                tracing::warn!(link = %step.link, bucket = %a.bucket, key = %a.key, %rule, "resumed artifact copy did not check; starting over");
                destination.discard_staged(a).await.map_err(Miss::Failed)?;
                from = 0;
            }
            Err(BoundaryError::FailedPrecondition(rule)) => return Err(unavailable(rule)),
            Err(e) => return Err(Miss::Failed(e)),
        }
    }
}

/// What the driver does with an action.
enum Dispatch<'a> {
    /// A port call, answered by its event when it completes.
    Call(Call<'a>),
    /// A notification or a timer: the driver's own business.
    Notice(Action),
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
    }
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_ms: now_unix_ms(),
    }
}

fn page_concurrency(n: usize) -> usize {
    n.clamp(1, 1000)
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A link's configuration, as composed from the zone's config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSettings {
    /// Link name, unique in the zone; keys its checkpoint.
    pub name: String,
    /// This (the destination) zone's name, for the gap record.
    pub local_zone: String,
    /// The source zone's name, from configuration (see [`PullStep::source_zone`]).
    pub source_zone: String,
    /// Durable consumer on the source; it decides the class and subject kinds pulled.
    pub consumer: String,
    /// Facts per page.
    pub page_size: u32,
    /// Pages between their fetch and the answer to their confirm, at most
    /// ([`PAGES_IN_FLIGHT`] by default; 1 applies one page at a time with no fetch
    /// ahead).
    pub pages_in_flight: usize,
    /// Long-poll wait of an idle link.
    pub wait: Duration,
    /// Source streams the link may carry (`facts_<class>`); empty allows any.
    pub streams: Vec<String>,
    /// First retry delay after a failure.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How long a call to the source may take (beyond the long-poll wait for a fetch)
    /// before the step counts as failed and backs off.
    pub request_timeout: Duration,
}

/// The state of a link, as `bsfg status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LinkState {
    /// Not yet past its first step.
    Starting,
    /// Steps succeed.
    Running,
    /// The last step failed; the next one runs after the backoff.
    BackingOff {
        /// Consecutive failures.
        attempt: u32,
        /// Delay before the next attempt.
        retry_in_ms: u64,
        /// The operation that failed.
        op: Operation,
        /// What failed.
        error: String,
    },
    /// Stopped at a gap; only an operator's acceptance moves it on.
    Gapped {
        /// First missing offset.
        missing_from: u64,
        /// Last missing offset.
        missing_to: u64,
    },
    /// Another gateway of the zone holds the link's lease and runs it; this one
    /// takes over when that lease expires.
    Standby,
    /// Shut down.
    Stopped,
}

impl LinkState {
    /// Short name: `starting`, `running`, `backing_off`, `gapped`, `standby`,
    /// `stopped`.
    pub fn name(&self) -> &'static str {
        match self {
            LinkState::Starting => "starting",
            LinkState::Running => "running",
            LinkState::BackingOff { .. } => "backing_off",
            LinkState::Gapped { .. } => "gapped",
            LinkState::Standby => "standby",
            LinkState::Stopped => "stopped",
        }
    }
}

/// The lease that lets exactly one gateway of a zone run a link at a time, kept in
/// the zone's store (compare-and-set on a revision, expiring unless renewed).
#[async_trait]
pub trait LinkLease: Send + Sync {
    /// Takes the lease of `link` for `holder`, or renews it when `holder` has it
    /// already, for [`LinkLease::ttl`] from now. `Ok(None)`: `holder` has it;
    /// `Ok(Some(other))`: `other` has it. An error leaves the lease as it was.
    async fn claim(&self, link: &str, holder: &str) -> Result<Option<String>, BoundaryError>;
    /// Gives the lease up if `holder` has it (at a clean stop), so another gateway
    /// takes over at once rather than after the ttl.
    async fn release(&self, link: &str, holder: &str);
    /// How long a lease lasts without renewal.
    fn ttl(&self) -> Duration;
}

/// How a link's run ended.
enum Ended {
    /// The gateway stops.
    Shutdown,
    /// The lease was lost (another gateway has it, or it could not be renewed in
    /// time): this gateway stops pulling.
    LeaseLost,
}

/// Counters of one link, monotonic since the gateway started.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// FetchFacts calls.
    pub fetch_requests: AtomicU64,
    /// Failed FetchFacts calls.
    pub fetch_failures: AtomicU64,
    /// AppendFact calls into the local zone (one per fact).
    pub append_requests: AtomicU64,
    /// Failed appends.
    pub append_failures: AtomicU64,
    /// ConfirmReceipt calls.
    pub confirm_requests: AtomicU64,
    /// Failed confirms.
    pub confirm_failures: AtomicU64,
    /// Facts newly stored locally.
    pub facts_stored: AtomicU64,
    /// Facts that were already stored (replays absorbed).
    pub facts_duplicate: AtomicU64,
    /// Facts set aside in the zone's quarantine (policy denials and refusals).
    pub quarantined: AtomicU64,
    /// Of those, facts this zone refused (invalid here, conflicting duplicate, ...).
    pub refused: AtomicU64,
    /// Gaps accepted by an operator.
    pub gaps_accepted: AtomicU64,
    /// Facts an intake policy filtered (dropped and recorded, not quarantined).
    pub filtered: AtomicU64,
    /// Artifacts copied whole from the source into this zone.
    pub artifacts_copied: AtomicU64,
    /// Artifacts this zone already held when a fact referenced them.
    pub artifacts_present: AtomicU64,
    /// Artifact copies that failed (the step backs off and resumes them).
    pub artifact_failures: AtomicU64,
    /// Artifacts the source could not serve as referenced (their facts quarantined).
    pub artifacts_unavailable: AtomicU64,
    /// Artifact bytes received from the source (shared with the bodies in flight).
    pub artifact_bytes: Arc<AtomicU64>,
    /// Artifacts of the page at hand not yet held here (a gauge).
    pub artifacts_pending: AtomicU64,
}

/// A snapshot of a link for status and metrics (the `/status` JSON of a zone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Link name.
    pub name: String,
    /// Consumer on the source.
    pub consumer: String,
    /// Source zone, as the link's configuration names it.
    pub source_zone: String,
    /// Current state.
    #[serde(flatten)]
    pub state: LinkState,
    /// Which gateway of the zone holds the link's lease (runs it), when the zone
    /// coordinates its gateways by leases.
    #[serde(default)]
    pub holder: Option<String>,
    /// Source frontier of the consumer after the last step.
    pub frontier: u64,
    /// Source's newest offset at the last step.
    pub source_last_offset: u64,
    /// Facts the source holds for this link's consumer that it has not confirmed.
    pub lag_facts: u64,
    /// 0 when caught up; otherwise how old the newest replicated fact was when it was
    /// stored here, plus the time since the last successful step (source clock vs
    /// local clock: skew between zones shows up here).
    pub lag_seconds: f64,
    /// Unix ms of the last successful step.
    pub last_success_unix_ms: Option<i64>,
    /// Counters (see [`LinkCounters`]).
    pub fetch_requests: u64,
    /// Failed fetches.
    pub fetch_failures: u64,
    /// Appends.
    pub append_requests: u64,
    /// Failed appends.
    pub append_failures: u64,
    /// Confirms.
    pub confirm_requests: u64,
    /// Failed confirms.
    pub confirm_failures: u64,
    /// Facts newly stored.
    pub facts_stored: u64,
    /// Replays absorbed.
    pub facts_duplicate: u64,
    /// Facts quarantined at intake (policy denials and refusals).
    #[serde(default)]
    pub quarantined: u64,
    /// Of those, facts this zone refused (invalid here, conflicting duplicate, ...).
    #[serde(default)]
    pub refused: u64,
    /// Gaps accepted.
    pub gaps_accepted: u64,
    /// Facts an intake policy filtered.
    #[serde(default)]
    pub filtered: u64,
    /// Artifacts copied whole from the source.
    #[serde(default)]
    pub artifacts_copied: u64,
    /// Artifacts already held when referenced.
    #[serde(default)]
    pub artifacts_present: u64,
    /// Artifact copies that failed and are retried.
    #[serde(default)]
    pub artifact_failures: u64,
    /// Artifacts the source could not serve as referenced (facts quarantined).
    #[serde(default)]
    pub artifacts_unavailable: u64,
    /// Artifact bytes received from the source.
    #[serde(default)]
    pub artifact_bytes: u64,
    /// Artifacts of the page at hand not yet held here.
    #[serde(default)]
    pub artifacts_pending: u64,
}

#[derive(Debug, Clone)]
struct Progress {
    state: LinkState,
    holder: Option<String>,
    source_zone: String,
    frontier: u64,
    source_last_offset: u64,
    source_pending: u64,
    last_page_lag_ms: i64,
    last_success_unix_ms: Option<i64>,
}

/// Shared between a running link and whoever watches or steers it.
struct Shared {
    settings: LinkSettings,
    counters: LinkCounters,
    progress: Mutex<Progress>,
    acceptance: watch::Sender<Option<GapAcceptance>>,
}

/// Why an operator's gap acceptance was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptGapError {
    /// The link is not gapped.
    #[error("link `{0}` is not gapped")]
    NotGapped(String),
    /// The range does not match the link's current gap.
    #[error("link `{link}` is gapped at {missing_from}..={missing_to}, not at the range given")]
    OtherRange {
        /// Link.
        link: String,
        /// Its current gap start.
        missing_from: u64,
        /// Its current gap end.
        missing_to: u64,
    },
}

/// Handle to a link: status snapshots and the operator's gap acceptance.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("name", &self.shared.settings.name)
            .finish()
    }
}

impl LinkHandle {
    /// The link's name.
    pub fn name(&self) -> &str {
        &self.shared.settings.name
    }

    /// A consistent snapshot of state, positions and counters.
    pub fn status(&self) -> LinkStatus {
        let p = match self.shared.progress.lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let lag_facts = p.source_pending;
        let lag_seconds = match (lag_facts, &p.state, p.last_success_unix_ms) {
            (0, LinkState::Running, _) => 0.0,
            (_, _, Some(t)) => {
                (p.last_page_lag_ms.max(0) + (now_unix_ms() - t).max(0)) as f64 / 1000.0
            }
            (_, _, None) => 0.0,
        };
        LinkStatus {
            name: self.shared.settings.name.clone(),
            consumer: self.shared.settings.consumer.clone(),
            source_zone: p.source_zone,
            state: p.state,
            holder: p.holder,
            frontier: p.frontier,
            source_last_offset: p.source_last_offset,
            lag_facts,
            lag_seconds,
            last_success_unix_ms: p.last_success_unix_ms,
            fetch_requests: get(&c.fetch_requests),
            fetch_failures: get(&c.fetch_failures),
            append_requests: get(&c.append_requests),
            append_failures: get(&c.append_failures),
            confirm_requests: get(&c.confirm_requests),
            confirm_failures: get(&c.confirm_failures),
            facts_stored: get(&c.facts_stored),
            facts_duplicate: get(&c.facts_duplicate),
            quarantined: get(&c.quarantined),
            refused: get(&c.refused),
            gaps_accepted: get(&c.gaps_accepted),
            filtered: get(&c.filtered),
            artifacts_copied: get(&c.artifacts_copied),
            artifacts_present: get(&c.artifacts_present),
            artifact_failures: get(&c.artifact_failures),
            artifacts_unavailable: get(&c.artifacts_unavailable),
            artifact_bytes: get(&c.artifact_bytes),
            artifacts_pending: get(&c.artifacts_pending),
        }
    }

    /// Accepts the link's current gap, which must be exactly
    /// `missing_from..=missing_to`. The link records the acceptance as a fact in the
    /// local zone and goes on; a different gap found later stops it again.
    pub fn accept_gap(
        &self,
        missing_from: u64,
        missing_to: u64,
        accepted_by: &str,
    ) -> Result<(), AcceptGapError> {
        let state = self.status().state;
        let LinkState::Gapped {
            missing_from: f,
            missing_to: t,
        } = state
        else {
            return Err(AcceptGapError::NotGapped(self.name().to_owned()));
        };
        if (f, t) != (missing_from, missing_to) {
            return Err(AcceptGapError::OtherRange {
                link: self.name().to_owned(),
                missing_from: f,
                missing_to: t,
            });
        }
        self.shared.acceptance.send_replace(Some(GapAcceptance {
            local_zone: self.shared.settings.local_zone.clone(),
            accepted_by: accepted_by.to_owned(),
            at_unix_ms: now_unix_ms(),
            range: Some((f, t)),
        }));
        Ok(())
    }
}

/// A link: pulls from `source` into `destination` until shut down.
pub struct Link {
    shared: Arc<Shared>,
    source: Arc<dyn BoundaryApi>,
    destination: Arc<dyn Destination>,
    intake: Intake,
    lease: Option<(Arc<dyn LinkLease>, String)>,
}

impl Link {
    /// Prepares a link; [`Link::run`] drives it.
    pub fn new(
        settings: LinkSettings,
        source: Arc<dyn BoundaryApi>,
        destination: Arc<dyn Destination>,
    ) -> (Link, LinkHandle) {
        let (acceptance, _) = watch::channel(None);
        let source_zone = settings.source_zone.clone();
        let shared = Arc::new(Shared {
            settings,
            counters: LinkCounters::default(),
            progress: Mutex::new(Progress {
                state: LinkState::Starting,
                holder: None,
                source_zone,
                frontier: 0,
                source_last_offset: 0,
                source_pending: 0,
                last_page_lag_ms: 0,
                last_success_unix_ms: None,
            }),
            acceptance,
        });
        let handle = LinkHandle {
            shared: shared.clone(),
        };
        (
            Link {
                shared,
                source,
                destination,
                intake: Intake::default(),
                lease: None,
            },
            handle,
        )
    }

    /// Runs the link only while `holder` (this gateway) holds its lease: the other
    /// gateways of the zone with the same link stand by and take over when the
    /// holder's lease expires (default: no lease, the link always runs).
    pub fn with_lease(mut self, lease: Arc<dyn LinkLease>, holder: String) -> Self {
        self.lease = Some((lease, holder));
        self
    }

    fn set_holder(&self, holder: Option<String>) {
        if let Ok(mut p) = self.shared.progress.lock() {
            p.holder = holder;
        }
    }

    /// Decides every page at intake before it is appended (default: no policies).
    pub fn with_intake(mut self, intake: Intake) -> Self {
        self.intake = intake;
        self
    }

    fn set_state(&self, state: LinkState) {
        if let Ok(mut p) = self.shared.progress.lock() {
            p.state = state;
        }
    }

    /// Runs until `shutdown` turns true. Never returns early on failures: it backs
    /// off (capped, jittered, exponential) and retries; at a gap it waits for an
    /// operator. Dropping a step half-way is safe: nothing is confirmed before its
    /// appends are durable. The decisions are the link's state machine's
    /// ([`machine::Machine`]); this loop only executes its actions, running its calls
    /// concurrently: up to `pages_in_flight` pages between fetch and confirm.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Some((lease, holder)) = self.lease.clone() else {
            let (_never, mut lost) = watch::channel(false);
            self.drive(&mut shutdown, &mut lost).await;
            self.set_state(LinkState::Stopped);
            tracing::info!(link = %self.shared.settings.name, "link stopped");
            return;
        };
        let name = self.shared.settings.name.clone();
        let ttl = lease.ttl();
        let renew_every = ttl / 3;
        loop {
            // Stand by until the lease is this gateway's.
            loop {
                match lease.claim(&name, &holder).await {
                    Ok(None) => break,
                    Ok(Some(other)) => {
                        if self
                            .shared
                            .progress
                            .lock()
                            .is_ok_and(|p| p.holder.as_ref() != Some(&other))
                        {
                            tracing::info!(link = %name, holder = %other, "link runs on another gateway of the zone; standing by");
                        }
                        self.set_holder(Some(other));
                        self.set_state(LinkState::Standby);
                    }
                    Err(e) => {
                        tracing::warn!(link = %name, error = %e, "cannot read the link's lease; retrying");
                    }
                }
                tokio::select! {
                    _ = shutdown.changed() => {
                        self.set_state(LinkState::Stopped);
                        return;
                    }
                    _ = tokio::time::sleep(renew_every) => {}
                }
            }
            tracing::info!(link = %name, %holder, "link lease taken; this gateway runs the link");
            self.set_holder(Some(holder.clone()));
            // Renewed in the background; lost when another holder shows, or when no
            // renewal succeeded for two thirds of the ttl (before it can expire for
            // the others).
            let (lost_tx, mut lost) = watch::channel(false);
            let renewal = {
                let (lease, name, holder) = (lease.clone(), name.clone(), holder.clone());
                tokio::spawn(async move {
                    let mut last_ok = Instant::now();
                    loop {
                        tokio::time::sleep(renew_every).await;
                        match lease.claim(&name, &holder).await {
                            Ok(None) => last_ok = Instant::now(),
                            Ok(Some(other)) => {
                                tracing::warn!(link = %name, holder = %other, "link lease taken by another gateway; this one stops pulling");
                                break;
                            }
                            Err(e) if last_ok.elapsed() >= ttl * 2 / 3 => {
                                tracing::warn!(link = %name, error = %e, "link lease not renewed in time; this gateway stops pulling");
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(link = %name, error = %e, "link lease renewal failed; retrying");
                            }
                        }
                    }
                    let _ = lost_tx.send(true);
                })
            };
            let ended = self.drive(&mut shutdown, &mut lost).await;
            renewal.abort();
            match ended {
                Ended::Shutdown => {
                    lease.release(&name, &holder).await;
                    self.set_state(LinkState::Stopped);
                    tracing::info!(link = %name, "link stopped; lease released");
                    return;
                }
                Ended::LeaseLost => {
                    self.set_holder(None);
                    self.set_state(LinkState::Standby);
                }
            }
        }
    }

    /// Drives the link's machine until the gateway stops or `lost` turns true.
    async fn drive(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        lost: &mut watch::Receiver<bool>,
    ) -> Ended {
        let settings = self.shared.settings.clone();
        let step = PullStep {
            link: settings.name.clone(),
            consumer: settings.consumer.clone(),
            limit: settings.page_size,
            wait: settings.wait,
            streams: settings.streams.clone(),
            source_zone: settings.source_zone.clone(),
            local_zone: settings.local_zone.clone(),
        };
        let metered_source = Observed::new(
            self.source.clone(),
            SourceObserver {
                shared: self.shared.clone(),
                request_timeout: settings.request_timeout,
            },
        );
        let metered_destination = MeteredDestination {
            inner: self.destination.as_ref(),
            counters: &self.shared.counters,
        };
        let ports = Ports {
            source: &metered_source,
            destination: &metered_destination,
            intake: &self.intake,
            step: &step,
            counters: Some(&self.shared.counters),
        };
        let config = MachineConfig {
            mode: Mode::Continuous,
            pages_in_flight: settings.pages_in_flight.max(1),
            intake: !self.intake.chain.is_empty(),
            limits: self.destination.limits(),
            backoff_min: settings.backoff_min,
            backoff_max: settings.backoff_max,
            seed: RandomState::new().hash_one(&settings.name),
            checkpoint_every: CHECKPOINT_EVERY,
        };
        let mut machine = Machine::new(step.clone(), config);
        let mut acceptance_rx = self.shared.acceptance.subscribe();
        let mut calls: futures::stream::FuturesUnordered<Call<'_>> = Default::default();
        let mut timer: Option<Instant> = None;
        let mut next: Option<Event> = None;
        tracing::info!(link = %settings.name, consumer = %settings.consumer, "link started");
        let mut ended = Ended::Shutdown;
        machine.start(now());
        loop {
            while let Some(action) = machine.poll_action() {
                match ports.run(action) {
                    Dispatch::Call(call) => calls.push(call),
                    Dispatch::Notice(Action::SleepUntil(at)) => timer = Some(at),
                    Dispatch::Notice(Action::Stepped(report)) => self.record_success(&report),
                    Dispatch::Notice(Action::BackingOff {
                        attempt,
                        delay,
                        op,
                        error,
                    }) => {
                        tracing::warn!(
                            link = %settings.name,
                            consumer = %settings.consumer,
                            %op,
                            attempt,
                            retry_in_ms = delay.as_millis() as u64,
                            error = %error,
                            "link step failed; backing off"
                        );
                        self.set_state(LinkState::BackingOff {
                            attempt,
                            retry_in_ms: delay.as_millis() as u64,
                            op,
                            error: error.to_string(),
                        });
                    }
                    Dispatch::Notice(Action::Gapped(gap)) => {
                        self.gapped(gap);
                        // An acceptance given before the gap was found again counts.
                        if let Some(a) = acceptance_rx.borrow_and_update().clone() {
                            next = Some(Event::GapAccepted(a));
                        }
                    }
                    Dispatch::Notice(_) => {}
                }
            }
            if *shutdown.borrow() {
                break;
            }
            if *lost.borrow() {
                ended = Ended::LeaseLost;
                break;
            }
            let event = match next.take() {
                Some(e) => e,
                None => tokio::select! {
                    biased;
                    _ = shutdown.changed() => break,
                    _ = lost.changed() => {
                        ended = Ended::LeaseLost;
                        break;
                    }
                    Some(e) = calls.next(), if !calls.is_empty() => e,
                    _ = sleep_until(timer), if timer.is_some() => {
                        timer = None;
                        Event::TimerFired
                    }
                    r = acceptance_rx.changed() => {
                        if r.is_err() {
                            break;
                        }
                        match acceptance_rx.borrow_and_update().clone() {
                            Some(a) => Event::GapAccepted(a),
                            None => continue,
                        }
                    }
                },
            };
            if let Event::GapAccepted(a) = &event
                && let Some((missing_from, missing_to)) = a.range
                && self.shared.progress.lock().is_ok_and(|p| {
                    p.state
                        == LinkState::Gapped {
                            missing_from,
                            missing_to,
                        }
                })
            {
                let (from, to) = (missing_from, missing_to);
                tracing::warn!(link = %settings.name, missing_from = from, missing_to = to, accepted_by = %a.accepted_by, "gap accepted by operator");
            }
            machine.handle(now(), event);
        }
        // The checkpoint of the last steps, if only kept in memory so far.
        if let Some(c) = machine.unrecorded_checkpoint() {
            let recorded = tokio::time::timeout(
                settings.request_timeout,
                self.destination.record_checkpoint(&settings.name, c),
            )
            .await;
            if !matches!(recorded, Ok(Ok(()))) {
                tracing::warn!(link = %settings.name, checkpoint = c, "could not record the link checkpoint at stop; the one recorded before stands (the gap check looks further back)");
            }
        }
        ended
    }

    fn gapped(&self, gap: PullError) {
        let PullError::Gap {
            missing_from,
            missing_to,
            source_zone,
            frontier,
            last_offset,
            ..
        } = gap
        else {
            return;
        };
        let state = LinkState::Gapped {
            missing_from,
            missing_to,
        };
        let newly_gapped = self.shared.progress.lock().is_ok_and(|mut p| {
            p.source_zone = source_zone;
            p.frontier = frontier;
            p.source_last_offset = last_offset;
            std::mem::replace(&mut p.state, state.clone()) != state
        });
        if newly_gapped {
            tracing::error!(
                link = %self.shared.settings.name,
                consumer = %self.shared.settings.consumer,
                missing_from,
                missing_to,
                "link gapped: the source no longer holds facts this link never confirmed; an operator must accept the gap (bsfg link accept-gap)"
            );
        }
    }

    fn record_success(&self, report: &PullReport) {
        let c = &self.shared.counters;
        c.facts_stored
            .fetch_add(report.stored as u64, Ordering::Relaxed);
        c.facts_duplicate
            .fetch_add(report.duplicates as u64, Ordering::Relaxed);
        c.quarantined
            .fetch_add(report.quarantined as u64, Ordering::Relaxed);
        c.refused
            .fetch_add(report.refused as u64, Ordering::Relaxed);
        c.filtered
            .fetch_add(report.filtered as u64, Ordering::Relaxed);
        if report.gap_accepted.is_some() {
            c.gaps_accepted.fetch_add(1, Ordering::Relaxed);
        }
        let now = now_unix_ms();
        if let Ok(mut p) = self.shared.progress.lock() {
            if p.state != LinkState::Running {
                tracing::info!(link = %self.shared.settings.name, frontier = report.frontier, "link running");
            }
            p.state = LinkState::Running;
            p.source_zone.clone_from(&report.source_zone);
            p.frontier = report.frontier;
            p.source_last_offset = report.last_offset;
            p.source_pending = report.pending;
            if let Some(t) = report.newest_appended_at_unix_ms {
                p.last_page_lag_ms = now - t;
            } else if report.last_offset <= report.frontier {
                p.last_page_lag_ms = 0;
            }
            p.last_success_unix_ms = Some(now);
        }
    }
}

/// Counts requests and failures of the source's fetches and confirms, and bounds
/// their time (a fetch by its long-poll wait plus `request_timeout`): an observer of
/// the link's source.
struct SourceObserver {
    shared: Arc<Shared>,
    request_timeout: Duration,
}

impl Observer for SourceObserver {
    fn deadline(&self, op: Op) -> Option<Duration> {
        match op {
            Op::Fetch { wait } => Some(wait + self.request_timeout),
            Op::Confirm { .. } | Op::HeadObject | Op::GetObject { .. } => {
                Some(self.request_timeout)
            }
            Op::Append | Op::PutObject => None,
        }
    }
    fn observed(&self, op: Op, _elapsed: Duration, outcome: Result<Outcome<'_>, &BoundaryError>) {
        let c = &self.shared.counters;
        let (requests, failures) = match op {
            Op::Fetch { .. } => (&c.fetch_requests, &c.fetch_failures),
            Op::Confirm { .. } => (&c.confirm_requests, &c.confirm_failures),
            Op::Append | Op::PutObject | Op::HeadObject | Op::GetObject { .. } => return,
        };
        requests.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts appends and their failures into the local zone.
struct MeteredDestination<'a> {
    inner: &'a dyn Destination,
    counters: &'a LinkCounters,
}

#[async_trait]
impl Destination for MeteredDestination<'_> {
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    async fn append_replicated(
        &self,
        message: ValidatedMessage,
    ) -> Result<AppendOutcome, BoundaryError> {
        let c = self.counters;
        let r = self.inner.append_replicated(message).await;
        c.append_requests.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            c.append_failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
    async fn checkpoint(&self, link: &str) -> Result<Option<u64>, BoundaryError> {
        self.inner.checkpoint(link).await
    }
    async fn record_checkpoint(&self, link: &str, offset: u64) -> Result<(), BoundaryError> {
        self.inner.record_checkpoint(link, offset).await
    }
    async fn quarantine(&self, entry: QuarantineEntry) -> Result<(), BoundaryError> {
        self.inner.quarantine(entry).await
    }
    async fn artifact_held(&self, artifact: &ArtifactRef) -> ApiResult<Held> {
        self.inner.artifact_held(artifact).await
    }
    async fn stage_artifact(
        &self,
        artifact: &ArtifactRef,
        from: u64,
        body: ByteStream,
    ) -> ApiResult<ObjectInfo> {
        let counted = self.counters.artifact_bytes.clone();
        let body = body
            .inspect(move |chunk| {
                if let Ok(c) = chunk {
                    counted.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
            })
            .boxed();
        self.inner.stage_artifact(artifact, from, body).await
    }
    async fn discard_staged(&self, artifact: &ArtifactRef) -> ApiResult<()> {
        self.inner.discard_staged(artifact).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Limits;

    #[test]
    fn the_gap_record_is_a_valid_audit_fact_with_a_stable_id() {
        let a = GapAcceptance {
            local_zone: "enterprise".into(),
            accepted_by: "operator jdoe".into(),
            at_unix_ms: 1,
            range: None,
        };
        let m = gap_fact("to-enterprise", 3, 5, &a);
        assert_eq!(m.envelope.message_id, "gap:to-enterprise:3-5");
        assert_eq!(
            m.envelope.labels.get("class").map(String::as_str),
            Some("audit")
        );
        let v = Limits::default().validate(m).expect("a valid fact");
        assert!(
            v.message()
                .fact
                .object_json
                .contains(r#""accepted_by":"operator jdoe""#)
        );
    }

    fn page(first: u64, last: u64, frontier: u64, offsets: &[u64]) -> FactPage {
        FactPage {
            first_offset: first,
            last_offset: last,
            frontier,
            facts: offsets
                .iter()
                .map(|&offset| crate::ports::FetchedFact {
                    offset,
                    appended_at_unix_ms: 0,
                    delivery_count: 1,
                    message: Message::default(),
                    provenance: None,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_page_continuing_from_the_frontier_shows_no_gap() {
        assert_eq!(find_gap(&page(1, 10, 4, &[5, 6]), 4), None);
        assert_eq!(find_gap(&page(5, 10, 4, &[5, 6]), 4), None);
        // Redelivery of older facts (first retained below the frontier) is no gap.
        assert_eq!(find_gap(&page(1, 10, 8, &[3, 4]), 8), None);
    }

    #[test]
    fn retention_past_the_base_is_a_gap_up_to_the_first_retained_offset() {
        assert_eq!(find_gap(&page(7, 10, 4, &[7, 8]), 4), Some((5, 6)));
    }

    #[test]
    fn an_empty_stream_beyond_the_base_is_a_gap_even_without_facts() {
        // JetStream reports an emptied stream as first = last + 1.
        assert_eq!(find_gap(&page(11, 10, 10, &[]), 4), Some((5, 10)));
        // Caught up on an empty stream: nothing missing.
        assert_eq!(find_gap(&page(11, 10, 10, &[]), 10), None);
        assert_eq!(find_gap(&page(0, 0, 0, &[]), 0), None);
        // An empty page of a non-empty stream says nothing about gaps.
        assert_eq!(find_gap(&page(8, 10, 4, &[]), 4), None);
    }
}
