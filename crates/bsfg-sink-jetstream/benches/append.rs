//! AppendFact throughput through the Boundary engine (validation, canonical JSON,
//! permanent idempotency, group commit) beside raw async-nats publishing to a plain
//! stream, measured in the same run on the same server, under both flush settings.
//!
//! Run: `cargo bench -p bsfg-sink-jetstream --bench append`
//! Size: `BSFG_BENCH_FACTS` (default 40 000), `BSFG_BENCH_CONCURRENCY` (default 1024, the raw baseline's acks in flight).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bsfg_core::{Boundary, BoundaryApi, Limits, Message};
use bsfg_sink_jetstream::baseline::percentile_ms as pct;
use bsfg_sink_jetstream::{JetStreamConfig, JetStreamZone};
use bsfg_testkit::{NatsOptions, NatsServer};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fact(run: &str, i: usize) -> Message {
    bsfg_testkit::fixtures::padded_fact(&format!("{run}-{i}"), i, 256)
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
        let raw = bsfg_sink_jetstream::baseline::raw_publish(&server.url(), n, stored, 1024)
            .await
            .unwrap();
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
