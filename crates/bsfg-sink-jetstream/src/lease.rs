//! Link leases in the zone's JetStream: a key-value bucket `bsfg_leases` whose
//! entries expire `ttl` after their last write. A gateway takes a link's lease by
//! creating its key (only one create succeeds), renews it by an update on the
//! revision it holds (compare-and-set), and gives it up by a delete on that revision.
//! A holder that stops renewing loses it when the entry ages out.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv;
use async_trait::async_trait;
use bsfg_core::BoundaryError;
use bsfg_core::link::LinkLease;

use crate::SinkError;

/// The bucket holding the leases.
pub const LEASE_BUCKET: &str = "bsfg_leases";

/// Default lease time: a dead holder's links move within it.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// The zone's link leases.
pub struct Leases {
    store: kv::Store,
    ttl: Duration,
}

fn key(link: &str) -> String {
    format!("link.{link}")
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BoundaryError {
    BoundaryError::Unavailable(format!("link lease: {what}: {e}"))
}

impl Leases {
    /// Creates or opens the lease bucket (entries expire after `ttl`).
    pub async fn open(
        js: &jetstream::Context,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Leases, SinkError> {
        let store = match js.get_key_value(LEASE_BUCKET).await {
            Ok(s) => {
                // The bucket's entries expire after the lease time it was made with:
                // every gateway of the zone keeps to that one.
                if let Ok(status) = s.status().await
                    && status.max_age() != ttl
                    && !status.max_age().is_zero()
                {
                    tracing::warn!(configured = ?ttl, bucket = ?status.max_age(), "lease_ttl differs from the zone's lease bucket; the bucket's applies");
                    return Ok(Leases {
                        store: s,
                        ttl: status.max_age(),
                    });
                }
                s
            }
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: LEASE_BUCKET.into(),
                    description: "BSFG link leases: which gateway of the zone runs each link"
                        .into(),
                    history: 1,
                    max_age: ttl,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| SinkError::js("create the lease bucket", e))?,
        };
        Ok(Leases { store, ttl })
    }

    async fn current(&self, link: &str) -> Result<Option<kv::Entry>, BoundaryError> {
        let entry = self
            .store
            .entry(key(link))
            .await
            .map_err(|e| unavailable("read", e))?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put))
    }

    /// Who holds `link`'s lease now, after a write of ours lost to another's.
    async fn holder_now(&self, link: &str) -> Result<Option<String>, BoundaryError> {
        Ok(Some(
            self.current(link)
                .await?
                .map(|e| String::from_utf8_lossy(&e.value).into_owned())
                .unwrap_or_default(),
        ))
    }
}

#[async_trait]
impl LinkLease for Leases {
    async fn claim(&self, link: &str, holder: &str) -> Result<Option<String>, BoundaryError> {
        let value = bytes::Bytes::copy_from_slice(holder.as_bytes());
        match self.current(link).await? {
            Some(e) if e.value == holder.as_bytes() => {
                match self.store.update(key(link), value, e.revision).await {
                    Ok(_) => Ok(None),
                    // Someone wrote in between: whoever it is holds it now.
                    Err(_) => self.holder_now(link).await,
                }
            }
            Some(e) => Ok(Some(String::from_utf8_lossy(&e.value).into_owned())),
            None => match self.store.create(key(link), value).await {
                Ok(_) => Ok(None),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    self.holder_now(link).await
                }
                Err(e) => Err(unavailable("create", e)),
            },
        }
    }

    async fn release(&self, link: &str, holder: &str) {
        if let Ok(Some(e)) = self.current(link).await
            && e.value == holder.as_bytes()
        {
            let _ = self
                .store
                .delete_expect_revision(key(link), Some(e.revision))
                .await;
        }
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}
