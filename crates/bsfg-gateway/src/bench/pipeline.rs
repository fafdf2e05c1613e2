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
    /// Facts of the bulk comparison: appended by the engine in process, then by
    /// `bsfg append --file` (this binary, as a producer runs it) through the
    /// gateway. 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    file_facts: usize,
    /// Instead: a zone on a three-node JetStream cluster (replicas = 3) served by
    /// this many gateways at once (each its own zone store and gRPC listener, in this
    /// process), e.g. `1,2,3`; the clients are spread over the gateways.
    #[arg(long, value_delimiter = ',')]
    cluster_gateways: Vec<usize>,
}

/// A zone's API served over plaintext gRPC on a free loopback port, in process.
pub(crate) struct Served {
    /// `grpc://127.0.0.1:<port>`.
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), bsfg_transport_grpc::ServeError>>,
}

impl Served {
    /// Serves `api` (local callers, full access) until [`Served::stop`].
    pub async fn start(api: Arc<dyn BoundaryApi>) -> anyhow::Result<Served> {
        let (listener, addr) = bsfg_transport_grpc::bind("127.0.0.1:0".parse()?).await?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(bsfg_transport_grpc::serve(
            bsfg_core::Gate::local_only(api),
            ServerConfig::default(),
            bsfg_transport_grpc::Incoming::Plain(listener),
            Default::default(),
            bsfg_core::component::Readiness::always(),
            async {
                let _ = stop_rx.await;
            },
        ));
        Ok(Served {
            url: format!("grpc://{addr}"),
            stop,
            task,
        })
    }

    /// Stops serving once the calls in flight are answered.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Appends facts `0..n` (built by `fact`) through `api`, 1024 at a time.
pub(crate) async fn load_backlog(
    api: &Arc<Boundary>,
    n: usize,
    fact: impl Fn(usize) -> bsfg_core::Message,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let m = fact(i);
            async move { api.append_fact(m).await }
        })
        .buffer_unordered(1024)
        .collect()
        .await;
    for r in results {
        r.map_err(|e| anyhow::anyhow!("loading zone A: {e}"))?;
    }
    Ok(())
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
    if !opts.cluster_gateways.is_empty() {
        return cluster_gateways(&opts).await;
    }
    let stored = serde_json::to_vec(&bench_fact("bench-0", 0, opts.object_bytes))?.len();
    println!(
        "# bsfg bench append: {} facts, {} gRPC clients x {} in flight, object_json {} B (stored record {stored} B)",
        opts.facts, opts.clients, opts.inflight, opts.object_bytes
    );
    println!(
        "| nats-server flush | raw publish msg/s | gRPC AppendFact facts/s | ratio | p50 ms | p99 ms | at half rate: facts/s | p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut bulks = Vec::new();
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
        let engine = Arc::new(Boundary::new(zone.clone(), zone, Limits::default()));
        let api: Arc<dyn BoundaryApi> = engine.clone();
        let served = Served::start(api).await?;
        let url = served.url.clone();
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
        let bulk = if opts.file_facts > 0 {
            Some(
                bulk(
                    &engine,
                    &url,
                    opts.file_facts,
                    opts.object_bytes,
                    sync_always,
                )
                .await?,
            )
        } else {
            None
        };
        served.stop().await;
        bulks.push((sync_always, bulk));
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
    if opts.file_facts > 0 {
        println!();
        println!(
            "bulk: {} facts appended by the engine in process (1024 in flight), then by `bsfg append --file` through the gateway (AppendFacts calls of 500, 1000 facts in flight)",
            opts.file_facts
        );
        println!("| nats-server flush | engine facts/s | bsfg append --file facts/s | ratio |");
        println!("|---|---|---|---|");
        for (sync_always, b) in bulks {
            if let Some((engine, file)) = b {
                println!(
                    "| {} | {engine:.0} | {file:.0} | {:.2}x |",
                    if sync_always {
                        "sync_interval: always"
                    } else {
                        "default (lazy)"
                    },
                    file / engine
                );
            }
        }
    }
    Ok(())
}

/// Appends into one zone on a three-node cluster through 1, 2, 3... gateways.
async fn cluster_gateways(opts: &AppendBench) -> anyhow::Result<()> {
    println!(
        "# bsfg bench append --cluster-gateways: {} facts per row into one zone on a three-node JetStream cluster (replicas = 3, sync_interval: always), {} gRPC clients x {} in flight spread over the gateways, object_json {} B",
        opts.facts, opts.clients, opts.inflight, opts.object_bytes
    );
    println!("| gateways | facts/s | vs one gateway | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    let nodes = bsfg_testkit::start_cluster(3, NatsOptions::default())
        .context("starting a three-node cluster (run scripts/setup.sh)")?;
    let urls = nodes
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let mut one = None;
    for (row, &g) in opts.cluster_gateways.iter().enumerate() {
        anyhow::ensure!(g >= 1, "--cluster-gateways: at least 1");
        let mut served = Vec::new();
        for _ in 0..g {
            let mut cfg = JetStreamConfig::new("bench", urls.clone());
            cfg.replicas = 3;
            // Each gateway keeps its own look-up (in memory here) and writer number.
            cfg.index_path = None;
            let deadline = Instant::now() + Duration::from_secs(60);
            let zone = loop {
                match JetStreamZone::connect(cfg.clone()).await {
                    Ok(z) => break Arc::new(z),
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(error = %e, "cluster not ready yet");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let api: Arc<dyn BoundaryApi> =
                Arc::new(Boundary::new(zone.clone(), zone, Limits::default()));
            served.push(Served::start(api).await?);
        }
        let start = Instant::now();
        let names: Vec<String> = (0..g).map(|i| format!("c{row}g{i}")).collect();
        let runs = served.iter().zip(&names).map(|(s, name)| {
            load(
                &s.url,
                name,
                opts.facts / g,
                (opts.clients / g).max(1),
                opts.inflight,
                opts.object_bytes,
                None,
            )
        });
        let results = futures::future::try_join_all(runs).await?;
        let rate = (opts.facts / g * g) as f64 / start.elapsed().as_secs_f64();
        let mut lat: Vec<Duration> = results.into_iter().flat_map(|(_, l)| l).collect();
        lat.sort();
        let base = *one.get_or_insert(rate);
        println!(
            "| {g} | {rate:.0} | {:.2}x | {:.1} | {:.1} |",
            rate / base,
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
        for s in served {
            s.stop().await;
        }
    }
    Ok(())
}

/// The engine's own append rate (in process, 1024 appends in flight) and what
/// `bsfg append --file` reaches through the gateway, over `n` facts each.
async fn bulk(
    engine: &Arc<Boundary>,
    url: &str,
    n: usize,
    object_bytes: usize,
    sync_always: bool,
) -> anyhow::Result<(f64, f64)> {
    use std::io::Write as _;
    let tag = if sync_always { "always" } else { "lazy" };
    let t = Instant::now();
    load_backlog(engine, n, |i| {
        bench_fact(&format!("engine-{tag}-{i}"), i, object_bytes)
    })
    .await?;
    let engine_rate = n as f64 / t.elapsed().as_secs_f64();
    let path = std::env::temp_dir().join(format!("bsfg-bench-{}-{tag}.jsonl", std::process::id()));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..n {
            serde_json::to_writer(
                &mut f,
                &bench_fact(&format!("file-{tag}-{i}"), i, object_bytes),
            )?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
    }
    let exe = std::env::current_exe()?;
    let t = Instant::now();
    let out = tokio::process::Command::new(exe)
        .args(["--url", url, "append", "--file"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await?;
    let file_rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(path.with_extension("jsonl.bsfg-acked"));
    anyhow::ensure!(
        out.status.success(),
        "bsfg append --file failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((engine_rate, file_rate))
}

/// Options of `bsfg bench replicate`.
#[derive(Debug, clap::Args)]
pub struct ReplicateBench {
    /// Size of the backlog drained from zone A to zone B.
    #[arg(long, default_value_t = 100_000)]
    facts: usize,
    /// Size of each fact's canonical object_json.
    #[arg(long, default_value_t = 256)]
    object_bytes: usize,
    /// Facts per FetchFacts page of the link (and per fetch of the raw baseline).
    #[arg(long, default_value_t = 1000)]
    page_size: u32,
    /// The link's pages between fetch and confirm.
    #[arg(long, default_value_t = bsfg_core::link::PAGES_IN_FLIGHT)]
    pages_in_flight: usize,
    /// Single facts timed across the idle link (append in A until stored in B and
    /// confirmed) after the backlog.
    #[arg(long, default_value_t = 100)]
    idle_samples: usize,
}

async fn wait_until(
    what: &str,
    mut done: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(900);
    while !done().await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} did not finish in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Runs `bsfg bench replicate` and prints a markdown table per flush setting:
/// `sync_interval: always` (what BSFG ships), then the server's lazy default.
pub async fn replicate(opts: ReplicateBench) -> anyhow::Result<()> {
    for sync_always in [true, false] {
        replicate_once(&opts, sync_always).await?;
    }
    Ok(())
}

async fn replicate_once(opts: &ReplicateBench, sync_always: bool) -> anyhow::Result<()> {
    let n = opts.facts;
    let leaf_port = bsfg_testkit::free_port()?;
    let a_nats = NatsServer::start_with(NatsOptions {
        domain: Some("zone_a".into()),
        extra_config: format!("leafnodes {{\n  listen: 127.0.0.1:{leaf_port}\n}}"),
        sync_always,
        ..Default::default()
    })
    .context("starting nats-server A (run scripts/setup.sh)")?;
    let b_nats = NatsServer::start_with(NatsOptions {
        domain: Some("zone_b".into()),
        extra_config: format!(
            "leafnodes {{\n  remotes: [ {{ url: \"nats-leaf://127.0.0.1:{leaf_port}\" }} ]\n}}"
        ),
        sync_always,
        ..Default::default()
    })
    .context("starting nats-server B")?;
    let stored = serde_json::to_vec(&bench_fact("bench-0", 0, opts.object_bytes))?.len();
    println!(
        "# bsfg bench replicate: backlog of {n} facts (stored record {stored} B), zone A -> zone B, two nats-servers with {}, joined by a leaf node for the native baseline",
        if sync_always {
            "sync_interval: always"
        } else {
            "the default lazy flushing"
        }
    );
    let base = bsfg_sink_jetstream::baseline::replication_baselines(
        (&a_nats.url(), "zone_a"),
        (&b_nats.url(), "zone_b"),
        n,
        stored,
        opts.page_size as usize,
    )
    .await
    .map_err(|e| anyhow::anyhow!("baselines: {e}"))?;
    let (raw_publish, native, native_secs, raw_copy) = (
        base.publish_rate,
        base.native_rate,
        base.native_secs,
        base.fetch_publish_rate,
    );

    drop((a_nats, b_nats));

    // BSFG: zone A's log behind a gRPC gateway, zone B pulling with a link. Zones get
    // their own servers, not joined by a leaf node: a leaf node carries plain
    // subjects across, so two zones' streams with the same subjects would both
    // receive (zones talk only through BSFG; their servers are never joined).
    let a_nats = NatsServer::start_with(NatsOptions {
        domain: Some("zone_a".into()),
        sync_always,
        ..Default::default()
    })?;
    let b_nats = NatsServer::start_with(NatsOptions {
        domain: Some("zone_b".into()),
        sync_always,
        ..Default::default()
    })?;
    let mut a_cfg = JetStreamConfig::new("zone_a", a_nats.url());
    a_cfg.domain = Some("zone_a".into());
    a_cfg.monitor_url = Some(a_nats.monitor_url());
    a_cfg.consumers = vec![bsfg_sink_jetstream::ConsumerConfig::new(
        "to-b",
        "operational",
    )];
    let a_zone = Arc::new(JetStreamZone::connect(a_cfg).await?);
    let mut limits = Limits::default();
    limits.max_fetch_limit = limits.max_fetch_limit.max(opts.page_size);
    let a_api = Arc::new(Boundary::new(a_zone.clone(), a_zone, limits.clone()));
    let t = Instant::now();
    load_backlog(&a_api, n, |i| {
        bench_fact(&format!("rep-{i}"), i, opts.object_bytes)
    })
    .await?;
    let load_rate = n as f64 / t.elapsed().as_secs_f64();
    let served = Served::start(a_api.clone()).await?;
    let mut b_cfg = JetStreamConfig::new("zone_b", b_nats.url());
    b_cfg.domain = Some("zone_b".into());
    b_cfg.monitor_url = Some(b_nats.monitor_url());
    let b_zone = Arc::new(JetStreamZone::connect(b_cfg).await?);
    let b_api = Boundary::new(b_zone.clone(), b_zone, limits);
    let source = GrpcClient::connect_lazy(&served.url, ClientConfig::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (link, handle) = bsfg_core::link::Link::new(
        bsfg_core::link::LinkSettings {
            name: "bench".into(),
            local_zone: "zone_b".into(),
            source_zone: "zone_a".into(),
            consumer: "to-b".into(),
            page_size: opts.page_size,
            pages_in_flight: opts.pages_in_flight,
            wait: Duration::from_secs(1),
            streams: vec![],
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
        },
        Arc::new(source),
        Arc::new(b_api),
    );
    let (stop_link, link_rx) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let task = tokio::spawn(link.run(link_rx));
    wait_until("BSFG link", async || {
        let s = handle.status();
        anyhow::ensure!(
            s.fetch_failures + s.append_failures + s.confirm_failures < 100,
            "link keeps failing: {s:?}"
        );
        // Offsets are positions in A's log, not counts: done when every fact is
        // stored in B and the source holds none unconfirmed.
        Ok(s.facts_stored as usize >= n && s.lag_facts == 0 && s.frontier > 0)
    })
    .await?;
    let bsfg_secs = t.elapsed().as_secs_f64();
    let bsfg = n as f64 / bsfg_secs;
    let s = handle.status();

    // An idle link: single facts appended in A one at a time, each timed until the
    // link's frontier covers it (stored in B and confirmed to A).
    let mut crossing = Vec::new();
    for i in 0..opts.idle_samples {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        let target = a_api
            .append_fact(bench_fact(&format!("idle-{i}"), i, opts.object_bytes))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .offset;
        while handle.status().frontier < target {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "idle fact {i} did not cross"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        crossing.push(t.elapsed());
    }
    crossing.sort();
    stop_link.send_replace(true);
    let _ = task.await;
    served.stop().await;

    println!("| path | facts/s | drain time of the backlog | vs native sourcing |");
    println!("|---|---|---|---|");
    println!(
        "| raw JetStream publish into A (loading the baseline backlog) | {raw_publish:.0} | | |"
    );
    println!(
        "| native JetStream sourcing A -> B over a leaf node | {native:.0} | {native_secs:.2} s | 1.00x |"
    );
    println!(
        "| raw JetStream fetch from A + publish to B + ack, page {} | {raw_copy:.0} | {:.2} s | {:.2}x |",
        opts.page_size,
        n as f64 / raw_copy,
        raw_copy / native
    );
    println!(
        "| BSFG link over gRPC (FetchFacts, AppendFact x page, ConfirmReceipt), page {} | {bsfg:.0} | {bsfg_secs:.2} s | {:.2}x |",
        opts.page_size,
        bsfg / native
    );
    println!(
        "idle link, append in A -> stored in B and confirmed: p50 {:.1} ms, p99 {:.1} ms ({} samples)",
        pct(&crossing, 0.5),
        pct(&crossing, 0.99),
        crossing.len()
    );
    println!(
        "(loading zone A through the engine: {load_rate:.0} facts/s; link: {} fetches, {} confirms, {} stored, {} replays, {} failures)",
        s.fetch_requests,
        s.confirm_requests,
        s.facts_stored,
        s.facts_duplicate,
        s.fetch_failures + s.append_failures + s.confirm_failures
    );
    Ok(())
}
