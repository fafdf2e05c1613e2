//! The link as a sans-IO state machine, the way quinn-proto sits under quinn.
//!
//! [`Machine`] decides every transition of a link and performs no I/O, reads no
//! clock and draws no randomness of its own: events come in ([`Event`]: a page
//! fetched, verdicts, append results, a confirm's frontier, a timer fired, a gap
//! accepted), actions come out ([`Action`]: fetch, decide, append, quarantine,
//! confirm, record the checkpoint, sleep until), and the time and the jitter seed are
//! passed in. A thin async driver ([`super::Link::run`], [`super::pull_page`])
//! executes the actions and feeds their results back. Every transition is therefore
//! testable as a table, without sockets, servers or sleeps.
//!
//! Invariants held here:
//! - **confirm never before every append of its page succeeded**: [`Action::Confirm`]
//!   is emitted only from the quarantine stage, which is reached only when the
//!   answers cover exactly the facts handed out (a fact missing from an answer fails
//!   the step) and every append of the page returned `Ok` or a refusal that was set
//!   aside, and the set aside entries were kept durably;
//! - **a gap is never skipped silently**: a page whose stream no longer holds facts
//!   after `min(checkpoint, frontier)` stops the step ([`Action::Gapped`]) until an
//!   acceptance of exactly that range arrives; the acceptance is appended as a fact
//!   before anything of the page;
//! - **after any failure nothing cached survives**: the checkpoint is read again,
//!   pages fetched ahead are dropped (they come again after the consumer's ack wait)
//!   and answers to confirms still on their way are ignored;
//! - **pages are applied one at a time, in the order their fetches were sent**; up
//!   to [`MachineConfig::pages_in_flight`] pages are between their fetch and the
//!   answer to their confirm: fetched ahead, being applied, or confirming. A page's
//!   confirm is sent once its own appends are durable, and the pages before it were
//!   applied before it, so a confirm never covers a fact not yet appended;
//! - **a gap is judged only on a quiet link**: a page that shows a gap while confirms
//!   of earlier pages are still on their way waits for their answers (the checkpoint
//!   they move may close it) and is judged again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

use crate::error::BoundaryError;
use crate::model::{ArtifactRef, Limits, Provenance, Refused, ValidatedMessage};
use crate::policy::{CAUSE_POLICY, QuarantineEntry, Verdict};
use crate::ports::{AppendOutcome, FactPage, FetchedFact, Frontier};

use super::{
    FILTER_RECORD_LISTED, Filtered, GapAcceptance, Operation, PullError, PullReport, PullStep,
    filter_fact, gap_fact,
};

/// Whether the machine runs a link (steps forever, backing off on failures) or one
/// step (`bsfg pull`, [`super::pull_page`]): the first outcome ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A link: step after step; failures back off, gaps wait for an operator.
    Continuous,
    /// One step: [`Action::Done`] with its outcome, then nothing more.
    Once,
}

/// How a machine behaves, fixed when it is made.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Link or single step.
    pub mode: Mode,
    /// Pages between their fetch and the answer to their confirm, at most (at least
    /// 1; links default to [`super::PAGES_IN_FLIGHT`]). 1: one page at a time, no
    /// fetch ahead. With more, pages are fetched ahead while the source has a
    /// backlog (a full page), at most one ahead otherwise, and a page is applied
    /// while the confirms of the pages before it are on their way.
    pub pages_in_flight: usize,
    /// The zone has intake policies: allowed facts are decided before any append.
    pub intake: bool,
    /// The zone's limits, under which fetched facts are validated.
    pub limits: Limits,
    /// First retry delay after a failure.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Seed of the backoff jitter (tests pass a fixed one).
    pub seed: u64,
    /// At most one durable checkpoint per this long (zero: after every step). The
    /// checkpoint the gap check uses follows every confirm in memory; the durable
    /// one (read again after a failure or a restart) may be older, which only makes
    /// the gap check look further back. A step that recorded a gap acceptance
    /// always records it.
    pub checkpoint_every: Duration,
}

/// The time an event arrives at: a monotonic instant for timers, and the wall clock
/// (Unix ms) for what is recorded (quarantine entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub instant: Instant,
    /// Wall clock, Unix ms.
    pub unix_ms: i64,
}

/// One fact handed to the append port, with what is needed if it is refused.
#[derive(Debug)]
pub struct Appended {
    /// The fact's offset in the source stream.
    pub offset: u64,
    /// Its stored form, to rebuild the message when the zone refuses it.
    pub stored: bytes::Bytes,
    /// What the append port answered.
    pub outcome: Result<AppendOutcome, BoundaryError>,
}

/// What happened, fed to [`Machine::handle`].
#[derive(Debug)]
pub enum Event {
    /// The answer to [`Action::ReadCheckpoint`].
    CheckpointRead(Result<Option<u64>, BoundaryError>),
    /// The answer to [`Action::Fetch`].
    Fetched(Result<FactPage, BoundaryError>),
    /// The answer to [`Action::Prefetch`] with the same ticket.
    Prefetched(u64, Result<FactPage, BoundaryError>),
    /// The answer to [`Action::Decide`]: the same facts, each with its verdict.
    Decided(Vec<(u64, ValidatedMessage, Verdict)>),
    /// The answer to [`Action::AppendGapRecord`].
    GapRecorded(Result<AppendOutcome, BoundaryError>),
    /// The answer to [`Action::AppendFilterRecord`].
    FilterRecorded(Result<AppendOutcome, BoundaryError>),
    /// The answers to [`Action::Carry`], one per fact, in any order.
    Carried(Vec<(u64, Carry)>),
    /// The answers to [`Action::Append`], one per fact, in any order.
    Appended(Vec<Appended>),
    /// The answer to [`Action::Quarantine`] (every entry kept, or the first failure).
    Quarantined(Result<(), BoundaryError>),
    /// The answer to [`Action::Confirm`] of this offset.
    Confirmed(u64, Result<Frontier, BoundaryError>),
    /// The answer to [`Action::RecordCheckpoint`].
    CheckpointRecorded(Result<(), BoundaryError>),
    /// The instant of the last [`Action::SleepUntil`] has come.
    TimerFired,
    /// An operator accepted a gap (only an acceptance of the current gap counts).
    GapAccepted(GapAcceptance),
}

/// What the driver must do, taken from [`Machine::poll_action`]. Actions that call a
/// port are answered by exactly one [`Event`]; the notifications (`Stepped`,
/// `BackingOff`, `Gapped`, `Done`) need no answer.
#[derive(Debug)]
pub enum Action {
    /// Read the link's durable checkpoint.
    ReadCheckpoint,
    /// FetchFacts for the step's page.
    Fetch,
    /// FetchFacts for a page ahead, while others are applied or confirmed; the
    /// answer carries the ticket back.
    Prefetch(u64),
    /// Run the intake policies on these validated facts (with their source offsets).
    Decide(Vec<(u64, ValidatedMessage)>),
    /// Append the record of an accepted gap.
    AppendGapRecord(Box<ValidatedMessage>),
    /// Append the audit record of the facts the intake policies filtered from the
    /// page (before its confirm).
    AppendFilterRecord(Box<ValidatedMessage>),
    /// Make sure this zone holds every artifact these facts (by source offset)
    /// reference, copying from the source what it lacks.
    Carry(Vec<(u64, Vec<ArtifactRef>)>),
    /// Append these facts (concurrently: the zone log commits them together).
    Append(Vec<(u64, ValidatedMessage)>),
    /// Keep these facts in the zone's quarantine, durably, in order.
    Quarantine(Vec<QuarantineEntry>),
    /// ConfirmReceipt up to this offset.
    Confirm(u64),
    /// Record this frontier as the link's checkpoint, durably.
    RecordCheckpoint(u64),
    /// Fire [`Event::TimerFired`] at this instant.
    SleepUntil(Instant),
    /// A step succeeded (the link is running).
    Stepped(PullReport),
    /// A step failed; the next one starts when the timer fires.
    BackingOff {
        /// Consecutive failures.
        attempt: u32,
        /// The delay before the next attempt.
        delay: Duration,
        /// The operation that failed.
        op: Operation,
        /// What it returned.
        error: BoundaryError,
    },
    /// The link stopped at a gap ([`PullError::Gap`]); it waits for an acceptance.
    Gapped(PullError),
    /// [`Mode::Once`]: the step's outcome. Nothing follows.
    Done(Result<PullReport, PullError>),
}

/// What carrying one fact's artifacts came to.
#[derive(Debug, Clone)]
pub enum Carry {
    /// This zone holds every artifact the fact references, with its digest and size.
    Ready,
    /// An artifact cannot be had as the fact references it (the source does not
    /// hold it, holds other bytes, or this zone holds other bytes under its key):
    /// the fact goes to the quarantine with this reason, naming the artifact
    /// (`fact.artifacts[<i>]`).
    Unavailable {
        /// Which of the fact's artifacts.
        index: usize,
        /// Why.
        error: BoundaryError,
    },
    /// The copy failed in a way a retry may mend (link lost, store unavailable): the
    /// step fails, and the next one resumes the copy where it stopped.
    Failed(BoundaryError),
}

/// Where a step is.
#[derive(Debug)]
enum Stage {
    RecordingGap,
    Deciding,
    Carrying,
    Appending,
    Quarantining,
    RecordingFilter,
    /// Only a gap acceptance on a page without facts: recorded before anything else.
    RecordingCheckpoint,
}

/// A page being applied: what the page said, what the step found so far.
#[derive(Debug)]
struct Work {
    stream: String,
    facts: Vec<FetchedFact>,
    /// The offsets of the facts handed to the policies or the append port, whose
    /// answers the step waits for: every one must come back before the confirm.
    awaiting: Vec<u64>,
    /// Facts waiting for their artifacts before they are appended.
    carrying: Vec<(u64, ValidatedMessage)>,
    last: Option<u64>,
    report: PullReport,
    set_aside: Vec<QuarantineEntry>,
    /// Facts the intake policies filtered (recorded before the confirm).
    filtered: Vec<Filtered>,
    stage: Stage,
}

impl Work {
    /// Checks that an answer covers exactly the facts the step waits for: a fact
    /// missing from it would otherwise be neither stored nor set aside, and the page
    /// confirmed over it.
    fn answered(
        &mut self,
        offsets: impl Iterator<Item = u64>,
        port: &str,
    ) -> Result<(), BoundaryError> {
        let mut got: Vec<u64> = offsets.collect();
        let mut sent = std::mem::take(&mut self.awaiting);
        got.sort_unstable();
        sent.sort_unstable();
        if got == sent {
            Ok(())
        } else {
            Err(BoundaryError::Internal(format!(
                "the {port} answered for {} of the {} facts it was given",
                got.len(),
                sent.len()
            )))
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// Ready to start a step (when no fetch ahead is on its way).
    Idle,
    ReadingCheckpoint,
    Fetching,
    Applying(Box<Work>),
    /// A page that shows a gap, waiting for the confirms before it to be answered.
    Parked(FactPage),
    BackingOff,
    Gapped(u64, u64),
    Done,
}

/// The link's decisions; see the module documentation.
#[derive(Debug)]
pub struct Machine {
    step: PullStep,
    config: MachineConfig,
    rng: SmallRng,
    phase: Phase,
    actions: VecDeque<Action>,
    /// The durable checkpoint as last read or recorded; `None`: read it again.
    checkpoint: Option<Option<u64>>,
    /// Pages fetched ahead, in the order their fetches were sent: the ticket, and the
    /// page once it came.
    ahead: VecDeque<(u64, Option<FactPage>)>,
    next_ticket: u64,
    /// Pages whose confirm is on its way, in the order they were sent.
    confirming: VecDeque<Box<Work>>,
    /// The page whose checkpoint is being recorded, and that checkpoint.
    recording: Option<(u64, Box<Work>)>,
    /// The highest frontier a confirm returned since the last failure (answers may
    /// come in any order; the checkpoint never moves back because of that).
    run_high: Option<u64>,
    /// The latest page had facts (the link is moving), and was full (the source
    /// has a backlog: fill the window).
    flowing: bool,
    backlog: bool,
    /// The frontier the last confirm returned: a page fetched before it is taken as
    /// at least that far.
    frontier_floor: u64,
    /// The consumer's unconfirmed facts as the latest page reported them, and the
    /// facts confirmed since: the link's lag in facts.
    pending_seen: u64,
    confirmed_since: u64,
    /// When the checkpoint was last recorded durably, and whether the one in memory
    /// is newer.
    last_recorded: Option<Instant>,
    unrecorded: bool,
    attempt: u32,
    accepting: Option<GapAcceptance>,
}

impl Machine {
    /// A machine for `step`; [`Machine::start`] begins the first step.
    pub fn new(step: PullStep, config: MachineConfig) -> Self {
        let rng = SmallRng::seed_from_u64(config.seed);
        Machine {
            step,
            config,
            rng,
            phase: Phase::Idle,
            actions: VecDeque::new(),
            checkpoint: None,
            ahead: VecDeque::new(),
            next_ticket: 0,
            confirming: VecDeque::new(),
            recording: None,
            run_high: None,
            flowing: false,
            backlog: false,
            frontier_floor: 0,
            pending_seen: 0,
            confirmed_since: 0,
            last_recorded: None,
            unrecorded: false,
            attempt: 0,
            accepting: None,
        }
    }

    /// Accepts, in advance, the gap the first step finds (`bsfg pull --accept-gap`).
    pub fn accepting(mut self, acceptance: Option<GapAcceptance>) -> Self {
        self.accepting = acceptance;
        self
    }

    /// Begins the first step.
    pub fn start(&mut self, now: Now) {
        self.try_start(now);
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Consecutive failures so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// True once a [`Mode::Once`] machine has emitted [`Action::Done`].
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Retry delay before attempt `attempt` (1-based): exponential from
    /// `backoff_min`, capped at `backoff_max`, with jitter in its upper half drawn
    /// from the machine's seeded generator.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let (min, max) = (self.config.backoff_min, self.config.backoff_max);
        let exp = min.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20)));
        let cap = exp.min(max).max(min);
        let half = cap / 2;
        let span = (cap - half).as_millis().max(1) as u64;
        half + Duration::from_millis(self.rng.gen_range(0..span))
    }

    fn emit(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    /// Feeds what happened. An event the current phase does not expect (an answer to
    /// an action of a step that already failed) changes nothing.
    pub fn handle(&mut self, now: Now, event: Event) {
        // Answers that belong to no phase: pages ahead, confirms, checkpoint records.
        let event = match event {
            Event::Prefetched(ticket, r) => return self.prefetched(now, ticket, r),
            Event::Confirmed(offset, r) => return self.confirmed(now, offset, r),
            Event::CheckpointRecorded(r) if self.recording.is_some() => {
                return self.recorded(now, r);
            }
            other => other,
        };
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        match (phase, event) {
            (Phase::ReadingCheckpoint, Event::CheckpointRead(r)) => match r {
                Ok(c) => {
                    self.checkpoint = Some(c);
                    self.fetch(now);
                }
                Err(e) => self.fail(now, boundary(Operation::Checkpoint, e)),
            },
            (Phase::Fetching, Event::Fetched(r)) => match r {
                Ok(page) => {
                    (self.pending_seen, self.confirmed_since) = (page.pending, 0);
                    self.got_page(now, page)
                }
                Err(e) => self.fail(now, boundary(Operation::Fetch, e)),
            },
            (Phase::Applying(w), event) => self.apply(now, w, event),
            (Phase::BackingOff, Event::TimerFired) => self.try_start(now),
            (Phase::Gapped(from, to), Event::GapAccepted(a)) => {
                if a.range == Some((from, to)) {
                    self.accepting = Some(a);
                    self.try_start(now);
                } else {
                    self.phase = Phase::Gapped(from, to);
                }
            }
            (phase, _) => self.phase = phase,
        }
    }

    fn apply(&mut self, now: Now, mut w: Box<Work>, event: Event) {
        match (&w.stage, event) {
            (Stage::RecordingGap, Event::GapRecorded(r)) => {
                if let Err(e) = r {
                    return self.fail(now, boundary(Operation::Append, e));
                }
                if w.facts.is_empty() {
                    // Nothing to confirm: the gap's end is where the link stands now.
                    let (_, to) = w.report.gap_accepted.unwrap_or_default();
                    let c = to.max(w.report.frontier);
                    w.stage = Stage::RecordingCheckpoint;
                    self.phase = Phase::Applying(w);
                    self.emit(Action::RecordCheckpoint(c));
                } else {
                    self.validate(now, w);
                }
            }
            (Stage::Deciding, Event::Decided(verdicts)) => {
                if let Err(e) = w.answered(verdicts.iter().map(|(o, _, _)| *o), "intake policies") {
                    return self.fail(now, boundary(Operation::Append, e));
                }
                let mut allowed = Vec::with_capacity(verdicts.len());
                for (offset, v, verdict) in verdicts {
                    match verdict {
                        Verdict::Allow => allowed.push((offset, v)),
                        Verdict::Filter(d) => w.filtered.push(Filtered {
                            message_id: v.message().envelope.message_id.clone(),
                            source_offset: offset,
                            policy: d.policy,
                            reason: d.reason,
                        }),
                        Verdict::Deny(denial) => {
                            let from = self.provenance(&w.stream, offset);
                            w.set_aside.push(QuarantineEntry::new(
                                v.into_message(),
                                CAUSE_POLICY,
                                denial,
                                from,
                                now.unix_ms,
                            ));
                        }
                    }
                }
                self.append(now, w, allowed);
            }
            (Stage::Carrying, Event::Carried(results)) => {
                if let Err(e) = w.answered(results.iter().map(|(o, _)| *o), "artifact copy") {
                    return self.fail(now, boundary(Operation::Artifact, e));
                }
                let mut verdicts: std::collections::HashMap<u64, Carry> =
                    results.into_iter().collect();
                let mut ready = Vec::new();
                for (offset, v) in std::mem::take(&mut w.carrying) {
                    if v.message().fact.artifacts.is_empty() {
                        ready.push((offset, v));
                        continue;
                    }
                    match verdicts.remove(&offset) {
                        Some(Carry::Ready) => ready.push((offset, v)),
                        Some(Carry::Unavailable { index, error }) => {
                            let from = self.provenance(&w.stream, offset);
                            let mut entry = QuarantineEntry::refused(
                                v.into_message(),
                                &error,
                                from,
                                now.unix_ms,
                            );
                            entry.field = Some(format!("fact.artifacts[{index}]"));
                            w.set_aside.push(entry);
                        }
                        Some(Carry::Failed(e)) => {
                            return self.fail(now, boundary(Operation::Artifact, e));
                        }
                        None => {
                            let e = BoundaryError::Internal(format!(
                                "the artifact copy gave no answer for offset {offset}"
                            ));
                            return self.fail(now, boundary(Operation::Artifact, e));
                        }
                    }
                }
                self.append_now(now, w, ready);
            }
            (Stage::Appending, Event::Appended(results)) => {
                if let Err(e) = w.answered(results.iter().map(|a| a.offset), "append port") {
                    return self.fail(now, boundary(Operation::Append, e));
                }
                let mut failed = None;
                for a in results {
                    match a.outcome {
                        Ok(o) if o.duplicate => w.report.duplicates += 1,
                        Ok(_) => w.report.stored += 1,
                        Err(e) if e.refuses_the_fact() => {
                            match crate::model::decode_stored(&a.stored) {
                                Ok(message) => {
                                    let from = self.provenance(&w.stream, a.offset);
                                    w.set_aside.push(QuarantineEntry::refused(
                                        message,
                                        &e,
                                        from,
                                        now.unix_ms,
                                    ));
                                }
                                Err(d) => {
                                    failed.get_or_insert(BoundaryError::Internal(format!(
                                        "a stored form that does not read back: {d}"
                                    )));
                                }
                            }
                        }
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
                match failed {
                    Some(e) => self.fail(now, boundary(Operation::Append, e)),
                    None => self.quarantine(now, w),
                }
            }
            (Stage::Quarantining, Event::Quarantined(r)) => match r {
                Ok(()) => self.record_filtered(now, w),
                Err(e) => self.fail(now, boundary(Operation::Quarantine, e)),
            },
            (Stage::RecordingFilter, Event::FilterRecorded(r)) => match r {
                Ok(_) => self.confirm(now, w),
                Err(e) => self.fail(now, boundary(Operation::Append, e)),
            },
            (Stage::RecordingCheckpoint, Event::CheckpointRecorded(r)) => match r {
                Ok(()) => {
                    let c = Self::checkpoint_of(&w);
                    w.report.checkpoint = Some(c);
                    self.checkpoint = Some(Some(c));
                    self.run_high = Some(self.run_high.unwrap_or(0).max(c));
                    self.last_recorded = Some(now.instant);
                    self.unrecorded = false;
                    self.finish(now, w.report);
                }
                Err(e) => self.fail(now, boundary(Operation::Checkpoint, e)),
            },
            // Not an answer to what this step waits for.
            (_, _) => self.phase = Phase::Applying(w),
        }
    }

    /// A page fetched ahead came (or its fetch failed, which fails nothing: the step
    /// that needs it fetches again). An answer to a fetch of a failed step is dropped.
    fn prefetched(&mut self, now: Now, ticket: u64, r: Result<FactPage, BoundaryError>) {
        let Some(i) = self
            .ahead
            .iter()
            .position(|(t, p)| *t == ticket && p.is_none())
        else {
            return;
        };
        match r {
            Ok(page) => {
                (self.pending_seen, self.confirmed_since) = (page.pending, 0);
                self.note_flow(&page);
                self.ahead[i].1 = Some(page);
                if matches!(self.phase, Phase::Idle) {
                    self.try_start(now);
                }
                self.fill();
            }
            Err(_) => {
                self.ahead.remove(i);
                if matches!(self.phase, Phase::Idle) {
                    self.try_start(now);
                }
            }
        }
    }

    /// The answer to a page's confirm. A failure fails the link (what the page and
    /// those after it appended comes again, and is absorbed as duplicates).
    fn confirmed(&mut self, now: Now, offset: u64, r: Result<Frontier, BoundaryError>) {
        let Some(i) = self.confirming.iter().position(|w| w.last == Some(offset)) else {
            return;
        };
        let Some(mut w) = self.confirming.remove(i) else {
            return;
        };
        let f = match r {
            Ok(f) => f,
            // The phase's page (if any) is dropped with the rest.
            Err(e) => return self.fail(now, boundary(Operation::Confirm, e)),
        };
        w.report.frontier = f.offset;
        self.confirmed_since += w.report.fetched as u64;
        let c = Self::checkpoint_of(&w).max(self.run_high.unwrap_or(0));
        self.run_high = Some(c);
        self.checkpoint = Some(Some(c));
        let every = self.config.checkpoint_every;
        let due = self.recording.is_none()
            && (every.is_zero()
                || w.report.gap_accepted.is_some()
                || self
                    .last_recorded
                    .is_none_or(|t| now.instant.saturating_duration_since(t) >= every));
        if due {
            self.recording = Some((c, w));
            self.emit(Action::RecordCheckpoint(c));
        } else {
            // Kept in memory; recorded with a later step or at stop.
            self.unrecorded = true;
            self.settled(now, w.report);
        }
    }

    /// The answer to recording a confirmed page's checkpoint.
    fn recorded(&mut self, now: Now, r: Result<(), BoundaryError>) {
        let Some((c, mut w)) = self.recording.take() else {
            return;
        };
        match r {
            Ok(()) => {
                w.report.checkpoint = Some(c);
                self.last_recorded = Some(now.instant);
                self.unrecorded = self.checkpoint.flatten().is_some_and(|k| k > c);
                self.settled(now, w.report);
            }
            Err(e) => self.fail(now, boundary(Operation::Checkpoint, e)),
        }
    }

    /// A page confirmed (and its checkpoint recorded, when due) while the machine may
    /// be busy with later pages: reports it, then lets what waited for it go on.
    fn settled(&mut self, now: Now, report: PullReport) {
        self.stepped(report);
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Idle => self.try_start(now),
            Phase::Parked(mut page) if self.quiet() => {
                page.frontier = page.frontier.max(self.frontier_floor);
                self.got_page(now, page);
            }
            p => {
                self.phase = p;
                self.fill();
            }
        }
    }

    /// No confirm or checkpoint record is on its way.
    fn quiet(&self) -> bool {
        self.confirming.is_empty() && self.recording.is_none()
    }

    fn note_flow(&mut self, page: &FactPage) {
        self.flowing = !page.facts.is_empty();
        self.backlog = page.facts.len() >= self.step.limit.max(1) as usize;
    }

    /// Fetches pages ahead while the window has room: up to `pages_in_flight` pages
    /// between fetch and confirm while the source has a backlog, one ahead while
    /// it trickles, none while it is idle (the step's own fetch long-polls).
    fn fill(&mut self) {
        match self.phase {
            Phase::Applying(_) => self.fill_beside(1),
            Phase::Idle => self.fill_beside(0),
            _ => {}
        }
    }

    /// [`Machine::fill`] with `applying` pages being applied (0 or 1).
    fn fill_beside(&mut self, applying: usize) {
        let p = self.config.pages_in_flight.max(1);
        if self.config.mode != Mode::Continuous || p < 2 || !self.flowing {
            return;
        }
        let busy = self.confirming.len() + usize::from(self.recording.is_some()) + applying;
        let free = p.saturating_sub(busy);
        let room = if self.backlog { free } else { free.min(1) };
        while self.ahead.len() < room {
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            self.ahead.push_back((ticket, None));
            self.emit(Action::Prefetch(ticket));
        }
    }

    /// The checkpoint a confirmed step stands for.
    fn checkpoint_of(w: &Work) -> u64 {
        match w.report.gap_accepted {
            Some((_, to)) if w.last.is_none() => to.max(w.report.frontier),
            _ => w.report.frontier,
        }
    }

    /// The checkpoint in memory when it is newer than the one recorded durably (a
    /// link records it when it stops).
    pub fn unrecorded_checkpoint(&self) -> Option<u64> {
        if self.unrecorded {
            self.checkpoint.flatten()
        } else {
            None
        }
    }

    fn provenance(&self, stream: &str, offset: u64) -> Provenance {
        Provenance {
            zone: self.step.source_zone.clone(),
            stream: stream.to_owned(),
            offset,
            link: self.step.link.clone(),
        }
    }

    /// Starts a step when nothing is in the way: reads the checkpoint if it is not
    /// cached, then takes the page fetched ahead or fetches one.
    fn try_start(&mut self, now: Now) {
        if !matches!(self.phase, Phase::Idle) {
            return;
        }
        let settling = self.confirming.len() + usize::from(self.recording.is_some());
        if settling >= self.config.pages_in_flight.max(1) {
            return;
        }
        if self.checkpoint.is_none() {
            self.phase = Phase::ReadingCheckpoint;
            self.emit(Action::ReadCheckpoint);
        } else {
            self.fetch(now);
        }
    }

    /// Takes the oldest page fetched ahead, waits for it if it is still on its way,
    /// or fetches one.
    fn fetch(&mut self, now: Now) {
        if self.ahead.front().is_some_and(|(_, page)| page.is_none()) {
            return; // the oldest page ahead is still on its way
        }
        match self.ahead.pop_front() {
            Some((_, Some(mut page))) => {
                // It was read before earlier confirms: at least as far as they went.
                page.frontier = page.frontier.max(self.frontier_floor);
                self.got_page(now, page);
            }
            _ => {
                self.phase = Phase::Fetching;
                self.emit(Action::Fetch);
            }
        }
    }

    fn got_page(&mut self, now: Now, page: FactPage) {
        let step = &self.step;
        if !page.facts.is_empty()
            && !step.streams.is_empty()
            && !step.streams.contains(&page.stream)
        {
            let error = BoundaryError::invalid(
                "consumer",
                format!(
                    "`{}` on zone `{}` reads stream `{}`, which is not one of this link's {:?}",
                    step.consumer, step.source_zone, page.stream, step.streams
                ),
            );
            return self.fail(now, boundary(Operation::Fetch, error));
        }
        if !page.facts.is_empty() {
            // The stream name becomes a provenance header on every fact: a source that
            // sends a malformed one is broken as a whole, not one fact.
            if let Err(e) = crate::names::validate_consumer("stream", &page.stream) {
                return self.fail(now, boundary(Operation::Fetch, e));
            }
        }
        if page.zone != step.source_zone && !page.zone.is_empty() {
            tracing::debug!(link = %step.link, configured = %step.source_zone, reported = %page.zone, "the source reports another zone name than the link's configuration; the configuration is used");
        }
        let checkpoint = self.checkpoint.flatten();
        let base = checkpoint.map_or(page.frontier, |c| c.min(page.frontier));
        let report = PullReport {
            fetched: page.facts.len(),
            frontier: page.frontier,
            last_offset: page.last_offset,
            source_zone: step.source_zone.clone(),
            newest_appended_at_unix_ms: page.facts.last().map(|f| f.appended_at_unix_ms),
            ..Default::default()
        };
        let gap = super::find_gap(&page, base);
        if gap.is_some() && !self.quiet() {
            // Facts of pages still confirming may be what looks missing: judge again
            // once their confirms moved the checkpoint.
            self.phase = Phase::Parked(page);
            return;
        }
        self.note_flow(&page);
        let mut w = Box::new(Work {
            last: page.facts.last().map(|f| f.offset),
            stream: page.stream,
            facts: page.facts,
            awaiting: Vec::new(),
            carrying: Vec::new(),
            report,
            set_aside: Vec::new(),
            filtered: Vec::new(),
            stage: Stage::RecordingGap,
        });
        if let Some((missing_from, missing_to)) = gap {
            let acceptance = self
                .accepting
                .as_ref()
                .filter(|a| a.range.is_none_or(|r| r == (missing_from, missing_to)));
            let Some(acceptance) = acceptance else {
                return self.fail(
                    now,
                    PullError::Gap {
                        consumer: self.step.consumer.clone(),
                        missing_from,
                        missing_to,
                        source_zone: self.step.source_zone.clone(),
                        frontier: page.frontier,
                        last_offset: page.last_offset,
                    },
                );
            };
            let record = gap_fact(&self.step.consumer, missing_from, missing_to, acceptance);
            match self.config.limits.try_validate(record) {
                Ok(v) => {
                    w.report.gap_accepted = Some((missing_from, missing_to));
                    self.phase = Phase::Applying(w);
                    self.fill();
                    self.emit(Action::AppendGapRecord(Box::new(v)));
                }
                Err(r) => self.fail(now, boundary(Operation::Append, r.error)),
            }
            return;
        }
        if w.facts.is_empty() {
            // The source had nothing: the next step long-polls.
            return self.finish(now, w.report);
        }
        self.fill_beside(1);
        self.validate(now, w);
    }

    /// Validates every fact under this zone's rules: policies judge, and the zone
    /// stores, the canonical form. A fact this zone refuses is set aside.
    fn validate(&mut self, now: Now, mut w: Box<Work>) {
        let mut valid = Vec::with_capacity(w.facts.len());
        for f in std::mem::take(&mut w.facts) {
            let from = self.provenance(&w.stream, f.offset);
            match self.config.limits.try_validate(f.message) {
                Ok(v) => match v.with_provenance(from) {
                    Ok(v) => valid.push((f.offset, v)),
                    Err(e) => return self.fail(now, boundary(Operation::Append, e)),
                },
                Err(Refused { error, message }) => {
                    w.set_aside.push(QuarantineEntry::refused(
                        *message,
                        &error,
                        from,
                        now.unix_ms,
                    ));
                }
            }
        }
        if self.config.intake && !valid.is_empty() {
            w.stage = Stage::Deciding;
            w.awaiting = valid.iter().map(|(o, _)| *o).collect();
            self.phase = Phase::Applying(w);
            self.emit(Action::Decide(valid));
        } else {
            self.append(now, w, valid);
        }
    }

    /// Facts that reference artifacts wait until this zone holds them (a fact never
    /// lands before its artifacts); the others are appended at once with them.
    fn append(&mut self, now: Now, mut w: Box<Work>, facts: Vec<(u64, ValidatedMessage)>) {
        let refs: Vec<(u64, Vec<ArtifactRef>)> = facts
            .iter()
            .filter(|(_, v)| !v.message().fact.artifacts.is_empty())
            .map(|(o, v)| (*o, v.message().fact.artifacts.clone()))
            .collect();
        if refs.is_empty() {
            return self.append_now(now, w, facts);
        }
        w.stage = Stage::Carrying;
        w.awaiting = refs.iter().map(|(o, _)| *o).collect();
        w.carrying = facts;
        self.phase = Phase::Applying(w);
        self.emit(Action::Carry(refs));
    }

    fn append_now(&mut self, now: Now, mut w: Box<Work>, facts: Vec<(u64, ValidatedMessage)>) {
        if facts.is_empty() {
            return self.quarantine(now, w);
        }
        w.stage = Stage::Appending;
        w.awaiting = facts.iter().map(|(o, _)| *o).collect();
        self.phase = Phase::Applying(w);
        self.emit(Action::Append(facts));
    }

    /// Keeps what was set aside, before the confirm like the appends: a crash
    /// re-fetches the page and keeping an entry again stores nothing new.
    fn quarantine(&mut self, now: Now, mut w: Box<Work>) {
        w.report.quarantined = w.set_aside.len();
        w.report.refused = w
            .set_aside
            .iter()
            .filter(|e| e.cause != CAUSE_POLICY)
            .count();
        if w.set_aside.is_empty() {
            return self.record_filtered(now, w);
        }
        let entries = std::mem::take(&mut w.set_aside);
        w.stage = Stage::Quarantining;
        self.phase = Phase::Applying(w);
        self.emit(Action::Quarantine(entries));
    }

    /// What the intake policies filtered is recorded, durably, before the confirm: a
    /// fact is dropped only with a trace of it in this zone.
    fn record_filtered(&mut self, now: Now, mut w: Box<Work>) {
        w.report.filtered = w.filtered.len();
        if w.filtered.is_empty() {
            return self.confirm(now, w);
        }
        // A record that does not fit this zone's limits (long reasons, a small
        // max_fact_bytes) lists fewer facts, down to the count alone: the page never
        // waits on its own audit record.
        let mut listed = w.filtered.len().min(FILTER_RECORD_LISTED);
        loop {
            let record = filter_fact(&self.step, &w.stream, &w.filtered, listed, now.unix_ms);
            match self.config.limits.try_validate(record) {
                Ok(v) => {
                    w.stage = Stage::RecordingFilter;
                    self.phase = Phase::Applying(w);
                    return self.emit(Action::AppendFilterRecord(Box::new(v)));
                }
                Err(_) if listed > 0 => listed /= 2,
                Err(r) => return self.fail(now, boundary(Operation::Append, r.error)),
            }
        }
    }

    /// Every fact of the page is durably appended or kept: only now the confirm. The
    /// next page may be applied while it is on its way.
    fn confirm(&mut self, now: Now, w: Box<Work>) {
        let Some(last) = w.last else {
            return self.finish(now, w.report);
        };
        self.confirming.push_back(w);
        self.emit(Action::Confirm(last));
        self.phase = Phase::Idle;
        self.try_start(now);
        self.fill();
    }

    /// A step ended without a confirm to wait for.
    fn finish(&mut self, now: Now, report: PullReport) {
        self.stepped(report);
        if self.config.mode == Mode::Continuous {
            self.phase = Phase::Idle;
            self.try_start(now);
        }
    }

    /// Reports a step that succeeded ([`Action::Stepped`], or [`Action::Done`] of a
    /// single step).
    fn stepped(&mut self, mut report: PullReport) {
        self.attempt = 0;
        // The count a page reported was read when its fetch reached the source, and
        // confirms of earlier pages may have landed after that: a frontier at the
        // class's last offset means nothing is pending, whatever it said.
        report.pending = if report.last_offset > 0 && report.frontier >= report.last_offset {
            0
        } else {
            self.pending_seen.saturating_sub(self.confirmed_since)
        };
        // An acceptance holds until the step that finds its gap uses it (pages in
        // between may be empty while facts await redelivery).
        if report.gap_accepted.is_some() {
            self.accepting = None;
        }
        self.frontier_floor = self.frontier_floor.max(report.frontier);
        match self.config.mode {
            Mode::Once => {
                self.phase = Phase::Done;
                self.emit(Action::Done(Ok(report)));
            }
            Mode::Continuous => self.emit(Action::Stepped(report)),
        }
    }

    fn fail(&mut self, now: Now, error: PullError) {
        // Read the durable checkpoint again; a page fetched ahead (if any) is dropped
        // and comes again after the consumer's ack wait.
        self.checkpoint = None;
        self.ahead.clear();
        self.confirming.clear();
        self.recording = None;
        self.run_high = None;
        self.flowing = false;
        self.frontier_floor = 0;
        if self.config.mode == Mode::Once {
            self.phase = Phase::Done;
            self.emit(Action::Done(Err(error)));
            return;
        }
        match error {
            PullError::Gap {
                missing_from,
                missing_to,
                ..
            } => {
                self.accepting = None;
                self.phase = Phase::Gapped(missing_from, missing_to);
                self.emit(Action::Gapped(error));
            }
            PullError::Boundary { op, error } => {
                self.attempt = self.attempt.saturating_add(1);
                let delay = self.backoff(self.attempt);
                self.phase = Phase::BackingOff;
                self.emit(Action::BackingOff {
                    attempt: self.attempt,
                    delay,
                    op,
                    error,
                });
                self.emit(Action::SleepUntil(now.instant + delay));
            }
        }
    }
}

fn boundary(op: Operation, error: BoundaryError) -> PullError {
    PullError::Boundary { op, error }
}

#[cfg(test)]
mod tests {
    //! Table tests of every transition: events in, actions out, no sockets, servers
    //! or sleeps.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::model::{Envelope, Fact, Message};
    use crate::policy::Denial;

    fn step() -> PullStep {
        PullStep {
            link: "to-ent".into(),
            consumer: "ent".into(),
            limit: 10,
            wait: Duration::from_secs(1),
            streams: vec!["facts_operational".into()],
            source_zone: "plant".into(),
            local_zone: "ent".into(),
        }
    }

    fn config(mode: Mode, intake: bool) -> MachineConfig {
        MachineConfig {
            mode,
            pages_in_flight: 2,
            intake,
            limits: Limits::default(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            seed: 7,
            checkpoint_every: Duration::ZERO,
        }
    }

    fn at(ms: u64) -> Now {
        thread_local!(static BASE: Instant = Instant::now());
        Now {
            instant: BASE.with(|b| *b) + Duration::from_millis(ms),
            unix_ms: 1_700_000_000_000 + ms as i64,
        }
    }

    fn fact(offset: u64) -> FetchedFact {
        fact_with(offset, "{\"v\":1}")
    }

    /// A fact referencing one artifact (`media_type` set, as validation wants).
    fn fact_with_artifact(offset: u64) -> FetchedFact {
        let mut f = fact(offset);
        f.message.envelope.object_media_type = Some("application/pdf".into());
        f.message.fact.artifacts = vec![ArtifactRef {
            bucket: "batch-files".into(),
            key: format!("B{offset}/record.pdf"),
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 10,
        }];
        f
    }

    fn take_carry(actions: Vec<Action>) -> Vec<(u64, Vec<ArtifactRef>)> {
        actions
            .into_iter()
            .find_map(|a| match a {
                Action::Carry(f) => Some(f),
                _ => None,
            })
            .expect("a carry action")
    }

    /// A page of a plain fact (5) and two facts with artifacts (6, 7): nothing is
    /// appended before the artifacts are held.
    fn carrying() -> (Machine, Vec<(u64, Vec<ArtifactRef>)>) {
        let mut m = fetching(Some(4));
        let mut p = page(1, 10, 4, &[5]);
        p.facts.push(fact_with_artifact(6));
        p.facts.push(fact_with_artifact(7));
        m.handle(at(1), Event::Fetched(Ok(p)));
        let a = drain(&mut m);
        assert_eq!(
            names(&a),
            ["prefetch", "carry"],
            "no append before the copy"
        );
        let refs = take_carry(a);
        assert_eq!(refs.iter().map(|r| r.0).collect::<Vec<_>>(), [6, 7]);
        (m, refs)
    }

    #[test]
    fn facts_with_artifacts_are_appended_only_after_their_artifacts_are_held() {
        let (mut m, _) = carrying();
        m.handle(
            at(2),
            Event::Carried(vec![(7, Carry::Ready), (6, Carry::Ready)]),
        );
        let facts = take_append(drain(&mut m));
        assert_eq!(facts.iter().map(|f| f.0).collect::<Vec<_>>(), [5, 6, 7]);
        m.handle(at(3), appended(facts, &[]));
        assert!(matches!(drain(&mut m).as_slice(), [Action::Confirm(7)]));
    }

    #[test]
    fn a_fact_whose_artifact_is_unavailable_is_quarantined_naming_it_and_the_rest_goes_on() {
        let (mut m, _) = carrying();
        let missing = BoundaryError::FailedPrecondition("the source does not hold it".into());
        m.handle(
            at(2),
            Event::Carried(vec![
                (6, Carry::Ready),
                (
                    7,
                    Carry::Unavailable {
                        index: 0,
                        error: missing,
                    },
                ),
            ]),
        );
        let facts = take_append(drain(&mut m));
        assert_eq!(facts.iter().map(|f| f.0).collect::<Vec<_>>(), [5, 6]);
        m.handle(at(3), appended(facts, &[]));
        let a = drain(&mut m);
        let [Action::Quarantine(entries)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].source_offset, 7);
        assert_eq!(entries[0].cause, "failed_precondition");
        assert_eq!(entries[0].field.as_deref(), Some("fact.artifacts[0]"));
        assert!(entries[0].denial.reason.contains("does not hold"));
        m.handle(at(4), Event::Quarantined(Ok(())));
        assert!(matches!(drain(&mut m).as_slice(), [Action::Confirm(7)]));
    }

    #[test]
    fn a_failed_copy_fails_the_page_before_any_append_or_confirm() {
        let (mut m, _) = carrying();
        let lost = BoundaryError::Unavailable("link lost".into());
        m.handle(
            at(2),
            Event::Carried(vec![(6, Carry::Ready), (7, Carry::Failed(lost))]),
        );
        let a = drain(&mut m);
        assert_eq!(names(&a), ["backing_off", "sleep_until"]);
        assert!(matches!(
            &a[0],
            Action::BackingOff {
                op: Operation::Artifact,
                ..
            }
        ));
        // A copy answer that leaves out a fact fails the step too.
        let (mut m, _) = carrying();
        m.handle(at(2), Event::Carried(vec![(6, Carry::Ready)]));
        assert_eq!(names(&drain(&mut m)), ["backing_off", "sleep_until"]);
    }

    fn fact_with(offset: u64, object_json: &str) -> FetchedFact {
        FetchedFact {
            offset,
            appended_at_unix_ms: 5,
            delivery_count: 1,
            message: Message {
                envelope: Envelope {
                    message_id: format!("m{offset}"),
                    from_zone: "plant".into(),
                    to_zone: "ent".into(),
                    produced_at_unix_ms: 1,
                    ..Default::default()
                },
                fact: Fact {
                    subject: "line:1".into(),
                    predicate: "count".into(),
                    object_json: object_json.into(),
                    artifacts: vec![],
                },
            },
            provenance: None,
        }
    }

    /// A page of `offsets` from a stream holding `first..=last`, frontier `frontier`.
    fn page(first: u64, last: u64, frontier: u64, offsets: &[u64]) -> FactPage {
        FactPage {
            zone: "plant".into(),
            stream: "facts_operational".into(),
            facts: offsets.iter().map(|&o| fact(o)).collect(),
            first_offset: first,
            last_offset: last,
            frontier,
            pending: 0,
        }
    }

    fn drain(m: &mut Machine) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn names(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .map(|a| match a {
                Action::ReadCheckpoint => "read_checkpoint",
                Action::Fetch => "fetch",
                Action::Prefetch(_) => "prefetch",
                Action::Decide(_) => "decide",
                Action::Carry(_) => "carry",
                Action::AppendGapRecord(_) => "append_gap_record",
                Action::AppendFilterRecord(_) => "append_filter_record",
                Action::Append(_) => "append",
                Action::Quarantine(_) => "quarantine",
                Action::Confirm(_) => "confirm",
                Action::RecordCheckpoint(_) => "record_checkpoint",
                Action::SleepUntil(_) => "sleep_until",
                Action::Stepped(_) => "stepped",
                Action::BackingOff { .. } => "backing_off",
                Action::Gapped(_) => "gapped",
                Action::Done(_) => "done",
            })
            .collect()
    }

    fn ok_outcome(offset: u64, duplicate: bool) -> Result<AppendOutcome, BoundaryError> {
        Ok(AppendOutcome {
            stream: "facts_operational".into(),
            offset,
            duplicate,
        })
    }

    /// Answers an `Append` action: every fact stored, or `fail` for the offsets named.
    fn appended(facts: Vec<(u64, ValidatedMessage)>, fail: &[(u64, BoundaryError)]) -> Event {
        Event::Appended(
            facts
                .into_iter()
                .map(|(offset, v)| Appended {
                    offset,
                    stored: v.stored_form().clone(),
                    outcome: match fail.iter().find(|(o, _)| *o == offset) {
                        Some((_, e)) => Err(e.clone()),
                        None => ok_outcome(offset, false),
                    },
                })
                .collect(),
        )
    }

    fn take_append(actions: Vec<Action>) -> Vec<(u64, ValidatedMessage)> {
        actions
            .into_iter()
            .find_map(|a| match a {
                Action::Append(f) => Some(f),
                _ => None,
            })
            .expect("an append action")
    }

    /// A continuous machine that has read checkpoint `ckpt` and waits for its fetch.
    fn fetching(ckpt: Option<u64>) -> Machine {
        let mut m = Machine::new(step(), config(Mode::Continuous, false));
        m.start(at(0));
        assert_eq!(names(&drain(&mut m)), ["read_checkpoint"]);
        m.handle(at(0), Event::CheckpointRead(Ok(ckpt)));
        assert_eq!(names(&drain(&mut m)), ["fetch"]);
        m
    }

    #[test]
    fn a_page_is_appended_then_confirmed_then_checkpointed_with_the_next_page_fetched_ahead() {
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(1, 10, 4, &[5, 6]))));
        let a = drain(&mut m);
        assert_eq!(names(&a), ["prefetch", "append"]);
        let facts = take_append(a);
        assert_eq!(facts.iter().map(|f| f.0).collect::<Vec<_>>(), [5, 6]);
        m.handle(at(2), appended(facts, &[]));
        let a = drain(&mut m);
        assert!(matches!(a.as_slice(), [Action::Confirm(6)]), "{a:?}");
        m.handle(at(3), Event::Confirmed(6, Ok(Frontier { offset: 6 })));
        let a = drain(&mut m);
        assert!(
            matches!(a.as_slice(), [Action::RecordCheckpoint(6)]),
            "{a:?}"
        );
        m.handle(at(4), Event::CheckpointRecorded(Ok(())));
        let a = drain(&mut m);
        // The step succeeded; the next one waits for the page fetched ahead.
        let [Action::Stepped(r)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(
            (r.fetched, r.stored, r.frontier, r.checkpoint),
            (2, 2, 6, Some(6))
        );
    }

    #[test]
    fn a_running_link_records_its_checkpoint_at_most_once_per_interval_and_keeps_it_in_memory() {
        let mut cfg = config(Mode::Continuous, false);
        cfg.checkpoint_every = Duration::from_secs(1);
        let mut m = Machine::new(step(), cfg);
        m.start(at(0));
        drain(&mut m);
        m.handle(at(0), Event::CheckpointRead(Ok(Some(4))));
        drain(&mut m);
        // One step: fetched (with the next page ahead), appended, confirmed.
        let step = |m: &mut Machine, t: u64, offsets: &[u64], ahead: Option<u64>| {
            let p = page(1, 100, offsets[0] - 1, offsets);
            let last = *offsets.last().unwrap();
            match ahead {
                None => m.handle(at(t), Event::Fetched(Ok(p))),
                Some(ticket) => m.handle(at(t), Event::Prefetched(ticket, Ok(p))),
            }
            let facts = take_append(drain(m));
            m.handle(at(t), appended(facts, &[]));
            assert!(matches!(drain(m).as_slice(), [Action::Confirm(o)] if *o == last));
            m.handle(at(t), Event::Confirmed(last, Ok(Frontier { offset: last })));
            drain(m)
        };
        // The first confirm is recorded.
        let a = step(&mut m, 10, &[5, 6], None);
        assert!(
            matches!(a.as_slice(), [Action::RecordCheckpoint(6)]),
            "{a:?}"
        );
        m.handle(at(11), Event::CheckpointRecorded(Ok(())));
        assert_eq!(m.unrecorded_checkpoint(), None);
        drain(&mut m);
        // 300 ms later: kept in memory only, the step done without a commit.
        let a = step(&mut m, 310, &[7, 8], Some(0));
        let [Action::Stepped(r)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!((r.frontier, r.checkpoint), (8, None));
        assert_eq!(m.unrecorded_checkpoint(), Some(8));
        // A second after the last record: recorded again.
        let a = step(&mut m, 1_020, &[9], Some(1));
        assert!(
            matches!(a.as_slice(), [Action::RecordCheckpoint(9)]),
            "{a:?}"
        );
        m.handle(at(1_021), Event::CheckpointRecorded(Ok(())));
        assert_eq!(m.unrecorded_checkpoint(), None);
    }

    #[test]
    fn confirm_is_never_emitted_while_an_append_of_the_page_failed() {
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(1, 10, 4, &[5, 6, 7]))));
        let facts = take_append(drain(&mut m));
        let unavailable = BoundaryError::Unavailable("jetstream down".into());
        m.handle(at(2), appended(facts, &[(6, unavailable)]));
        let a = drain(&mut m);
        assert_eq!(names(&a), ["backing_off", "sleep_until"]);
        assert!(
            matches!(
                &a[0],
                Action::BackingOff {
                    op: Operation::Append,
                    attempt: 1,
                    ..
                }
            ),
            "{a:?}"
        );
        // Late answers of the failed step change nothing.
        m.handle(at(3), Event::Confirmed(7, Ok(Frontier { offset: 7 })));
        m.handle(at(3), Event::CheckpointRecorded(Ok(())));
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn an_answer_missing_a_fact_of_the_page_fails_the_step_and_confirms_nothing() {
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(1, 10, 4, &[5, 6, 7]))));
        let mut facts = take_append(drain(&mut m));
        facts.pop();
        m.handle(at(2), appended(facts, &[]));
        let a = drain(&mut m);
        assert!(
            matches!(
                &a[0],
                Action::BackingOff {
                    op: Operation::Append,
                    error: BoundaryError::Internal(_),
                    ..
                }
            ),
            "{a:?}"
        );
        assert!(!a.iter().any(|a| matches!(a, Action::Confirm(_))), "{a:?}");
    }

    #[test]
    fn a_refused_fact_is_quarantined_before_the_confirm_and_the_rest_still_goes_through() {
        let mut m = fetching(Some(4));
        let mut p = page(1, 10, 4, &[5, 7]);
        // Invalid under this zone's rules: set aside at validation.
        p.facts.insert(1, fact_with(6, "{\"a\":1,\"a\":2}"));
        m.handle(at(1), Event::Fetched(Ok(p)));
        let facts = take_append(drain(&mut m));
        assert_eq!(facts.iter().map(|f| f.0).collect::<Vec<_>>(), [5, 7]);
        // The zone refuses 7 for what it is (conflicting duplicate).
        let conflict = BoundaryError::ConflictingDuplicate {
            message_id: "m7".into(),
            stream: "facts_operational".into(),
            offset: 3,
        };
        m.handle(at(2), appended(facts, &[(7, conflict)]));
        let a = drain(&mut m);
        let [Action::Quarantine(entries)] = a.as_slice() else {
            panic!("{a:?}")
        };
        let offsets: Vec<_> = entries.iter().map(|e| e.source_offset).collect();
        assert_eq!(offsets, [6, 7]);
        // Each stamped when it was set aside: at validation, at the append's answer.
        let stamps: Vec<_> = entries.iter().map(|e| e.quarantined_at_unix_ms).collect();
        assert_eq!(stamps, [at(1).unix_ms, at(2).unix_ms]);
        m.handle(at(3), Event::Quarantined(Ok(())));
        assert!(matches!(drain(&mut m).as_slice(), [Action::Confirm(7)]));
    }

    #[test]
    fn a_failed_quarantine_fails_the_page_before_its_confirm() {
        let mut m = fetching(Some(4));
        let mut p = page(1, 10, 4, &[]);
        p.facts.push(fact_with(5, "{\"a\":1,\"a\":2}"));
        m.handle(at(1), Event::Fetched(Ok(p)));
        let a = drain(&mut m);
        assert_eq!(names(&a), ["prefetch", "quarantine"]);
        m.handle(
            at(2),
            Event::Quarantined(Err(BoundaryError::Unavailable("x".into()))),
        );
        let a = drain(&mut m);
        assert!(
            matches!(
                &a[0],
                Action::BackingOff {
                    op: Operation::Quarantine,
                    ..
                }
            ),
            "{a:?}"
        );
    }

    #[test]
    fn intake_denials_are_quarantined_and_only_allowed_facts_are_appended() {
        let mut m = Machine::new(step(), config(Mode::Continuous, true));
        m.start(at(0));
        drain(&mut m);
        m.handle(at(0), Event::CheckpointRead(Ok(Some(4))));
        drain(&mut m);
        m.handle(at(1), Event::Fetched(Ok(page(1, 10, 4, &[5, 6]))));
        let a = drain(&mut m);
        assert_eq!(names(&a), ["prefetch", "decide"]);
        let Some(Action::Decide(valid)) = a.into_iter().nth(1) else {
            panic!()
        };
        let deny = Verdict::Deny(Denial {
            policy: "p".into(),
            reason: "no".into(),
            module_sha256: String::new(),
        });
        let decided = valid
            .into_iter()
            .map(|(o, v)| (o, v, if o == 6 { deny.clone() } else { Verdict::Allow }))
            .collect();
        m.handle(at(2), Event::Decided(decided));
        let facts = take_append(drain(&mut m));
        assert_eq!(facts.iter().map(|f| f.0).collect::<Vec<_>>(), [5]);
        m.handle(at(3), appended(facts, &[]));
        let a = drain(&mut m);
        let [Action::Quarantine(e)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!((e.len(), e[0].cause.as_str()), (1, CAUSE_POLICY));
    }

    #[test]
    fn filtered_facts_are_dropped_recorded_in_one_audit_fact_and_only_then_the_page_confirmed() {
        let mut m = Machine::new(step(), config(Mode::Continuous, true));
        m.start(at(0));
        drain(&mut m);
        m.handle(at(0), Event::CheckpointRead(Ok(Some(4))));
        drain(&mut m);
        m.handle(at(1), Event::Fetched(Ok(page(1, 10, 4, &[5, 6, 7, 8]))));
        let Some(Action::Decide(valid)) = drain(&mut m).into_iter().nth(1) else {
            panic!()
        };
        let verdict = |o: u64| {
            let d = Denial {
                policy: "p".into(),
                reason: format!("not wanted {o}"),
                module_sha256: String::new(),
            };
            match o {
                6 | 8 => Verdict::Filter(d),
                7 => Verdict::Deny(d),
                _ => Verdict::Allow,
            }
        };
        let decided = valid.into_iter().map(|(o, v)| (o, v, verdict(o))).collect();
        m.handle(at(2), Event::Decided(decided));
        let facts = take_append(drain(&mut m));
        assert_eq!(facts.iter().map(|f| f.0).collect::<Vec<_>>(), [5]);
        m.handle(at(3), appended(facts, &[]));
        let a = drain(&mut m);
        let [Action::Quarantine(e)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(e.len(), 1, "only the denied fact is quarantined");
        m.handle(at(4), Event::Quarantined(Ok(())));
        let a = drain(&mut m);
        let [Action::AppendFilterRecord(record)] = a.as_slice() else {
            panic!("{a:?}")
        };
        let r = record.message();
        assert_eq!(r.fact.predicate, "facts_filtered");
        assert_eq!(
            (r.envelope.from_zone.as_str(), r.fact.subject.as_str()),
            ("ent", "link:to-ent")
        );
        assert!(
            r.fact.object_json.contains(r#""count":2"#)
                && r.fact.object_json.contains("\"m6\"")
                && r.fact.object_json.contains("not wanted 8"),
            "{}",
            r.fact.object_json
        );
        // A failed record fails the page before its confirm.
        let id = r.envelope.message_id.clone();
        m.handle(
            at(5),
            Event::FilterRecorded(Err(BoundaryError::Unavailable("down".into()))),
        );
        assert_eq!(names(&drain(&mut m)), ["backing_off", "sleep_until"]);
        // The replayed page records the same fact (same id: stored once).
        let again = filter_fact(
            &step(),
            "facts_operational",
            &[6, 8].map(|o| Filtered {
                message_id: format!("m{o}"),
                source_offset: o,
                policy: "p".into(),
                reason: format!("not wanted {o}"),
            }),
            FILTER_RECORD_LISTED,
            99,
        );
        assert_eq!(again.envelope.message_id, id);
    }

    #[test]
    fn a_filter_record_too_large_for_the_zone_lists_fewer_facts_and_the_page_goes_on() {
        let mut cfg = config(Mode::Continuous, true);
        cfg.limits.max_fact_bytes = 2_000;
        let mut m = Machine::new(step(), cfg);
        m.start(at(0));
        drain(&mut m);
        m.handle(at(0), Event::CheckpointRead(Ok(Some(4))));
        drain(&mut m);
        m.handle(at(1), Event::Fetched(Ok(page(1, 10, 4, &[5, 6, 7, 8]))));
        let Some(Action::Decide(valid)) = drain(&mut m).into_iter().nth(1) else {
            panic!()
        };
        // Every fact filtered with a reason of 1 000 bytes: four would not fit.
        let decided = valid
            .into_iter()
            .map(|(o, v)| {
                let d = Denial {
                    policy: "p".into(),
                    reason: "x".repeat(1_000),
                    module_sha256: String::new(),
                };
                (o, v, Verdict::Filter(d))
            })
            .collect();
        m.handle(at(2), Event::Decided(decided));
        let a = drain(&mut m);
        let [Action::AppendFilterRecord(record)] = a.as_slice() else {
            panic!("{a:?}")
        };
        let o: serde_json::Value =
            serde_json::from_str(&record.message().fact.object_json).unwrap();
        assert_eq!(o["count"], 4, "{o}");
        assert!(o["facts"].as_array().unwrap().len() < 4, "{o}");
    }

    #[test]
    fn a_gap_stops_the_link_before_anything_is_appended_until_exactly_that_range_is_accepted() {
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(7, 10, 4, &[7, 8]))));
        let a = drain(&mut m);
        let [
            Action::Gapped(PullError::Gap {
                missing_from: 5,
                missing_to: 6,
                ..
            }),
        ] = a.as_slice()
        else {
            panic!("{a:?}")
        };
        let acceptance = |range| GapAcceptance {
            local_zone: "ent".into(),
            accepted_by: "op".into(),
            at_unix_ms: 1,
            range,
        };
        // Another range, a timer, a late answer: still gapped, nothing emitted.
        m.handle(at(2), Event::GapAccepted(acceptance(Some((5, 9)))));
        m.handle(at(2), Event::TimerFired);
        m.handle(at(2), Event::Fetched(Ok(page(7, 10, 4, &[7, 8]))));
        assert!(drain(&mut m).is_empty());
        // Exactly the gap: the checkpoint is read again, the page fetched again, the
        // acceptance recorded first, then the facts.
        m.handle(at(3), Event::GapAccepted(acceptance(Some((5, 6)))));
        assert_eq!(names(&drain(&mut m)), ["read_checkpoint"]);
        m.handle(at(3), Event::CheckpointRead(Ok(Some(4))));
        assert_eq!(names(&drain(&mut m)), ["fetch"]);
        m.handle(at(4), Event::Fetched(Ok(page(7, 10, 4, &[7, 8]))));
        let a = drain(&mut m);
        assert_eq!(names(&a), ["prefetch", "append_gap_record"]);
        let Some(Action::AppendGapRecord(record)) = a.into_iter().nth(1) else {
            panic!()
        };
        assert_eq!(record.message().envelope.message_id, "gap:ent:5-6");
        m.handle(at(5), Event::GapRecorded(ok_outcome(1, false)));
        let facts = take_append(drain(&mut m));
        m.handle(at(6), appended(facts, &[]));
        m.handle(at(7), Event::Confirmed(8, Ok(Frontier { offset: 8 })));
        m.handle(at(8), Event::CheckpointRecorded(Ok(())));
        let a = drain(&mut m);
        let Some(Action::Stepped(r)) = a.iter().find(|a| matches!(a, Action::Stepped(_))) else {
            panic!("{a:?}")
        };
        assert_eq!(r.gap_accepted, Some((5, 6)));
    }

    #[test]
    fn an_accepted_gap_on_an_emptied_stream_checkpoints_the_gaps_end_without_a_confirm() {
        let acceptance = GapAcceptance {
            local_zone: "ent".into(),
            accepted_by: "op".into(),
            at_unix_ms: 1,
            range: Some((5, 10)),
        };
        let mut m = Machine::new(step(), config(Mode::Once, false)).accepting(Some(acceptance));
        m.start(at(0));
        drain(&mut m);
        m.handle(at(0), Event::CheckpointRead(Ok(Some(4))));
        drain(&mut m);
        // JetStream reports an emptied stream as first = last + 1, the ack floor moved.
        m.handle(at(1), Event::Fetched(Ok(page(11, 10, 10, &[]))));
        assert_eq!(names(&drain(&mut m)), ["append_gap_record"]);
        m.handle(at(2), Event::GapRecorded(ok_outcome(1, false)));
        let a = drain(&mut m);
        assert!(
            matches!(a.as_slice(), [Action::RecordCheckpoint(10)]),
            "{a:?}"
        );
        m.handle(at(3), Event::CheckpointRecorded(Ok(())));
        let a = drain(&mut m);
        let [Action::Done(Ok(r))] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!((r.checkpoint, r.gap_accepted), (Some(10), Some((5, 10))));
    }

    #[test]
    fn the_gap_is_judged_against_the_lower_of_checkpoint_and_frontier() {
        // The source's frontier jumped to 10 without this link confirming past 4.
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(11, 10, 10, &[]))));
        assert!(matches!(
            drain(&mut m).as_slice(),
            [Action::Gapped(PullError::Gap {
                missing_from: 5,
                missing_to: 10,
                ..
            })]
        ));
        // Without a checkpoint the frontier is the reference: nothing missing.
        let mut m = fetching(None);
        m.handle(at(1), Event::Fetched(Ok(page(11, 10, 10, &[]))));
        assert_eq!(names(&drain(&mut m)), ["stepped", "fetch"]);
    }

    #[test]
    fn a_page_fetched_ahead_is_dropped_when_the_step_fails_and_the_checkpoint_is_read_again() {
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(1, 10, 4, &[5, 6]))));
        let facts = take_append(drain(&mut m));
        // The page ahead arrives while this one is appended...
        m.handle(at(2), Event::Prefetched(0, Ok(page(1, 10, 4, &[7, 8]))));
        assert!(drain(&mut m).is_empty());
        // ... and this one's confirm fails: the page ahead is gone.
        m.handle(at(3), appended(facts, &[]));
        drain(&mut m);
        m.handle(
            at(4),
            Event::Confirmed(6, Err(BoundaryError::Unavailable("x".into()))),
        );
        assert_eq!(names(&drain(&mut m)), ["backing_off", "sleep_until"]);
        m.handle(at(5000), Event::TimerFired);
        assert_eq!(names(&drain(&mut m)), ["read_checkpoint"]);
        m.handle(at(5000), Event::CheckpointRead(Ok(Some(4))));
        // A fresh fetch, not the page fetched ahead.
        assert_eq!(names(&drain(&mut m)), ["fetch"]);
    }

    #[test]
    fn a_page_ahead_still_on_its_way_when_the_step_fails_is_discarded_when_it_comes() {
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(1, 10, 4, &[5]))));
        drain(&mut m);
        m.handle(
            at(2),
            Event::Appended(vec![Appended {
                offset: 5,
                stored: bytes::Bytes::new(),
                outcome: Err(BoundaryError::Unavailable("x".into())),
            }]),
        );
        drain(&mut m);
        m.handle(at(5000), Event::TimerFired);
        assert_eq!(names(&drain(&mut m)), ["read_checkpoint"]);
        // The page ahead belongs to the failed step: it is not applied (it comes
        // again after the consumer's ack wait).
        m.handle(at(5001), Event::Prefetched(0, Ok(page(1, 10, 4, &[6]))));
        assert!(drain(&mut m).is_empty());
        m.handle(at(5001), Event::CheckpointRead(Ok(Some(4))));
        assert_eq!(names(&drain(&mut m)), ["fetch"]);
        m.handle(at(5002), Event::Fetched(Ok(page(1, 10, 4, &[5, 6]))));
        let facts = take_append(drain(&mut m));
        assert_eq!(facts.iter().map(|f| f.0).collect::<Vec<_>>(), [5, 6]);
    }

    #[test]
    fn the_page_ahead_takes_the_frontier_the_previous_confirm_returned_and_the_cached_checkpoint() {
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(1, 20, 4, &[5, 6]))));
        let facts = take_append(drain(&mut m));
        // Read before the confirm below: frontier 4, and the stream's first retained
        // offset 7 (5 and 6 confirmed and removed by a work-queue retention).
        m.handle(at(2), Event::Prefetched(0, Ok(page(7, 20, 4, &[7, 8]))));
        m.handle(at(3), appended(facts, &[]));
        drain(&mut m);
        m.handle(at(4), Event::Confirmed(6, Ok(Frontier { offset: 6 })));
        drain(&mut m);
        m.handle(at(5), Event::CheckpointRecorded(Ok(())));
        let a = drain(&mut m);
        // No checkpoint read (cached: 6), no fetch (the page ahead), no gap (the page
        // ahead is taken as frontier 6): straight to the next append.
        assert_eq!(names(&a), ["stepped", "prefetch", "append"]);
        let facts = take_append(a);
        assert_eq!(facts.iter().map(|f| f.0).collect::<Vec<_>>(), [7, 8]);
    }

    #[test]
    fn a_failed_fetch_ahead_fails_nothing_and_the_next_step_fetches() {
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(1, 10, 4, &[5]))));
        let facts = take_append(drain(&mut m));
        m.handle(
            at(2),
            Event::Prefetched(0, Err(BoundaryError::Unavailable("x".into()))),
        );
        m.handle(at(3), appended(facts, &[]));
        m.handle(at(4), Event::Confirmed(5, Ok(Frontier { offset: 5 })));
        m.handle(at(5), Event::CheckpointRecorded(Ok(())));
        let a = drain(&mut m);
        // The next page is fetched while the confirm is on its way.
        assert_eq!(
            names(&a),
            ["confirm", "fetch", "record_checkpoint", "stepped"]
        );
    }

    /// A continuous machine with `n` pages in flight that has read checkpoint `ckpt`
    /// and waits for its fetch.
    fn windowed(n: usize, ckpt: Option<u64>) -> Machine {
        let mut cfg = config(Mode::Continuous, false);
        cfg.pages_in_flight = n;
        let mut m = Machine::new(step(), cfg);
        m.start(at(0));
        drain(&mut m);
        m.handle(at(0), Event::CheckpointRead(Ok(ckpt)));
        assert_eq!(names(&drain(&mut m)), ["fetch"]);
        m
    }

    /// A full page (the step's limit, 10 facts) from `from` on, of a stream holding
    /// 1..=1000.
    fn full(from: u64, frontier: u64) -> FactPage {
        let offsets: Vec<u64> = (from..from + 10).collect();
        page(1, 1000, frontier, &offsets)
    }

    fn offsets_of(facts: &[(u64, ValidatedMessage)]) -> Vec<u64> {
        facts.iter().map(|f| f.0).collect()
    }

    #[test]
    fn a_backlog_fills_the_window_and_pages_are_applied_in_the_order_their_fetches_were_sent() {
        let mut m = windowed(4, Some(0));
        m.handle(at(1), Event::Fetched(Ok(full(1, 0))));
        let a = drain(&mut m);
        // A full page: three more fetched ahead (four pages in flight).
        assert_eq!(names(&a), ["prefetch", "prefetch", "prefetch", "append"]);
        let first = take_append(a);
        // The third page ahead comes first: it waits for the ones sent before it.
        m.handle(at(2), Event::Prefetched(2, Ok(full(31, 0))));
        m.handle(at(2), Event::Prefetched(0, Ok(full(11, 0))));
        assert!(drain(&mut m).is_empty());
        m.handle(at(3), appended(first, &[]));
        // Page 1 confirmed; page 2 applied while that confirm is on its way.
        let a = drain(&mut m);
        assert_eq!(names(&a), ["confirm", "append"]);
        assert!(matches!(a[0], Action::Confirm(10)));
        let second = take_append(a);
        assert_eq!(offsets_of(&second), (11..21).collect::<Vec<_>>());
        m.handle(at(4), appended(second, &[]));
        // Page 3 (ticket 1) has not come: nothing more is applied, and the window
        // (2 confirming, 2 ahead) is full.
        assert_eq!(names(&drain(&mut m)), ["confirm"]);
        m.handle(at(5), Event::Prefetched(1, Ok(full(21, 0))));
        let a = drain(&mut m);
        assert_eq!(names(&a), ["append"], "{a:?}");
        assert_eq!(offsets_of(&take_append(a)), (21..31).collect::<Vec<_>>());
    }

    /// A machine with four pages in flight: page 1..=10 appended and confirming,
    /// page 11..=20 handed to the append port (its facts returned).
    fn second_page_appending() -> (Machine, Vec<(u64, ValidatedMessage)>) {
        let mut m = windowed(4, Some(0));
        m.handle(at(1), Event::Fetched(Ok(full(1, 0))));
        let first = take_append(drain(&mut m));
        m.handle(at(2), Event::Prefetched(0, Ok(full(11, 0))));
        m.handle(at(3), appended(first, &[]));
        let second = take_append(drain(&mut m));
        (m, second)
    }

    #[test]
    fn confirms_answered_out_of_order_never_move_the_checkpoint_back() {
        let (mut m, second) = second_page_appending();
        m.handle(at(4), appended(second, &[]));
        drain(&mut m);
        // The second page's confirm answers first (frontier 20), then the first's
        // (which read the frontier before: 10).
        m.handle(at(5), Event::Confirmed(20, Ok(Frontier { offset: 20 })));
        let a = drain(&mut m);
        assert!(
            matches!(a.as_slice(), [Action::RecordCheckpoint(20)]),
            "{a:?}"
        );
        m.handle(at(6), Event::Confirmed(10, Ok(Frontier { offset: 10 })));
        let a = drain(&mut m);
        // Not due (a record is on its way): kept in memory, at 20, not 10.
        assert_eq!(names(&a), ["stepped"]);
        m.handle(at(7), Event::CheckpointRecorded(Ok(())));
        let a = drain(&mut m);
        let [Action::Stepped(r)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(r.checkpoint, Some(20));
        assert_eq!(m.unrecorded_checkpoint(), None);
    }

    #[test]
    fn a_gap_seen_while_earlier_confirms_are_on_their_way_is_judged_again_after_them() {
        let mut m = windowed(4, Some(4));
        m.handle(
            at(1),
            Event::Fetched(Ok(page(1, 100, 4, &(5..15).collect::<Vec<_>>()))),
        );
        let first = take_append(drain(&mut m));
        // Read before page 1's confirm: 5..14 already removed (work-queue retention
        // of confirmed facts elsewhere), frontier still 4.
        m.handle(at(2), Event::Prefetched(0, Ok(page(15, 100, 4, &[15, 16]))));
        m.handle(at(3), appended(first, &[]));
        // It looks like a gap (5..14) while page 1 is confirming: nothing of it yet.
        assert_eq!(names(&drain(&mut m)), ["confirm"]);
        m.handle(at(4), Event::Confirmed(14, Ok(Frontier { offset: 14 })));
        m.handle(at(5), Event::CheckpointRecorded(Ok(())));
        let a = drain(&mut m);
        // Judged again at checkpoint 14: no gap, applied (the pages still ahead fill
        // the window).
        assert_eq!(names(&a), ["record_checkpoint", "stepped", "append"]);
        assert_eq!(offsets_of(&take_append(a)), [15, 16]);
    }

    #[test]
    fn a_real_gap_behind_confirming_pages_still_stops_the_link_once_they_are_answered() {
        let mut m = windowed(4, Some(4));
        m.handle(at(1), Event::Fetched(Ok(full(5, 4))));
        let first = take_append(drain(&mut m));
        // 15..19 expired before this link saw them: the stream holds 20.. now.
        let later: Vec<u64> = (20..30).collect();
        m.handle(at(2), Event::Prefetched(0, Ok(page(20, 1000, 4, &later))));
        m.handle(at(3), appended(first, &[]));
        assert_eq!(names(&drain(&mut m)), ["confirm"]);
        m.handle(at(4), Event::Confirmed(14, Ok(Frontier { offset: 14 })));
        let a = drain(&mut m);
        assert_eq!(names(&a), ["record_checkpoint"]);
        m.handle(at(5), Event::CheckpointRecorded(Ok(())));
        let a = drain(&mut m);
        assert!(
            matches!(
                a.as_slice(),
                [
                    Action::Stepped(_),
                    Action::Gapped(PullError::Gap {
                        missing_from: 15,
                        missing_to: 19,
                        ..
                    })
                ]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn a_failed_confirm_drops_every_page_in_flight_and_later_answers_change_nothing() {
        let (mut m, second) = second_page_appending();
        m.handle(
            at(4),
            Event::Confirmed(10, Err(BoundaryError::Unavailable("x".into()))),
        );
        assert_eq!(names(&drain(&mut m)), ["backing_off", "sleep_until"]);
        // The second page's appends, the pages ahead and its confirm: all ignored.
        m.handle(at(5), appended(second, &[]));
        m.handle(at(5), Event::Prefetched(1, Ok(full(21, 0))));
        m.handle(at(5), Event::Confirmed(20, Ok(Frontier { offset: 20 })));
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.unrecorded_checkpoint(), None);
        m.handle(at(5000), Event::TimerFired);
        assert_eq!(names(&drain(&mut m)), ["read_checkpoint"]);
    }

    #[test]
    fn one_page_in_flight_applies_one_page_at_a_time_without_fetching_ahead() {
        let mut m = windowed(1, Some(0));
        m.handle(at(1), Event::Fetched(Ok(full(1, 0))));
        let a = drain(&mut m);
        assert_eq!(names(&a), ["append"]);
        m.handle(at(2), appended(take_append(a), &[]));
        assert_eq!(names(&drain(&mut m)), ["confirm"]);
        m.handle(at(3), Event::Confirmed(10, Ok(Frontier { offset: 10 })));
        assert_eq!(names(&drain(&mut m)), ["record_checkpoint"]);
        m.handle(at(4), Event::CheckpointRecorded(Ok(())));
        assert_eq!(names(&drain(&mut m)), ["stepped", "fetch"]);
    }

    #[test]
    fn a_trickle_fetches_one_page_ahead_whatever_the_window() {
        let mut m = windowed(8, Some(0));
        m.handle(at(1), Event::Fetched(Ok(page(1, 100, 0, &[1, 2]))));
        assert_eq!(names(&drain(&mut m)), ["prefetch", "append"]);
    }

    #[test]
    fn an_empty_page_is_a_success_without_confirm_and_the_next_step_long_polls() {
        let mut m = fetching(Some(4));
        m.handle(at(1), Event::Fetched(Ok(page(1, 4, 4, &[]))));
        let a = drain(&mut m);
        assert_eq!(names(&a), ["stepped", "fetch"]);
    }

    #[test]
    fn a_page_from_a_stream_the_link_does_not_carry_fails_before_anything_is_appended() {
        let mut m = fetching(Some(4));
        let mut p = page(1, 10, 4, &[5]);
        p.stream = "facts_audit".into();
        m.handle(at(1), Event::Fetched(Ok(p)));
        let a = drain(&mut m);
        assert!(
            matches!(
                &a[0],
                Action::BackingOff {
                    op: Operation::Fetch,
                    ..
                }
            ),
            "{a:?}"
        );
        assert_eq!(names(&a), ["backing_off", "sleep_until"]);
    }

    #[test]
    fn a_malformed_stream_name_fails_the_page_as_a_whole_before_any_append() {
        let mut c = config(Mode::Continuous, false);
        c.pages_in_flight = 1;
        let mut st = step();
        st.streams.clear();
        let mut m = Machine::new(st, c);
        m.start(at(0));
        drain(&mut m);
        m.handle(at(0), Event::CheckpointRead(Ok(Some(4))));
        drain(&mut m);
        let mut p = page(1, 10, 4, &[5]);
        p.stream = "facts.operational>".into();
        m.handle(at(1), Event::Fetched(Ok(p)));
        let a = drain(&mut m);
        assert!(
            matches!(&a[0], Action::BackingOff { op: Operation::Fetch, error, .. } if error.field() == Some("stream")),
            "{a:?}"
        );
    }

    #[test]
    fn once_mode_with_an_acceptance_of_another_range_reports_the_gap_it_found() {
        let acceptance = GapAcceptance {
            local_zone: "ent".into(),
            accepted_by: "op".into(),
            at_unix_ms: 1,
            range: Some((5, 5)),
        };
        let mut m = Machine::new(step(), config(Mode::Once, false)).accepting(Some(acceptance));
        m.start(at(0));
        drain(&mut m);
        m.handle(at(0), Event::CheckpointRead(Ok(Some(4))));
        drain(&mut m);
        m.handle(at(1), Event::Fetched(Ok(page(7, 10, 4, &[7]))));
        let a = drain(&mut m);
        assert!(
            matches!(
                a.as_slice(),
                [Action::Done(Err(PullError::Gap {
                    missing_from: 5,
                    missing_to: 6,
                    ..
                }))]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn a_failed_checkpoint_read_backs_off_and_reads_it_again() {
        let mut m = Machine::new(step(), config(Mode::Continuous, false));
        m.start(at(0));
        drain(&mut m);
        m.handle(
            at(0),
            Event::CheckpointRead(Err(BoundaryError::Unavailable("x".into()))),
        );
        let a = drain(&mut m);
        assert!(matches!(
            &a[0],
            Action::BackingOff {
                op: Operation::Checkpoint,
                ..
            }
        ));
        m.handle(at(9000), Event::TimerFired);
        assert_eq!(names(&drain(&mut m)), ["read_checkpoint"]);
    }

    #[test]
    fn backoff_grows_exponentially_within_its_bounds_and_resets_after_a_success() {
        let mut m = fetching(Some(4));
        let mut last = at(0);
        for attempt in 1..30u32 {
            m.handle(
                last,
                Event::Fetched(Err(BoundaryError::Unavailable("x".into()))),
            );
            let a = drain(&mut m);
            let (
                Action::BackingOff {
                    attempt: n, delay, ..
                },
                Action::SleepUntil(until),
            ) = (&a[0], &a[1])
            else {
                panic!("{a:?}")
            };
            let cap = Duration::from_millis(100 * 2u64.pow((attempt - 1).min(20)))
                .min(Duration::from_secs(5));
            assert_eq!(*n, attempt);
            assert!(
                *delay >= cap / 2 && *delay <= cap,
                "attempt {attempt}: {delay:?}"
            );
            assert_eq!(*until, last.instant + *delay);
            last = Now {
                instant: *until,
                unix_ms: last.unix_ms,
            };
            m.handle(last, Event::TimerFired);
            // The checkpoint was dropped by the failure: read again, then fetch.
            assert_eq!(names(&drain(&mut m)), ["read_checkpoint"]);
            m.handle(last, Event::CheckpointRead(Ok(Some(4))));
            assert_eq!(names(&drain(&mut m)), ["fetch"]);
        }
        m.handle(last, Event::Fetched(Ok(page(1, 4, 4, &[]))));
        drain(&mut m);
        assert_eq!(m.attempt(), 0);
    }

    #[test]
    fn the_jitter_is_seeded_same_seed_same_delays_and_spread_across_attempts() {
        let delays = |seed| {
            let mut c = config(Mode::Continuous, false);
            c.seed = seed;
            let mut m = Machine::new(step(), c);
            (0..20).map(|_| m.backoff(10)).collect::<Vec<_>>()
        };
        assert_eq!(delays(1), delays(1));
        assert_ne!(delays(1), delays(2));
        let distinct: std::collections::HashSet<_> = delays(1).into_iter().collect();
        assert!(distinct.len() > 1, "jittered");
    }

    #[test]
    fn once_mode_reports_the_first_failure_and_stops() {
        let mut m = Machine::new(step(), config(Mode::Once, false));
        m.start(at(0));
        drain(&mut m);
        m.handle(at(0), Event::CheckpointRead(Ok(None)));
        assert_eq!(names(&drain(&mut m)), ["fetch"]);
        m.handle(
            at(1),
            Event::Fetched(Err(BoundaryError::Unavailable("x".into()))),
        );
        let a = drain(&mut m);
        assert!(matches!(
            a.as_slice(),
            [Action::Done(Err(PullError::Boundary {
                op: Operation::Fetch,
                ..
            }))]
        ));
        assert!(m.is_done());
        m.handle(at(2), Event::TimerFired);
        assert!(drain(&mut m).is_empty());
    }
}
