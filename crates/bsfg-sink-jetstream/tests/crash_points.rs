//! The append write order under crashes and races: a round's reservations, facts
//! and class heads are one atomic batch, so the states a crash can leave are "all of
//! it" or "none of it". Each is built by hand or by a second gateway whose look-up
//! the first does not share, then a retry must store exactly one copy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_nats::HeaderMap;
use bsfg_core::{BoundaryApi, Limits, Reason};
use bsfg_sink_jetstream::PublishMode;
use bsfg_sink_jetstream::append::{HDR_DIGEST, HDR_MESSAGE_ID};
use bsfg_sink_jetstream::index;
use common::*;

#[tokio::test]
async fn a_batch_broken_off_before_its_commit_stores_nothing_and_the_retry_stores_one() {
    // A gateway that died while sending its round: the server holds the batch's
    // first messages uncommitted and never applies them.
    let nats = server();
    let z = zone(config(&nats)).await;
    let msg = fact("crash-1", 7);
    let v = Limits::default().validate(msg.clone()).unwrap();
    let t = index::token("crash-1");
    let client = z.client().clone();
    let record = serde_json::json!({"r": [{"id": "crash-1", "digest": v.digest().to_hex(),
        "stream": "facts_operational", "subject": "bsfg.log.facts.operational.batch.dead00", "d": 1}]});
    let mut h = HeaderMap::new();
    h.insert("Nats-Batch-Id", "broken-off-batch");
    h.insert("Nats-Batch-Sequence", "1");
    client
        .publish_with_headers(
            index::bucket_subject(index::bucket(&t)),
            h,
            record.to_string().into(),
        )
        .await
        .unwrap();
    let mut h = HeaderMap::new();
    h.insert("Nats-Batch-Id", "broken-off-batch");
    h.insert("Nats-Batch-Sequence", "2");
    h.insert(HDR_MESSAGE_ID, "crash-1");
    h.insert(HDR_DIGEST, v.digest().to_hex().as_str());
    client
        .publish_with_headers(
            "bsfg.log.facts.operational.batch.dead00",
            h,
            v.stored_form().clone(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    assert_eq!(stream_messages(&z, "facts_operational").await, 0);

    let api = engine(&z);
    let out = api.append_fact(msg.clone()).await.unwrap();
    assert!(!out.duplicate);
    let again = api.append_fact(msg).await.unwrap();
    assert_eq!((again.offset, again.duplicate), (out.offset, true));
    assert_eq!(stream_messages(&z, "facts_operational").await, 1);
}

#[tokio::test]
async fn a_commit_whose_answer_never_arrived_is_found_by_the_retry_not_stored_again() {
    // Gateway A's look-up does not know what gateway B committed (as after a commit
    // whose acknowledgement was lost): A's batch names the bucket's old sequence,
    // its compare-and-set fails, A reads the index and answers the stored offset.
    let nats = server();
    let cfg = config(&nats);
    let a = zone(cfg.clone()).await;
    let b = zone(cfg).await;
    // A knows the heads and buckets as they are before B's commit.
    engine(&a).append_fact(fact("warm-up", 0)).await.unwrap();
    let stored = engine(&b).append_fact(fact("crash-2", 8)).await.unwrap();
    assert!(!stored.duplicate);
    let out = engine(&a).append_fact(fact("crash-2", 8)).await.unwrap();
    assert_eq!((out.offset, out.duplicate), (stored.offset, true));
    let e = engine(&a)
        .append_fact(fact("crash-2", 9))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::ConflictingDuplicate);
    assert_eq!(stream_messages(&a, "facts_operational").await, 2);
}

#[tokio::test]
async fn many_concurrent_retries_across_two_gateways_store_one_copy() {
    concurrent_retries_store_one_copy(PublishMode::AtomicBatch).await;
}

#[tokio::test]
async fn many_concurrent_pipelined_retries_across_two_gateways_store_one_copy() {
    concurrent_retries_store_one_copy(PublishMode::Pipelined).await;
}

async fn concurrent_retries_store_one_copy(mode: PublishMode) {
    let nats = server();
    let mut cfg = config(&nats);
    cfg.publish_mode = Some(mode);
    let a = zone(cfg.clone()).await;
    let b = zone(cfg).await;
    let msg = fact("crash-3", 1);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let api = engine(if i % 2 == 0 { &a } else { &b });
        let m = msg.clone();
        tasks.push(tokio::spawn(
            async move { api.append_fact(m).await.unwrap() },
        ));
    }
    let mut offsets = Vec::new();
    let mut fresh = 0;
    for t in tasks {
        let o = t.await.unwrap();
        fresh += usize::from(!o.duplicate);
        offsets.push(o.offset);
    }
    offsets.dedup();
    assert_eq!(offsets.len(), 1, "{offsets:?}");
    assert_eq!(fresh, 1, "exactly one append stored it");
    assert_eq!(stream_messages(&a, "facts_operational").await, 1);
}

#[tokio::test]
async fn conflicting_payloads_racing_on_two_gateways_in_two_classes_store_exactly_one() {
    // One index for the zone: the same id with another payload is refused even when
    // its class label sends it to another class, and even when both race.
    let nats = server();
    let cfg = config(&nats);
    let a = zone(cfg.clone()).await;
    let b = zone(cfg).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut m = fact("race-1", i);
        if i % 2 == 1 {
            m.envelope.labels.insert("class".into(), "audit".into());
        }
        let api = engine(if i % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move { api.append_fact(m).await }));
    }
    let mut stored = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(o) => stored += usize::from(!o.duplicate),
            Err(e) => {
                assert_eq!(e.reason(), Reason::ConflictingDuplicate, "{e}");
                conflicts += 1;
            }
        }
    }
    assert_eq!((stored, conflicts), (1, 9));
    let facts =
        stream_messages(&a, "facts_operational").await + stream_messages(&a, "facts_audit").await;
    assert_eq!(facts, 1);
}

#[tokio::test]
async fn two_gateways_writing_one_class_keep_one_chain_of_its_facts() {
    // Every fact's place in its class's chain (Bsfg-Prev, or its predecessor in the
    // batch) names the class's previous fact, across gateways: what FetchFacts
    // reads to tell expired facts from other messages of the log.
    let nats = server();
    let cfg = config(&nats);
    let a = zone(cfg.clone()).await;
    let b = zone(cfg).await;
    let (ra, rb) = tokio::join!(
        append_many(&a, "chain-a", 150),
        append_many(&b, "chain-b", 150)
    );
    let mut all: Vec<u64> = ra.into_iter().chain(rb).collect();
    all.sort();
    let js = async_nats::jetstream::new(a.client().clone());
    let log = js.get_stream(index::LOG_STREAM).await.unwrap();
    let mut prev = 0;
    for offset in &all {
        let m = log.direct_get(*offset).await.unwrap();
        let named = match m.headers.get(index::HDR_PREV) {
            Some(v) => v.as_str().parse::<u64>().unwrap(),
            None => offset - 1,
        };
        assert_eq!(named, prev, "offset {offset}");
        prev = *offset;
    }
    // The head names the last fact.
    let head = log
        .direct_get_last_for_subject(index::head_subject("operational"))
        .await
        .unwrap();
    let back: serde_json::Value = serde_json::from_slice(&head.payload).unwrap();
    assert_eq!(head.sequence - back["back"].as_u64().unwrap(), prev);
}

#[tokio::test]
async fn an_id_kept_without_its_fact_is_answered_duplicate_and_never_stored_again() {
    // What the migration writes for an id whose fact retention already took.
    let nats = server();
    let z = zone(config(&nats)).await;
    let v = Limits::default().validate(fact("gone-1", 1)).unwrap();
    let t = index::token("gone-1");
    let record = serde_json::json!({"r": [{"id": "gone-1", "digest": v.digest().to_hex(),
        "stream": "facts_operational", "subject": "bsfg.log.facts.operational.batch.ffff00"}]});
    let js = async_nats::jetstream::new(z.client().clone());
    js.publish(
        index::bucket_subject(index::bucket(&t)),
        record.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    drop(z);
    let z = zone(config(&nats)).await;
    let out = engine(&z).append_fact(fact("gone-1", 1)).await.unwrap();
    assert_eq!((out.offset, out.duplicate), (0, true));
    assert_eq!(stream_messages(&z, "facts_operational").await, 0);
}

/// Appends `n` facts `<prefix>-<i>` and returns their offsets.
async fn append_many(
    z: &std::sync::Arc<bsfg_sink_jetstream::JetStreamZone>,
    prefix: &str,
    n: u64,
) -> Vec<u64> {
    let api = engine(z);
    let mut tasks = Vec::new();
    for i in 0..n {
        let api = api.clone();
        let id = format!("{prefix}-{i}");
        tasks.push(tokio::spawn(async move {
            api.append_fact(fact(&id, i as i64)).await.unwrap()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        let o = t.await.unwrap();
        assert!(!o.duplicate);
        out.push(o.offset);
    }
    out
}

#[tokio::test]
async fn a_zone_restarted_after_losing_its_look_up_store_rebuilds_it_and_answers_duplicates() {
    let nats = server();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.redb");
    let mut cfg = config(&nats);
    cfg.index_path = Some(path.clone());
    let z = zone(cfg.clone()).await;
    let offsets = append_many(&z, "lost", 300).await;
    assert_eq!(z.index_usage().await.unwrap().ids, 300);
    drop(z);
    // The look-up file is gone (disk replaced, directory wiped).
    std::fs::remove_file(&path).unwrap();

    let z = zone(cfg).await;
    assert_eq!(
        z.index_usage().await.unwrap().ids,
        300,
        "rebuilt from the index stream"
    );
    let api = engine(&z);
    for (i, offset) in offsets.iter().enumerate() {
        let out = api
            .append_fact(fact(&format!("lost-{i}"), i as i64))
            .await
            .unwrap();
        assert_eq!((out.offset, out.duplicate), (*offset, true), "lost-{i}");
    }
    let e = api.append_fact(fact("lost-7", 1000)).await.unwrap_err();
    assert_eq!(e.reason(), bsfg_core::Reason::ConflictingDuplicate);
    assert_eq!(stream_messages(&z, "facts_operational").await, 300);
}

#[tokio::test]
async fn a_restarted_zone_reads_only_what_its_look_up_store_has_not_seen() {
    let nats = server();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&nats);
    cfg.index_path = Some(dir.path().join("index.redb"));
    let a = zone(cfg.clone()).await;
    let first = append_many(&a, "kept", 50).await;
    // Meanwhile a second gateway of the zone (in-memory look-up) appends more.
    let mut other = cfg.clone();
    other.index_path = None;
    let b = zone(other).await;
    let second = append_many(&b, "other", 50).await;
    drop(a);
    let a = zone(cfg).await;
    assert_eq!(a.index_usage().await.unwrap().ids, 100);
    let api = engine(&a);
    for (i, o) in first.iter().enumerate() {
        let out = api
            .append_fact(fact(&format!("kept-{i}"), i as i64))
            .await
            .unwrap();
        assert_eq!((out.offset, out.duplicate), (*o, true));
    }
    for (i, o) in second.iter().enumerate() {
        let out = api
            .append_fact(fact(&format!("other-{i}"), i as i64))
            .await
            .unwrap();
        assert_eq!((out.offset, out.duplicate), (*o, true));
    }
    assert_eq!(stream_messages(&a, "facts_operational").await, 100);
}

#[tokio::test]
async fn a_zone_with_the_per_id_index_layout_is_refused_with_the_command_to_run() {
    let nats = server();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "bsfg_ids".into(),
        subjects: vec!["bsfg.ids.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let e = match bsfg_sink_jetstream::JetStreamZone::connect(config(&nats)).await {
        Ok(_) => panic!("a zone of the old layout must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("bsfg index migrate"), "{e}");
    // Nothing was created or changed.
    assert!(js.get_stream("bsfg_log").await.is_err());
}

#[tokio::test]
async fn a_zone_of_the_two_stream_layout_is_refused_with_the_command_to_run() {
    let nats = server();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "bsfg_index".into(),
        subjects: vec!["bsfg.index.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let e = match bsfg_sink_jetstream::JetStreamZone::connect(config(&nats)).await {
        Ok(_) => panic!("a zone of the two-stream layout must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("bsfg index migrate") && e.contains("two-stream"),
        "{e}"
    );
    assert!(js.get_stream("bsfg_log").await.is_err());
}
