//! `bsfg bench transports`: replication over gRPC (TCP) and QUIC (UDP) across the same
//! emulated link (bsfg-testkit's namespace emulator), for a matrix of round-trip times
//! and loss rates.
//!
//! The source zone is a real `bsfg run` inside the emulator's namespace, listening on
//! grpcs:// and on two quic:// ports (BBR and CUBIC: the sender of the facts is the
//! source, so its controller is the one that matters); its nats-server sits on the
//! clean side channel and holds one backlog. Each cell pulls that backlog through a
//! link of its own (its own consumer, a fresh destination nats-server) for a fixed
//! window and reports facts replicated per second, the p99 time from a FetchFacts
//! request to the ConfirmReceipt of that page, and the IP bytes that crossed the
//! emulated link. Needs root (network namespaces and TUN devices).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bsfg_core::link::{Link, LinkSettings};
use bsfg_core::observe::{Observed, Observer, Op, Outcome};
use bsfg_core::{Boundary, BoundaryApi, BoundaryError, Limits};
use bsfg_sink_jetstream::baseline::percentile_ms as pct;
use bsfg_sink_jetstream::{JetStreamConfig, JetStreamZone};
use bsfg_testkit::fixtures::padded_fact;
use bsfg_testkit::netem::EmulatedLink;
use bsfg_testkit::pki::Pki;
use bsfg_testkit::udp_relay::Profile;
use bsfg_testkit::{NatsOptions, NatsServer};
use bsfg_tls::{ClientTls, TlsStats};

/// Options of `bsfg bench transports`.
#[derive(Debug, clap::Args)]
pub struct TransportsBench {
    /// Round-trip times to emulate, in ms (half each way).
    #[arg(long, value_delimiter = ',', default_value = "1,50,200")]
    rtt_ms: Vec<u64>,
    /// Loss rates to emulate, in percent, the same both ways.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5,10")]
    loss_pct: Vec<f64>,
    /// Measuring window of each cell.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Facts in the source's backlog (enough for the fastest cell's window).
    #[arg(long, default_value_t = 150_000)]
    facts: usize,
    /// Size of each fact's canonical object_json.
    #[arg(long, default_value_t = 256)]
    object_bytes: usize,
    /// Facts per FetchFacts page.
    #[arg(long, default_value_t = 500)]
    page_size: u32,
    /// The link's pages between fetch and confirm to compare (each value is a row of
    /// every cell).
    #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
    pages_in_flight: Vec<usize>,
    /// Bandwidth cap of the emulated link in Mbit/s, each way (default: none).
    #[arg(long)]
    rate_mbps: Option<f64>,
    /// Seed of the emulated link's randomness.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The transports compared, with the source listener each one dials.
pub(super) const TRANSPORTS: [(&str, &str, u16); 3] = [
    ("gRPC (TCP, cubic)", "grpcs", 7443),
    ("QUIC (bbr)", "quic", 7443),
    ("QUIC (cubic)", "quic", 7444),
];

/// Times each page from its FetchFacts request to the ConfirmReceipt that covers it
/// (an observer of the link's source).
#[derive(Default)]
struct Timed {
    open: Mutex<VecDeque<(Instant, u64)>>,
    samples: Mutex<Vec<Duration>>,
    /// When the last confirm returned: the end of the completed work.
    last_confirm: Mutex<Option<Instant>>,
}

impl Observer for Timed {
    fn observed(&self, op: Op, elapsed: Duration, outcome: Result<Outcome<'_>, &BoundaryError>) {
        let now = Instant::now();
        match (op, outcome) {
            (Op::Fetch { .. }, Ok(Outcome::Page(page))) => {
                if let (Some(last), Ok(mut open)) = (page.facts.last(), self.open.lock()) {
                    open.push_back((now - elapsed, last.offset));
                }
            }
            (Op::Confirm { offset }, Ok(_)) => {
                if let Ok(mut l) = self.last_confirm.lock() {
                    *l = Some(now);
                }
                if let (Ok(mut open), Ok(mut samples)) = (self.open.lock(), self.samples.lock()) {
                    while open.front().is_some_and(|(_, last)| *last <= offset) {
                        if let Some((t, _)) = open.pop_front() {
                            samples.push(now - t);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// What one cell measured.
pub(super) struct Cell {
    /// Confirmed facts per second.
    pub facts_per_sec: f64,
    pub p99_ms: f64,
    pub pages: usize,
    /// Facts confirmed.
    pub confirmed: u64,
    /// IP bytes across the emulated link, both ways.
    pub wire_bytes: u64,
    /// Failed fetches, appends and confirms.
    pub failures: u64,
    /// Artifact bytes the link received.
    pub artifact_bytes: u64,
    /// Artifacts copied whole.
    pub artifacts_copied: u64,
    /// Artifact copies that failed (and resumed).
    pub artifact_failures: u64,
    /// How long the cell ran.
    pub elapsed: Duration,
}

/// The source zone's gateway config: grpcs and two quic listeners, the consumers
/// (name, class) of the cells, and a grant that reads every bucket.
fn source_config(nats_url: &str, consumers: &[(String, &str)], page_size: u32) -> String {
    let limit = page_size.max(1000);
    let mut c = format!(
        r#"[zone]
name = "source"

[limits]
max_fetch_limit = {limit}

[sink]
type = "jetstream"
url = "{nats_url}"
domain = "source"

[[listeners]]
url = "grpcs://0.0.0.0:7443"

[[listeners]]
url = "quic://0.0.0.0:7443"
quic = {{ congestion = "bbr" }}

[[listeners]]
url = "quic://0.0.0.0:7444"
quic = {{ congestion = "cubic" }}

[tls]
cert = "source-bsfg.pem"
key = "source-bsfg.key"
trust = {{ bench = "bench-ca.pem" }}

[[peers]]
identity = "bench-bsfg"
ca = "bench"
consumers = ["*"]
read_buckets = ["*"]
"#
    );
    for (name, class) in consumers {
        c += &format!(
            "\n[[consumers]]\nname = \"{name}\"\nclass = \"{class}\"\nack_wait = \"120s\"\n"
        );
    }
    c
}

/// The source zone: a real `bsfg run` inside the emulator's namespace (grpcs and two
/// quic listeners), its nats-server on the clean side channel, and the client
/// certificate files that dial it. Dropping it stops the gateway.
pub(super) struct Source {
    gateway: std::process::Child,
    /// The source's nats-server (clean side channel).
    pub nats: NatsServer,
    client_files: bsfg_tls::TlsFiles,
    tls_stats: Arc<TlsStats>,
    _dir: tempfile::TempDir,
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.gateway.kill();
        let _ = self.gateway.wait();
    }
}

impl Source {
    /// Starts the source zone behind `link` with `consumers` (name, class).
    pub(super) fn start(
        link: &EmulatedLink,
        consumers: &[(String, &str)],
        page_size: u32,
    ) -> anyhow::Result<Source> {
        let dir = tempfile::tempdir()?;
        let source_pki = Pki::new(dir.path(), "source")?;
        let bench_pki = Pki::new(dir.path(), "bench")?;
        source_pki.issue("source-bsfg")?;
        let client_files = bench_pki.files("bench-bsfg", &[&source_pki])?;
        let nats = NatsServer::start_with(NatsOptions {
            domain: Some("source".into()),
            listen_host: Some(link.side_near_addr().into()),
            ..Default::default()
        })
        .context("starting nats-server (run scripts/setup.sh)")?;
        let config = dir.path().join("source.toml");
        std::fs::write(&config, source_config(&nats.url(), consumers, page_size))?;
        let exe = std::env::current_exe()?;
        let log = std::fs::File::create(dir.path().join("source.log"))?;
        let mut gateway = link
            .command(&exe)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting the source gateway in the namespace")?;
        let ready = {
            use std::io::BufRead as _;
            let out = gateway.stdout.take().context("gateway stdout")?;
            std::io::BufReader::new(out).lines().next()
        };
        if !ready.is_some_and(|l| l.is_ok_and(|l| l.contains("ready"))) {
            let _ = gateway.kill();
            let _ = gateway.wait();
            anyhow::bail!(
                "the source gateway did not start:\n{}",
                std::fs::read_to_string(dir.path().join("source.log")).unwrap_or_default()
            );
        }
        Ok(Source {
            gateway,
            nats,
            client_files,
            tls_stats: Arc::new(TlsStats::default()),
            _dir: dir,
        })
    }

    /// The source's engine, in process, over the clean side channel (to load it).
    pub(super) async fn engine(&self) -> anyhow::Result<Arc<Boundary>> {
        let mut cfg = JetStreamConfig::new("source", self.nats.url());
        cfg.domain = Some("source".into());
        let zone = Arc::new(JetStreamZone::connect(cfg).await?);
        Ok(Arc::new(Boundary::new(
            zone.clone(),
            zone,
            Limits::default(),
        )))
    }

    /// A client of the source across the emulated link, by transport; the QUIC one
    /// also as itself, to close its connection after the cell.
    pub(super) fn dial(
        &self,
        link: &EmulatedLink,
        (name, scheme, port): (&str, &str, u16),
    ) -> anyhow::Result<(
        Arc<dyn BoundaryApi>,
        Option<bsfg_transport_quic::QuicClient>,
    )> {
        let tls = ClientTls::new(
            self.client_files.clone(),
            alpn(&crate::registry::builtin(), scheme),
            format!("bench:{name}"),
            self.tls_stats.clone(),
        )?;
        let url = format!("{scheme}://{}:{port}", link.far_addr());
        Ok(if scheme == "quic" {
            let c = bsfg_transport_quic::QuicClient::new(
                &url,
                bsfg_transport_quic::ClientConfig {
                    request_timeout: Duration::from_secs(60),
                    ..Default::default()
                },
                tls,
                Some("source-bsfg".into()),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            (Arc::new(c.clone()), Some(c))
        } else {
            let c = bsfg_transport_grpc::GrpcClient::connect_lazy_tls(
                &url,
                bsfg_transport_grpc::ClientConfig {
                    request_timeout: Duration::from_secs(60),
                    ..Default::default()
                },
                tls,
                Some("source-bsfg".into()),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            (Arc::new(c), None)
        })
    }
}

/// Runs the matrix and prints one markdown table.
pub async fn transports(opts: TransportsBench) -> anyhow::Result<()> {
    let cells =
        opts.rtt_ms.len() * opts.loss_pct.len() * opts.pages_in_flight.len() * TRANSPORTS.len();
    let link = EmulatedLink::create(Profile::default(), Profile::default(), opts.seed)
        .context("the link emulator needs root (network namespaces, TUN devices)")?;
    let consumers: Vec<(String, &str)> = (0..cells)
        .map(|i| (format!("cell-{i}"), "operational"))
        .collect();
    let source = Source::start(&link, &consumers, opts.page_size)?;
    // Ctrl-C still removes the namespace and stops the source gateway.
    tokio::select! {
        r = matrix(&opts, &link, &source) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    }
}

async fn matrix(opts: &TransportsBench, link: &EmulatedLink, site: &Source) -> anyhow::Result<()> {
    // The backlog, loaded once through the engine on the clean side channel.
    load_facts(&*site.engine().await?, opts.facts, opts.object_bytes).await?;
    let stored = serde_json::to_vec(&padded_fact("net-0", 0, opts.object_bytes))?.len();

    println!(
        "# bsfg bench transports: a link pulls a backlog of {} facts (stored record {stored} B, page {}) across the emulated link for {:?} per cell; {}",
        opts.facts,
        opts.page_size,
        opts.window,
        opts.rate_mbps
            .map_or("no bandwidth cap".to_owned(), |r| format!(
                "{r} Mbit/s each way"
            ))
    );
    println!(
        "| RTT | loss | pages in flight | transport | facts/s | vs gRPC | p99 fetch-to-confirm ms | pages | bytes on the wire | bytes/fact | failed calls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut n = 0;
    for &rtt in &opts.rtt_ms {
        for &loss in &opts.loss_pct {
            link.set_profiles(
                profile(rtt, loss, opts.rate_mbps),
                profile(rtt, loss, opts.rate_mbps),
            );
            for &in_flight in &opts.pages_in_flight {
                let mut grpc_rate = None;
                for transport in TRANSPORTS {
                    let name = transport.0;
                    let (api, quic) = site.dial(link, transport)?;
                    let cell = run_cell(
                        link,
                        api,
                        &format!("cell-{n}"),
                        (opts.page_size, in_flight),
                        opts.window,
                        None,
                    )
                    .await?;
                    n += 1;
                    // Close the connection so that nothing of this cell still crosses
                    // the link during the next one.
                    if let Some(q) = quic {
                        q.close().await;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let vs = vs_grpc(&mut grpc_rate, cell.facts_per_sec);
                    println!(
                        "| {rtt} ms | {loss}% | {in_flight} | {name} | {:.0} | {vs} | {} | {} | {:.1} MB | {} | {} |",
                        cell.facts_per_sec,
                        if cell.pages == 0 {
                            "no page".to_owned()
                        } else {
                            format!("{:.0}", cell.p99_ms)
                        },
                        cell.pages,
                        cell.wire_bytes as f64 / 1e6,
                        if cell.confirmed > 0 {
                            format!("{:.0}", cell.wire_bytes as f64 / cell.confirmed as f64)
                        } else {
                            "-".to_owned()
                        },
                        cell.failures,
                    );
                }
            }
        }
    }
    Ok(())
}

/// `rate` against the gRPC row of the same cell: the first rate of a cell is gRPC's
/// (kept in `grpc`), the others are shown as a ratio to it.
pub(super) fn vs_grpc(grpc: &mut Option<f64>, rate: f64) -> String {
    match *grpc {
        None => {
            *grpc = Some(rate);
            "1.00x".to_owned()
        }
        Some(g) if g > 0.0 => format!("{:.2}x", rate / g),
        Some(_) => "(gRPC: 0)".to_owned(),
    }
}

/// The emulated link's profile for a round-trip time and a loss rate (both ways).
pub(super) fn profile(rtt_ms: u64, loss_pct: f64, rate_mbps: Option<f64>) -> Profile {
    Profile {
        loss: loss_pct / 100.0,
        delay: Duration::from_micros(rtt_ms * 500),
        rate_bps: rate_mbps.map(|r| (r * 1e6) as u64),
        ..Profile::default()
    }
}

/// Loads `n` facts of `object_bytes` into the source, 1024 in flight.
pub(super) async fn load_facts(
    source: &Boundary,
    n: usize,
    object_bytes: usize,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let m = padded_fact(&format!("net-{i}"), i, object_bytes);
            async move { source.append_fact(m).await }
        })
        .buffer_unordered(1024)
        .collect()
        .await;
    for r in results {
        r.map_err(|e| anyhow::anyhow!("loading the backlog: {e}"))?;
    }
    Ok(())
}

/// One cell: a link from `source` (an already dialed transport client) into a fresh
/// destination zone, with pages of `page_size` and `pages_in_flight`, for `window` or
/// until it has confirmed `until`.
pub(super) async fn run_cell(
    link: &EmulatedLink,
    source: Arc<dyn BoundaryApi>,
    consumer: &str,
    (page_size, pages_in_flight): (u32, usize),
    window: Duration,
    until: Option<u64>,
) -> anyhow::Result<Cell> {
    let dest_nats = NatsServer::start_with(NatsOptions {
        domain: Some("dest".into()),
        ..Default::default()
    })?;
    let mut cfg = JetStreamConfig::new("dest", dest_nats.url());
    cfg.domain = Some("dest".into());
    cfg.monitor_url = Some(dest_nats.monitor_url());
    let zone = Arc::new(JetStreamZone::connect(cfg).await?);
    let mut limits = Limits::default();
    limits.max_fetch_limit = limits.max_fetch_limit.max(page_size);
    let dest = Arc::new(Boundary::new(zone.clone(), zone, limits));
    let timed = Arc::new(Timed::default());
    let (l, handle) = Link::new(
        LinkSettings {
            name: format!("bench-{consumer}"),
            local_zone: "dest".into(),
            source_zone: "source".into(),
            consumer: consumer.to_owned(),
            page_size,
            pages_in_flight,
            wait: Duration::from_secs(1),
            streams: vec![],
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            request_timeout: Duration::from_secs(60),
        },
        Arc::new(Observed::new(source, timed.clone())),
        dest,
    );
    let bytes_before = link.bytes_on_wire();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let task = tokio::spawn(l.run(rx));
    while start.elapsed() < window {
        if until.is_some_and(|u| handle.status().frontier >= u) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed();
    let s = handle.status();
    let wire_bytes = link.bytes_on_wire() - bytes_before;
    stop.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let mut samples = timed.samples.lock().map(|s| s.clone()).unwrap_or_default();
    samples.sort();
    // Confirmed facts over the time it took to confirm them: a page still in flight
    // at the end of the window neither counts nor stretches the time.
    let done = timed
        .last_confirm
        .lock()
        .ok()
        .and_then(|l| *l)
        .map_or(0.0, |t| (t - start).as_secs_f64());
    Ok(Cell {
        facts_per_sec: if done > 0.0 {
            s.frontier as f64 / done
        } else {
            0.0
        },
        p99_ms: pct(&samples, 0.99),
        pages: samples.len(),
        confirmed: s.frontier,
        wire_bytes,
        failures: s.fetch_failures + s.append_failures + s.confirm_failures,
        artifact_bytes: s.artifact_bytes,
        artifacts_copied: s.artifacts_copied,
        artifact_failures: s.artifact_failures,
        elapsed,
    })
}

/// The ALPN protocols of a registered scheme (none for a scheme without TLS).
fn alpn(registry: &bsfg_core::component::Registry, scheme: &str) -> Vec<Vec<u8>> {
    match registry.scheme(scheme).map(|(_, s)| s.security) {
        Some(bsfg_core::component::Security::MutualTls { alpn }) => vec![alpn.to_vec()],
        _ => Vec::new(),
    }
}
