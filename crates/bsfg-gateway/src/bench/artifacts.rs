//! `bsfg bench artifacts`: artifact throughput of a link across the emulated link, for
//! gRPC and QUIC at each round-trip time and loss rate, beside the same link's fact
//! throughput.
//!
//! The source zone is the one of `bsfg bench transports` (a real `bsfg run` inside the
//! emulator's namespace). It holds a backlog of small facts (class `operational`) and
//! `--artifacts` artifacts of `--artifact-mib` MiB, each referenced by one fact (class
//! `documents`). Per cell and transport, a link into a fresh destination zone pulls
//! the documents until every artifact is copied (or the window ends: then what was
//! copied counts), and another pulls the small facts for `--fact-window`. Reported:
//! artifact MiB/s, the ratio to gRPC in the same cell, the IP bytes on the wire per
//! artifact byte, facts/s of the same link, and failed copies (each one resumed).
//! Needs root (network namespaces and TUN devices).

use std::time::Duration;

use anyhow::Context as _;
use bsfg_core::model::ArtifactRef;
use bsfg_core::{BoundaryApi, Envelope, Fact, Message};
use bsfg_testkit::netem::EmulatedLink;
use bsfg_testkit::udp_relay::Profile;
use futures::StreamExt as _;

use super::transports::{Source, TRANSPORTS, load_facts, profile, run_cell, vs_grpc};

/// Options of `bsfg bench artifacts`.
#[derive(Debug, clap::Args)]
pub struct ArtifactsBench {
    /// Round-trip times to emulate, in ms (half each way).
    #[arg(long, value_delimiter = ',', default_value = "1,50,200")]
    rtt_ms: Vec<u64>,
    /// Loss rates to emulate, in percent, the same both ways.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
    loss_pct: Vec<f64>,
    /// Artifacts in the source, each referenced by one fact.
    #[arg(long, default_value_t = 4)]
    artifacts: usize,
    /// Size of each artifact, MiB.
    #[arg(long, default_value_t = 8)]
    artifact_mib: usize,
    /// Longest time an artifact cell may take (what was copied by then counts).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Measuring window of the fact cell beside each artifact cell.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    fact_window: Duration,
    /// Small facts in the source's backlog.
    #[arg(long, default_value_t = 60_000)]
    facts: usize,
    /// Size of each small fact's canonical object_json.
    #[arg(long, default_value_t = 256)]
    object_bytes: usize,
    /// Facts per FetchFacts page.
    #[arg(long, default_value_t = 500)]
    page_size: u32,
    /// Seed of the emulated link's randomness.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The fact that references artifact `i`, in class `documents`.
fn document(i: usize, a: ArtifactRef) -> Message {
    Message {
        envelope: Envelope {
            message_id: format!("doc-{i}"),
            from_zone: "source".into(),
            to_zone: "dest".into(),
            produced_at_unix_ms: 1_764_000_000_000,
            labels: [("class".to_owned(), "documents".to_owned())].into(),
            object_media_type: Some("application/octet-stream".into()),
            ..Default::default()
        },
        fact: Fact {
            subject: format!("batch:Bench/B{i}"),
            predicate: "has_artifact".into(),
            object_json: format!(r#"{{"n":{i}}}"#),
            artifacts: vec![a],
        },
    }
}

/// Runs the matrix and prints one markdown table.
pub async fn artifacts(opts: ArtifactsBench) -> anyhow::Result<()> {
    let transports = &TRANSPORTS[..2];
    let cells = opts.rtt_ms.len() * opts.loss_pct.len() * transports.len();
    let link = EmulatedLink::create(Profile::default(), Profile::default(), opts.seed)
        .context("the link emulator needs root (network namespaces, TUN devices)")?;
    let consumers: Vec<(String, &str)> = (0..cells)
        .flat_map(|i| {
            [
                (format!("docs-{i}"), "documents"),
                (format!("facts-{i}"), "operational"),
            ]
        })
        .collect();
    let source = Source::start(&link, &consumers, opts.page_size)?;
    tokio::select! {
        r = matrix(&opts, &link, &source, transports) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    }
}

async fn matrix(
    opts: &ArtifactsBench,
    link: &EmulatedLink,
    source: &Source,
    transports: &[(&str, &str, u16)],
) -> anyhow::Result<()> {
    const MIB: usize = 1024 * 1024;
    let engine = source.engine().await?;
    load_facts(&engine, opts.facts, opts.object_bytes).await?;
    for i in 0..opts.artifacts {
        let chunks = futures::stream::iter(0..opts.artifact_mib)
            .map(move |c| {
                let seed = (i * 7919 + c) as u32;
                Ok(bytes::Bytes::from(
                    (0..MIB as u32)
                        .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
                        .collect::<Vec<u8>>(),
                ))
            })
            .boxed();
        let info = engine
            .put_object("bench-files", &format!("B{i}/artifact.bin"), chunks)
            .await
            .map_err(|e| anyhow::anyhow!("loading artifact {i}: {e}"))?;
        engine
            .append_fact(document(
                i,
                ArtifactRef {
                    bucket: info.bucket,
                    key: info.key,
                    digest: info.digest,
                    size: info.size,
                },
            ))
            .await
            .map_err(|e| anyhow::anyhow!("the fact of artifact {i}: {e}"))?;
    }
    let total = (opts.artifacts * opts.artifact_mib) as f64;
    println!(
        "# bsfg bench artifacts: a link copies {} artifacts of {} MiB (one fact each) across the emulated link, at most {:?} per cell; beside it the same link pulls small facts ({} B objects, page {}) for {:?}",
        opts.artifacts,
        opts.artifact_mib,
        opts.window,
        opts.object_bytes,
        opts.page_size,
        opts.fact_window
    );
    println!(
        "| RTT | loss | transport | artifact MiB/s | vs gRPC | copied | wire bytes / artifact byte | facts/s (same link) | failed copies (resumed) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut n = 0;
    for &rtt in &opts.rtt_ms {
        for &loss in &opts.loss_pct {
            let p = profile(rtt, loss, None);
            link.set_profiles(p, p);
            let mut grpc_rate = None;
            for &transport in transports {
                let (api, quic) = source.dial(link, transport)?;
                let docs = run_cell(
                    link,
                    api.clone(),
                    &format!("docs-{n}"),
                    (opts.page_size, bsfg_core::link::PAGES_IN_FLIGHT),
                    opts.window,
                    Some(opts.artifacts as u64),
                )
                .await?;
                let facts = run_cell(
                    link,
                    api,
                    &format!("facts-{n}"),
                    (opts.page_size, bsfg_core::link::PAGES_IN_FLIGHT),
                    opts.fact_window,
                    None,
                )
                .await?;
                n += 1;
                if let Some(q) = quic {
                    q.close().await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mib_s =
                    docs.artifact_bytes as f64 / MIB as f64 / docs.elapsed.as_secs_f64().max(1e-3);
                let vs = vs_grpc(&mut grpc_rate, mib_s);
                println!(
                    "| {rtt} ms | {loss}% | {} | {mib_s:.2} | {vs} | {}/{} ({:.0} of {total:.0} MiB) | {:.2} | {:.0} | {} |",
                    transport.0,
                    docs.artifacts_copied,
                    opts.artifacts,
                    docs.artifact_bytes as f64 / MIB as f64,
                    if docs.artifact_bytes > 0 {
                        docs.wire_bytes as f64 / docs.artifact_bytes as f64
                    } else {
                        0.0
                    },
                    facts.facts_per_sec,
                    docs.artifact_failures,
                );
            }
        }
    }
    Ok(())
}
