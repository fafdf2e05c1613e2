//! Support for BSFG's end-to-end tests: zones on real nats-servers, sample
//! plant facts; the receiver step (fetch -> append -> confirm) is bsfg-core's.

use std::sync::Arc;
use std::time::Duration;

use bsfg_core::{
    Boundary, BoundaryApi, BoundaryError, Envelope, Fact, FactPage, FetchRequest, Limits, Message,
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
        Self::start_with(name, consumers, |_| {}).await
    }

    /// Like [`Zone::start`], with a last word on the sink config (retention, ...).
    pub async fn start_with(
        name: &str,
        consumers: &[(&str, &str)],
        tweak: impl FnOnce(&mut JetStreamConfig),
    ) -> Result<Zone, ZoneError> {
        Self::start_custom(
            name,
            consumers,
            NatsOptions::default(),
            Limits::default(),
            tweak,
        )
        .await
    }

    /// Like [`Zone::start_with`], with the server's options (its domain is set to
    /// the zone's name) and the engine's limits.
    pub async fn start_custom(
        name: &str,
        consumers: &[(&str, &str)],
        options: NatsOptions,
        limits: Limits,
        tweak: impl FnOnce(&mut JetStreamConfig),
    ) -> Result<Zone, ZoneError> {
        let nats = NatsServer::start_with(NatsOptions {
            domain: Some(name.to_owned()),
            ..options
        })?;
        let mut cfg = JetStreamConfig::new(name, nats.url());
        cfg.domain = Some(name.to_owned());
        cfg.monitor_url = Some(nats.monitor_url());
        cfg.consumers = consumers
            .iter()
            .map(|(n, c)| ConsumerConfig::new(*n, *c).with_ack_wait(Duration::from_secs(2)))
            .collect();
        tweak(&mut cfg);
        let log = Arc::new(JetStreamZone::connect(cfg).await?);
        let api = Boundary::new(log.clone(), log.clone(), limits);
        Ok(Zone {
            name: name.to_owned(),
            nats,
            log,
            api,
        })
    }
}

impl Zone {
    /// Appends `step_completed` facts for `steps` of `batch`, addressed to `to`.
    pub async fn append_steps(
        &self,
        to: &str,
        batch: &str,
        steps: std::ops::RangeInclusive<u32>,
    ) -> Result<Vec<u64>, BoundaryError> {
        let mut offsets = Vec::new();
        for step in steps {
            let o = self
                .api
                .append_fact(step_completed(&self.name, to, batch, step))
                .await?;
            offsets.push(o.offset);
        }
        Ok(offsets)
    }

    /// One page for a consumer of this zone.
    pub async fn fetch(
        &self,
        consumer: &str,
        limit: u32,
        wait: Duration,
    ) -> Result<FactPage, BoundaryError> {
        self.api
            .fetch_facts(FetchRequest {
                consumer: consumer.into(),
                limit,
                wait,
            })
            .await
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

pub use bsfg_core::link::{PullError, PullReport, PullStep, pull_page};

impl Zone {
    /// plant-a, whose operational facts expire after `max_age` (consumer
    /// `to-enterprise`), and enterprise with readers `reporting` (operational) and
    /// `audit-reader` (audit, where accepted gaps are recorded).
    pub async fn pair_with_retention(max_age: Duration) -> Result<(Zone, Zone), ZoneError> {
        let plant = Zone::start_with("plant-a", &[("to-enterprise", "operational")], |c| {
            c.classes[0].max_age = max_age;
            c.duplicate_window = Duration::from_secs(1);
        });
        let enterprise = Zone::start(
            "enterprise",
            &[("reporting", "operational"), ("audit-reader", "audit")],
        );
        let (plant, enterprise) = tokio::join!(plant, enterprise);
        Ok((plant?, enterprise?))
    }

    /// One receiver step into this zone from `source`'s `consumer`, as the link loop
    /// runs it (link named after the consumer: checkpoint and provenance kept here).
    pub async fn pull_from(
        &self,
        source: &Zone,
        consumer: &str,
        limit: u32,
        wait: Duration,
        accept_gap: Option<&bsfg_core::link::GapAcceptance>,
    ) -> Result<PullReport, PullError> {
        let step = PullStep {
            wait,
            local_zone: self.name.clone(),
            ..pull_step(consumer, consumer, &source.name, limit)
        };
        pull_page(&source.api, &self.api, &step, accept_gap).await
    }
}

/// A pull step of link `link` on `consumer` of zone `source_zone`: pages of `limit`,
/// no long-poll, any stream.
pub fn pull_step(link: &str, consumer: &str, source_zone: &str, limit: u32) -> PullStep {
    PullStep {
        link: link.to_owned(),
        consumer: consumer.to_owned(),
        limit,
        wait: Duration::ZERO,
        streams: vec![],
        source_zone: source_zone.to_owned(),
        local_zone: "local".into(),
    }
}
