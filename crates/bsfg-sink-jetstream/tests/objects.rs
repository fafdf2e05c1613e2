//! Artifacts: streamed, digest as sha256sum computes it, immutable once stored, a
//! failed put leaves nothing, reads resume from an offset, copies resume from what
//! was staged, and a fact never references an artifact the zone does not hold.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bsfg_core::model::ArtifactRef;
use bsfg_core::{BoundaryApi, BoundaryError, ByteStream, ObjectStore, Reason};
use bytes::Bytes;
use common::*;
use futures::{StreamExt, TryStreamExt};
use sha2::Digest as _;

fn body(parts: &[&'static [u8]]) -> ByteStream {
    let owned: Vec<Bytes> = parts.iter().map(|p| Bytes::from_static(p)).collect();
    futures::stream::iter(owned.into_iter().map(Ok)).boxed()
}

#[tokio::test]
async fn same_key_same_bytes_is_idempotent_and_other_bytes_are_refused() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let info = api
        .put_object(
            "batch-files",
            "B1042/report.pdf",
            body(&[b"%PDF-1.7 ", b"hello"]),
        )
        .await
        .unwrap();
    assert_eq!(info.size, 14);
    use sha2::Digest;
    let expected = format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(b"%PDF-1.7 hello"))
    );
    assert_eq!(info.digest, expected);
    let again = api
        .put_object(
            "batch-files",
            "B1042/report.pdf",
            body(&[b"%PDF-1.7 hello"]),
        )
        .await
        .unwrap();
    assert_eq!(again, info);
    let e = api
        .put_object(
            "batch-files",
            "B1042/report.pdf",
            body(&[b"%PDF-1.7 HELLO"]),
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::ConflictingDuplicate);
    // What is stored is still the original.
    let back: Vec<Bytes> = ObjectStore::get(&*z, "batch-files", "B1042/report.pdf", 0)
        .await
        .unwrap()
        .body
        .try_collect()
        .await
        .unwrap();
    assert_eq!(back.concat(), b"%PDF-1.7 hello");
}

#[tokio::test]
async fn bad_bucket_or_key_is_named_and_nothing_is_read() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let e = api
        .put_object("bad.bucket", "k", body(&[b"x"]))
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("bucket"));
    let e = api
        .put_object("b", "../etc/passwd", body(&[b"x"]))
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("key"));
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// Messages in the bucket's stream: chunks and metadata alike.
async fn stored_messages(nats: &bsfg_testkit::NatsServer, bucket: &str) -> u64 {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(format!("OBJ_{bucket}")).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// A body of `parts`, then an error: an upload that breaks off.
fn broken(parts: Vec<Vec<u8>>) -> ByteStream {
    let items = parts
        .into_iter()
        .map(|p| Ok(Bytes::from(p)))
        .chain([Err(BoundaryError::Unavailable("connection reset".into()))]);
    futures::stream::iter(items).boxed()
}

fn small_chunks(nats: &bsfg_testkit::NatsServer) -> bsfg_sink_jetstream::JetStreamConfig {
    let mut c = config(nats);
    c.object_chunk_size = 1000;
    c
}

#[tokio::test]
async fn an_upload_that_breaks_off_leaves_no_chunk_behind() {
    let nats = server();
    let z = zone(small_chunks(&nats)).await;
    let api = engine(&z);
    // One object stored, so the bucket exists: 3 chunks + 1 metadata message.
    api.put_object("batch-files", "ok.bin", body(&[&[7u8; 2500]]))
        .await
        .unwrap();
    assert_eq!(stored_messages(&nats, "batch-files").await, 4);
    let e = api
        .put_object(
            "batch-files",
            "broken.bin",
            broken(vec![vec![1; 4000], vec![2; 1500]]),
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::Unavailable, "{e}");
    assert_eq!(
        stored_messages(&nats, "batch-files").await,
        4,
        "the five chunks written before the break are purged"
    );
    let e = api
        .head_object("batch-files", "broken.bin")
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::NotFound);
}

#[tokio::test]
async fn a_read_resumes_from_an_offset_and_heads_name_digest_and_size() {
    let nats = server();
    let z = zone(small_chunks(&nats)).await;
    let api = engine(&z);
    let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let stored = api
        .put_object(
            "batch-files",
            "B7/record.pdf",
            body(&[Box::leak(bytes.clone().into_boxed_slice())]),
        )
        .await
        .unwrap();
    let head = api
        .head_object("batch-files", "B7/record.pdf")
        .await
        .unwrap();
    assert_eq!(head, stored);
    assert_eq!(head.digest, sha(&bytes));
    for offset in [0u64, 1, 999, 1000, 4321, 5000] {
        let read = api
            .get_object("batch-files", "B7/record.pdf", offset)
            .await
            .unwrap();
        assert_eq!((read.offset, read.info.size), (offset, 5000));
        let tail: Vec<Bytes> = read.body.try_collect().await.unwrap();
        assert_eq!(tail.concat(), bytes[offset as usize..], "from {offset}");
    }
    let e = api
        .get_object("batch-files", "B7/record.pdf", 5001)
        .await
        .unwrap_err();
    assert_eq!(e.field(), Some("offset"), "{e}");
    let e = api.get_object("batch-files", "nope", 0).await.unwrap_err();
    assert_eq!(e.reason(), Reason::NotFound);
    // A bucket nobody wrote to is not there, and reading does not create it.
    let e = api.head_object("other-files", "x").await.unwrap_err();
    assert_eq!(e.reason(), Reason::NotFound);
    let client = async_nats::connect(nats.url()).await.unwrap();
    assert!(
        async_nats::jetstream::new(client)
            .get_stream("OBJ_other-files")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_staged_copy_resumes_after_a_restart_and_checks_the_digest_of_the_whole() {
    let nats = server();
    let bytes: Vec<u8> = (0..4500u32).map(|i| (i * 7 % 256) as u8).collect();
    let a = ArtifactRef {
        bucket: "batch-files".into(),
        key: "B9/coa.pdf".into(),
        digest: sha(&bytes),
        size: 4500,
    };
    {
        let z = zone(small_chunks(&nats)).await;
        assert_eq!(z.staged(&a).await.unwrap(), 0);
        // 2.5 chunks arrive, then the link is lost: two whole chunks stay staged.
        let e = z
            .stage(&a, 0, broken(vec![bytes[..2500].to_vec()]))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), Reason::Unavailable);
        assert_eq!(z.staged(&a).await.unwrap(), 2000);
        assert!(
            z.head("batch-files", "B9/coa.pdf").await.unwrap().is_none(),
            "not visible before whole"
        );
        // Resuming from anywhere else is refused and changes nothing.
        let e = z.stage(&a, 0, body(&[b"x"])).await.unwrap_err();
        assert_eq!(e.reason(), Reason::Unavailable, "{e}");
        assert_eq!(z.staged(&a).await.unwrap(), 2000);
    }
    // A new gateway instance (a crash and restart) finds what was staged.
    let z = zone(small_chunks(&nats)).await;
    assert_eq!(z.staged(&a).await.unwrap(), 2000);
    let rest = Bytes::from(bytes[2000..].to_vec());
    let info = z
        .stage(&a, 2000, futures::stream::iter([Ok(rest)]).boxed())
        .await
        .unwrap();
    assert_eq!((info.digest.as_str(), info.size), (a.digest.as_str(), 4500));
    let back: Vec<Bytes> = ObjectStore::get(&*z, "batch-files", "B9/coa.pdf", 0)
        .await
        .unwrap()
        .body
        .try_collect()
        .await
        .unwrap();
    assert_eq!(back.concat(), bytes);
    // Staged bytes of an artifact whose digest does not check are discarded.
    let lie = ArtifactRef {
        key: "B9/other.pdf".into(),
        digest: sha(b"something else"),
        ..a.clone()
    };
    let before = stored_messages(&nats, "batch-files").await;
    let e = z
        .stage(
            &lie,
            0,
            futures::stream::iter([Ok(Bytes::from(bytes.clone()))]).boxed(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{e}");
    assert!(e.to_string().contains(&lie.digest), "{e}");
    assert_eq!(stored_messages(&nats, "batch-files").await, before);
    assert_eq!(z.staged(&lie).await.unwrap(), 0);
    assert!(
        z.head("batch-files", "B9/other.pdf")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_fact_referencing_an_artifact_the_zone_lacks_is_refused_naming_it() {
    let nats = server();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let mut m = fact("art-1", 1);
    m.envelope.object_media_type = Some("application/pdf".into());
    m.fact.artifacts = vec![ArtifactRef {
        bucket: "batch-files".into(),
        key: "B1042/record.pdf".into(),
        digest: sha(b"%PDF-1.7 record"),
        size: 15,
    }];
    let e = api.append_fact(m.clone()).await.unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{e}");
    assert!(
        e.to_string().contains("batch-files/B1042/record.pdf"),
        "{e}"
    );
    // Other bytes under the key are no better.
    api.put_object(
        "batch-files",
        "B1042/record.pdf",
        body(&[b"%PDF-1.7 RECORD"]),
    )
    .await
    .unwrap();
    let e = api.append_fact(m.clone()).await.unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("fact.artifacts[0]"), "{e}");
    m.fact.artifacts[0].key = "B1042/record-v2.pdf".into();
    api.put_object(
        "batch-files",
        "B1042/record-v2.pdf",
        body(&[b"%PDF-1.7 record"]),
    )
    .await
    .unwrap();
    let stored = api.append_fact(m).await.unwrap();
    assert!(!stored.duplicate);
}
