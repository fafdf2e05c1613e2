//! AppendFact throughput through the Boundary engine (validation, canonical JSON,
//! permanent idempotency, group commit) beside raw async-nats publishing to a plain
//! stream, measured in the same run on the same server, under both flush settings.
//!
//! Run: `cargo bench -p bsfg-sink-jetstream --bench append`
//! Size: `BSFG_BENCH_FACTS` (default 40 000), `BSFG_BENCH_CONCURRENCY` (default 1024, the raw baseline's acks in flight).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bsfg_core::{Boundary, BoundaryApi, Envelope, Fact, Limits, Message};
use bsfg_sink_jetstream::{JetStreamConfig, JetStreamZone};
use bsfg_testkit::{NatsOptions, NatsServer};
use futures::stream::{FuturesUnordered, StreamExt};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fact whose canonical object_json is exactly 256 bytes.
fn fact(run: &str, i: usize) -> Message {
    let prefix = format!(r#"{{"operator":"jdoe","seq":{i},"pad":""#);
    let pad = "x".repeat(256 - prefix.len() - 2);
    Message {
        envelope: Envelope {
            message_id: format!("{run}-{i}"),
            from_zone: "plant-a".into(),
            to_zone: "enterprise".into(),
            produced_at_unix_ms: 1_764_000_000_000,
            ..Default::default()
        },
        fact: Fact {
            subject: "batch:PlantA/B1042".into(),
            predicate: "step_completed".into(),
            object_json: format!("{prefix}{pad}\"}}"),
            artifacts: vec![],
        },
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn raw_publish(url: &str, n: usize, size: usize) -> f64 {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "raw".into(),
        subjects: vec!["raw.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for i in 0..n {
        let ack = js
            .publish(format!("raw.{}", i % 16), payload.clone())
            .await
            .unwrap();
        inflight.push(ack.into_future());
        if inflight.len() >= 1024 {
            inflight.next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = inflight.next().await {
        r.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn engine_append(
    url: &str,
    monitor: String,
    n: usize,
    concurrency: usize,
) -> (f64, Vec<Duration>, String) {
    let mut cfg = JetStreamConfig::new("bench", url);
    cfg.monitor_url = Some(monitor);
    if let Ok(v) = std::env::var("BSFG_BENCH_INFLIGHT") {
        cfg.max_inflight_batches = v.parse().ok();
    }
    cfg.max_batch = env("BSFG_BENCH_MAX_BATCH", cfg.max_batch);
    let zone = Arc::new(JetStreamZone::connect(cfg).await.unwrap());
    let mode = format!("{:?}", zone.publish_mode());
    let api = Arc::new(Boundary::new(zone.clone(), zone, Limits::default()));
    let per = n / concurrency;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let m = fact("bench", c * per + i);
                let t = Instant::now();
                api.append_fact(m).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let rate = (per * concurrency) as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    (rate, lat, mode)
}

#[tokio::main]
async fn main() {
    let n = env("BSFG_BENCH_FACTS", 40_000);
    let concurrency = env("BSFG_BENCH_CONCURRENCY", 1024);
    let stored = serde_json::to_vec(&fact("bench", 0)).unwrap().len();
    println!(
        "# AppendFact benchmark: {n} facts, {concurrency} concurrent appenders, object_json 256 B (stored record {stored} B)"
    );
    println!(
        "| nats-server flush | raw publish (1024 acks in flight), msg/s | engine mode | engine AppendFact, facts/s | ratio | engine p50 ms | engine p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for sync_always in [true, false] {
        let server = NatsServer::start_with(NatsOptions {
            sync_always,
            ..Default::default()
        })
        .unwrap();
        let raw = raw_publish(&server.url(), n, stored).await;
        let (eng, lat, mode) =
            engine_append(&server.url(), server.monitor_url(), n, concurrency).await;
        println!(
            "| {} | {:.0} | {mode} | {:.0} | {:.2}x | {:.1} | {:.1} |",
            if sync_always {
                "sync_interval: always"
            } else {
                "default (lazy)"
            },
            raw,
            eng,
            eng / raw,
            pct(&lat, 0.50),
            pct(&lat, 0.99)
        );
    }
}
