//! A live two-zone demo: a plant zone and an enterprise zone, each with its own
//! nats-server and JetStream domain, exchanging facts through the four operations.
//! Run with `scripts/demo.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use bsfg_core::{ArtifactRef, BoundaryApi};
use bsfg_e2e::{Zone, pull_once, step_completed};
use bytes::Bytes;
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "== Starting zone plant-a and zone enterprise (own nats-server each, sync_interval: always)"
    );
    let plant = Zone::start("plant-a", &[("to-enterprise", "operational")]).await?;
    let enterprise = Zone::start("enterprise", &[]).await?;
    println!("   plant-a    at {}", plant.nats.url());
    println!("   enterprise at {}", enterprise.nats.url());

    println!("\n== A producer in plant-a stores a batch report, then appends facts locally");
    let report = Bytes::from_static(b"%PDF-1.7 batch B1042 record (demo)");
    let obj = plant
        .api
        .put_object(
            "batch-files",
            "B1042/record.pdf",
            futures::stream::iter([Ok(report)]).boxed(),
        )
        .await?;
    println!(
        "   PutObject batch-files/B1042/record.pdf -> {} ({} bytes)",
        obj.digest, obj.size
    );
    for step in 1..=5 {
        let out = plant
            .api
            .append_fact(step_completed("plant-a", "enterprise", "B1042", step))
            .await?;
        println!(
            "   AppendFact step {step} -> {}:{} duplicate={}",
            out.stream, out.offset, out.duplicate
        );
    }
    let mut with_report = step_completed("plant-a", "enterprise", "B1042", 6);
    with_report.envelope.message_id = "plant-a:batch:B1042:record".into();
    with_report.envelope.object_media_type = Some("application/pdf".into());
    with_report.fact.predicate = "has_artifact".into();
    with_report.fact.object_json = r#"{"kind":"batch_record"}"#.into();
    with_report.fact.artifacts.push(ArtifactRef {
        bucket: obj.bucket.clone(),
        key: obj.key.clone(),
        digest: obj.digest.clone(),
        size: obj.size,
    });
    let out = plant.api.append_fact(with_report).await?;
    println!(
        "   AppendFact has_artifact -> {}:{}",
        out.stream, out.offset
    );

    println!(
        "\n== The producer retries step 3 (same id, same payload) and sends a corrupted step 4"
    );
    let again = plant
        .api
        .append_fact(step_completed("plant-a", "enterprise", "B1042", 3))
        .await?;
    println!(
        "   retry of step 3 -> offset {} duplicate={} (nothing new stored)",
        again.offset, again.duplicate
    );
    let mut bad = step_completed("plant-a", "enterprise", "B1042", 4);
    bad.fact.object_json = r#"{"step":4,"operator":"mallory"}"#.into();
    match plant.api.append_fact(bad).await {
        Err(e) => println!("   changed step 4 -> refused: {e}"),
        Ok(o) => println!("   changed step 4 -> UNEXPECTEDLY stored at {}", o.offset),
    }
    let mut invalid = step_completed("plant-a", "enterprise", "B1042", 7);
    invalid.fact.predicate = "StepCompleted".into();
    if let Err(e) = plant.api.append_fact(invalid).await {
        println!("   invalid predicate -> refused: {e}");
    }

    println!(
        "\n== enterprise pulls from plant-a: FetchFacts -> AppendFact (locally) -> ConfirmReceipt"
    );
    loop {
        let r = pull_once(
            &plant.api,
            &enterprise.api,
            "to-enterprise",
            4,
            Duration::from_millis(500),
        )
        .await?;
        if r.fetched == 0 {
            println!(
                "   nothing more to fetch; plant-a frontier for to-enterprise = {}",
                r.frontier
            );
            break;
        }
        println!(
            "   page: fetched {} stored {} duplicates {} -> plant-a frontier {}",
            r.fetched, r.stored, r.duplicates, r.frontier
        );
    }

    println!("\n== A replay of plant-a's whole history into enterprise stores nothing new");
    let mut dups = 0;
    for step in 1..=5 {
        let o = enterprise
            .api
            .append_fact(step_completed("plant-a", "enterprise", "B1042", step))
            .await?;
        dups += usize::from(o.duplicate);
    }
    println!("   5 replayed facts -> {dups} absorbed as duplicates");
    println!("\n== Done: every fact crossed once; the zones shut down with the demo.");
    Ok(())
}
