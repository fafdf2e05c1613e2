//! The append write order under crashes: the state a crash leaves between the
//! pipeline's writes is built by hand, then a retry must store exactly one copy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_nats::HeaderMap;
use bsfg_core::{BoundaryApi, Limits};
use bsfg_sink_jetstream::PublishMode;
use bsfg_sink_jetstream::append::{HDR_DIGEST, HDR_MESSAGE_ID, id_token};
use common::*;

async fn reserve_only(z: &bsfg_sink_jetstream::JetStreamZone, id: &str, digest: &str) -> String {
    let js = async_nats::jetstream::new(z.client().clone());
    let token = id_token(id);
    let subject = format!("facts.operational.batch.{token}");
    let entry = serde_json::json!({"id": id, "digest": digest, "stream": "facts_operational", "subject": subject});
    js.publish(format!("bsfg.ids.{token}"), entry.to_string().into())
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
    let body = serde_json::to_vec(validated.message()).unwrap();
    let stored = js
        .publish_with_headers(subject, h, body.into())
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
