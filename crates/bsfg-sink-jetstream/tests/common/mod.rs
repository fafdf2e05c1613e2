//! Shared helpers: a real nats-server per test, zones and sample facts.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bsfg_core::{Boundary, Limits};
use bsfg_sink_jetstream::{ConsumerConfig, JetStreamConfig, JetStreamZone};
use bsfg_testkit::NatsServer;

pub fn server() -> NatsServer {
    NatsServer::start().expect("a test that needs nats-server must be able to start one")
}

pub fn config(server: &NatsServer) -> JetStreamConfig {
    let mut c = JetStreamConfig::new("plant-a", server.url());
    c.monitor_url = Some(server.monitor_url());
    c.consumers = vec![
        ConsumerConfig::new("enterprise-pull", "operational").with_ack_wait(Duration::from_secs(1)),
    ];
    c
}

pub async fn zone(cfg: JetStreamConfig) -> Arc<JetStreamZone> {
    Arc::new(JetStreamZone::connect(cfg).await.expect("zone connects"))
}

pub fn engine(z: &Arc<JetStreamZone>) -> Boundary {
    Boundary::new(z.clone(), z.clone(), Limits::default())
}

#[allow(unused_imports)] // not every test binary appends facts
pub use bsfg_testkit::fixtures::step_completed as fact;

/// Number of messages in a stream, read from the server; for a class's stream
/// (`facts_<class>`) the facts of that class in the zone log.
pub async fn stream_messages(z: &JetStreamZone, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(z.client().clone());
    match stream.strip_prefix("facts_") {
        Some(class) => class_facts(&js, class).await,
        None => {
            let mut s = js.get_stream(stream).await.expect("stream");
            s.info().await.expect("info").state.messages
        }
    }
}

/// Facts of a class in the zone log.
pub async fn class_facts(js: &async_nats::jetstream::Context, class: &str) -> u64 {
    use futures::TryStreamExt;
    let s = js
        .get_stream(bsfg_sink_jetstream::index::LOG_STREAM)
        .await
        .expect("log stream");
    let subjects: Vec<(String, usize)> = s
        .info_with_subjects(bsfg_sink_jetstream::index::class_filter(class))
        .await
        .expect("info")
        .try_collect()
        .await
        .expect("subjects");
    subjects.iter().map(|(_, n)| *n as u64).sum()
}

/// Appends `<prefix><i>` for i in 0..n one after another; returns their offsets.
pub async fn append_in_order(api: &Boundary, prefix: &str, n: i64) -> Vec<u64> {
    use bsfg_core::BoundaryApi;
    let mut out = Vec::new();
    for i in 0..n {
        let o = api
            .append_fact(fact(&format!("{prefix}{i}"), i))
            .await
            .expect("append");
        out.push(o.offset);
    }
    out
}
