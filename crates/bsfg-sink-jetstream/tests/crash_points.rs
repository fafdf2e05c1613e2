//! The append write order under crashes: the state a crash leaves between the
//! pipeline's writes is built by hand, then a retry must store exactly one copy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_nats::HeaderMap;
use bsfg_core::{BoundaryApi, Limits};
use bsfg_sink_jetstream::PublishMode;
use bsfg_sink_jetstream::append::{HDR_DIGEST, HDR_MESSAGE_ID};
use bsfg_sink_jetstream::index;
use common::*;

/// Writes a reservation the way step 2 does, as a gateway that crashed right after
/// would leave it; returns the fact subject it names.
async fn reserve_only(z: &bsfg_sink_jetstream::JetStreamZone, id: &str, digest: &str) -> String {
    let js = async_nats::jetstream::new(z.client().clone());
    let token = index::token(id);
    // A writer number no gateway of this test has.
    let subject = format!(
        "facts.operational.batch.dead{:02x}",
        index::fact_bucket(&token)
    );
    let entry = serde_json::json!({"id": id, "digest": digest, "stream": "facts_operational", "subject": subject, "after": 0});
    js.publish(
        index::bucket_subject(index::bucket(&token)),
        entry.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    subject
}

#[tokio::test]
async fn crash_after_reservation_before_publish_is_completed_by_the_retry() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let msg = fact("crash-1", 7);
    let digest = Limits::default()
        .validate(msg.clone())
        .unwrap()
        .digest()
        .to_hex();
    reserve_only(&z, "crash-1", &digest).await;
    assert_eq!(stream_messages(&z, "facts_operational").await, 0);

    let api = engine(&z);
    let out = api.append_fact(msg.clone()).await.unwrap();
    assert!(!out.duplicate);
    let again = api.append_fact(msg).await.unwrap();
    assert_eq!((again.offset, again.duplicate), (out.offset, true));
    assert_eq!(stream_messages(&z, "facts_operational").await, 1);
}

#[tokio::test]
async fn crash_after_publish_before_offset_record_returns_the_stored_offset() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let validated = Limits::default().validate(fact("crash-2", 8)).unwrap();
    let digest = validated.digest().to_hex();
    let subject = reserve_only(&z, "crash-2", &digest).await;
    // The fact made it to the stream; the index never learnt its offset.
    let js = async_nats::jetstream::new(z.client().clone());
    let mut h = HeaderMap::new();
    h.insert(HDR_MESSAGE_ID, "crash-2");
    h.insert(HDR_DIGEST, digest.as_str());
    let stored = js
        .publish_with_headers(subject, h, validated.stored_form().clone())
        .await
        .unwrap()
        .await
        .unwrap();

    let out = engine(&z).append_fact(fact("crash-2", 8)).await.unwrap();
    assert_eq!((out.offset, out.duplicate), (stored.sequence, true));
    assert_eq!(stream_messages(&z, "facts_operational").await, 1);
    // A conflicting payload is still refused with the original offset.
    let e = engine(&z)
        .append_fact(fact("crash-2", 9))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), bsfg_core::Reason::ConflictingDuplicate);
}

#[tokio::test]
async fn many_concurrent_retries_of_an_orphan_reservation_store_one_copy() {
    orphan_reservation_retries_store_one_copy(PublishMode::AtomicBatch).await;
}

#[tokio::test]
async fn many_concurrent_pipelined_retries_of_an_orphan_reservation_store_one_copy() {
    orphan_reservation_retries_store_one_copy(PublishMode::Pipelined).await;
}

async fn orphan_reservation_retries_store_one_copy(mode: PublishMode) {
    let nats = server();
    let mut cfg = config(&nats);
    cfg.publish_mode = Some(mode);
    let a = zone(cfg.clone()).await;
    let b = zone(cfg).await;
    let msg = fact("crash-3", 1);
    let digest = Limits::default()
        .validate(msg.clone())
        .unwrap()
        .digest()
        .to_hex();
    reserve_only(&a, "crash-3", &digest).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let api = engine(if i % 2 == 0 { &a } else { &b });
        let m = msg.clone();
        tasks.push(tokio::spawn(
            async move { api.append_fact(m).await.unwrap() },
        ));
    }
    let mut offsets = Vec::new();
    for t in tasks {
        offsets.push(t.await.unwrap().offset);
    }
    offsets.dedup();
    assert_eq!(offsets.len(), 1, "{offsets:?}");
    assert_eq!(stream_messages(&a, "facts_operational").await, 1);
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
    assert!(js.get_stream("bsfg_index").await.is_err());
    assert!(js.get_stream("facts_operational").await.is_err());
}

#[tokio::test]
async fn a_fact_published_by_another_writer_on_the_same_subject_is_read_before_completing() {
    // The orphan's fact subject already holds other facts after the reservation's
    // `after`, published by another gateway: the retry reads them, finds its fact
    // is not among them, and stores exactly one copy after them.
    let nats = server();
    let z = zone(config(&nats)).await;
    let msg = fact("crash-4", 4);
    let validated = Limits::default().validate(msg.clone()).unwrap();
    let subject = reserve_only(&z, "crash-4", &validated.digest().to_hex()).await;
    let js = async_nats::jetstream::new(z.client().clone());
    for i in 0..3 {
        let mut h = HeaderMap::new();
        h.insert(HDR_MESSAGE_ID, format!("someone-else-{i}").as_str());
        h.insert(HDR_DIGEST, "00");
        js.publish_with_headers(subject.clone(), h, validated.stored_form().clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let out = engine(&z).append_fact(msg.clone()).await.unwrap();
    assert_eq!((out.offset, out.duplicate), (4, false));
    let again = engine(&z).append_fact(msg).await.unwrap();
    assert_eq!((again.offset, again.duplicate), (4, true));
    assert_eq!(stream_messages(&z, "facts_operational").await, 4);
}
