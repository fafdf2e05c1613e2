//! Artifacts cross zones with the facts that reference them: a link copies each
//! artifact before it appends its fact, once, resuming a copy that broke off; a fact
//! whose artifact the source cannot serve goes to the quarantine and the link moves
//! on. In-process zones on real nats-servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bsfg_core::link::{Link, LinkHandle, LinkSettings, LinkState, LinkStatus};
use bsfg_core::model::ArtifactRef;
use bsfg_core::{
    ApiResult, BoundaryApi, BoundaryError, ByteStream, FactPage, FetchRequest, Frontier, Message,
    ObjectInfo, ObjectRead, QuarantineAction, Reason,
};
use bsfg_e2e::{Zone, step_completed};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use sha2::Digest as _;
use tokio::sync::watch;

fn settings() -> LinkSettings {
    LinkSettings {
        name: "plant-a".into(),
        local_zone: "enterprise".into(),
        source_zone: "plant-a".into(),
        consumer: "to-enterprise".into(),
        page_size: 100,
        pages_in_flight: bsfg_core::link::PAGES_IN_FLIGHT,
        wait: Duration::from_millis(500),
        streams: vec!["facts_operational".into()],
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        request_timeout: Duration::from_secs(5),
    }
}

async fn wait_for(handle: &LinkHandle, what: &str, ok: impl Fn(&LinkStatus) -> bool) -> LinkStatus {
    bsfg_testkit::eventually(what, Duration::from_secs(60), || async {
        let s = handle.status();
        if ok(&s) { Ok(s) } else { Err(format!("{s:?}")) }
    })
    .await
}

async fn zones() -> (Zone, Zone) {
    let plant = Zone::start("plant-a", &[("to-enterprise", "operational")]);
    let enterprise = Zone::start(
        "enterprise",
        &[("reporting", "operational"), ("audit-reader", "audit")],
    );
    let (plant, enterprise) = tokio::join!(plant, enterprise);
    (plant.unwrap(), enterprise.unwrap())
}

fn bytes_of(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
        .collect()
}

fn body(b: &[u8]) -> ByteStream {
    let parts: Vec<ApiResult<Bytes>> = b
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(parts).boxed()
}

/// Puts `bytes` as `key` in `zone` and returns the reference a fact makes to it.
async fn put(zone: &Zone, key: &str, bytes: &[u8]) -> ArtifactRef {
    let info = zone
        .api
        .put_object("batch-files", key, body(bytes))
        .await
        .unwrap();
    ArtifactRef {
        bucket: info.bucket,
        key: info.key,
        digest: info.digest,
        size: info.size,
    }
}

/// Step `step` of batch `batch`, referencing `artifacts`.
fn fact_with(batch: &str, step: u32, artifacts: Vec<ArtifactRef>) -> Message {
    let mut m = step_completed("plant-a", "enterprise", batch, step);
    m.envelope.object_media_type = Some("application/pdf".into());
    m.fact.artifacts = artifacts;
    m
}

async fn read_all(zone: &Zone, key: &str) -> Vec<u8> {
    let read = zone.api.get_object("batch-files", key, 0).await.unwrap();
    let parts: Vec<Bytes> = read.body.try_collect().await.unwrap();
    parts.concat()
}

/// Every message_id in the enterprise's operational class.
async fn ids(zone: &Zone) -> Vec<String> {
    let p = zone.fetch("reporting", 100, Duration::ZERO).await.unwrap();
    p.facts
        .iter()
        .map(|f| f.message.envelope.message_id.clone())
        .collect()
}

#[tokio::test]
async fn a_link_copies_each_artifact_before_its_fact_and_quarantines_a_fact_whose_artifact_is_gone()
{
    let (plant, enterprise) = zones().await;
    let record = bytes_of(300_000, 1);
    let a = put(&plant, "B1/record.pdf", &record).await;
    let gone = put(&plant, "B1/gone.pdf", b"%PDF-1.7 soon deleted").await;
    plant
        .api
        .append_fact(fact_with("B1", 1, vec![a.clone()]))
        .await
        .unwrap();
    plant
        .api
        .append_fact(fact_with("B1", 2, vec![gone.clone()]))
        .await
        .unwrap();
    plant.append_steps("enterprise", "B1", 3..=3).await.unwrap();
    let last = plant
        .api
        .append_fact(fact_with("B1", 4, vec![a.clone()]))
        .await
        .unwrap()
        .offset;
    // An operator deletes an artifact at the source after its fact was stored.
    let js = async_nats::jetstream::new(async_nats::connect(plant.nats.url()).await.unwrap());
    js.get_object_store("batch-files")
        .await
        .unwrap()
        .delete("B1/gone.pdf")
        .await
        .unwrap();

    let (link, handle) = Link::new(
        settings(),
        Arc::new(plant.api.clone()),
        Arc::new(enterprise.api.clone()),
    );
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(link.run(rx));
    let s = wait_for(&handle, "the page confirmed", |s| s.frontier == last).await;
    assert_eq!(s.state, LinkState::Running, "the link keeps running");
    assert_eq!(
        (s.facts_stored, s.quarantined, s.refused),
        (3, 1, 1),
        "{s:?}"
    );
    assert_eq!(
        (
            s.artifacts_copied,
            s.artifacts_unavailable,
            s.artifacts_pending
        ),
        (1, 1, 0),
        "the shared artifact copied once: {s:?}"
    );
    assert_eq!(s.artifact_bytes, 300_000, "{s:?}");
    stop.send_replace(true);
    task.await.unwrap();

    // The artifact is in the enterprise, byte for byte, before (and with) its facts.
    let head = enterprise
        .api
        .head_object("batch-files", "B1/record.pdf")
        .await
        .unwrap();
    assert_eq!(
        (head.digest.as_str(), head.size),
        (a.digest.as_str(), a.size)
    );
    assert_eq!(read_all(&enterprise, "B1/record.pdf").await, record);
    assert_eq!(
        ids(&enterprise).await,
        [
            "plant-a:batch:B1:step:1",
            "plant-a:batch:B1:step:3",
            "plant-a:batch:B1:step:4"
        ]
    );

    // The fact whose artifact is gone waits in the quarantine, naming it.
    let q = enterprise.api.quarantined(10).await.unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].message.envelope.message_id, "plant-a:batch:B1:step:2");
    assert_eq!(
        (q[0].cause.as_str(), q[0].field.as_deref()),
        ("failed_precondition", Some("fact.artifacts[0]"))
    );
    assert!(
        q[0].denial.reason.contains("B1/gone.pdf") && q[0].denial.reason.contains("does not hold"),
        "{}",
        q[0].denial.reason
    );
    // A release fails while the zone lacks the artifact, and keeps the entry; once an
    // operator has put it here, the release appends the fact.
    let id = "plant-a:batch:B1:step:2";
    let e = enterprise
        .api
        .settle_quarantined(id, None, QuarantineAction::Release, "enterprise", "jdoe", 1)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{e}");
    assert_eq!(enterprise.api.quarantined(10).await.unwrap().len(), 1);
    put(&enterprise, "B1/gone.pdf", b"%PDF-1.7 soon deleted").await;
    enterprise
        .api
        .settle_quarantined(id, None, QuarantineAction::Release, "enterprise", "jdoe", 2)
        .await
        .unwrap();
    assert!(enterprise.api.quarantined(10).await.unwrap().is_empty());
}

/// The plant's API, whose first GetObject body breaks off after `cut` bytes; every
/// read's offset is recorded.
struct Flaky {
    inner: bsfg_core::Boundary,
    cut: u64,
    reads: Mutex<Vec<u64>>,
    sent: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl BoundaryApi for Flaky {
    async fn append_fact(&self, m: Message) -> ApiResult<bsfg_core::AppendOutcome> {
        self.inner.append_fact(m).await
    }
    async fn fetch_facts(&self, r: FetchRequest) -> ApiResult<FactPage> {
        self.inner.fetch_facts(r).await
    }
    async fn confirm_receipt(&self, c: &str, o: u64) -> ApiResult<Frontier> {
        self.inner.confirm_receipt(c, o).await
    }
    async fn put_object(&self, b: &str, k: &str, body: ByteStream) -> ApiResult<ObjectInfo> {
        self.inner.put_object(b, k, body).await
    }
    async fn head_object(&self, b: &str, k: &str) -> ApiResult<ObjectInfo> {
        self.inner.head_object(b, k).await
    }
    async fn get_object(&self, b: &str, k: &str, offset: u64) -> ApiResult<ObjectRead> {
        let first = {
            let mut reads = self.reads.lock().unwrap();
            reads.push(offset);
            reads.len() == 1
        };
        let mut read = self.inner.get_object(b, k, offset).await?;
        let sent = self.sent.clone();
        let mut left = if first { self.cut } else { u64::MAX };
        read.body = read
            .body
            .map(move |chunk| {
                let chunk = chunk?;
                if left == 0 {
                    return Err(BoundaryError::Unavailable("link lost".into()));
                }
                let take = (chunk.len() as u64).min(left) as usize;
                left -= take as u64;
                sent.fetch_add(take as u64, Ordering::Relaxed);
                Ok(chunk.slice(..take))
            })
            .take_while({
                let mut failed = false;
                move |r| {
                    let go = !failed;
                    failed |= r.is_err();
                    futures::future::ready(go)
                }
            })
            .boxed();
        Ok(read)
    }
}

#[tokio::test]
async fn a_copy_that_breaks_off_resumes_from_the_staged_bytes_instead_of_starting_over() {
    let (plant, enterprise) = zones().await;
    let big = bytes_of(3 * 1024 * 1024 + 123, 7);
    let a = put(&plant, "B2/camera.raw", &big).await;
    let stored = plant
        .api
        .append_fact(fact_with("B2", 1, vec![a.clone()]))
        .await
        .unwrap()
        .offset;
    let flaky = Arc::new(Flaky {
        inner: plant.api.clone(),
        cut: 1024 * 1024 + 5000,
        reads: Mutex::default(),
        sent: Arc::default(),
    });
    let (link, handle) = Link::new(settings(), flaky.clone(), Arc::new(enterprise.api.clone()));
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(link.run(rx));
    let s = wait_for(&handle, "the fact replicated", |s| s.frontier == stored).await;
    stop.send_replace(true);
    task.await.unwrap();
    assert_eq!((s.artifacts_copied, s.artifact_failures), (1, 1), "{s:?}");

    let reads = flaky.reads.lock().unwrap().clone();
    assert_eq!(reads.len(), 2, "one read broke off, one resumed: {reads:?}");
    assert_eq!(reads[0], 0);
    // Whole 128 KiB chunks were staged: the second read starts at the last whole
    // chunk before the break, not at 0.
    assert_eq!(reads[1], 8 * 128 * 1024, "{reads:?}");
    let sent = flaky.sent.load(Ordering::Relaxed);
    assert!(
        sent < big.len() as u64 * 11 / 10,
        "{sent} bytes crossed for {} (well under twice)",
        big.len()
    );
    assert_eq!(read_all(&enterprise, "B2/camera.raw").await, big);
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&big)));
    let head = enterprise
        .api
        .head_object("batch-files", "B2/camera.raw")
        .await
        .unwrap();
    assert_eq!(head.digest, digest);
    assert_eq!(ids(&enterprise).await, ["plant-a:batch:B2:step:1"]);
}
