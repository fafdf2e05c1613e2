//! Support for BSFG's end-to-end tests and demo: zones on real nats-servers, sample
//! plant facts, and one hand-driven receiver step (fetch -> append -> confirm).
//!
//! The step is the contract's receiver-driven pull written out plainly; the real
//! link loop (with backoff, gap detection and metrics) lives in bsfg-core later.

use std::sync::Arc;
use std::time::Duration;

use bsfg_core::{
    Boundary, BoundaryApi, BoundaryError, Envelope, Fact, FetchRequest, Limits, Message,
};
use bsfg_sink_jetstream::{ConsumerConfig, JetStreamConfig, JetStreamZone, SinkError};
use bsfg_testkit::{NatsOptions, NatsServer, TestkitError};

/// One zone: its own nats-server (own JetStream domain) and its Boundary engine.
pub struct Zone {
    /// The zone's name (also its JetStream domain).
    pub name: String,
    /// The zone's nats-server.
    pub nats: NatsServer,
    /// The zone log.
    pub log: Arc<JetStreamZone>,
    /// The engine serving the four operations.
    pub api: Boundary,
}

/// Why a zone could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// nats-server did not start.
    #[error(transparent)]
    Nats(#[from] TestkitError),
    /// The sink did not open.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl Zone {
    /// Starts a zone whose log declares `consumers` (name, class) for its peers.
    pub async fn start(name: &str, consumers: &[(&str, &str)]) -> Result<Zone, ZoneError> {
        let nats = NatsServer::start_with(NatsOptions {
            domain: Some(name.to_owned()),
            ..Default::default()
        })?;
        let mut cfg = JetStreamConfig::new(name, nats.url());
        cfg.domain = Some(name.to_owned());
        cfg.monitor_url = Some(nats.monitor_url());
        cfg.consumers = consumers
            .iter()
            .map(|(n, c)| ConsumerConfig::new(*n, *c).with_ack_wait(Duration::from_secs(2)))
            .collect();
        let log = Arc::new(JetStreamZone::connect(cfg).await?);
        let api = Boundary::new(log.clone(), log.clone(), Limits::default());
        Ok(Zone {
            name: name.to_owned(),
            nats,
            log,
            api,
        })
    }
}

/// A sample plant fact: step `step` of batch `batch` completed.
pub fn step_completed(from: &str, to: &str, batch: &str, step: u32) -> Message {
    Message {
        envelope: Envelope {
            message_id: format!("{from}:batch:{batch}:step:{step}"),
            from_zone: from.into(),
            to_zone: to.into(),
            produced_at_unix_ms: 1_764_000_000_000 + i64::from(step),
            correlation_id: Some(format!("batch-{batch}")),
            labels: [("site".to_owned(), "PlantA".to_owned())].into(),
            ..Default::default()
        },
        fact: Fact {
            subject: format!("batch:PlantA/{batch}"),
            predicate: "step_completed".into(),
            object_json: format!(r#"{{"step":{step},"operator":"jdoe"}}"#),
            artifacts: vec![],
        },
    }
}

/// What one receiver step did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// Facts fetched from the source.
    pub fetched: usize,
    /// Of those, newly stored in the destination.
    pub stored: usize,
    /// Of those, already stored (replays absorbed by idempotency).
    pub duplicates: usize,
    /// The source's frontier after the confirm.
    pub frontier: u64,
}

/// One receiver-driven step: fetch a page from `source`, append every fact to
/// `destination` with its original message_id, and only then confirm the page.
pub async fn pull_once(
    source: &dyn BoundaryApi,
    destination: &dyn BoundaryApi,
    consumer: &str,
    limit: u32,
    wait: Duration,
) -> Result<StepReport, BoundaryError> {
    let page = source
        .fetch_facts(FetchRequest {
            consumer: consumer.into(),
            limit,
            wait,
        })
        .await?;
    let mut report = StepReport {
        fetched: page.facts.len(),
        frontier: page.frontier,
        ..Default::default()
    };
    let Some(last) = page.facts.last().map(|f| f.offset) else {
        return Ok(report);
    };
    for f in page.facts {
        // A failure here returns before the confirm: the page comes again.
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
