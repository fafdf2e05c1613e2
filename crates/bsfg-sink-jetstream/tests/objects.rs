//! PutObject: streamed, digest as sha256sum computes it, immutable once stored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bsfg_core::{BoundaryApi, ByteStream, ObjectStore, Reason};
use bytes::Bytes;
use common::*;
use futures::{StreamExt, TryStreamExt};

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
    let back: Vec<Bytes> = ObjectStore::get(&*z, "batch-files", "B1042/report.pdf")
        .await
        .unwrap()
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
