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

/// Number of messages in a stream, read from the server.
pub async fn stream_messages(z: &JetStreamZone, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(z.client().clone());
    let mut s = js.get_stream(stream).await.expect("stream");
    s.info().await.expect("info").state.messages
}
