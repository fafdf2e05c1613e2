//! The raw JetStream baseline that benchmarks compare BSFG against: async-nats
//! publishing to a plain file stream with many acks in flight, nothing else.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures::stream::{FuturesUnordered, StreamExt};

/// Publishes `n` messages of `size` bytes to a fresh stream `raw_baseline` with up to
/// `inflight` acks outstanding; returns messages per second.
pub async fn raw_publish(
    url: &str,
    n: usize,
    size: usize,
    inflight: usize,
) -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "raw_baseline".into(),
        subjects: vec!["raw_baseline.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        let ack = js
            .publish(format!("raw_baseline.{}", i % 16), payload.clone())
            .await?;
        pending.push(ack.into_future());
        if pending.len() >= inflight.max(1)
            && let Some(r) = pending.next().await
        {
            r?;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The `p` quantile (0.0-1.0) of sorted latencies, in milliseconds; 0 when empty.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}
