//! A zone created with the per-id index layout (`bsfg_ids`, one subject per id and
//! per fact) is refused until `bsfg index migrate` moved it; after the move every
//! remembered id is still answered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use async_nats::HeaderMap;
use bsfg_core::{BoundaryApi, Limits, Reason};
use bsfg_sink_jetstream::append::{HDR_DIGEST, HDR_MESSAGE_ID, id_token};
use common::*;

/// Builds what the per-id layout left: facts on `facts.operational.batch.<token>`
/// and index entries on `bsfg.ids.<token>`. `recorded` says whether the entry got
/// its offset; `published` whether the fact was stored at all.
async fn legacy_fact(
    js: &async_nats::jetstream::Context,
    id: &str,
    value: i64,
    published: bool,
    recorded: bool,
) -> Option<u64> {
    let v = Limits::default().validate(fact(id, value)).unwrap();
    let token = id_token(id);
    let subject = format!("facts.operational.batch.{token}");
    let mut offset = None;
    if published {
        let mut h = HeaderMap::new();
        h.insert(HDR_MESSAGE_ID, id);
        h.insert(HDR_DIGEST, v.digest().to_hex().as_str());
        let ack = js
            .publish_with_headers(subject.clone(), h, v.stored_form().clone())
            .await
            .unwrap()
            .await
            .unwrap();
        offset = Some(ack.sequence);
    }
    let mut entry = serde_json::json!({"id": id, "digest": v.digest().to_hex(), "stream": "facts_operational", "subject": subject});
    if recorded && let Some(o) = offset {
        entry["offset"] = o.into();
    }
    js.publish(format!("bsfg.ids.{token}"), entry.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    offset
}

#[tokio::test]
async fn index_migrate_moves_every_remembered_id_and_the_zone_answers_them_after() {
    let nats = server();
    let cfg = config(&nats);
    // The class streams as any zone has them; then the index of the old layout.
    drop(zone(cfg.clone()).await);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.delete_stream("bsfg_index").await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "bsfg_ids".into(),
        subjects: vec!["bsfg.ids.*".into()],
        max_messages_per_subject: 1,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stored = Vec::new();
    for i in 0..40 {
        stored.push(
            legacy_fact(&js, &format!("old-{i}"), i, true, i % 4 != 0)
                .await
                .unwrap(),
        );
    }
    // Reserved, never published (a crash between the old steps 1 and 2).
    assert_eq!(legacy_fact(&js, "old-orphan", 7, false, false).await, None);

    let refused = bsfg_sink_jetstream::JetStreamZone::connect(cfg.clone()).await;
    assert!(matches!(
        refused,
        Err(bsfg_sink_jetstream::SinkError::Layout(_))
    ));

    let m = bsfg_sink_jetstream::migrate_index(&cfg).await.unwrap();
    assert_eq!(
        (m.read, m.written, m.skipped, m.removed_legacy),
        (41, 41, 0, true)
    );
    assert!(js.get_stream("bsfg_ids").await.is_err());
    // Running it again finds nothing to do.
    let again = bsfg_sink_jetstream::migrate_index(&cfg).await.unwrap();
    assert!(!again.removed_legacy);

    let z = zone(cfg).await;
    assert_eq!(z.index_usage().await.unwrap().ids, 41);
    let api = engine(&z);
    for (i, offset) in stored.iter().enumerate() {
        let out = api
            .append_fact(fact(&format!("old-{i}"), i as i64))
            .await
            .unwrap();
        assert_eq!((out.offset, out.duplicate), (*offset, true), "old-{i}");
    }
    let e = api.append_fact(fact("old-3", 1000)).await.unwrap_err();
    assert_eq!(e.reason(), Reason::ConflictingDuplicate);
    // The orphan is completed once; new ids go to the bounded subjects.
    let orphan = api.append_fact(fact("old-orphan", 7)).await.unwrap();
    assert!(!orphan.duplicate);
    let again = api.append_fact(fact("old-orphan", 7)).await.unwrap();
    assert_eq!((again.offset, again.duplicate), (orphan.offset, true));
    let new = api.append_fact(fact("new-1", 1)).await.unwrap();
    assert!(!new.duplicate);
    assert_eq!(stream_messages(&z, "facts_operational").await, 42);
}
