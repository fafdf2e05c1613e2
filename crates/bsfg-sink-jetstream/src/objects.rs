//! Artifacts on JetStream Object Store buckets, streamed in chunks both ways.
//!
//! Objects are written here rather than by async-nats' `put`, in the same format (the
//! chunks on `$O.<bucket>.C.<nuid>`, then one metadata message on `$O.<bucket>.M.<name>`
//! that makes the object visible, whole, at once), for three guarantees the library's
//! put does not give:
//! - **a failed put leaves nothing**: whatever breaks (the body errors, times out or
//!   has the wrong size, the server fails) the chunks written so far are purged;
//! - **a copy resumes**: a link's copy of an artifact is staged under a nuid derived
//!   from the artifact (bucket, key, digest, size, chunk size), in whole chunks, so
//!   after a lost link or a crash of the gateway the staged chunks are counted and the
//!   copy goes on from there; the digest of the whole is checked before the metadata
//!   is written, and a mismatch discards the staged chunks;
//! - **writes are pipelined**: several chunk acknowledgements are awaited at once
//!   instead of one round trip per chunk.
//!
//! Referenced artifacts are immutable: the same key with the same bytes is
//! idempotent, the same key with other bytes is refused.

use std::collections::VecDeque;

use crate::error::unavailable;
use async_nats::jetstream::{self, context::PublishAckFuture, object_store};
use base64::Engine as _;
use bsfg_core::model::ArtifactRef;
use bsfg_core::{ApiResult, BoundaryError, ByteStream, ObjectInfo, ObjectRead};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt as _;
use tokio_util::io::ReaderStream;

/// Chunk acknowledgements awaited at once.
const ACKS_IN_FLIGHT: usize = 8;

/// Converts the Object Store's `SHA-256=<base64url>` to `sha256:<hex>`.
pub(crate) fn nats_digest_to_hex(d: &str) -> Option<String> {
    let b64 = d.strip_prefix("SHA-256=")?;
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64))
        .ok()?;
    Some(format!("sha256:{}", hex::encode(raw)))
}

pub(crate) async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<object_store::ObjectStore, BoundaryError> {
    match js.get_object_store(name).await {
        Ok(s) => Ok(s),
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: name.to_owned(),
                description: Some("BSFG artifacts".into()),
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("create bucket", e)),
    }
}

/// The bucket if it exists (reads never create one).
pub(crate) async fn existing_bucket(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<object_store::ObjectStore>, BoundaryError> {
    match js.get_stream(format!("OBJ_{name}")).await {
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(unavailable("object bucket", e)),
        Ok(_) => js
            .get_object_store(name)
            .await
            .map(Some)
            .map_err(|e| unavailable("object bucket", e)),
    }
}

/// The stored info of `key`, `None` when absent or deleted.
async fn stored_info(
    store: &object_store::ObjectStore,
    key: &str,
) -> Result<Option<object_store::ObjectInfo>, BoundaryError> {
    match store.info(key).await {
        Ok(info) if !info.deleted => Ok(Some(info)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable("object info", e)),
    }
}

fn info_of(bucket: &str, key: &str, info: &object_store::ObjectInfo) -> ObjectInfo {
    ObjectInfo {
        bucket: bucket.into(),
        key: key.into(),
        digest: info
            .digest
            .as_deref()
            .and_then(nats_digest_to_hex)
            .unwrap_or_default(),
        size: info.size as u64,
    }
}

pub(crate) async fn head(
    store: &object_store::ObjectStore,
    bucket: &str,
    key: &str,
) -> ApiResult<Option<ObjectInfo>> {
    Ok(stored_info(store, key)
        .await?
        .map(|i| info_of(bucket, key, &i)))
}

fn sha256_hex(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The chunks of one object being written: full chunks published as they fill, up
/// to [`ACKS_IN_FLIGHT`] acknowledgements outstanding.
struct Chunks<'a> {
    js: &'a jetstream::Context,
    subject: String,
    chunk_size: usize,
    buf: BytesMut,
    hasher: Sha256,
    size: u64,
    acks: VecDeque<PublishAckFuture>,
}

impl<'a> Chunks<'a> {
    fn new(js: &'a jetstream::Context, bucket: &str, nuid: &str, chunk_size: usize) -> Self {
        Chunks {
            js,
            subject: format!("$O.{bucket}.C.{nuid}"),
            chunk_size: chunk_size.max(1),
            buf: BytesMut::new(),
            hasher: Sha256::new(),
            size: 0,
            acks: VecDeque::new(),
        }
    }

    /// Takes `data`, publishing every chunk it completes.
    async fn push(&mut self, mut data: Bytes) -> ApiResult<()> {
        self.hasher.update(&data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (self.chunk_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data.split_to(take));
            if self.buf.len() == self.chunk_size {
                let chunk = self.buf.split().freeze();
                self.publish(chunk).await?;
            }
        }
        Ok(())
    }

    async fn publish(&mut self, chunk: Bytes) -> ApiResult<()> {
        if self.acks.len() >= ACKS_IN_FLIGHT
            && let Some(ack) = self.acks.pop_front()
        {
            ack.await.map_err(|e| unavailable("object chunk ack", e))?;
        }
        let ack = self
            .js
            .publish(self.subject.clone(), chunk)
            .await
            .map_err(|e| unavailable("object chunk", e))?;
        self.acks.push_back(ack);
        Ok(())
    }

    /// Publishes the last, partial chunk (if any) and waits for every
    /// acknowledgement: after `Ok` every chunk is stored.
    async fn finish(&mut self) -> ApiResult<()> {
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            self.publish(chunk).await?;
        }
        self.settle().await
    }

    /// Waits for every acknowledgement outstanding.
    async fn settle(&mut self) -> ApiResult<()> {
        while let Some(ack) = self.acks.pop_front() {
            ack.await.map_err(|e| unavailable("object chunk ack", e))?;
        }
        Ok(())
    }
}

/// The stream that holds `bucket`'s chunks and metadata.
async fn bucket_stream(
    js: &jetstream::Context,
    bucket: &str,
) -> ApiResult<jetstream::stream::Stream> {
    js.get_stream(format!("OBJ_{bucket}"))
        .await
        .map_err(|e| unavailable("object bucket", e))
}

/// Removes every chunk of `nuid` (a failed or discarded write).
async fn purge_chunks(
    stream: &jetstream::stream::Stream,
    bucket: &str,
    nuid: &str,
) -> ApiResult<()> {
    stream
        .purge()
        .filter(format!("$O.{bucket}.C.{nuid}"))
        .await
        .map_err(|e| unavailable("purge object chunks", e))?;
    Ok(())
}

/// The metadata message, in the Object Store's format, that makes an object visible.
#[derive(serde::Serialize)]
struct Meta<'a> {
    name: &'a str,
    bucket: &'a str,
    nuid: &'a str,
    size: u64,
    chunks: u64,
    mtime: String,
    digest: String,
    options: MetaOptions,
}

#[derive(serde::Serialize)]
struct MetaOptions {
    max_chunk_size: usize,
}

/// Writes the metadata of a whole object whose chunks are stored under `nuid`.
async fn commit(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
    nuid: &str,
    chunk_size: usize,
    size: u64,
    digest_hex: &str,
) -> ApiResult<ObjectInfo> {
    let raw = hex::decode(digest_hex.trim_start_matches("sha256:"))
        .map_err(|e| BoundaryError::Internal(format!("digest: {e}")))?;
    let meta = Meta {
        name: key,
        bucket,
        nuid,
        size,
        chunks: size.div_ceil(chunk_size.max(1) as u64),
        mtime: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
        digest: format!(
            "SHA-256={}",
            base64::engine::general_purpose::URL_SAFE.encode(raw)
        ),
        options: MetaOptions {
            max_chunk_size: chunk_size,
        },
    };
    let body = serde_json::to_vec(&meta).map_err(|e| BoundaryError::Internal(e.to_string()))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_ROLLUP, "sub");
    let subject = format!(
        "$O.{bucket}.M.{}",
        base64::engine::general_purpose::URL_SAFE.encode(key)
    );
    js.publish_with_headers(subject, headers, body.into())
        .await
        .map_err(|e| unavailable("object metadata", e))?
        .await
        .map_err(|e| unavailable("object metadata ack", e))?;
    Ok(ObjectInfo {
        bucket: bucket.into(),
        key: key.into(),
        digest: digest_hex.into(),
        size,
    })
}

/// Stores `body` under `key`: idempotent for the same bytes, refused for others, and
/// nothing left behind when it fails.
pub(crate) async fn put(
    js: &jetstream::Context,
    store: &object_store::ObjectStore,
    bucket: &str,
    key: &str,
    chunk_size: usize,
    body: ByteStream,
) -> Result<ObjectInfo, BoundaryError> {
    if let Some(info) = stored_info(store, key).await? {
        // Hash what is offered without storing it, then compare.
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        let offered = sha256_hex(hasher);
        let stored = info_of(bucket, key, &info);
        if stored.digest != offered || stored.size != size {
            return Err(BoundaryError::ImmutableObject {
                bucket: bucket.into(),
                key: key.into(),
                existing_digest: stored.digest,
                offered_digest: offered,
            });
        }
        return Ok(stored);
    }
    let nuid = nuid::next().to_string();
    let mut chunks = Chunks::new(js, bucket, &nuid, chunk_size);
    let written: ApiResult<ObjectInfo> = async {
        let mut body = body;
        while let Some(data) = body.next().await {
            chunks.push(data?).await?;
        }
        chunks.finish().await?;
        let digest = sha256_hex(std::mem::take(&mut chunks.hasher));
        commit(js, bucket, key, &nuid, chunk_size, chunks.size, &digest).await
    }
    .await;
    if written.is_err() {
        // Wait out what is in flight so the purge sees every chunk, then purge.
        let _ = chunks.settle().await;
        let purged = match bucket_stream(js, bucket).await {
            Ok(stream) => purge_chunks(&stream, bucket, &nuid).await,
            Err(e) => Err(e),
        };
        if let Err(e) = purged {
            tracing::warn!(bucket, key, error = %e, "could not purge the chunks of a failed upload");
        }
    }
    written
}

/// Reads `key` from byte `offset` on.
pub(crate) async fn get(
    store: &object_store::ObjectStore,
    bucket: &str,
    key: &str,
    offset: u64,
) -> ApiResult<ObjectRead> {
    let object = store.get(key).await.map_err(|e| {
        if e.kind() == object_store::GetErrorKind::NotFound {
            BoundaryError::NotFound(format!("object `{bucket}/{key}`"))
        } else {
            unavailable("get object", e)
        }
    })?;
    let info = info_of(bucket, key, &object.info);
    if offset > info.size {
        return Err(BoundaryError::invalid(
            "offset",
            format!(
                "{offset} is past the end of `{bucket}/{key}` ({} bytes)",
                info.size
            ),
        ));
    }
    let chunk = object
        .info
        .options
        .as_ref()
        .and_then(|o| o.max_chunk_size)
        .unwrap_or(128 * 1024)
        .clamp(16 * 1024, 1024 * 1024);
    let mut object = object;
    // Skip to `offset` here, inside the zone: what crosses to the reader starts there.
    let mut skipped = 0u64;
    let mut sink = vec![0u8; chunk];
    while skipped < offset {
        let want = ((offset - skipped) as usize).min(sink.len());
        let n = object
            .read(&mut sink[..want])
            .await
            .map_err(|e| unavailable("read object", e))?;
        if n == 0 {
            return Err(unavailable("read object", "ended before the offset"));
        }
        skipped += n as u64;
    }
    Ok(ObjectRead {
        info,
        offset,
        body: ReaderStream::with_capacity(object, chunk)
            .map_err(|e| unavailable("read object", e))
            .boxed(),
    })
}

/// The staging nuid of `artifact` at `chunk_size`: the same after a restart, another
/// for another artifact or chunk size.
fn staging_nuid(a: &ArtifactRef, chunk_size: usize) -> String {
    let mut h = Sha256::new();
    for part in [a.bucket.as_bytes(), a.key.as_bytes(), a.digest.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(a.size.to_be_bytes());
    h.update((chunk_size as u64).to_be_bytes());
    format!("stage{}", &hex::encode(h.finalize())[..32])
}

/// Chunks stored under `nuid`.
async fn chunk_count(
    stream: &jetstream::stream::Stream,
    bucket: &str,
    nuid: &str,
) -> ApiResult<u64> {
    let subject = format!("$O.{bucket}.C.{nuid}");
    let info = stream
        .info_with_subjects(&subject)
        .await
        .map_err(|e| unavailable("staged chunks", e))?;
    let mut count = 0u64;
    let mut subjects = info;
    while let Some(s) = subjects.next().await {
        let (s, n) = s.map_err(|e| unavailable("staged chunks", e))?;
        if s == subject {
            count += n as u64;
        }
    }
    Ok(count)
}

/// Bytes of `a` staged in whole chunks (see the module documentation).
pub(crate) async fn staged(
    js: &jetstream::Context,
    a: &ArtifactRef,
    chunk_size: usize,
) -> ApiResult<u64> {
    let nuid = staging_nuid(a, chunk_size);
    let stream = bucket_stream(js, &a.bucket).await?;
    let n = chunk_count(&stream, &a.bucket, &nuid).await?;
    Ok((n * chunk_size as u64).min(a.size))
}

/// Hashes the chunks staged under `nuid` (the first `count`).
async fn hash_staged(
    stream: &jetstream::stream::Stream,
    bucket: &str,
    nuid: &str,
    count: u64,
) -> ApiResult<Sha256> {
    let mut hasher = Sha256::new();
    if count == 0 {
        return Ok(hasher);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("$O.{bucket}.C.{nuid}"),
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable("staged chunks", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable("staged chunks", e))?;
    let mut read = 0u64;
    while read < count {
        match messages.next().await {
            Some(Ok(m)) => {
                hasher.update(&m.payload);
                read += 1;
            }
            Some(Err(e)) => return Err(unavailable("staged chunks", e)),
            None => return Err(unavailable("staged chunks", "ended early")),
        }
    }
    Ok(hasher)
}

/// Adds `body` to what is staged of `a` (see [`bsfg_core::ObjectStore::stage`]).
pub(crate) async fn stage(
    js: &jetstream::Context,
    a: &ArtifactRef,
    chunk_size: usize,
    from: u64,
    body: ByteStream,
) -> ApiResult<ObjectInfo> {
    let chunk_size = chunk_size.max(1);
    let nuid = staging_nuid(a, chunk_size);
    let stream = bucket_stream(js, &a.bucket).await?;
    let count = chunk_count(&stream, &a.bucket, &nuid).await?;
    let staged = (count * chunk_size as u64).min(a.size);
    if staged != from {
        return Err(BoundaryError::Unavailable(format!(
            "`{}/{}`: {staged} bytes are staged, not {from} (another copy at work?)",
            a.bucket, a.key
        )));
    }
    let mut chunks = Chunks::new(js, &a.bucket, &nuid, chunk_size);
    chunks.hasher = hash_staged(&stream, &a.bucket, &nuid, count).await?;
    chunks.size = staged;
    let mut body = body;
    let received: ApiResult<()> = async {
        while chunks.size < a.size {
            let Some(data) = body.next().await else {
                return Err(BoundaryError::Unavailable(format!(
                    "`{}/{}`: the read ended at byte {} of {}",
                    a.bucket, a.key, chunks.size, a.size
                )));
            };
            let data = data?;
            if chunks.size + data.len() as u64 > a.size {
                return Err(BoundaryError::Unavailable(format!(
                    "`{}/{}`: the source sent more than the {} bytes referenced",
                    a.bucket, a.key, a.size
                )));
            }
            chunks.push(data).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = received {
        // Keep the whole chunks that arrived (a later copy resumes after them); the
        // partial one is dropped and comes again.
        chunks.buf.clear();
        chunks.settle().await?;
        return Err(e);
    }
    chunks.finish().await?;
    let digest = sha256_hex(std::mem::take(&mut chunks.hasher));
    if digest != a.digest {
        purge_chunks(&stream, &a.bucket, &nuid).await?;
        return Err(BoundaryError::FailedPrecondition(format!(
            "`{}/{}`: the bytes read hash to {digest}, the fact references {}; nothing was stored",
            a.bucket, a.key, a.digest
        )));
    }
    commit(js, &a.bucket, &a.key, &nuid, chunk_size, a.size, &digest).await
}

/// Purges what is staged of `a`, unless it is the stored object itself.
pub(crate) async fn discard_staged(
    js: &jetstream::Context,
    store: &object_store::ObjectStore,
    a: &ArtifactRef,
    chunk_size: usize,
) -> ApiResult<()> {
    let nuid = staging_nuid(a, chunk_size);
    if stored_info(store, &a.key)
        .await?
        .is_some_and(|i| i.nuid == nuid)
    {
        return Ok(());
    }
    purge_chunks(&bucket_stream(js, &a.bucket).await?, &a.bucket, &nuid).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_digest_converts_to_sha256_hex() {
        // SHA-256 of the empty string.
        let d = "SHA-256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU=";
        assert_eq!(
            nats_digest_to_hex(d).as_deref(),
            Some("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        assert_eq!(nats_digest_to_hex("MD5=abc"), None);
    }

    #[test]
    fn the_staging_name_depends_on_the_artifact_and_the_chunk_size() {
        let a = ArtifactRef {
            bucket: "b".into(),
            key: "k".into(),
            digest: "sha256:00".into(),
            size: 3,
        };
        let b = ArtifactRef {
            key: "k2".into(),
            ..a.clone()
        };
        assert_eq!(staging_nuid(&a, 10), staging_nuid(&a, 10));
        assert_ne!(staging_nuid(&a, 10), staging_nuid(&a, 11));
        assert_ne!(staging_nuid(&a, 10), staging_nuid(&b, 10));
    }
}
