//! `bsfg bench index`: what remembering message_ids costs a zone's nats-server.
//!
//! Appends `ids` facts (each its own message_id) through the engine into a zone on a
//! temporary nats-server with `sync_interval: always`, and at each of `samples`
//! checkpoints prints the server's resident memory (`/varz` `mem`) and its store on
//! disk, per million ids, beside the append rate of that stretch and the size of the
//! gateway's on-disk look-up. Then it restarts the server on the same store (memory
//! at rest), checks that the very first id is still answered `duplicate` and a
//! changed payload `conflicting_duplicate`, deletes the look-up file and times its
//! rebuild from the index stream (and checks the answers again).
//!
//! The layout measured is the one in force (`bsfg_log`: 256 reservation buckets
//! beside the facts, on `bsfg.log.facts.<class>.<kind>.<writer><bb>`). The baseline, in the same
//! run on a fresh server, is the per-id layout it replaced (one index subject and one
//! fact subject per id), written raw (`--baseline false` skips it).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use bsfg_core::{Boundary, BoundaryApi, BoundaryError, Limits};
use bsfg_sink_jetstream::durability::server_memory;
use bsfg_sink_jetstream::{JetStreamConfig, JetStreamZone};
use bsfg_testkit::fixtures::padded_fact;
use bsfg_testkit::{NatsOptions, NatsServer};

/// Options of `bsfg bench index`.
#[derive(Debug, clap::Args)]
pub struct IndexBench {
    /// message_ids to append.
    #[arg(long, default_value_t = 5_000_000)]
    pub ids: usize,
    /// Checkpoints at which memory, disk and the append rate are read.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Bytes of each fact's object_json.
    #[arg(long, default_value_t = 64)]
    pub object_bytes: usize,
    /// Measure the per-id layout's storage shape as the baseline.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub baseline: bool,
}

const MIB: f64 = 1024.0 * 1024.0;

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

fn id(i: usize) -> String {
    format!("idx-{i}")
}

async fn connect(
    nats: &NatsServer,
    lookup: &Path,
) -> anyhow::Result<(Arc<JetStreamZone>, Arc<Boundary>)> {
    let mut cfg = JetStreamConfig::new("bench", nats.url());
    cfg.monitor_url = Some(nats.monitor_url());
    cfg.index_path = Some(lookup.to_path_buf());
    let zone = Arc::new(JetStreamZone::connect(cfg).await?);
    let api = Arc::new(Boundary::new(zone.clone(), zone.clone(), Limits::default()));
    Ok((zone, api))
}

/// Runs the benchmark and prints a markdown table.
pub async fn index(opts: IndexBench) -> anyhow::Result<()> {
    let samples = opts.samples.max(1);
    let per = (opts.ids / samples).max(1);
    let mut nats = NatsServer::start_with(NatsOptions {
        // Restoring millions of subjects at the restart takes a while.
        ready_timeout: std::time::Duration::from_secs(900),
        ..NatsOptions::default()
    })
    .context("starting nats-server (run scripts/setup.sh)")?;
    let state = tempfile::tempdir().context("temporary directory for the look-up")?;
    let lookup = state.path().join("index.redb");
    let (zone, api) = connect(&nats, &lookup).await?;
    let monitor = nats.monitor_url();
    let base = server_memory(&monitor).await.unwrap_or(0);
    println!(
        "# bsfg bench index: {} ids through the engine, nats-server with sync_interval: always; one-stream log (bsfg_log: 256 reservation buckets beside the facts; facts on 256 subjects per class, kind and gateway)",
        per * samples
    );
    println!(
        "(server memory before the first id: {:.1} MiB)",
        base as f64 / MIB
    );
    println!(
        "| ids | append facts/s (this stretch) | server RSS MiB | RSS above start per million ids | store on disk MiB | disk per million ids | index stream MiB | gateway look-up MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut rates = Vec::with_capacity(samples);
    let mut last_rss_per_m = 0.0;
    let mut last_disk_per_m = 0.0;
    for k in 0..samples {
        let t = Instant::now();
        crate::bench::pipeline::load_backlog(&api, per, |i| {
            padded_fact(&id(k * per + i), k * per + i, opts.object_bytes)
        })
        .await?;
        let rate = per as f64 / t.elapsed().as_secs_f64();
        rates.push(rate);
        let ids = (k + 1) * per;
        let millions = ids as f64 / 1e6;
        let rss = server_memory(&monitor).await.unwrap_or(0);
        let disk = dir_bytes(&nats.store_dir());
        let index = zone.index_usage().await?;
        last_rss_per_m = rss.saturating_sub(base) as f64 / MIB / millions;
        last_disk_per_m = disk as f64 / MIB / millions;
        let lookup_bytes = std::fs::metadata(&lookup).map_or(0, |m| m.len());
        println!(
            "| {ids} | {rate:.0} | {:.1} | {last_rss_per_m:.1} | {:.1} | {last_disk_per_m:.1} | {:.1} | {:.1} |",
            rss as f64 / MIB,
            disk as f64 / MIB,
            index.disk_bytes as f64 / MIB,
            lookup_bytes as f64 / MIB,
        );
    }
    drop(api);
    drop(zone);
    // At rest: the same store after a restart (what a zone carries for years).
    let t = Instant::now();
    nats.restart().context("restarting nats-server")?;
    let restart_secs = t.elapsed().as_secs_f64();
    let (zone, api) = connect(&nats, &lookup).await?;
    let rest = server_memory(&monitor).await.unwrap_or(0);
    let total = per * samples;
    let rest_per_m = rest.saturating_sub(base) as f64 / MIB / (total as f64 / 1e6);
    println!(
        "after a restart on the same store (ready in {restart_secs:.1} s): server RSS {:.1} MiB, {rest_per_m:.1} MiB above the empty server per million ids",
        rest as f64 / MIB,
    );
    // The first id, `total` ids later: still a duplicate, and a change still a conflict.
    let (dup_ok, conflict_ok) = check_first(&api, total, opts.object_bytes).await;
    drop(api);
    drop(zone);
    // The look-up file lost: start-up rebuilds it from the index stream.
    let lookup_bytes = std::fs::metadata(&lookup).map_or(0, |m| m.len());
    std::fs::remove_file(&lookup).context("removing the look-up file")?;
    let t = Instant::now();
    let (zone, api) = connect(&nats, &lookup).await?;
    let rebuild_secs = t.elapsed().as_secs_f64();
    let rebuilt = zone.index_usage().await?.ids;
    println!(
        "look-up file ({:.1} MiB) deleted: start-up rebuilt it from the index stream in {rebuild_secs:.1} s ({rebuilt} ids)",
        lookup_bytes as f64 / MIB
    );
    let (dup_after, conflict_after) = check_first(&api, total, opts.object_bytes).await;
    let (first_rate, last_rate) = (rates[0], rates[rates.len() - 1]);
    println!(
        "summary: server RSS {last_rss_per_m:.1} MiB per million ids while written, {rest_per_m:.1} at rest; disk {last_disk_per_m:.1} MiB per million; append rate at the end {:.2}x of the start ({last_rate:.0} vs {first_rate:.0} facts/s)",
        last_rate / first_rate
    );
    let usage = zone.index_usage().await?;
    println!(
        "start-up line of such a zone: {}",
        usage.projection(crate::client::now_ms()).0
    );
    anyhow::ensure!(
        dup_ok && conflict_ok && dup_after && conflict_after && rebuilt as usize == total,
        "idempotency failed after {total} ids"
    );
    drop(api);
    drop(zone);
    drop(nats);
    if opts.baseline {
        let stored = serde_json::to_vec(&padded_fact(&id(0), 0, opts.object_bytes))?.len();
        let base = per_id_shape(per, samples, stored).await?;
        println!(
            "bounded layout vs the per-id layout, server RSS per million ids at rest: {rest_per_m:.1} vs {:.1} MiB ({:.1}x less); while written: {last_rss_per_m:.1} vs {:.1} MiB ({:.1}x less)",
            base.rest_per_m,
            base.rest_per_m / rest_per_m.max(0.001),
            base.written_per_m,
            base.written_per_m / last_rss_per_m.max(0.001),
        );
    }
    Ok(())
}

/// Appends the first id again (expects `duplicate`) and a changed payload under it
/// (expects `conflicting_duplicate`); prints and returns both verdicts.
async fn check_first(api: &Boundary, total: usize, object_bytes: usize) -> (bool, bool) {
    let first = padded_fact(&id(0), 0, object_bytes);
    let again = api.append_fact(first.clone()).await;
    let mut changed = first;
    changed.fact.object_json = r#"{"changed":true}"#.into();
    let conflict = api.append_fact(changed).await;
    let dup_ok = matches!(&again, Ok(o) if o.duplicate);
    let conflict_ok = matches!(conflict, Err(BoundaryError::ConflictingDuplicate { .. }));
    println!(
        "the first id, {total} ids later: {} ({again:?}); changed payload: {}",
        if dup_ok {
            "duplicate"
        } else {
            "NOT a duplicate"
        },
        if conflict_ok {
            "conflicting_duplicate"
        } else {
            "NOT refused"
        }
    );
    (dup_ok, conflict_ok)
}

/// What the per-id layout's storage shape cost the server.
struct Shape {
    written_per_m: f64,
    rest_per_m: f64,
}

/// The storage shape of the per-id layout, written raw on a fresh server (see the
/// module docs): memory and disk per million ids, and at rest after a restart.
async fn per_id_shape(per: usize, samples: usize, fact_bytes: usize) -> anyhow::Result<Shape> {
    // Lazy flushing: what the server holds in memory and on disk does not depend on
    // it, and one raw publish per sync would take half an hour for 5 M ids.
    let mut nats = NatsServer::start_with(NatsOptions {
        sync_always: false,
        ready_timeout: std::time::Duration::from_secs(900),
        ..NatsOptions::default()
    })
    .context("starting nats-server")?;
    let monitor = nats.monitor_url();
    let base = server_memory(&monitor).await.unwrap_or(0);
    println!();
    println!(
        "# baseline: the per-id layout's storage shape, written raw (no engine logic, server flushing lazily: only memory and disk compare): per id one index entry on its own subject and one {fact_bytes}-byte fact on its own subject"
    );
    println!(
        "| ids | raw ids/s (this stretch) | server RSS MiB | RSS above start per million ids | store on disk MiB | disk per million ids |"
    );
    println!("|---|---|---|---|---|---|");
    let mut written_per_m = 0.0;
    for k in 0..samples {
        let rate = bsfg_sink_jetstream::baseline::per_id_shape(
            &nats.url(),
            k * per,
            (k + 1) * per,
            fact_bytes,
            1024,
        )
        .await
        .map_err(|e| anyhow::anyhow!("per-id shape: {e}"))?;
        let ids = (k + 1) * per;
        let millions = ids as f64 / 1e6;
        let rss = server_memory(&monitor).await.unwrap_or(0);
        let disk = dir_bytes(&nats.store_dir());
        written_per_m = rss.saturating_sub(base) as f64 / MIB / millions;
        println!(
            "| {ids} | {rate:.0} | {:.1} | {written_per_m:.1} | {:.1} | {:.1} |",
            rss as f64 / MIB,
            disk as f64 / MIB,
            disk as f64 / MIB / millions,
        );
    }
    let t = Instant::now();
    nats.restart().context("restarting nats-server")?;
    let restart_secs = t.elapsed().as_secs_f64();
    let rest = server_memory(&monitor).await.unwrap_or(0);
    let rest_per_m = rest.saturating_sub(base) as f64 / MIB / ((per * samples) as f64 / 1e6);
    println!(
        "after a restart on the same store (ready in {restart_secs:.1} s): server RSS {:.1} MiB, {rest_per_m:.1} MiB above the empty server per million ids",
        rest as f64 / MIB
    );
    Ok(Shape {
        written_per_m,
        rest_per_m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_bytes_sums_every_file_below() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("a")).expect("mkdir");
        std::fs::write(d.path().join("x"), [0u8; 10]).expect("write");
        std::fs::write(d.path().join("a").join("y"), [0u8; 5]).expect("write");
        assert_eq!(dir_bytes(d.path()), 15);
        assert_eq!(dir_bytes(&d.path().join("missing")), 0);
    }
}
