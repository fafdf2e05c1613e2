//! PutObject on JetStream Object Store buckets, streamed in chunks.
//!
//! Referenced artifacts are immutable: the same key with the same bytes is
//! idempotent, the same key with other bytes is refused.

use crate::error::unavailable;
use async_nats::jetstream::{self, object_store};
use base64::Engine as _;
use bsfg_core::{BoundaryError, ByteStream, ObjectInfo};
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio_util::io::{ReaderStream, StreamReader};

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

pub(crate) async fn put(
    store: &object_store::ObjectStore,
    bucket: &str,
    key: &str,
    chunk_size: usize,
    body: ByteStream,
) -> Result<ObjectInfo, BoundaryError> {
    let existing = match store.info(key).await {
        Ok(info) if !info.deleted => Some(info),
        Ok(_) => None,
        Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => None,
        Err(e) => return Err(unavailable("object info", e)),
    };
    if let Some(info) = existing {
        // Hash what is offered without storing it, then compare.
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        let offered = format!("sha256:{}", hex::encode(hasher.finalize()));
        let stored = info
            .digest
            .as_deref()
            .and_then(nats_digest_to_hex)
            .unwrap_or_default();
        if stored != offered || info.size as u64 != size {
            return Err(BoundaryError::ImmutableObject {
                bucket: bucket.into(),
                key: key.into(),
                existing_digest: stored,
                offered_digest: offered,
            });
        }
        return Ok(ObjectInfo {
            bucket: bucket.into(),
            key: key.into(),
            digest: stored,
            size,
        });
    }
    let mut reader = StreamReader::new(body.map_err(std::io::Error::other));
    let meta = object_store::ObjectMetadata {
        name: key.to_owned(),
        chunk_size: Some(chunk_size),
        ..Default::default()
    };
    let info = store
        .put(meta, &mut reader)
        .await
        .map_err(|e| unavailable("put object", e))?;
    let digest = info
        .digest
        .as_deref()
        .and_then(nats_digest_to_hex)
        .ok_or_else(|| BoundaryError::Internal("object store returned no SHA-256 digest".into()))?;
    Ok(ObjectInfo {
        bucket: bucket.into(),
        key: key.into(),
        digest,
        size: info.size as u64,
    })
}

pub(crate) async fn get(
    store: &object_store::ObjectStore,
    key: &str,
) -> Result<ByteStream, BoundaryError> {
    let object = store.get(key).await.map_err(|e| {
        if e.kind() == object_store::GetErrorKind::NotFound {
            BoundaryError::NotFound(format!("object `{key}`"))
        } else {
            unavailable("get object", e)
        }
    })?;
    Ok(ReaderStream::new(object)
        .map_err(|e| unavailable("read object", e))
        .boxed())
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
}
