//! The receiver-driven pull, one page at a time: FetchFacts from the source zone,
//! AppendFact into the local zone with the original message_id, and only then
//! ConfirmReceipt to the source.
//!
//! Architecture invariant: a confirm never precedes the durable append of every fact
//! of its page. Any failure returns before the confirm, so the page comes again and
//! idempotent append absorbs what was already stored. (The long-running link loop
//! with backoff and gap detection builds on this step.)

use std::time::Duration;

use crate::error::BoundaryError;
use crate::ports::{BoundaryApi, FetchRequest};

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

/// Pulls one page from `source` into `destination` for `consumer`.
pub async fn pull_page(
    source: &dyn BoundaryApi,
    destination: &dyn BoundaryApi,
    consumer: &str,
    limit: u32,
    wait: Duration,
) -> Result<PullReport, BoundaryError> {
    let page = source
        .fetch_facts(FetchRequest {
            consumer: consumer.into(),
            limit,
            wait,
        })
        .await?;
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
