//! Zones of earlier layouts are refused until `bsfg index migrate` moved them: the
//! per-id index (`bsfg_ids`) and the two-stream layout (`bsfg_index` beside
//! `facts_<class>`). After the move every remembered id is still answered, every
//! retained fact is in the log once, and consumers resume at their frontiers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull};
use bsfg_core::{BoundaryApi, FetchRequest, Limits, Reason};
use bsfg_sink_jetstream::append::{HDR_DIGEST, HDR_MESSAGE_ID, id_token};
use bsfg_sink_jetstream::{SinkError, StreamClass, index, streams};
use common::*;
use futures::StreamExt;

/// The class stream of the layouts before the log.
async fn old_class_stream(js: &jetstream::Context, cfg: &bsfg_sink_jetstream::JetStreamConfig) {
    let class = StreamClass::new(
        "operational",
        std::time::Duration::from_secs(30 * 24 * 3600),
    );
    js.create_stream(streams::class_stream_config(&class, cfg))
        .await
        .unwrap();
}

/// Publishes a fact as the old layouts stored it; returns its sequence.
async fn old_fact(js: &jetstream::Context, subject: &str, id: &str, value: i64) -> u64 {
    let v = Limits::default().validate(fact(id, value)).unwrap();
    let mut h = HeaderMap::new();
    h.insert(HDR_MESSAGE_ID, id);
    h.insert(HDR_DIGEST, v.digest().to_hex().as_str());
    js.publish_with_headers(subject.to_owned(), h, v.stored_form().clone())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

fn digest(id: &str, value: i64) -> String {
    Limits::default()
        .validate(fact(id, value))
        .unwrap()
        .digest()
        .to_hex()
}

async fn publish(js: &jetstream::Context, subject: String, body: String) {
    js.publish(subject, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The message id stored at an offset of the log.
async fn id_at(js: &jetstream::Context, offset: u64) -> String {
    let log = js.get_stream(index::LOG_STREAM).await.unwrap();
    let m = log.direct_get(offset).await.unwrap();
    m.headers.get(HDR_MESSAGE_ID).unwrap().as_str().to_owned()
}

#[tokio::test]
async fn index_migrate_moves_a_per_id_zone_to_the_log_and_the_zone_answers_every_id() {
    let nats = server();
    let cfg = config(&nats);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    old_class_stream(&js, &cfg).await;
    js.create_stream(jetstream::stream::Config {
        name: "bsfg_ids".into(),
        subjects: vec!["bsfg.ids.*".into()],
        max_messages_per_subject: 1,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..40 {
        let id = format!("old-{i}");
        let token = id_token(&id);
        let subject = format!("facts.operational.batch.{token}");
        let offset = old_fact(&js, &subject, &id, i).await;
        let mut entry = serde_json::json!({"id": id, "digest": digest(&id, i), "stream": "facts_operational", "subject": subject});
        if i % 4 != 0 {
            entry["offset"] = offset.into();
        }
        publish(&js, format!("bsfg.ids.{token}"), entry.to_string()).await;
    }
    // Reserved, never published (a crash between the old steps).
    let token = id_token("old-orphan");
    let entry = serde_json::json!({"id": "old-orphan", "digest": digest("old-orphan", 7), "stream": "facts_operational", "subject": format!("facts.operational.batch.{token}")});
    publish(&js, format!("bsfg.ids.{token}"), entry.to_string()).await;

    let refused = bsfg_sink_jetstream::JetStreamZone::connect(cfg.clone()).await;
    assert!(matches!(refused, Err(SinkError::Layout(_))));

    let m = bsfg_sink_jetstream::migrate_index(&cfg).await.unwrap();
    assert_eq!(
        (m.read, m.written, m.skipped, m.removed_legacy),
        (41, 41, 0, true)
    );
    assert_eq!(
        (m.facts, m.dropped_unstored, m.moved_two_stream),
        (40, 1, true)
    );
    for gone in ["bsfg_ids", "bsfg_index", "facts_operational"] {
        assert!(js.get_stream(gone).await.is_err(), "{gone}");
    }
    let again = bsfg_sink_jetstream::migrate_index(&cfg).await.unwrap();
    assert!(!again.removed_legacy && !again.moved_two_stream);

    let z = zone(cfg).await;
    assert_eq!(z.index_usage().await.unwrap().ids, 40);
    let api = engine(&z);
    for i in 0..40 {
        let id = format!("old-{i}");
        let out = api.append_fact(fact(&id, i)).await.unwrap();
        assert!(out.duplicate, "{id}");
        assert_eq!(id_at(&js, out.offset).await, id);
    }
    let e = api.append_fact(fact("old-3", 1000)).await.unwrap_err();
    assert_eq!(e.reason(), Reason::ConflictingDuplicate);
    // The orphan was never stored: the retry stores it, once.
    let orphan = api.append_fact(fact("old-orphan", 7)).await.unwrap();
    assert!(!orphan.duplicate);
    let again = api.append_fact(fact("old-orphan", 7)).await.unwrap();
    assert_eq!((again.offset, again.duplicate), (orphan.offset, true));
    assert_eq!(stream_messages(&z, "facts_operational").await, 41);
}

#[tokio::test]
async fn index_migrate_moves_a_two_stream_zone_with_its_consumers_at_their_frontiers() {
    let nats = server();
    let cfg = config(&nats);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    old_class_stream(&js, &cfg).await;
    js.create_stream(jetstream::stream::Config {
        name: "bsfg_index".into(),
        subjects: vec!["bsfg.index.*".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let old = js.get_stream("facts_operational").await.unwrap();
    let _: jetstream::consumer::PullConsumer = old
        .create_consumer(pull::Config {
            durable_name: Some("enterprise-pull".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: std::time::Duration::from_secs(1),
            max_ack_pending: 10_000,
            filter_subjects: vec!["facts.operational.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..10 {
        let id = format!("two-{i}");
        let t = index::token(&id);
        let subject = format!("facts.operational.batch.0000{:02x}", t[2]);
        let offset = old_fact(&js, &subject, &id, i).await;
        let mut r = serde_json::json!({"id": id, "digest": digest(&id, i), "stream": "facts_operational", "subject": subject, "after": offset - 1});
        if i % 2 == 0 {
            r["offset"] = offset.into();
        }
        let b = (u16::from(t[0]) << 4) | u16::from(t[1] >> 4);
        publish(&js, format!("bsfg.index.{b:03x}"), r.to_string()).await;
    }
    publish(&js, "bsfg.index.offsets".into(), r#"{"o":[]}"#.into()).await;
    // An id whose fact retention took (facts after its `after` are gone).
    let gone = serde_json::json!({"id": "two-gone", "digest": digest("two-gone", 1), "stream": "facts_operational", "subject": "facts.operational.batch.000000", "after": 0, "offset": 1});
    let t = index::token("two-gone");
    let b = (u16::from(t[0]) << 4) | u16::from(t[1] >> 4);
    publish(&js, format!("bsfg.index.{b:03x}"), gone.to_string()).await;
    // The reader confirmed the first three.
    let c: jetstream::consumer::PullConsumer = old.get_consumer("enterprise-pull").await.unwrap();
    let mut msgs = c.fetch().max_messages(3).messages().await.unwrap();
    while let Some(m) = msgs.next().await {
        m.unwrap().double_ack().await.unwrap();
    }

    let refused = bsfg_sink_jetstream::JetStreamZone::connect(cfg.clone()).await;
    assert!(matches!(refused, Err(SinkError::Layout(_))));
    let m = bsfg_sink_jetstream::migrate_index(&cfg).await.unwrap();
    assert_eq!(
        (
            m.facts,
            m.kept_without_fact,
            m.dropped_unstored,
            m.consumers
        ),
        (10, 1, 0, 1)
    );
    assert!(m.moved_two_stream && !m.removed_legacy);

    let z = zone(cfg).await;
    let api = engine(&z);
    let mut offsets = Vec::new();
    for i in 0..10 {
        let id = format!("two-{i}");
        let out = api.append_fact(fact(&id, i)).await.unwrap();
        assert!(out.duplicate, "{id}");
        assert_eq!(id_at(&js, out.offset).await, id);
        offsets.push(out.offset);
    }
    let out = api.append_fact(fact("two-gone", 1)).await.unwrap();
    assert_eq!((out.offset, out.duplicate), (0, true));
    // The consumer resumes after what it had confirmed.
    let page = api
        .fetch_facts(FetchRequest {
            consumer: "enterprise-pull".into(),
            limit: 100,
            wait: std::time::Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!(page.frontier, offsets[2]);
    assert_eq!(
        page.facts.iter().map(|f| f.offset).collect::<Vec<_>>(),
        offsets[3..]
    );
    assert_eq!(page.facts[0].message.envelope.message_id, "two-3");
    assert_eq!((page.first_offset, page.last_offset), (1, offsets[9]));
    assert_eq!(stream_messages(&z, "facts_operational").await, 10);
}
