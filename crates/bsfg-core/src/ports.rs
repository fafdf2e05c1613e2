//! The ports: what the engine needs from a store, and what every transport serves.
//!
//! Adapters implement these traits in their own crates; bsfg-core never names them.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::BoundaryError;
use crate::model::{ArtifactRef, Message, Provenance, ValidatedMessage};
use crate::policy::QuarantineEntry;

/// A stream of byte chunks, used for artifacts in both directions so that no artifact
/// is ever held whole in memory.
pub type ByteStream = BoxStream<'static, Result<Bytes, BoundaryError>>;

/// Result of an AppendFact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Stream (stream class) that holds the fact.
    pub stream: String,
    /// Offset of the fact in that stream.
    pub offset: u64,
    /// True when the message_id was already stored with the same payload; nothing new
    /// was stored and `offset` is the original one.
    pub duplicate: bool,
}

/// A FetchFacts request. The server keeps the read position; the client never sends one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// Durable consumer name.
    pub consumer: String,
    /// Upper bound on the page size (at least 1).
    pub limit: u32,
    /// How long to wait when nothing is ready (long-poll). Zero returns at once.
    pub wait: Duration,
}

/// One fact of a fetched page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedFact {
    /// Offset in the consumer's stream.
    pub offset: u64,
    /// When this zone appended it (Unix ms, the store's clock).
    pub appended_at_unix_ms: i64,
    /// How many times it has been delivered to this consumer (1 = first time).
    pub delivery_count: u64,
    /// The message as stored (canonical object_json).
    pub message: Message,
    /// Where this zone got it from, when a link replicated it here.
    pub provenance: Option<Provenance>,
}

/// A page of facts plus the stream and consumer positions, so a receiver can compute
/// lag and detect gaps without extra calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FactPage {
    /// Zone that served the page (recorded as provenance by receivers).
    pub zone: String,
    /// Stream the consumer reads.
    pub stream: String,
    /// Facts in offset order. Unconfirmed facts may come again (at-least-once).
    pub facts: Vec<FetchedFact>,
    /// Oldest offset still retained by the stream (0 when the stream is empty).
    pub first_offset: u64,
    /// Newest offset in the stream.
    pub last_offset: u64,
    /// The consumer's frontier: highest contiguous confirmed offset.
    pub frontier: u64,
    /// Facts not yet confirmed by this consumer (delivered or not).
    pub pending: u64,
}

/// Result of a ConfirmReceipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frontier {
    /// Highest contiguous confirmed offset of the consumer.
    pub offset: u64,
}

/// Result of a PutObject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// What a GetObject answers: the object's info, then its bytes from `offset` on.
pub struct ObjectRead {
    /// The whole object's bucket, key, digest and size.
    pub info: ObjectInfo,
    /// The byte the body starts at (what the caller asked to resume from).
    pub offset: u64,
    /// The bytes from `offset` to the end, streamed; a read that breaks off ends in
    /// an error, never early without one.
    pub body: ByteStream,
}

impl std::fmt::Debug for ObjectRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectRead")
            .field("info", &self.info)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl ObjectInfo {
    /// True when this is the artifact `r` references: same digest and size.
    pub fn matches(&self, r: &ArtifactRef) -> bool {
        self.digest == r.digest && self.size == r.size
    }
}

/// What a boundary operation returns: its answer, or the error with its stable
/// reason.
pub type ApiResult<T> = Result<T, BoundaryError>;

/// Most facts one AppendFacts call carries.
pub const MAX_APPEND_FACTS: usize = 1000;

/// The four boundary operations. Implemented by the engine and by transport clients,
/// so a replicator is just a client of two `BoundaryApi` values.
#[async_trait]
pub trait BoundaryApi: Send + Sync {
    /// Durable, idempotent append to this zone's log.
    async fn append_fact(&self, message: Message) -> Result<AppendOutcome, BoundaryError>;
    /// [`BoundaryApi::append_fact`] for many facts at once: one answer per fact, in
    /// order, each exactly what `append_fact` would answer it alone (one fact's
    /// refusal never holds back another). The outer error is for a call that could
    /// not be made at all. The default appends them concurrently (so a zone commits
    /// them together); a client of a remote zone sends them in one request.
    async fn append_facts(
        &self,
        messages: Vec<Message>,
    ) -> ApiResult<Vec<ApiResult<AppendOutcome>>> {
        Ok(futures::future::join_all(messages.into_iter().map(|m| self.append_fact(m))).await)
    }
    /// Paged pull for a durable named consumer.
    async fn fetch_facts(&self, request: FetchRequest) -> Result<FactPage, BoundaryError>;
    /// "Everything up to `offset` is durably committed on my side."
    async fn confirm_receipt(&self, consumer: &str, offset: u64)
    -> Result<Frontier, BoundaryError>;
    /// FetchFacts on behalf of `receiver`, the identity a transport authenticated
    /// (the [`crate::Gate`] passes it). The zone remembers which receiver each offset
    /// was delivered to, so that only that receiver can confirm it. The default
    /// ignores `receiver`, which is right for a client of another zone (its server
    /// establishes the identity); a wrapper in front of the engine must forward it.
    async fn fetch_facts_as(&self, receiver: &str, request: FetchRequest) -> ApiResult<FactPage> {
        let _ = receiver;
        self.fetch_facts(request).await
    }
    /// ConfirmReceipt on behalf of `receiver` (see [`BoundaryApi::fetch_facts_as`]):
    /// an offset delivered to another receiver is `failed_precondition` and moves
    /// nothing.
    async fn confirm_receipt_as(
        &self,
        receiver: &str,
        consumer: &str,
        offset: u64,
    ) -> ApiResult<Frontier> {
        let _ = receiver;
        self.confirm_receipt(consumer, offset).await
    }
    /// Stores an artifact, streamed. Same key + same bytes is idempotent; same key +
    /// different bytes is refused.
    async fn put_object(&self, bucket: &str, key: &str, body: ByteStream) -> ApiResult<ObjectInfo>;
    /// An artifact's bucket, key, digest and size; `not_found` when the zone does not
    /// hold it. Authorized like GetObject.
    async fn head_object(&self, bucket: &str, key: &str) -> ApiResult<ObjectInfo>;
    /// Reads an artifact from byte `offset` on (0: all of it; a transfer that broke
    /// off resumes where it stopped), streamed. `not_found` when the zone does not
    /// hold it; an `offset` past its size is `invalid_argument` on `offset`.
    async fn get_object(&self, bucket: &str, key: &str, offset: u64) -> ApiResult<ObjectRead>;
}

/// The zone-local log of facts.
#[async_trait]
pub trait FactLog: Send + Sync {
    /// Appends durably. Permanently idempotent on message_id: same id + same digest
    /// returns the original offset with `duplicate = true` and stores nothing; same
    /// id + different digest is `ConflictingDuplicate` and stores nothing.
    async fn append(&self, message: ValidatedMessage) -> Result<AppendOutcome, BoundaryError>;
    /// Returns up to `request.limit` facts for the durable consumer, waiting up to
    /// `request.wait` when none is ready; an empty page when nothing arrives. The
    /// page is remembered as delivered to `receiver`.
    async fn fetch(&self, request: &FetchRequest, receiver: &str) -> ApiResult<FactPage>;
    /// Acknowledges what the page that delivered `offset` to `receiver` held, up to
    /// `offset`, and returns the frontier. Past the highest delivered offset is
    /// `InvalidArgument`; at or below the frontier changes nothing; an offset this
    /// zone did not deliver to `receiver` (another receiver holds it, or it was
    /// delivered before a restart) is `FailedPrecondition` and changes nothing.
    async fn confirm(&self, consumer: &str, offset: u64, receiver: &str) -> ApiResult<Frontier>;
    /// The checkpoint of a link pulling into this zone: the highest source offset it
    /// durably appended here and was about to confirm. `None` before the first page.
    async fn link_checkpoint(&self, link: &str) -> Result<Option<u64>, BoundaryError>;
    /// Durably records a link's checkpoint (see [`FactLog::link_checkpoint`]). Returns
    /// only after the record is durable.
    async fn record_link_checkpoint(&self, link: &str, offset: u64) -> Result<(), BoundaryError>;
    /// Keeps a fact a link could not append (an intake policy denied it, or this zone
    /// refused it) in the zone's quarantine, durably, one entry per (message_id,
    /// payload digest). Returns `false` (and stores nothing) when that entry is
    /// already kept.
    async fn quarantine(&self, entry: &QuarantineEntry) -> Result<bool, BoundaryError>;
    /// Quarantined entries, oldest first, at most `limit`.
    async fn quarantined(&self, limit: usize) -> Result<Vec<QuarantineEntry>, BoundaryError>;
    /// Every quarantined entry of `message_id` (one per distinct payload).
    async fn quarantined_entries(
        &self,
        message_id: &str,
    ) -> Result<Vec<QuarantineEntry>, BoundaryError>;
    /// Removes exactly that entry durably; `false` when it was not kept.
    async fn unquarantine(&self, entry: &QuarantineEntry) -> Result<bool, BoundaryError>;
}

/// The zone-local artifact store.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Stores `body` under `bucket/key`, streamed; see [`BoundaryApi::put_object`]. A
    /// put that fails (the body breaks off, times out, has the wrong size, the store
    /// fails) leaves nothing behind.
    async fn put(&self, bucket: &str, key: &str, body: ByteStream) -> ApiResult<ObjectInfo>;
    /// The object's info, `None` when this zone does not hold it.
    async fn head(&self, bucket: &str, key: &str) -> ApiResult<Option<ObjectInfo>>;
    /// Reads an object from byte `offset` on, streamed; `NotFound` when absent.
    async fn get(&self, bucket: &str, key: &str, offset: u64) -> ApiResult<ObjectRead>;
    /// How many bytes of `artifact` an earlier, interrupted [`ObjectStore::stage`]
    /// left staged (0: none). Staged bytes survive a restart of the gateway.
    async fn staged(&self, artifact: &ArtifactRef) -> ApiResult<u64>;
    /// Adds `body` to the staged bytes of `artifact`, which must be exactly `from`
    /// (else `Unavailable`, nothing changed: another copy is at work, and a retry reads
    /// the staged count again). What arrives is kept staged even
    /// when the body breaks off (the error is returned), so a later call resumes.
    /// When the staged bytes reach the artifact's size their digest is checked: the
    /// same, and the object becomes visible under `bucket/key` at once, whole, and its
    /// info is returned; another, and the staged bytes are discarded and the answer is
    /// `FailedPrecondition` naming both digests. Bytes beyond the size are refused.
    async fn stage(
        &self,
        artifact: &ArtifactRef,
        from: u64,
        body: ByteStream,
    ) -> ApiResult<ObjectInfo>;
    /// Discards what is staged for `artifact` (nothing staged: nothing to do).
    async fn discard_staged(&self, artifact: &ArtifactRef) -> ApiResult<()>;
}
