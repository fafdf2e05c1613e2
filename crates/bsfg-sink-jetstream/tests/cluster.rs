//! A zone on a three-node JetStream cluster with `replicas = 3`: appends and the
//! replication out of it (FetchFacts, AppendFact in another zone, ConfirmReceipt)
//! continue while the stream leader, and then another node, are SIGKILLed and
//! restarted; every fact is stored once in both zones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bsfg_core::link::{PullStep, pull_page};
use bsfg_core::{Boundary, BoundaryApi, FetchRequest, Limits};
use bsfg_sink_jetstream::{ConsumerConfig, JetStreamConfig, JetStreamZone};
use bsfg_testkit::fixtures::step_completed as fact;
use bsfg_testkit::{NatsOptions, NatsServer};

const FACTS: usize = 1500;

/// The cluster node whose server name is `name`.
fn node_named(nodes: &[NatsServer], name: &str) -> usize {
    nodes
        .iter()
        .position(|n| n.server_name() == name)
        .unwrap_or_else(|| panic!("no node is {name}"))
}

async fn leader(client: &async_nats::Client) -> Option<String> {
    let js = async_nats::jetstream::new(client.clone());
    let mut s = js
        .get_stream(bsfg_sink_jetstream::index::LOG_STREAM)
        .await
        .ok()?;
    s.info().await.ok()?.cluster.as_ref()?.leader.clone()
}

/// Appends `id` until the zone answers (a fact whose answer was lost is appended
/// again: idempotent).
async fn append_until_stored(api: &Boundary, id: &str, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match api.append_fact(fact(id, i as i64)).await {
            Ok(_) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "{id} never stored: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_on_a_three_node_cluster_appends_and_replicates_through_sigkills_of_the_leader_and_another_node()
 {
    let mut nodes = bsfg_testkit::start_cluster(3, NatsOptions::default()).unwrap();
    let urls = nodes
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let mut cfg = JetStreamConfig::new("plant", urls);
    cfg.replicas = 3;
    cfg.consumers =
        vec![ConsumerConfig::new("to-idmz", "operational").with_ack_wait(Duration::from_secs(2))];
    // The cluster elects its meta leader after the routes connect.
    let deadline = Instant::now() + Duration::from_secs(60);
    let zone = loop {
        match JetStreamZone::connect(cfg.clone()).await {
            Ok(z) => break Arc::new(z),
            Err(e) => {
                assert!(Instant::now() < deadline, "the cluster never formed: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let source = Boundary::new(zone.clone(), zone.clone(), Limits::default());
    let receiver_nats = NatsServer::start().unwrap();
    let mut rcfg = JetStreamConfig::new("idmz", receiver_nats.url());
    rcfg.consumers = vec![ConsumerConfig::new("check", "operational")];
    let receiver_zone = Arc::new(JetStreamZone::connect(rcfg).await.unwrap());
    let receiver = Boundary::new(
        receiver_zone.clone(),
        receiver_zone.clone(),
        Limits::default(),
    );

    // Appends in the cluster zone, and its facts pulled into the receiving zone, at
    // the same time.
    let appended = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (api, appended) = (source.clone(), appended.clone());
        tokio::spawn(async move {
            for i in 0..FACTS {
                append_until_stored(&api, &format!("cluster:{i}"), i).await;
                appended.store(i + 1, Ordering::Relaxed);
            }
        })
    };
    let link = {
        let (source, receiver, appended) = (source.clone(), receiver.clone(), appended.clone());
        tokio::spawn(async move {
            let step = PullStep {
                link: "from-plant".into(),
                consumer: "to-idmz".into(),
                limit: 100,
                wait: Duration::from_millis(200),
                streams: vec![],
                source_zone: "plant".into(),
                local_zone: "idmz".into(),
            };
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut failures = 0;
            loop {
                let last = match tokio::time::timeout(
                    Duration::from_secs(15),
                    pull_page(&source, &receiver, &step, None),
                )
                .await
                {
                    // Done: every fact appended, and the source has nothing beyond the
                    // frontier.
                    Ok(Ok(r))
                        if appended.load(Ordering::Relaxed) == FACTS
                            && r.fetched == 0
                            && r.pending == 0
                            && r.frontier >= r.last_offset =>
                    {
                        return failures;
                    }
                    Ok(Ok(r)) => format!("{r:?}"),
                    other => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        format!("{other:?}")
                    }
                };
                assert!(
                    Instant::now() < deadline,
                    "the link never caught up: {failures} failures, last {last}"
                );
            }
        })
    };

    // SIGKILL the stream leader a third of the way, another node two thirds of it.
    let client = zone.client().clone();
    let mut killed = Vec::new();
    for (at, pick_leader) in [(FACTS / 3, true), (2 * FACTS / 3, false)] {
        while appended.load(Ordering::Relaxed) < at {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leader = leader(&client).await.expect("the stream has a leader");
        let l = node_named(&nodes, &leader);
        let victim = if pick_leader { l } else { (l + 1) % 3 };
        nodes[victim].kill();
        killed.push((victim, pick_leader));
        tokio::time::sleep(Duration::from_secs(3)).await;
        nodes[victim].restart().unwrap();
    }
    producer.await.unwrap();
    let link_failures = link.await.unwrap();

    // Every fact once in the cluster zone's log and once in the receiving zone.
    let mut ids = Vec::new();
    loop {
        let page = receiver
            .fetch_facts(FetchRequest {
                consumer: "check".into(),
                limit: 1000,
                wait: Duration::from_millis(500),
            })
            .await
            .unwrap();
        let Some(last) = page.facts.last().map(|f| f.offset) else {
            break;
        };
        ids.extend(
            page.facts
                .iter()
                .map(|f| f.message.envelope.message_id.clone()),
        );
        receiver.confirm_receipt("check", last).await.unwrap();
    }
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        (ids.len(), unique.len()),
        (FACTS, FACTS),
        "replicated once each (killed {killed:?}, {link_failures} failed link steps)"
    );
    let js = async_nats::jetstream::new(client);
    assert_eq!(
        common::class_facts(&js, "operational").await,
        FACTS as u64,
        "stored once each in the cluster zone"
    );
    let info = js
        .get_stream(bsfg_sink_jetstream::index::LOG_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
}
