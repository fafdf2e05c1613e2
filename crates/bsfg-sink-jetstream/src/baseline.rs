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
    // A baseline on a busy machine (the test suite runs in parallel, every server
    // syncing each write) may wait longer than the default 5 s for an ack.
    let js = jetstream::context::ContextBuilder::new()
        .timeout(std::time::Duration::from_secs(30))
        .build(client);
    js.create_stream(stream::Config {
        name: "raw_baseline".into(),
        subjects: vec!["raw_baseline.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let msgs = (0..n).map(|i| (format!("raw_baseline.{}", i % 16), payload.clone()));
    publish_pipelined(&js, msgs, inflight).await?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Publishes every (subject, payload) with up to `inflight` acks outstanding and
/// returns once every ack has come back.
async fn publish_pipelined(
    js: &jetstream::Context,
    msgs: impl Iterator<Item = (String, bytes::Bytes)>,
    inflight: usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut pending = FuturesUnordered::new();
    for (subject, payload) in msgs {
        pending.push(js.publish(subject, payload).await?.into_future());
        if pending.len() >= inflight.max(1)
            && let Some(r) = pending.next().await
        {
            r?;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(())
}

/// What the replication baselines measured.
#[derive(Debug, Clone, Copy)]
pub struct ReplicationBaselines {
    /// Raw publish into A's stream while loading the backlog, messages/s.
    pub publish_rate: f64,
    /// Native JetStream sourcing of the backlog from A into B over a leaf node.
    pub native_rate: f64,
    /// Time native sourcing took to hold the whole backlog in B.
    pub native_secs: f64,
    /// A raw copier: pull consumer on A, publish each batch to B (acks awaited), ack
    /// the batch on A. Messages/s.
    pub fetch_publish_rate: f64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn wait_for_messages(s: &mut stream::Stream, n: usize) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(900);
    while (s.info().await?.state.messages as usize) < n {
        if Instant::now() > deadline {
            return Err("native sourcing did not finish in 15 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The two baselines a BSFG link is compared with, on servers `a` and `b` (URL,
/// JetStream domain) that a leaf node joins: a backlog of `n` messages of `size`
/// bytes published into A, then (1) sourced natively by a stream in B, and (2)
/// copied by a raw fetch/publish/ack loop with batches of `batch`.
pub async fn replication_baselines(
    a: (&str, &str),
    b: (&str, &str),
    n: usize,
    size: usize,
    batch: usize,
) -> Result<ReplicationBaselines, BoxError> {
    use async_nats::jetstream::consumer;
    let ajs = jetstream::with_domain(async_nats::connect(a.0).await?, a.1);
    let bjs = jetstream::with_domain(async_nats::connect(b.0).await?, b.1);
    let file = |name: &str, subjects: Vec<String>| stream::Config {
        name: name.into(),
        subjects,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    ajs.create_stream(file("native_src", vec!["native_src.>".into()]))
        .await?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let msgs = (0..n).map(|i| (format!("native_src.{}", i % 16), payload.clone()));
    publish_pipelined(&ajs, msgs, 1024).await?;
    let publish_rate = n as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut copy = bjs
        .create_stream(stream::Config {
            sources: Some(vec![stream::Source {
                name: "native_src".into(),
                // The server takes the domain as an external API prefix.
                external: Some(stream::External {
                    api_prefix: format!("$JS.{}.API", a.1),
                    delivery_prefix: None,
                }),
                ..Default::default()
            }]),
            ..file("native_copy", vec![])
        })
        .await?;
    wait_for_messages(&mut copy, n).await?;
    let native_secs = start.elapsed().as_secs_f64();

    bjs.create_stream(file("raw_copy", vec!["raw_copy.>".into()]))
        .await?;
    let c = ajs
        .get_stream("native_src")
        .await?
        .create_consumer(consumer::pull::Config {
            durable_name: Some("raw_copier".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let mut copied = 0;
    while copied < n {
        let mut msgs = c
            .fetch()
            .max_messages(batch)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        let mut got = Vec::new();
        while let Some(m) = msgs.next().await {
            got.push(m?);
        }
        let mut acks = Vec::with_capacity(got.len());
        for m in &got {
            acks.push(
                bjs.publish(format!("raw_copy.{}", copied % 16), m.payload.clone())
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
        for m in &got {
            m.ack().await?;
        }
        copied += got.len();
    }
    Ok(ReplicationBaselines {
        publish_rate,
        native_rate: n as f64 / native_secs,
        native_secs,
        fetch_publish_rate: n as f64 / start.elapsed().as_secs_f64(),
    })
}

/// The `p` quantile (0.0-1.0) of sorted latencies, in milliseconds; 0 when empty.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Writes, raw, the storage shape the per-id index layout (before the bounded one)
/// left on the server, for ids `from..to`: per id one index entry on its own subject
/// `probe.ids.<token>` and one fact of `fact_bytes` on its own subject
/// `probe.facts.operational.batch.<token>`, in one stream `probe_ids` (created on
/// first use), `inflight` acks outstanding: the baseline `bsfg bench index` measures
/// the bounded layout against. Returns ids/s.
pub async fn per_id_shape(
    url: &str,
    from: usize,
    to: usize,
    fact_bytes: usize,
    inflight: usize,
) -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
    use sha2::{Digest, Sha256};
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    js.get_or_create_stream(stream::Config {
        name: "probe_ids".into(),
        subjects: vec!["probe.ids.*".into(), "probe.facts.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let fact = bytes::Bytes::from(vec![b'x'; fact_bytes]);
    let start = Instant::now();
    let msgs = (from..to).flat_map(|i| {
        let id = format!("idx-{i}");
        let digest = Sha256::digest(id.as_bytes());
        let token = hex::encode(&digest[..16]);
        let entry = format!(
            r#"{{"id":"{id}","digest":"{}","stream":"facts_operational","subject":"facts.operational.batch.{token}","offset":{}}}"#,
            hex::encode(digest),
            2 * i + 2
        );
        [
            (format!("probe.ids.{token}"), bytes::Bytes::from(entry)),
            (
                format!("probe.facts.operational.batch.{token}"),
                fact.clone(),
            ),
        ]
    });
    publish_pipelined(&js, msgs, inflight).await?;
    Ok((to - from) as f64 / start.elapsed().as_secs_f64())
}

/// Facts of `class` in the zone log of the server at `url` (in JetStream domain
/// `domain`), read from the stream's subject counts: for benchmarks that watch a
/// zone fill up without a consumer.
pub async fn class_facts(
    url: &str,
    domain: Option<&str>,
    class: &str,
) -> Result<u64, async_nats::Error> {
    use futures::TryStreamExt as _;
    let client = async_nats::connect(url).await?;
    let js = match domain {
        Some(d) => jetstream::with_domain(client, d),
        None => jetstream::new(client),
    };
    let stream = js.get_stream(crate::index::LOG_STREAM).await?;
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects(crate::index::class_filter(class))
        .await?
        .try_collect()
        .await?;
    Ok(subjects.iter().map(|(_, n)| *n as u64).sum())
}
