//! The Boundary engine: the four operations over a [`FactLog`] and an [`ObjectStore`].
//!
//! The engine is where every input is validated (architecture invariant: nothing
//! reaches a port unvalidated). It performs no I/O of its own.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::BoundaryError;
use crate::link::Destination;
use crate::model::{Limits, Message, Provenance};
use crate::names;
use crate::ports::{
    AppendOutcome, BoundaryApi, ByteStream, FactLog, FactPage, FetchRequest, Frontier, ObjectInfo,
    ObjectStore,
};

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
}

#[async_trait]
impl BoundaryApi for Boundary {
    async fn append_fact(&self, message: Message) -> Result<AppendOutcome, BoundaryError> {
        let validated = self.limits.validate(message)?;
        self.log.append(validated).await
    }

    async fn fetch_facts(&self, request: FetchRequest) -> Result<FactPage, BoundaryError> {
        names::validate_consumer("consumer_name", &request.consumer)?;
        if request.limit == 0 || request.limit > self.limits.max_fetch_limit {
            return Err(BoundaryError::invalid(
                "limit",
                format!("must be between 1 and {}", self.limits.max_fetch_limit),
            ));
        }
        self.log.fetch(&request).await
    }

    async fn confirm_receipt(
        &self,
        consumer: &str,
        offset: u64,
    ) -> Result<Frontier, BoundaryError> {
        names::validate_consumer("consumer_name", consumer)?;
        if offset == 0 {
            return Err(BoundaryError::invalid("offset", "must be at least 1"));
        }
        self.log.confirm(consumer, offset).await
    }

    async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: ByteStream,
    ) -> Result<ObjectInfo, BoundaryError> {
        names::validate_bucket("bucket", bucket)?;
        names::validate_object_key("key", key)?;
        self.objects.put(bucket, key, body).await
    }
}

/// The engine as a link's destination: the same validation as AppendFact, with the
/// provenance stored beside the fact, and the link checkpoint kept in the zone log.
#[async_trait]
impl Destination for Boundary {
    async fn append_replicated(
        &self,
        message: Message,
        provenance: Option<Provenance>,
    ) -> Result<AppendOutcome, BoundaryError> {
        let mut validated = self.limits.validate(message)?;
        if let Some(p) = provenance {
            validated = validated.with_provenance(p)?;
        }
        self.log.append(validated).await
    }

    async fn checkpoint(&self, link: &str) -> Result<Option<u64>, BoundaryError> {
        self.log.link_checkpoint(link).await
    }

    async fn record_checkpoint(&self, link: &str, offset: u64) -> Result<(), BoundaryError> {
        self.log.record_link_checkpoint(link, offset).await
    }
}
