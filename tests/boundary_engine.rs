//! Two zones, each with its own nats-server and JetStream domain, exchanging facts
//! only through the four boundary operations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use bsfg_core::{BoundaryApi, FetchRequest};
use bsfg_e2e::{Zone, pull_page, step_completed};

#[tokio::test]
async fn receiver_pull_moves_every_fact_once_and_absorbs_replays() {
    let plant = Zone::start("plant-a", &[("to-enterprise", "operational")])
        .await
        .unwrap();
    let enterprise = Zone::start("enterprise", &[("reporting", "operational")])
        .await
        .unwrap();
    for step in 1..=25 {
        plant
            .api
            .append_fact(step_completed("plant-a", "enterprise", "B1042", step))
            .await
            .unwrap();
    }
    // First page is appended in the destination, then its confirm is "lost":
    // the receiver crashed after appending and before confirming.
    let page = plant
        .api
        .fetch_facts(FetchRequest {
            consumer: "to-enterprise".into(),
            limit: 10,
            wait: Duration::ZERO,
        })
        .await
        .unwrap();
    for f in &page.facts {
        enterprise.api.append_fact(f.message.clone()).await.unwrap();
    }
    // The receiver restarts and pulls until drained; the unconfirmed page comes again.
    let mut duplicates = 0;
    loop {
        let r = pull_page(
            &plant.api,
            &enterprise.api,
            "to-enterprise",
            10,
            Duration::from_secs(3),
        )
        .await
        .unwrap();
        if r.fetched == 0 {
            break;
        }
        duplicates += r.duplicates;
    }
    assert_eq!(
        duplicates, 10,
        "the replayed page is absorbed, not stored again"
    );

    // The destination holds each message_id exactly once, ids unchanged.
    let mut ids = HashSet::new();
    loop {
        let p = enterprise
            .api
            .fetch_facts(FetchRequest {
                consumer: "reporting".into(),
                limit: 100,
                wait: Duration::ZERO,
            })
            .await
            .unwrap();
        let Some(last) = p.facts.last().map(|f| f.offset) else {
            break;
        };
        for f in &p.facts {
            assert!(ids.insert(f.message.envelope.message_id.clone()));
        }
        enterprise
            .api
            .confirm_receipt("reporting", last)
            .await
            .unwrap();
    }
    let expected: HashSet<String> = (1..=25)
        .map(|s| format!("plant-a:batch:B1042:step:{s}"))
        .collect();
    assert_eq!(ids, expected);
    // And the source's frontier covers everything.
    let p = plant
        .api
        .fetch_facts(FetchRequest {
            consumer: "to-enterprise".into(),
            limit: 1,
            wait: Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!((p.frontier, p.last_offset), (25, 25));
}
