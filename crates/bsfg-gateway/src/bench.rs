//! `bsfg bench append`: AppendFact over gRPC through a real gateway, beside raw
//! JetStream publishing on the same nats-server in the same run.
//!
//! For each flush setting it starts a temporary nats-server (from `.tools/`, see
//! bsfg-testkit) and an in-process gateway on a loopback port, then measures:
//! 1. raw async-nats publish of same-size records with 1024 acks in flight;
//! 2. the most facts/s that `clients` gRPC connections reach, each with `inflight`
//!    appends outstanding, with p50/p99 latency;
//! 3. p50/p99 at half that rate, paced, which is what an operator sees in normal load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bsfg_core::{Boundary, BoundaryApi, Limits};
use bsfg_sink_jetstream::baseline::{percentile_ms as pct, raw_publish};
use bsfg_sink_jetstream::{JetStreamConfig, JetStreamZone};
use bsfg_testkit::fixtures::padded_fact as bench_fact;
use bsfg_testkit::{NatsOptions, NatsServer};
use bsfg_transport_grpc::{ClientConfig, GrpcClient, ServerConfig};

/// Options of `bsfg bench append`.
#[derive(Debug, clap::Args)]
pub struct AppendBench {
    /// Facts appended at full speed.
    #[arg(long, default_value_t = 40_000)]
    facts: usize,
    /// Concurrent gRPC clients (one connection each).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Appends outstanding per client.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Size of each fact's canonical object_json.
    #[arg(long, default_value_t = 256)]
    object_bytes: usize,
    /// Override the sink's rounds in flight (default: by publish mode).
    #[arg(long)]
    max_inflight_batches: Option<usize>,
    /// Force a publish mode (default: picked from the server's flush setting).
    #[arg(long, value_parser = ["atomic_batch", "pipelined"])]
    publish_mode: Option<String>,
}

/// Appends `n` facts from `clients` connections; `rate` paces the whole load
/// (facts/s) when set. Returns facts/s and sorted latencies.
async fn load(
    url: &str,
    run: &str,
    n: usize,
    clients: usize,
    inflight: usize,
    object_bytes: usize,
    rate: Option<f64>,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let workers = clients * inflight;
    let per = n / workers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = GrpcClient::connect_lazy(url, ClientConfig::default())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for w in 0..inflight {
            let client = client.clone();
            let run = run.to_owned();
            let worker = c * inflight + w;
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let seq = worker * per + i;
                    if let Some(rate) = rate {
                        // Each worker sends at rate/workers, offset so that the load
                        // is spread evenly over time.
                        let due = start
                            + Duration::from_secs_f64(
                                (i as f64 + worker as f64 / workers as f64) * workers as f64 / rate,
                            );
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let t = Instant::now();
                    client
                        .append_fact(bench_fact(&format!("{run}-{seq}"), seq, object_bytes))
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    lat.push(t.elapsed());
                }
                anyhow::Ok(lat)
            }));
        }
    }
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.extend(t.await??);
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    Ok((rate, lat))
}

/// Runs the benchmark and prints a markdown table.
pub async fn append(opts: AppendBench) -> anyhow::Result<()> {
    let stored = serde_json::to_vec(&bench_fact("bench-0", 0, opts.object_bytes))?.len();
    println!(
        "# bsfg bench append: {} facts, {} gRPC clients x {} in flight, object_json {} B (stored record {stored} B)",
        opts.facts, opts.clients, opts.inflight, opts.object_bytes
    );
    println!(
        "| nats-server flush | raw publish msg/s | gRPC AppendFact facts/s | ratio | p50 ms | p99 ms | at half rate: facts/s | p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for sync_always in [true, false] {
        let nats = NatsServer::start_with(NatsOptions {
            sync_always,
            ..Default::default()
        })
        .context("starting nats-server (run scripts/setup.sh)")?;
        let raw = raw_publish(&nats.url(), opts.facts, stored, 1024)
            .await
            .map_err(|e| anyhow::anyhow!("raw publish: {e}"))?;

        let mut cfg = JetStreamConfig::new("bench", nats.url());
        cfg.monitor_url = Some(nats.monitor_url());
        cfg.max_inflight_batches = opts.max_inflight_batches;
        cfg.publish_mode = match opts.publish_mode.as_deref() {
            Some("atomic_batch") => Some(bsfg_sink_jetstream::PublishMode::AtomicBatch),
            Some("pipelined") => Some(bsfg_sink_jetstream::PublishMode::Pipelined),
            _ => None,
        };
        let zone = Arc::new(JetStreamZone::connect(cfg).await?);
        let api: Arc<dyn BoundaryApi> =
            Arc::new(Boundary::new(zone.clone(), zone, Limits::default()));
        let (listener, addr) = bsfg_transport_grpc::bind("127.0.0.1:0".parse()?).await?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(bsfg_transport_grpc::serve(
            api,
            ServerConfig::default(),
            listener,
            async {
                let _ = stop_rx.await;
            },
        ));
        let url = format!("grpc://{addr}");
        let (max, lat) = load(
            &url,
            "full",
            opts.facts,
            opts.clients,
            opts.inflight,
            opts.object_bytes,
            None,
        )
        .await?;
        let half = max / 2.0;
        let (paced, plat) = load(
            &url,
            "half",
            opts.facts / 2,
            opts.clients,
            opts.inflight,
            opts.object_bytes,
            Some(half),
        )
        .await?;
        let _ = stop_tx.send(());
        let _ = server.await;
        println!(
            "| {} | {raw:.0} | {max:.0} | {:.2}x | {:.1} | {:.1} | {paced:.0} | {:.1} | {:.1} |",
            if sync_always {
                "sync_interval: always"
            } else {
                "default (lazy)"
            },
            max / raw,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&plat, 0.5),
            pct(&plat, 0.99),
        );
    }
    Ok(())
}
