//! The zone log against a real nats-server: idempotency, fetch/confirm, consumers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bsfg_core::{BoundaryApi, BoundaryError, FetchRequest, Reason};
use bsfg_sink_jetstream::{Durability, JetStreamConfig, JetStreamZone, PublishMode, SinkError};
use common::*;

fn req(consumer: &str, limit: u32, wait_ms: u64) -> FetchRequest {
    FetchRequest {
        consumer: consumer.into(),
        limit,
        wait: Duration::from_millis(wait_ms),
    }
}

#[tokio::test]
async fn append_with_same_id_and_payload_returns_original_offset_after_window_and_restart() {
    let mut nats = server();
    let mut cfg = config(&nats);
    cfg.duplicate_window = Duration::from_millis(500);
    let z = zone(cfg.clone()).await;
    let api = engine(&z);
    let first = api.append_fact(fact("evt-1", 1)).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.stream, "facts_operational");
    // Same payload, other whitespace and key order: still the same canonical payload.
    let mut again = fact("evt-1", 1);
    again.fact.object_json = r#"{ "operator": "jdoe", "step": 1 }"#.into();
    let second = api.append_fact(again.clone()).await.unwrap();
    assert!(second.duplicate);
    assert_eq!(second.offset, first.offset);

    // Past JetStream's own duplicate window.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let third = api.append_fact(again.clone()).await.unwrap();
    assert_eq!((third.offset, third.duplicate), (first.offset, true));

    // After a hard restart of nats-server, through a fresh connection.
    drop(api);
    drop(z);
    nats.kill_and_restart().unwrap();
    let z = zone(cfg).await;
    let api = engine(&z);
    let fourth = api.append_fact(again).await.unwrap();
    assert_eq!((fourth.offset, fourth.duplicate), (first.offset, true));
    assert_eq!(stream_messages(&z, "facts_operational").await, 1);
}

#[tokio::test]
async fn append_with_same_id_and_different_payload_is_conflicting_duplicate_and_stores_nothing() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let first = api.append_fact(fact("evt-2", 1)).await.unwrap();
    let err = api.append_fact(fact("evt-2", 2)).await.unwrap_err();
    assert_eq!(err.reason(), Reason::ConflictingDuplicate);
    match err {
        BoundaryError::ConflictingDuplicate { offset, stream, .. } => {
            assert_eq!(
                (stream.as_str(), offset),
                ("facts_operational", first.offset)
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // A different class label does not sneak a second copy into another stream.
    let mut audit = fact("evt-2", 2);
    audit.envelope.labels.insert("class".into(), "audit".into());
    assert_eq!(
        api.append_fact(audit).await.unwrap_err().reason(),
        Reason::ConflictingDuplicate
    );
    let mut same_in_audit = fact("evt-2", 1);
    same_in_audit
        .envelope
        .labels
        .insert("class".into(), "audit".into());
    let dup = api.append_fact(same_in_audit).await.unwrap();
    assert_eq!(
        (dup.stream.as_str(), dup.offset, dup.duplicate),
        ("facts_operational", first.offset, true)
    );
    assert_eq!(stream_messages(&z, "facts_operational").await, 1);
    assert_eq!(stream_messages(&z, "facts_audit").await, 0);
}

#[tokio::test]
async fn invalid_fields_are_named_and_store_nothing() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let mut bad_subject = fact("evt-3", 1);
    bad_subject.fact.subject = "Batch B1".into();
    let mut bad_class = fact("evt-4", 1);
    bad_class
        .envelope
        .labels
        .insert("class".into(), "secret".into());
    let mut bad_json = fact("evt-5", 1);
    bad_json.fact.object_json = "{".into();
    for (m, field) in [
        (bad_subject, "fact.subject"),
        (bad_class, "envelope.labels.class"),
        (bad_json, "fact.object_json"),
    ] {
        let e = api.append_fact(m).await.unwrap_err();
        assert_eq!(e.reason(), Reason::InvalidArgument);
        assert_eq!(e.field(), Some(field));
    }
    for s in [
        "facts_operational",
        "facts_audit",
        "facts_documents",
        "bsfg_log",
    ] {
        assert_eq!(stream_messages(&z, s).await, 0, "{s}");
    }
}

#[tokio::test]
async fn hundred_concurrent_appenders_with_repeated_ids_store_each_unique_id_once() {
    concurrent_appenders_store_each_unique_id_once(PublishMode::AtomicBatch).await;
}

#[tokio::test]
async fn hundred_concurrent_pipelined_appenders_with_repeated_ids_store_each_unique_id_once() {
    concurrent_appenders_store_each_unique_id_once(PublishMode::Pipelined).await;
}

async fn concurrent_appenders_store_each_unique_id_once(mode: PublishMode) {
    let nats = server();
    let mut cfg = config(&nats);
    cfg.publish_mode = Some(mode);
    // Two gateway instances on one zone, each serving half of the appenders.
    let a = zone(cfg.clone()).await;
    let b = zone(cfg).await;
    assert_eq!(a.publish_mode(), mode);
    let mut tasks = Vec::new();
    for t in 0..100 {
        let api = engine(if t % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                // 20 % of each appender's facts reuse ids shared by every appender.
                let id = if i < 80 {
                    format!("t{t}-f{i}")
                } else {
                    format!("shared-{}", i - 80)
                };
                let value = if i < 80 { i } else { 1000 + i };
                api.append_fact(fact(&id, value)).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let unique = 100 * 80 + 20;
    assert_eq!(stream_messages(&a, "facts_operational").await, unique);
    // Read every stored fact back: each id exactly once.
    let api = engine(&a);
    let mut seen = HashSet::new();
    loop {
        let page = api
            .fetch_facts(req("enterprise-pull", 1000, 0))
            .await
            .unwrap();
        if page.facts.is_empty() {
            break;
        }
        for f in &page.facts {
            assert!(
                seen.insert(f.message.envelope.message_id.clone()),
                "stored twice: {}",
                f.message.envelope.message_id
            );
        }
        let last = page.facts.last().unwrap().offset;
        api.confirm_receipt("enterprise-pull", last).await.unwrap();
    }
    assert_eq!(seen.len() as u64, unique);
}

#[tokio::test]
async fn fetch_confirm_frontier_rules_and_resume_across_restarts() {
    let mut nats = server();
    let cfg = config(&nats);
    let z = zone(cfg.clone()).await;
    let api = engine(&z);
    let o = append_in_order(&api, "e", 10).await;
    let page = api.fetch_facts(req("enterprise-pull", 4, 0)).await.unwrap();
    let offsets: Vec<u64> = page.facts.iter().map(|f| f.offset).collect();
    assert_eq!(offsets, o[..4]);
    assert_eq!(
        (page.first_offset, page.last_offset, page.frontier),
        (1, o[9], 0)
    );
    assert!(page.facts[0].appended_at_unix_ms > 0);
    assert_eq!(page.facts[0].message.envelope.message_id, "e0");

    assert_eq!(
        api.confirm_receipt("enterprise-pull", o[3])
            .await
            .unwrap()
            .offset,
        o[3]
    );
    // Backwards: unchanged.
    assert_eq!(
        api.confirm_receipt("enterprise-pull", o[1])
            .await
            .unwrap()
            .offset,
        o[3]
    );
    // Past what was delivered: an error naming the offset.
    let e = api
        .confirm_receipt("enterprise-pull", o[8])
        .await
        .unwrap_err();
    assert_eq!(
        (e.reason(), e.field()),
        (Reason::InvalidArgument, Some("offset"))
    );

    // Deliver 5..8, do not confirm, restart the server and the client.
    let page = api.fetch_facts(req("enterprise-pull", 4, 0)).await.unwrap();
    assert_eq!(page.facts.first().map(|f| f.offset), Some(o[4]));
    drop(api);
    drop(z);
    nats.restart().unwrap();
    let z = zone(cfg).await;
    let api = engine(&z);
    // Resumes after the frontier: 9 and 10 at once, 5..8 once their ack wait ran out.
    let page = api
        .fetch_facts(req("enterprise-pull", 10, 5000))
        .await
        .unwrap();
    assert_eq!(page.frontier, o[3]);
    // A receiver confirms each page it got, after appending it.
    let mut all: Vec<u64> = page.facts.iter().map(|f| f.offset).collect();
    let mut frontier = o[3];
    if let Some(last) = page.facts.last() {
        frontier = api
            .confirm_receipt("enterprise-pull", last.offset)
            .await
            .unwrap()
            .offset;
    }
    while all.len() < 6 {
        let p = api
            .fetch_facts(req("enterprise-pull", 10, 3000))
            .await
            .unwrap();
        assert!(!p.facts.is_empty(), "facts 5..10 must all come back");
        all.extend(p.facts.iter().map(|f| f.offset));
        let last = p.facts.last().unwrap().offset;
        frontier = api
            .confirm_receipt("enterprise-pull", last)
            .await
            .unwrap()
            .offset;
    }
    all.sort();
    all.dedup();
    assert_eq!(all, o[4..]);
    assert_eq!(frontier, o[9]);
}

#[tokio::test]
async fn after_a_hard_server_kill_every_unconfirmed_fact_still_arrives() {
    // nats-server persists consumer ack state lazily, so after SIGKILL the frontier
    // may fall back and confirmed facts come again (at-least-once); none is lost.
    let mut nats = server();
    let cfg = config(&nats);
    let z = zone(cfg.clone()).await;
    let api = engine(&z);
    let o = append_in_order(&api, "k", 10).await;
    let page = api.fetch_facts(req("enterprise-pull", 4, 0)).await.unwrap();
    api.confirm_receipt("enterprise-pull", page.facts.last().unwrap().offset)
        .await
        .unwrap();
    drop(api);
    drop(z);
    nats.kill_and_restart().unwrap();
    let z = zone(cfg).await;
    let api = engine(&z);
    let mut seen = HashSet::new();
    loop {
        let p = api
            .fetch_facts(req("enterprise-pull", 10, 1500))
            .await
            .unwrap();
        let Some(last) = p.facts.last().map(|f| f.offset) else {
            break;
        };
        seen.extend(p.facts.iter().map(|f| f.offset));
        api.confirm_receipt("enterprise-pull", last).await.unwrap();
    }
    assert!(
        o[4..].iter().all(|o| seen.contains(o)),
        "lost facts: {seen:?}"
    );
    assert_eq!(stream_messages(&z, "facts_operational").await, 10);
}

#[tokio::test]
async fn unconfirmed_facts_are_redelivered_after_ack_wait() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let o = append_in_order(&api, "r", 3).await;
    let first = api
        .fetch_facts(req("enterprise-pull", 10, 0))
        .await
        .unwrap();
    assert_eq!(first.facts.len(), 3);
    assert!(first.facts.iter().all(|f| f.delivery_count == 1));
    let again = api
        .fetch_facts(req("enterprise-pull", 10, 4000))
        .await
        .unwrap();
    let offsets: Vec<u64> = again.facts.iter().map(|f| f.offset).collect();
    assert_eq!(offsets, o);
    assert!(again.facts.iter().all(|f| f.delivery_count == 2));
}

#[tokio::test]
async fn frontier_advances_only_over_a_contiguous_confirmed_prefix() {
    let nats = server();
    let a = zone(config(&nats)).await;
    let b = zone(config(&nats)).await;
    let (api_a, api_b) = (engine(&a), engine(&b));
    let o = append_in_order(&api_a, "c", 6).await;
    let pa = api_a
        .fetch_facts(req("enterprise-pull", 3, 0))
        .await
        .unwrap();
    let pb = api_b
        .fetch_facts(req("enterprise-pull", 3, 0))
        .await
        .unwrap();
    assert_eq!(
        pa.facts.iter().map(|f| f.offset).collect::<Vec<_>>(),
        o[..3]
    );
    assert_eq!(
        pb.facts.iter().map(|f| f.offset).collect::<Vec<_>>(),
        o[3..]
    );
    // B confirms first: the first three are still open, so the frontier stays.
    assert_eq!(
        api_b
            .confirm_receipt("enterprise-pull", o[5])
            .await
            .unwrap()
            .offset,
        0
    );
    // A closes the gap: the frontier jumps over both pages.
    assert_eq!(
        api_a
            .confirm_receipt("enterprise-pull", o[2])
            .await
            .unwrap()
            .offset,
        o[5]
    );
}

#[tokio::test]
async fn confirm_never_acknowledges_a_page_the_receiver_did_not_receive() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let o = append_in_order(&api, "p", 6).await;
    // Page 1 goes to a receiver that crashes before appending it.
    let lost = api.fetch_facts(req("enterprise-pull", 3, 0)).await.unwrap();
    assert_eq!(lost.facts.len(), 3);
    // Its successor gets page 2 and confirms it: page 1 stays open.
    let p2 = api.fetch_facts(req("enterprise-pull", 3, 0)).await.unwrap();
    assert_eq!(p2.facts.first().map(|f| f.offset), Some(o[3]));
    assert_eq!(
        api.confirm_receipt("enterprise-pull", o[5])
            .await
            .unwrap()
            .offset,
        0
    );
    // Page 1 comes again after the ack wait, and only then is the frontier whole.
    let again = api
        .fetch_facts(req("enterprise-pull", 10, 4000))
        .await
        .unwrap();
    assert_eq!(
        again.facts.iter().map(|f| f.offset).collect::<Vec<_>>(),
        o[..3]
    );
    assert_eq!(
        api.confirm_receipt("enterprise-pull", o[2])
            .await
            .unwrap()
            .offset,
        o[5]
    );
}

#[tokio::test]
async fn instances_sharing_a_consumer_get_disjoint_pages_that_cover_every_fact() {
    let nats = server();
    let a = zone(config(&nats)).await;
    let b = zone(config(&nats)).await;
    let writer = engine(&a);
    let o = append_in_order(&writer, "s", 200).await;
    let mut handles = Vec::new();
    for z in [a.clone(), b.clone()] {
        handles.push(tokio::spawn(async move {
            let api = engine(&z);
            let mut mine = Vec::new();
            loop {
                let p = api
                    .fetch_facts(req("enterprise-pull", 7, 200))
                    .await
                    .unwrap();
                let Some(last) = p.facts.last().map(|f| f.offset) else {
                    break;
                };
                mine.extend(p.facts.iter().map(|f| f.offset));
                api.confirm_receipt("enterprise-pull", last).await.unwrap();
            }
            mine
        }));
    }
    let ra = handles.remove(0).await.unwrap();
    let rb = handles.remove(0).await.unwrap();
    let sa: HashSet<u64> = ra.iter().copied().collect();
    let sb: HashSet<u64> = rb.iter().copied().collect();
    assert!(sa.is_disjoint(&sb), "pages overlap");
    assert_eq!(sa.len() + sb.len(), 200);
    assert_eq!(sa.union(&sb).copied().max(), o.last().copied());
}

#[tokio::test]
async fn idle_fetch_waits_for_a_new_fact_and_returns_it() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let empty = api
        .fetch_facts(req("enterprise-pull", 10, 200))
        .await
        .unwrap();
    assert!(empty.facts.is_empty());
    let writer = engine(&z);
    let w = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer.append_fact(fact("late", 1)).await.unwrap();
    });
    let page = api
        .fetch_facts(req("enterprise-pull", 10, 10_000))
        .await
        .unwrap();
    w.await.unwrap();
    assert_eq!(page.facts.len(), 1);
    assert_eq!(page.facts[0].message.envelope.message_id, "late");
}

#[tokio::test]
async fn unknown_consumer_is_refused() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let e = engine(&z)
        .fetch_facts(req("nobody", 1, 0))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::UnknownConsumer);
    let e = engine(&z).confirm_receipt("nobody", 1).await.unwrap_err();
    assert_eq!(e.reason(), Reason::UnknownConsumer);
}

#[tokio::test]
async fn existing_stream_with_conflicting_settings_is_reported_not_changed() {
    let nats = server();
    let mut cfg = config(&nats);
    zone(cfg.clone()).await;
    cfg.duplicate_window = Duration::from_secs(60);
    let err = JetStreamZone::connect(cfg)
        .await
        .err()
        .expect("must refuse");
    match err {
        SinkError::Conflict { name, field, .. } => {
            assert_eq!((name.as_str(), field), ("bsfg_log", "duplicate_window"));
        }
        other => panic!("unexpected {other}"),
    }
    // The stream kept its original settings.
    let z = zone(config(&nats)).await;
    let js = async_nats::jetstream::new(z.client().clone());
    let mut s = js.get_stream("bsfg_log").await.unwrap();
    assert_eq!(
        s.info().await.unwrap().config.duplicate_window,
        Duration::from_secs(120)
    );
}

#[tokio::test]
async fn a_class_retention_change_applies_to_new_facts_without_touching_the_stream() {
    let nats = server();
    let mut cfg = config(&nats);
    cfg.classes[0].max_age = Duration::from_secs(3);
    cfg.duplicate_window = Duration::from_secs(1);
    let z = zone(cfg.clone()).await;
    let short = engine(&z).append_fact(fact("ttl-1", 1)).await.unwrap();
    drop(z);
    cfg.classes[0].max_age = Duration::from_secs(3600);
    let z = zone(cfg).await;
    let long = engine(&z).append_fact(fact("ttl-2", 2)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let js = async_nats::jetstream::new(z.client().clone());
    let s = js.get_stream("bsfg_log").await.unwrap();
    assert!(
        s.direct_get(short.offset).await.is_err(),
        "the 3 s fact expired"
    );
    assert!(
        s.direct_get(long.offset).await.is_ok(),
        "the 1 h fact stays"
    );
    // Its id is remembered past its fact.
    let again = engine(&z).append_fact(fact("ttl-1", 1)).await.unwrap();
    assert_eq!((again.offset, again.duplicate), (short.offset, true));
}

#[tokio::test]
async fn start_up_tells_a_lazily_flushing_server_from_a_syncing_one() {
    let durable = server();
    assert_eq!(
        zone(config(&durable)).await.durability(),
        Durability::SyncAlways
    );
    let lazy = bsfg_testkit::NatsServer::start_with(bsfg_testkit::NatsOptions {
        sync_always: false,
        ..Default::default()
    })
    .unwrap();
    let z = zone(config(&lazy)).await;
    assert_eq!(z.durability(), Durability::Lazy);
    assert_eq!(z.publish_mode(), PublishMode::Pipelined);
    let mut no_monitor: JetStreamConfig = config(&lazy);
    no_monitor.monitor_url = None;
    assert_eq!(zone(no_monitor).await.durability(), Durability::Unknown);
}

#[tokio::test]
async fn a_full_append_queue_refuses_with_backpressure_and_stores_nothing() {
    let mut nats = server();
    let mut cfg = config(&nats);
    cfg.queue_capacity = 1;
    cfg.max_inflight_batches = Some(1);
    let z = zone(cfg).await;
    // The server goes away: one batch stalls in flight, the next waits for its slot,
    // and one more fills the queue.
    nats.kill();
    let mut stalled = Vec::new();
    for i in 0..3 {
        let api = engine(&z);
        stalled.push(tokio::spawn(async move {
            api.append_fact(fact(&format!("bp-{i}"), i)).await
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let e = engine(&z).append_fact(fact("bp-3", 3)).await.unwrap_err();
    assert_eq!(e.reason(), Reason::Backpressure, "{e}");
    // The stalled appends end with an answer (stored or unavailable), never silence.
    for t in stalled {
        let _ = t.await.unwrap();
    }
    nats.restart().unwrap();
    // bp-3 was refused, so it is new when sent again.
    let mut stored = None;
    for _ in 0..50 {
        match engine(&z).append_fact(fact("bp-3", 3)).await {
            Ok(o) => {
                stored = Some(o);
                break;
            }
            Err(e) if e.reason() == Reason::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!stored.expect("zone recovers after restart").duplicate);
}

#[tokio::test]
async fn retention_past_unconfirmed_facts_shows_as_first_offset_beyond_the_frontier() {
    // The gap signal a receiver relies on: when retention removes facts this consumer
    // never confirmed, its frontier stays while the stream's first offset moves past
    // it. JetStream itself delivers what remains without a word, and a confirm past
    // the hole would bury it, so the receiver must check before it confirms.
    let nats = server();
    let mut cfg = config(&nats);
    cfg.classes[0].max_age = Duration::from_secs(2);
    cfg.duplicate_window = Duration::from_secs(1);
    let z = zone(cfg).await;
    let api = engine(&z);
    let o = append_in_order(&api, "g", 5).await;
    let p = api.fetch_facts(req("enterprise-pull", 2, 0)).await.unwrap();
    assert_eq!((p.first_offset, p.frontier), (1, 0), "no gap yet");
    api.confirm_receipt("enterprise-pull", o[1]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = append_in_order(&api, "h", 3).await;
    let p = api
        .fetch_facts(req("enterprise-pull", 10, 500))
        .await
        .unwrap();
    // The class chain says where its retained facts begin: after the last expired
    // one, whatever else the log holds between.
    assert_eq!(
        (p.first_offset, p.last_offset, p.frontier),
        (o[4] + 1, n[2], o[1])
    );
    assert!(
        p.first_offset > p.frontier + 1,
        "the last three of the first five are gone unconfirmed"
    );
    assert_eq!(p.facts.iter().map(|f| f.offset).collect::<Vec<_>>(), n);
    // Confirming past the hole moves the frontier over it: the gap is then invisible.
    assert_eq!(
        api.confirm_receipt("enterprise-pull", n[2])
            .await
            .unwrap()
            .offset,
        n[2]
    );
}

#[tokio::test]
async fn known_limit_when_every_unconfirmed_fact_expires_the_frontier_jumps_to_the_end() {
    // JetStream behaviour the link must guard against (see ARCHITECTURE.md): when
    // facts that were delivered but not confirmed expire and the stream is left empty,
    // the consumer's ack floor moves to the last offset although nothing was
    // confirmed, so page metadata alone cannot show this gap. (Facts never delivered
    // do not move it.) A receiver needs its own durable record of what it confirmed.
    // If this test starts to fail, JetStream changed and the guard can be simpler.
    let nats = server();
    let mut cfg = config(&nats);
    cfg.classes[0].max_age = Duration::from_secs(1);
    cfg.duplicate_window = Duration::from_secs(1);
    let z = zone(cfg).await;
    let api = engine(&z);
    let o = append_in_order(&api, "x", 3).await;
    let delivered = api
        .fetch_facts(req("enterprise-pull", 10, 0))
        .await
        .unwrap();
    assert_eq!(delivered.facts.len(), 3, "delivered, never confirmed");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = api
        .fetch_facts(req("enterprise-pull", 10, 0))
        .await
        .unwrap();
    assert!(p.facts.is_empty());
    assert_eq!((p.first_offset, p.last_offset, p.frontier), (0, o[2], o[2]));
}

#[tokio::test]
async fn existing_consumer_with_conflicting_settings_is_reported_not_changed() {
    let nats = server();
    zone(config(&nats)).await;
    let mut cfg = config(&nats);
    cfg.consumers[0].ack_wait = Duration::from_secs(9);
    match JetStreamZone::connect(cfg)
        .await
        .err()
        .expect("must refuse")
    {
        SinkError::Conflict {
            kind, name, field, ..
        } => {
            assert_eq!(
                (kind, name.as_str(), field),
                ("consumer", "enterprise-pull", "ack_wait")
            );
        }
        other => panic!("unexpected {other}"),
    }
    // Unchanged: the original settings still connect.
    zone(config(&nats)).await;
}

#[tokio::test]
async fn connect_refuses_a_max_fact_bytes_the_server_cannot_hold_with_headers() {
    let nats = bsfg_testkit::NatsServer::start_with(bsfg_testkit::NatsOptions {
        max_payload: 1024 * 1024,
        ..Default::default()
    })
    .unwrap();
    let mut cfg = config(&nats);
    cfg.max_fact_bytes = Some(1024 * 1024);
    let Err(SinkError::Config(msg)) = JetStreamZone::connect(cfg.clone()).await else {
        panic!("a 1 MiB fact cannot fit a 1 MiB max_payload with its headers");
    };
    assert!(
        msg.contains("max_payload") && msg.contains("1048576"),
        "{msg}"
    );
    let Err(SinkError::Config(_)) =
        bsfg_sink_jetstream::check_server(&cfg, Duration::from_secs(2)).await
    else {
        panic!("the check alone refuses it too");
    };
    // The default leaves room for the headers.
    cfg.max_fact_bytes = Some(bsfg_core::Limits::default().max_fact_bytes);
    assert_eq!(
        bsfg_sink_jetstream::check_server(&cfg, Duration::from_secs(2))
            .await
            .unwrap(),
        1024 * 1024
    );
    JetStreamZone::connect(cfg).await.unwrap();
}

#[tokio::test]
async fn a_fact_too_large_for_the_server_is_refused_alone_and_its_batch_is_stored() {
    let nats = bsfg_testkit::NatsServer::start_with(bsfg_testkit::NatsOptions {
        max_payload: 64 * 1024,
        ..Default::default()
    })
    .unwrap();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let mut big = fact("big", 1);
    big.fact.object_json = format!("{{\"blob\":\"{}\"}}", "\\\"".repeat(40_000));
    // Appended together, as a producer's batch would be.
    let results = futures::future::join_all(
        [fact("a", 1), big, fact("b", 2)]
            .into_iter()
            .map(|m| api.append_fact(m)),
    )
    .await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    match &results[1] {
        Err(BoundaryError::InvalidArgument { field, rule }) => {
            assert_eq!(field, "fact");
            assert!(rule.contains("max_payload"), "{rule}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        results[1].as_ref().unwrap_err().reason(),
        Reason::InvalidArgument
    );
    assert_eq!(stream_messages(&z, "facts_operational").await, 2);
}

#[tokio::test]
async fn an_index_horizon_shorter_than_a_class_retention_is_refused_before_anything_is_created() {
    let nats = server();
    let mut cfg = config(&nats);
    // operational keeps facts 30 days; forgetting ids after one would let a replay
    // store a second copy while the first is still there.
    cfg.index_max_age = Duration::from_secs(86_400);
    let e = match JetStreamZone::connect(cfg).await {
        Ok(_) => panic!("a horizon shorter than a class's retention must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("index_max_age") && e.contains("operational"),
        "{e}"
    );
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    assert!(js.get_stream("bsfg_index").await.is_err());
}

#[tokio::test]
async fn a_page_of_large_facts_loads_no_more_than_its_byte_budget_and_the_rest_follows() {
    let nats = server();
    let mut cfg = config(&nats);
    // A budget of 2 x 100 000 + 64 KiB: two or three facts of ~90 kB per page.
    cfg.max_fact_bytes = Some(100_000);
    let z = zone(cfg).await;
    let api = engine(&z);
    let big = "x".repeat(90_000);
    for i in 0..20 {
        let mut m = fact(&format!("big:{i}"), i);
        m.fact.object_json = format!(r#"{{"blob":"{big}","i":{i}}}"#);
        api.append_fact(m).await.unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let page = api
            .fetch_facts(req("enterprise-pull", 1000, 0))
            .await
            .unwrap();
        assert!(
            !page.facts.is_empty(),
            "every page carries at least one fact"
        );
        let bytes: usize = page
            .facts
            .iter()
            .map(|f| f.message.fact.object_json.len())
            .sum();
        assert!(
            page.facts.len() <= 3 && bytes <= 2 * 100_000 + 64 * 1024,
            "{} facts, {bytes} bytes in one page",
            page.facts.len()
        );
        let last = page.facts.last().unwrap().offset;
        seen.extend(
            page.facts
                .iter()
                .map(|f| f.message.envelope.message_id.clone()),
        );
        api.confirm_receipt("enterprise-pull", last).await.unwrap();
    }
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (20, 20));
}

#[tokio::test]
async fn a_link_checkpoint_only_moves_forward_whoever_records_it() {
    use bsfg_core::FactLog;
    let nats = server();
    let one = zone(config(&nats)).await;
    let mut other_cfg = config(&nats);
    other_cfg.index_path = None;
    let two = zone(other_cfg).await;
    assert_eq!(one.link_checkpoint("from-plant").await.unwrap(), None);
    one.record_link_checkpoint("from-plant", 50).await.unwrap();
    // A gateway behind (an older page's confirm) does not move it back.
    two.record_link_checkpoint("from-plant", 30).await.unwrap();
    assert_eq!(one.link_checkpoint("from-plant").await.unwrap(), Some(50));
    // Both recording at once: the highest stands.
    let (a, b) = futures::join!(
        one.record_link_checkpoint("from-plant", 70),
        two.record_link_checkpoint("from-plant", 90)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(two.link_checkpoint("from-plant").await.unwrap(), Some(90));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_appending_to_one_class_at_once_all_succeed_and_store_each_fact_once() {
    // Every round of every gateway compares-and-sets the class head: they contend on
    // each batch. A lost round is retried (error 10164 of an atomic batch included),
    // never answered as a failure.
    let nats = server();
    let mut gateways = Vec::new();
    for _ in 0..3 {
        let mut cfg = config(&nats);
        cfg.index_path = None;
        gateways.push(engine(&zone(cfg).await));
    }
    let per = 1500;
    let tasks = gateways.iter().enumerate().map(|(g, api)| async move {
        let appends = (0..per).map(|i| api.append_fact(fact(&format!("g{g}-{i}"), i as i64)));
        futures::future::join_all(appends).await
    });
    let results = futures::future::join_all(tasks).await;
    for (g, r) in results.iter().enumerate() {
        let failed: Vec<_> = r.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "gateway {g}: {} failed: {:?}",
            failed.len(),
            failed.first()
        );
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    assert_eq!(class_facts(&js, "operational").await, 3 * per as u64);
}
