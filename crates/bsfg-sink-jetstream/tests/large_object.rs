//! A 256 MiB artifact streams through PutObject and back with bounded memory.
//! Alone in its own test binary so that the process's peak RSS is its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;

use bsfg_core::{BoundaryApi, BoundaryError, ObjectStore};
use common::*;
use futures::{StreamExt, TryStreamExt};
use sha2::Digest;
use tokio_util::io::ReaderStream;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[tokio::test]
async fn put_object_of_256_mib_streams_with_bounded_memory_and_sha256sum_digest() {
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("artifact.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut block = vec![0u8; MIB];
        for i in 0..256u32 {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (j as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(i)
                    .to_le_bytes()[1];
            }
            f.write_all(&block).unwrap();
        }
    }
    let out = std::process::Command::new("sha256sum")
        .arg(&path)
        .output()
        .unwrap();
    let expected = format!(
        "sha256:{}",
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
    );

    let nats = server();
    let z = zone(config(&nats)).await;
    let api = engine(&z);
    let before = peak_rss_kib();
    let file = tokio::fs::File::open(&path).await.unwrap();
    let body = ReaderStream::with_capacity(file, 64 * 1024)
        .map_err(|e| BoundaryError::Unavailable(e.to_string()))
        .boxed();
    let info = api
        .put_object("big-files", "run/artifact.bin", body)
        .await
        .unwrap();
    assert_eq!(info.size, 256 * MIB as u64);
    assert_eq!(info.digest, expected);

    // Read it back, streamed, and hash it again.
    let mut hasher = sha2::Sha256::new();
    let mut chunks = ObjectStore::get(&*z, "big-files", "run/artifact.bin", 0)
        .await
        .unwrap()
        .body;
    let mut size = 0usize;
    while let Some(c) = chunks.next().await {
        let c = c.unwrap();
        size += c.len();
        hasher.update(&c);
    }
    assert_eq!(size, 256 * MIB);
    assert_eq!(
        format!("sha256:{}", hex::encode(hasher.finalize())),
        expected
    );

    let growth_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    eprintln!("peak RSS growth during 256 MiB put+get: {growth_mib} MiB");
    assert!(growth_mib < 64, "peak memory grew by {growth_mib} MiB");
}
