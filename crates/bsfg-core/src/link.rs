//! The receiver-driven pull, one page at a time: FetchFacts from the source zone,
//! AppendFact into the local zone with the original message_id, and only then
//! ConfirmReceipt to the source.
//!
//! Architecture invariants:
//! - a confirm never precedes the durable append of every fact of its page; any
//!   failure returns before the confirm, so the page comes again and idempotent append
//!   absorbs what was already stored;
//! - a gap is never skipped silently: when the source's retention removed facts this
//!   consumer never confirmed (`first_offset > frontier + 1`), the step stops before
//!   appending or confirming anything, unless the operator accepts exactly that gap,
//!   and an accepted gap is recorded as a fact in the local zone first.
//!
//! (The long-running link loop with backoff and metrics builds on this step.)

use std::time::Duration;

use crate::error::BoundaryError;
use crate::model::{Envelope, Fact, Message};
use crate::ports::{BoundaryApi, FetchRequest};

/// Why a pull step stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// A boundary operation failed; retrying the step is safe.
    #[error(transparent)]
    Boundary(#[from] BoundaryError),
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
        /// Last missing offset (first retained - 1).
        missing_to: u64,
    },
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

/// What one step did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// Facts fetched from the source.
    pub fetched: usize,
    /// Of those, newly stored in the destination.
    pub stored: usize,
    /// Of those, already stored (replays absorbed by idempotency).
    pub duplicates: usize,
    /// The source's frontier for the consumer after the step.
    pub frontier: u64,
    /// The source's newest offset (lag in facts = `last_offset - frontier`).
    pub last_offset: u64,
}

/// Pulls one page from `source` into `destination` for `consumer`. With `accept_gap`,
/// a gap found on this page is recorded in `destination` and then passed over.
pub async fn pull_page(
    source: &dyn BoundaryApi,
    destination: &dyn BoundaryApi,
    consumer: &str,
    limit: u32,
    wait: Duration,
    accept_gap: Option<&GapAcceptance>,
) -> Result<PullReport, PullError> {
    let page = source
        .fetch_facts(FetchRequest {
            consumer: consumer.into(),
            limit,
            wait,
        })
        .await?;
    if page.first_offset > page.frontier + 1 && !page.facts.is_empty() {
        let (missing_from, missing_to) = (page.frontier + 1, page.first_offset - 1);
        let Some(acceptance) = accept_gap else {
            return Err(PullError::Gap {
                consumer: consumer.to_owned(),
                missing_from,
                missing_to,
            });
        };
        destination
            .append_fact(gap_fact(consumer, missing_from, missing_to, acceptance))
            .await?;
    }
    let mut report = PullReport {
        fetched: page.facts.len(),
        frontier: page.frontier,
        last_offset: page.last_offset,
        ..Default::default()
    };
    let Some(last) = page.facts.last().map(|f| f.offset) else {
        return Ok(report);
    };
    for f in page.facts {
        let out = destination.append_fact(f.message).await?;
        if out.duplicate {
            report.duplicates += 1;
        } else {
            report.stored += 1;
        }
    }
    report.frontier = source.confirm_receipt(consumer, last).await?.offset;
    Ok(report)
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
}
