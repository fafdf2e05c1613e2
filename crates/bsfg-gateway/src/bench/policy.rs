//! `bsfg bench policy`: what a WASM policy costs.
//!
//! 1. Per-fact cost of the allow-by-label example policy (`allow_labels.wasm`) at
//!    batch sizes 1, 100 and 1000 on one thread, beside the same check written in
//!    Rust on the host in the same run (the floor: what deciding costs without the
//!    sandbox crossing, the lowering of every field into the guest and the guest's
//!    own work).
//! 2. Each kind of policy side by side, the same object_json check (a required
//!    field, the object parsed as JSON): the no_std SDK (`json_fields.wasm`),
//!    ordinary std Rust with wit-bindgen and WASI (`json_rules.wasm`) and Python
//!    through componentize-py (`site_filter.wasm`, CPython inside).
//! 3. Replication of one backlog from zone A to fresh zones over a gRPC link, with no
//!    intake policy, with the SDK policy and with the std policy on the link's intake
//!    chain, alternating (none, SDK, std, std, SDK, none) so that none gets the
//!    warmer machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bsfg_core::link::{Intake, Link, LinkSettings};
use bsfg_core::{
    Boundary, Candidate, Hook, Limits, Message, Policy, PolicyChain, PolicyContext, Verdict,
};
use bsfg_policy_wasm::{PolicyConfig, WasmPolicy};
use bsfg_sink_jetstream::{ConsumerConfig, JetStreamConfig, JetStreamZone};
use bsfg_testkit::fixtures::padded_fact;
use bsfg_testkit::{NatsOptions, NatsServer};
use bsfg_transport_grpc::{ClientConfig, GrpcClient};

/// Options of `bsfg bench policy`.
#[derive(Debug, clap::Args)]
pub struct PolicyBench {
    /// The allow-by-label policy (built by scripts/setup.sh).
    #[arg(
        long,
        default_value = "plugins/target/wasm32-wasip2/release/allow_labels.wasm"
    )]
    module: std::path::PathBuf,
    /// The object_json check written with the no_std SDK.
    #[arg(
        long,
        default_value = "plugins/target/wasm32-wasip2/release/json_fields.wasm"
    )]
    sdk_json_module: std::path::PathBuf,
    /// The same check in ordinary std Rust (wit-bindgen + serde_json, WASI).
    #[arg(
        long,
        default_value = "plugins/std/target/wasm32-wasip2/release/json_rules.wasm"
    )]
    std_json_module: std::path::PathBuf,
    /// The same check in Python (componentize-py).
    #[arg(long, default_value = "plugins/python/target/site_filter.wasm")]
    python_module: std::path::PathBuf,
    /// Facts decided per batch size by the Python policy (slower per fact).
    #[arg(long, default_value_t = 20_000)]
    python_decisions: usize,
    /// Facts decided per batch size for the per-fact cost.
    #[arg(long, default_value_t = 200_000)]
    decisions: usize,
    /// Backlog replicated per run (four runs).
    #[arg(long, default_value_t = 50_000)]
    facts: usize,
    /// Size of each fact's canonical object_json.
    #[arg(long, default_value_t = 256)]
    object_bytes: usize,
    /// Facts per FetchFacts page of the link.
    #[arg(long, default_value_t = 1000)]
    page_size: u32,
}

fn fact(i: usize, object_bytes: usize) -> Message {
    let mut m = padded_fact(&format!("pol-{i}"), i, object_bytes);
    m.envelope.labels.insert(
        "site".into(),
        if i.is_multiple_of(2) {
            "PlantA"
        } else {
            "PlantB"
        }
        .into(),
    );
    m
}

fn load(
    name: &str,
    module: &std::path::Path,
    settings: &[(&str, &str)],
) -> anyhow::Result<WasmPolicy> {
    anyhow::ensure!(
        module.is_file(),
        "{} not found: run scripts/setup.sh from the repository root",
        module.display()
    );
    let mut cfg = PolicyConfig::new(name, module);
    cfg.settings = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    cfg.instances = 4;
    // Room for an interpreter (the Python policy embeds CPython).
    cfg.memory_bytes = 64 << 20;
    cfg.timeout = Duration::from_secs(5);
    Ok(WasmPolicy::load(cfg)?)
}

fn allow_labels(module: &std::path::Path) -> anyhow::Result<WasmPolicy> {
    load(
        "allow-labels",
        module,
        &[("label", "site"), ("values", "PlantA,PlantB")],
    )
}

/// Nanoseconds per fact deciding `facts` in batches of `batch` with `decide`.
fn per_fact(
    facts: &[Message],
    batch: usize,
    total: usize,
    mut decide: impl FnMut(&[Candidate<'_>]) -> Vec<Verdict>,
) -> anyhow::Result<f64> {
    let cands: Vec<Candidate<'_>> = facts
        .iter()
        .map(|m| Candidate {
            message: m,
            source_offset: Some(1),
        })
        .collect();
    let rounds = (total / batch).max(1);
    // Warm up: instance, caches, allocator.
    for chunk in cands.chunks(batch).take(10) {
        decide(chunk);
    }
    let t = Instant::now();
    let mut denied = 0usize;
    for r in 0..rounds {
        let start = (r * batch) % (cands.len() - batch + 1);
        let v = decide(&cands[start..start + batch]);
        anyhow::ensure!(v.len() == batch, "{} verdicts for {batch}", v.len());
        denied += v.iter().filter(|v| **v != Verdict::Allow).count();
    }
    let ns = t.elapsed().as_nanos() as f64 / (rounds * batch) as f64;
    anyhow::ensure!(
        denied == 0,
        "{denied} facts denied: the bench facts must all pass"
    );
    Ok(ns)
}

/// One zone's log behind the engine.
async fn zone(
    nats: &NatsServer,
    name: &str,
    consumers: &[&str],
    limits: &Limits,
) -> anyhow::Result<Boundary> {
    let mut cfg = JetStreamConfig::new(name, nats.url());
    cfg.domain = Some(name.into());
    cfg.monitor_url = Some(nats.monitor_url());
    cfg.consumers = consumers
        .iter()
        .map(|c| ConsumerConfig::new(*c, "operational"))
        .collect();
    let z = Arc::new(JetStreamZone::connect(cfg).await?);
    Ok(Boundary::new(z.clone(), z, limits.clone()))
}

/// Drains `consumer` of the source at `url` into a fresh zone; seconds taken.
async fn drain(
    url: &str,
    consumer: &str,
    intake: Intake,
    n: usize,
    page_size: u32,
    limits: &Limits,
) -> anyhow::Result<f64> {
    let nats = NatsServer::start_with(NatsOptions {
        domain: Some("zone_b".into()),
        ..Default::default()
    })?;
    let dest = zone(&nats, "zone_b", &[], limits).await?;
    let source = GrpcClient::connect_lazy(url, ClientConfig::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (link, handle) = Link::new(
        LinkSettings {
            name: consumer.into(),
            local_zone: "zone_b".into(),
            source_zone: "zone_a".into(),
            consumer: consumer.into(),
            page_size,
            pages_in_flight: bsfg_core::link::PAGES_IN_FLIGHT,
            wait: Duration::from_secs(1),
            streams: vec![],
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
        },
        Arc::new(source),
        Arc::new(dest),
    );
    let link = link.with_intake(intake);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let task = tokio::spawn(link.run(rx));
    loop {
        let s = handle.status();
        anyhow::ensure!(
            s.fetch_failures + s.append_failures + s.confirm_failures < 100,
            "link keeps failing: {s:?}"
        );
        anyhow::ensure!(s.quarantined == 0, "the policy denied facts: {s:?}");
        if s.frontier as usize >= n {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(900),
            "drain did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    stop.send_replace(true);
    let _ = task.await;
    Ok(secs)
}

/// Runs `bsfg bench policy` and prints markdown tables.
pub async fn policy(opts: PolicyBench) -> anyhow::Result<()> {
    let policy = Arc::new(allow_labels(&opts.module)?);
    println!(
        "# bsfg bench policy: allow-by-label ({}, {}), facts with object_json of {} B and 2 labels",
        opts.module.display(),
        policy.sha256(),
        opts.object_bytes
    );
    let facts: Vec<Message> = (0..2000).map(|i| fact(i, opts.object_bytes)).collect();
    let ctx = PolicyContext {
        hook: Hook::Intake,
        zone: "zone_b",
        peer: "zone-a-bsfg",
        link: Some("bench"),
        source_zone: Some("zone_a"),
    };
    let values = ["PlantA".to_owned(), "PlantB".to_owned()];
    println!(
        "\n| batch | WASM ns/fact | WASM facts/s (1 thread) | host Rust check ns/fact | WASM / host |"
    );
    println!("|---|---|---|---|---|");
    for batch in [1usize, 100, 1000] {
        let wasm = per_fact(&facts, batch, opts.decisions, |c| {
            policy.decide_blocking(&ctx, c)
        })?;
        let host = per_fact(&facts, batch, opts.decisions, |c| {
            c.iter()
                .map(|c| match c.message.envelope.labels.get("site") {
                    Some(v) if values.contains(v) => Verdict::Allow,
                    other => Verdict::Deny(bsfg_core::Denial {
                        policy: "host".into(),
                        reason: format!("label `site` is {other:?}"),
                        module_sha256: String::new(),
                    }),
                })
                .collect()
        })?;
        println!(
            "| {batch} | {wasm:.0} | {:.0} | {host:.1} | {:.0}x |",
            1e9 / wasm,
            wasm / host.max(0.1)
        );
    }

    // Each kind, the same check: `operator` required in object_json.
    let sdk = Arc::new(load(
        "json-sdk",
        &opts.sdk_json_module,
        &[("require", "operator")],
    )?);
    let std_policy = Arc::new(load(
        "json-std",
        &opts.std_json_module,
        &[("require", "operator")],
    )?);
    let python = load(
        "json-python",
        &opts.python_module,
        &[("require", "operator")],
    )?;
    // On a thread of its own, outside the runtime, as a gateway calls a policy
    // (inside block_in_place): a WASI guest is then called in place.
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<()> {
            println!(
                "\n| batch | no_std SDK (json_fields) ns/fact | std Rust + WASI (json_rules) ns/fact | Python (site_filter) ns/fact | std / SDK | Python / SDK |"
            );
            println!("|---|---|---|---|---|---|");
            for batch in [1usize, 100, 1000] {
                let a = per_fact(&facts, batch, opts.decisions, |c| {
                    sdk.decide_blocking(&ctx, c)
                })?;
                let b = per_fact(&facts, batch, opts.decisions, |c| {
                    std_policy.decide_blocking(&ctx, c)
                })?;
                let p = per_fact(&facts, batch, opts.python_decisions, |c| {
                    python.decide_blocking(&ctx, c)
                })?;
                println!(
                    "| {batch} | {a:.0} | {b:.0} | {p:.0} | {:.2}x | {:.1}x |",
                    b / a.max(0.1),
                    p / a.max(0.1)
                );
            }
                Ok(())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the per-fact thread panicked"))?
    })?;

    // Replication with and without the policies at intake.
    let n = opts.facts;
    let mut limits = Limits::default();
    limits.max_fetch_limit = limits.max_fetch_limit.max(opts.page_size);
    let a_nats = NatsServer::start_with(NatsOptions {
        domain: Some("zone_a".into()),
        ..Default::default()
    })
    .context("starting nats-server A (run scripts/setup.sh)")?;
    let consumers = ["run-1", "run-2", "run-3", "run-4", "run-5", "run-6"];
    let a_api = Arc::new(zone(&a_nats, "zone_a", &consumers, &limits).await?);
    crate::bench::pipeline::load_backlog(&a_api, n, |i| fact(i, opts.object_bytes)).await?;
    let served = crate::bench::pipeline::Served::start(a_api.clone()).await?;
    let url = served.url.clone();
    let intake_of = |p: &Arc<WasmPolicy>| Intake {
        chain: PolicyChain::new(vec![p.clone() as Arc<dyn Policy>]),
        zone: "zone_b".into(),
        peer: "zone-a-bsfg".into(),
    };
    // 0: none, 1: the allow-by-label SDK policy, 2: the std json policy.
    let mut rates: [Vec<f64>; 3] = Default::default();
    for (consumer, kind) in consumers.iter().zip([0usize, 1, 2, 2, 1, 0]) {
        let intake = match kind {
            1 => intake_of(&policy),
            2 => intake_of(&std_policy),
            _ => Intake::default(),
        };
        let secs = drain(&url, consumer, intake, n, opts.page_size, &limits).await?;
        let rate = n as f64 / secs;
        println!(
            "(run {consumer}: {} at intake, {rate:.0} facts/s)",
            ["no policy", "allow-by-label (SDK)", "json-rules (std Rust)"][kind]
        );
        rates[kind].push(rate);
    }
    served.stop().await;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (none, with, with_std) = (mean(&rates[0]), mean(&rates[1]), mean(&rates[2]));
    println!(
        "\n| replication of {n} facts over gRPC, page {} | facts/s (mean of 2 runs) | vs no policy |",
        opts.page_size
    );
    println!("|---|---|---|");
    println!("| no intake policy | {none:.0} | 1.00x |");
    println!(
        "| allow-by-label WASM policy (no_std SDK) at intake | {with:.0} | {:.2}x |",
        with / none
    );
    println!(
        "| json-rules WASM policy (std Rust, WASI) at intake | {with_std:.0} | {:.2}x |",
        with_std / none
    );
    let s = policy.stats();
    println!(
        "(policy: {} batches, {} allowed, {} denied, {} instances made, faults {:?})",
        s.batches, s.allowed, s.denied, s.instantiations, s.faults
    );
    Ok(())
}
