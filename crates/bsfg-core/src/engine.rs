//! The Boundary engine: the four operations over a [`FactLog`] and an [`ObjectStore`].
//!
//! The engine is where every input is validated (architecture invariant: nothing
//! reaches a port unvalidated). It performs no I/O of its own.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::BoundaryError;
use crate::link::{Destination, Held};
use crate::model::{ArtifactRef, Envelope, Fact, Limits, Message, ValidatedMessage};
use crate::names;
use crate::policy::QuarantineEntry;
use crate::ports::{
    ApiResult, AppendOutcome, BoundaryApi, ByteStream, FactLog, FactPage, FetchRequest, Frontier,
    ObjectInfo, ObjectRead, ObjectStore,
};

/// The receiver of calls made without an authenticated identity (in-process callers,
/// the plaintext loopback listener).
pub const LOCAL_RECEIVER: &str = "local";

/// Implements [`BoundaryApi`] for one zone.
#[derive(Clone)]
pub struct Boundary {
    log: Arc<dyn FactLog>,
    objects: Arc<dyn ObjectStore>,
    limits: Limits,
}

impl Boundary {
    /// Builds the engine over its two stores, with the zone's limits.
    pub fn new(log: Arc<dyn FactLog>, objects: Arc<dyn ObjectStore>, limits: Limits) -> Self {
        Boundary {
            log,
            objects,
            limits,
        }
    }

    /// The limits this engine validates with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Refuses a fact that references an artifact this zone does not hold with that
    /// digest and size (`failed_precondition` naming the artifact), so no zone ever
    /// stores, and serves onward, a fact whose artifact it lacks.
    async fn check_artifacts(&self, message: &ValidatedMessage) -> ApiResult<()> {
        for (i, a) in message.message().fact.artifacts.iter().enumerate() {
            let head = self.objects.head(&a.bucket, &a.key).await?;
            match Held::found(head, a) {
                Some(Held::Whole) => {}
                Some(Held::Other(info)) => {
                    return Err(BoundaryError::FailedPrecondition(format!(
                        "fact.artifacts[{i}]: this zone holds `{}/{}` as {} ({} bytes), the fact references {} ({} bytes)",
                        a.bucket, a.key, info.digest, info.size, a.digest, a.size
                    )));
                }
                _ => {
                    return Err(BoundaryError::FailedPrecondition(format!(
                        "fact.artifacts[{i}]: this zone does not hold `{}/{}` ({}, {} bytes); put the artifact (PutObject) before the fact that references it",
                        a.bucket, a.key, a.digest, a.size
                    )));
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl BoundaryApi for Boundary {
    async fn append_fact(&self, message: Message) -> Result<AppendOutcome, BoundaryError> {
        let validated = self.limits.validate(message)?;
        self.check_artifacts(&validated).await?;
        self.log.append(validated).await
    }

    async fn fetch_facts(&self, request: FetchRequest) -> Result<FactPage, BoundaryError> {
        self.fetch_facts_as(LOCAL_RECEIVER, request).await
    }

    async fn confirm_receipt(&self, consumer: &str, offset: u64) -> ApiResult<Frontier> {
        self.confirm_receipt_as(LOCAL_RECEIVER, consumer, offset)
            .await
    }

    async fn fetch_facts_as(&self, receiver: &str, request: FetchRequest) -> ApiResult<FactPage> {
        names::validate_consumer("consumer_name", &request.consumer)?;
        if request.limit == 0 || request.limit > self.limits.max_fetch_limit {
            return Err(BoundaryError::invalid(
                "limit",
                format!("must be between 1 and {}", self.limits.max_fetch_limit),
            ));
        }
        self.log.fetch(&request, receiver).await
    }

    async fn confirm_receipt_as(
        &self,
        receiver: &str,
        consumer: &str,
        offset: u64,
    ) -> ApiResult<Frontier> {
        names::validate_consumer("consumer_name", consumer)?;
        if offset == 0 {
            return Err(BoundaryError::invalid("offset", "must be at least 1"));
        }
        self.log.confirm(consumer, offset, receiver).await
    }

    async fn put_object(&self, bucket: &str, key: &str, body: ByteStream) -> ApiResult<ObjectInfo> {
        names::validate_bucket("bucket", bucket)?;
        names::validate_object_key("key", key)?;
        self.objects.put(bucket, key, body).await
    }

    async fn head_object(&self, bucket: &str, key: &str) -> ApiResult<ObjectInfo> {
        names::validate_bucket("bucket", bucket)?;
        names::validate_object_key("key", key)?;
        self.objects
            .head(bucket, key)
            .await?
            .ok_or_else(|| BoundaryError::NotFound(format!("object `{bucket}/{key}`")))
    }

    async fn get_object(&self, bucket: &str, key: &str, offset: u64) -> ApiResult<ObjectRead> {
        names::validate_bucket("bucket", bucket)?;
        names::validate_object_key("key", key)?;
        self.objects.get(bucket, key, offset).await
    }
}

/// The engine as a link's destination: the same validation as AppendFact (this
/// zone's limits), and the link checkpoint and quarantine kept in the zone log.
#[async_trait]
impl Destination for Boundary {
    fn limits(&self) -> Limits {
        self.limits.clone()
    }

    /// The link made sure of the fact's artifacts before (its `Carry` step, which
    /// found each held here with its digest): no look-up again, so the facts of a
    /// page keep their order.
    async fn append_replicated(&self, message: ValidatedMessage) -> ApiResult<AppendOutcome> {
        self.log.append(message).await
    }

    async fn artifact_held(&self, artifact: &ArtifactRef) -> ApiResult<Held> {
        let head = self.objects.head(&artifact.bucket, &artifact.key).await?;
        match Held::found(head, artifact) {
            Some(held) => Ok(held),
            None => Ok(Held::Staged(self.objects.staged(artifact).await?)),
        }
    }

    async fn stage_artifact(
        &self,
        artifact: &ArtifactRef,
        from: u64,
        body: ByteStream,
    ) -> ApiResult<ObjectInfo> {
        self.objects.stage(artifact, from, body).await
    }

    async fn discard_staged(&self, artifact: &ArtifactRef) -> ApiResult<()> {
        self.objects.discard_staged(artifact).await
    }

    async fn checkpoint(&self, link: &str) -> Result<Option<u64>, BoundaryError> {
        self.log.link_checkpoint(link).await
    }

    async fn record_checkpoint(&self, link: &str, offset: u64) -> Result<(), BoundaryError> {
        self.log.record_link_checkpoint(link, offset).await
    }

    async fn quarantine(&self, entry: QuarantineEntry) -> Result<(), BoundaryError> {
        self.log.quarantine(&entry).await.map(|_| ())
    }
}

/// What an operator decides about a quarantined fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineAction {
    /// Append the fact as it was fetched, with its provenance.
    Release,
    /// Discard it.
    Drop,
}

impl QuarantineAction {
    fn predicate(self) -> &'static str {
        match self {
            QuarantineAction::Release => "quarantine_released",
            QuarantineAction::Drop => "quarantine_dropped",
        }
    }
}

/// The outcome of [`Boundary::settle_quarantined`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The entry as it was kept.
    pub entry: QuarantineEntry,
    /// Where the released fact is stored (None for a drop).
    pub released: Option<AppendOutcome>,
    /// Where the audit record of the decision is stored.
    pub record: AppendOutcome,
}

impl Boundary {
    /// Quarantined entries, oldest first.
    pub async fn quarantined(&self, limit: usize) -> Result<Vec<QuarantineEntry>, BoundaryError> {
        self.log.quarantined(limit).await
    }

    /// The quarantined entries of `message_id` (one per distinct payload).
    pub async fn quarantined_entries(
        &self,
        message_id: &str,
    ) -> Result<Vec<QuarantineEntry>, BoundaryError> {
        self.log.quarantined_entries(message_id).await
    }

    /// The one entry of `message_id` an operator means: the only one, or the one
    /// whose payload digest starts with `payload`. Several entries without `payload`
    /// is `invalid_argument` on `payload` listing them.
    pub async fn quarantined_entry(
        &self,
        message_id: &str,
        payload: Option<&str>,
    ) -> ApiResult<QuarantineEntry> {
        let mut entries: Vec<QuarantineEntry> = self
            .log
            .quarantined_entries(message_id)
            .await?
            .into_iter()
            .filter(|e| payload.is_none_or(|p| !p.is_empty() && e.payload_digest.starts_with(p)))
            .collect();
        match entries.len() {
            0 => Err(BoundaryError::NotFound(match payload {
                None => format!("no quarantined fact with message_id `{message_id}`"),
                Some(p) => {
                    format!("no quarantined fact with message_id `{message_id}` and payload `{p}`")
                }
            })),
            1 => Ok(entries.remove(0)),
            n => Err(BoundaryError::invalid(
                "payload",
                format!(
                    "message_id `{message_id}` has {n} quarantined facts with different payloads ({}); name one by its payload digest",
                    entries
                        .iter()
                        .map(|e| e.payload_short())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Releases or drops a quarantined fact on an operator's word (`payload` picks
    /// the entry when the message_id has several). A release validates the fact
    /// again under this zone's limits (the operator fixed the cause: raised a limit,
    /// added a class) and appends it with its own message_id, envelope and
    /// provenance; the policies are not asked again: the operator overrides them. A
    /// release that still fails returns the error and keeps the entry. Either way the
    /// decision is recorded as an audit fact in `zone` (subject `link:<link>`,
    /// predicate `quarantine_released` / `quarantine_dropped`, naming `by`), and only
    /// then is the entry removed. Every step is idempotent, so a retry after a crash
    /// completes the same decision without a second copy.
    pub async fn settle_quarantined(
        &self,
        message_id: &str,
        payload: Option<&str>,
        action: QuarantineAction,
        zone: &str,
        by: &str,
        at_unix_ms: i64,
    ) -> ApiResult<Settled> {
        let entry = self.quarantined_entry(message_id, payload).await?;
        let released = match action {
            QuarantineAction::Release => {
                if let Some(size) = entry.payload_omitted_bytes {
                    return Err(BoundaryError::FailedPrecondition(format!(
                        "the fact ({size} bytes) was too large for this zone's store to keep in the quarantine; drop the entry and have the fact sent again (source offset {})",
                        entry.source_offset
                    )));
                }
                let validated = self
                    .limits
                    .validate(entry.message.clone())?
                    .with_provenance(entry.provenance())?;
                self.check_artifacts(&validated).await?;
                Some(self.append_replicated(validated).await?)
            }
            QuarantineAction::Drop => None,
        };
        let record = self
            .append_fact(settlement_fact(&entry, action, zone, by, at_unix_ms))
            .await?;
        self.log.unquarantine(&entry).await?;
        Ok(Settled {
            entry,
            released,
            record,
        })
    }
}

/// The audit fact of an operator's release or drop. Its message_id derives from the
/// quarantined fact (message_id and payload) and the time it was quarantined, so
/// recording the same decision twice stores it once.
pub fn settlement_fact(
    entry: &QuarantineEntry,
    action: QuarantineAction,
    zone: &str,
    by: &str,
    at_unix_ms: i64,
) -> Message {
    let id_hash = hex_prefix(entry.message.envelope.message_id.as_bytes());
    Message {
        envelope: Envelope {
            message_id: format!(
                "{}:{id_hash}:{}:{}",
                action.predicate(),
                entry.payload_short(),
                entry.quarantined_at_unix_ms
            ),
            from_zone: zone.to_owned(),
            to_zone: zone.to_owned(),
            produced_at_unix_ms: at_unix_ms,
            // The cause, where it fits the default id limit (a zone with a longer
            // limit may have accepted a longer id; the object names it regardless).
            causation_id: Some(entry.message.envelope.message_id.clone())
                .filter(|id| id.len() <= Limits::default().max_id_bytes),
            labels: [("class".to_owned(), "audit".to_owned())].into(),
            ..Default::default()
        },
        fact: Fact {
            subject: format!("link:{}", entry.link),
            predicate: action.predicate().to_owned(),
            object_json: serde_json::json!({
                "message_id": entry.message.envelope.message_id,
                "by": by,
                "payload_digest": entry.payload_digest,
                "cause": entry.cause,
                "field": entry.field,
                "policy": entry.denial.policy,
                "reason": entry.denial.reason,
                "module_sha256": entry.denial.module_sha256,
                "source_zone": entry.source_zone,
                "source_stream": entry.source_stream,
                "source_offset": entry.source_offset,
                "quarantined_at_unix_ms": entry.quarantined_at_unix_ms,
            })
            .to_string(),
            artifacts: vec![],
        },
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
