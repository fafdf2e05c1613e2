//! # bsfg-proto
//!
//! The `bsfg.v1` wire messages generated from `proto/bsfg/v1/boundary.proto`, and
//! lossless conversions to and from the domain types of bsfg-core. Transports use
//! these; the engine never sees protobuf. The tonic service code is generated here
//! too, so that every gRPC adapter speaks the one contract.

/// Generated `bsfg.v1` messages, the `Boundary` service server trait and client.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/bsfg.v1.rs"));
}

/// Encoded `FileDescriptorSet` of `bsfg.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bsfg_v1_descriptor.bin"));

use std::collections::BTreeMap;

use bsfg_core::{
    AppendOutcome, ArtifactRef, BoundaryError, Envelope, Fact, FactPage, FetchedFact, Message,
    ObjectInfo, Provenance, Reason,
};

pub mod transfer;

/// The `google.rpc.ErrorInfo` domain of BSFG errors.
pub const ERROR_DOMAIN: &str = "bsfg.v1";

impl From<Message> for v1::FactMessage {
    fn from(m: Message) -> Self {
        let e = m.envelope;
        let f = m.fact;
        v1::FactMessage {
            envelope: Some(v1::Envelope {
                message_id: e.message_id,
                from_zone: e.from_zone,
                to_zone: e.to_zone,
                produced_at_unix_ms: e.produced_at_unix_ms,
                correlation_id: e.correlation_id,
                causation_id: e.causation_id,
                labels: e.labels,
                object_media_type: e.object_media_type,
                object_schema: e.object_schema,
            }),
            fact: Some(v1::Fact {
                subject: f.subject,
                predicate: f.predicate,
                object_json: f.object_json,
                artifacts: f
                    .artifacts
                    .into_iter()
                    .map(|a| v1::ArtifactRef {
                        bucket: a.bucket,
                        key: a.key,
                        digest: a.digest,
                        size: a.size,
                    })
                    .collect(),
            }),
        }
    }
}

impl TryFrom<v1::FactMessage> for Message {
    type Error = BoundaryError;

    /// Fails only when the envelope or fact is missing; field rules are checked by the
    /// engine's validation.
    fn try_from(m: v1::FactMessage) -> Result<Self, BoundaryError> {
        let e = m
            .envelope
            .ok_or_else(|| BoundaryError::invalid("envelope", "is required"))?;
        let f = m
            .fact
            .ok_or_else(|| BoundaryError::invalid("fact", "is required"))?;
        Ok(Message {
            envelope: Envelope {
                message_id: e.message_id,
                from_zone: e.from_zone,
                to_zone: e.to_zone,
                produced_at_unix_ms: e.produced_at_unix_ms,
                correlation_id: e.correlation_id,
                causation_id: e.causation_id,
                labels: e.labels,
                object_media_type: e.object_media_type,
                object_schema: e.object_schema,
            },
            fact: Fact {
                subject: f.subject,
                predicate: f.predicate,
                object_json: f.object_json,
                artifacts: f
                    .artifacts
                    .into_iter()
                    .map(|a| ArtifactRef {
                        bucket: a.bucket,
                        key: a.key,
                        digest: a.digest,
                        size: a.size,
                    })
                    .collect(),
            },
        })
    }
}

impl From<AppendOutcome> for v1::AppendFactResponse {
    fn from(o: AppendOutcome) -> Self {
        v1::AppendFactResponse {
            stream: o.stream,
            offset: o.offset,
            duplicate: o.duplicate,
        }
    }
}

impl From<v1::AppendFactResponse> for AppendOutcome {
    fn from(o: v1::AppendFactResponse) -> Self {
        AppendOutcome {
            stream: o.stream,
            offset: o.offset,
            duplicate: o.duplicate,
        }
    }
}

impl From<Provenance> for v1::Provenance {
    fn from(p: Provenance) -> Self {
        v1::Provenance {
            zone: p.zone,
            stream: p.stream,
            offset: p.offset,
            link: p.link,
        }
    }
}

impl From<v1::Provenance> for Provenance {
    fn from(p: v1::Provenance) -> Self {
        Provenance {
            zone: p.zone,
            stream: p.stream,
            offset: p.offset,
            link: p.link,
        }
    }
}

impl From<FactPage> for v1::FetchFactsResponse {
    fn from(p: FactPage) -> Self {
        v1::FetchFactsResponse {
            stream: p.stream,
            facts: p
                .facts
                .into_iter()
                .map(|f| v1::StoredFact {
                    offset: f.offset,
                    appended_at_unix_ms: f.appended_at_unix_ms,
                    delivery_count: f.delivery_count,
                    message: Some(f.message.into()),
                    provenance: f.provenance.map(Into::into),
                })
                .collect(),
            first_offset: p.first_offset,
            last_offset: p.last_offset,
            frontier: p.frontier,
            pending: p.pending,
            zone: p.zone,
        }
    }
}

impl TryFrom<v1::FetchFactsResponse> for FactPage {
    type Error = BoundaryError;

    fn try_from(p: v1::FetchFactsResponse) -> Result<Self, BoundaryError> {
        let facts = p
            .facts
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let m = f.message.ok_or_else(|| {
                    BoundaryError::invalid(format!("facts[{i}].message"), "is required")
                })?;
                Ok(FetchedFact {
                    offset: f.offset,
                    appended_at_unix_ms: f.appended_at_unix_ms,
                    delivery_count: f.delivery_count,
                    message: Message::try_from(m)?,
                    provenance: f.provenance.map(Into::into),
                })
            })
            .collect::<Result<_, BoundaryError>>()?;
        Ok(FactPage {
            zone: p.zone,
            stream: p.stream,
            facts,
            first_offset: p.first_offset,
            last_offset: p.last_offset,
            frontier: p.frontier,
            pending: p.pending,
        })
    }
}

/// The `google.rpc.ErrorInfo` metadata of an error: what a client branches on besides
/// the reason.
pub fn error_metadata(e: &BoundaryError) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    match e {
        BoundaryError::InvalidArgument { field, rule } => {
            m.insert("field".into(), field.clone());
            m.insert("rule".into(), rule.clone());
        }
        BoundaryError::ConflictingDuplicate {
            message_id,
            stream,
            offset,
        } => {
            m.insert("message_id".into(), message_id.clone());
            m.insert("stream".into(), stream.clone());
            m.insert("offset".into(), offset.to_string());
        }
        BoundaryError::ImmutableObject {
            bucket,
            key,
            existing_digest,
            ..
        } => {
            m.insert("bucket".into(), bucket.clone());
            m.insert("key".into(), key.clone());
            m.insert("existing_digest".into(), existing_digest.clone());
        }
        BoundaryError::UnknownConsumer(c) => {
            m.insert("consumer".into(), c.clone());
        }
        _ => {}
    }
    m
}

impl From<ObjectInfo> for v1::PutObjectResponse {
    fn from(i: ObjectInfo) -> Self {
        v1::PutObjectResponse {
            bucket: i.bucket,
            key: i.key,
            digest: i.digest,
            size: i.size,
        }
    }
}

impl From<v1::PutObjectResponse> for ObjectInfo {
    fn from(r: v1::PutObjectResponse) -> Self {
        ObjectInfo {
            bucket: r.bucket,
            key: r.key,
            digest: r.digest,
            size: r.size,
        }
    }
}

/// The error a server raised, rebuilt from its stable `reason`, its `message` and its
/// metadata (as [`error_metadata`] made them), whichever transport carried them.
pub fn error_from_parts(
    reason: Reason,
    message: &str,
    metadata: &BTreeMap<String, String>,
) -> BoundaryError {
    let meta = |k: &str| metadata.get(k).cloned().unwrap_or_default();
    // The server's message starts with the reason already; do not say it twice.
    let msg = message
        .strip_prefix(&format!("{}: ", reason.as_str()))
        .unwrap_or(message)
        .to_owned();
    match reason {
        Reason::InvalidArgument => BoundaryError::InvalidArgument {
            field: meta("field"),
            rule: meta("rule"),
        },
        Reason::ConflictingDuplicate if metadata.contains_key("bucket") => {
            BoundaryError::ImmutableObject {
                bucket: meta("bucket"),
                key: meta("key"),
                existing_digest: meta("existing_digest"),
                offered_digest: String::new(),
            }
        }
        Reason::ConflictingDuplicate => BoundaryError::ConflictingDuplicate {
            message_id: meta("message_id"),
            stream: meta("stream"),
            offset: meta("offset").parse().unwrap_or(0),
        },
        Reason::UnknownConsumer => BoundaryError::UnknownConsumer(meta("consumer")),
        Reason::Backpressure => BoundaryError::Backpressure(msg),
        Reason::PermissionDenied => BoundaryError::PermissionDenied(msg),
        Reason::Unavailable => BoundaryError::Unavailable(msg),
        Reason::NotFound => BoundaryError::NotFound(msg),
        Reason::Internal => BoundaryError::Internal(msg),
        Reason::FailedPrecondition => BoundaryError::FailedPrecondition(msg),
    }
}

impl From<&BoundaryError> for v1::CallError {
    fn from(e: &BoundaryError) -> Self {
        v1::CallError {
            reason: e.reason().as_str().to_owned(),
            message: e.to_string(),
            metadata: error_metadata(e),
        }
    }
}

impl From<v1::CallError> for BoundaryError {
    /// An unknown reason (a newer server) becomes `internal` with the text kept.
    fn from(e: v1::CallError) -> Self {
        match Reason::parse(&e.reason) {
            Some(r) => error_from_parts(r, &e.message, &e.metadata),
            None => BoundaryError::Internal(format!("{} ({})", e.message, e.reason)),
        }
    }
}

/// One fact's answer of an AppendFacts call, as sent: the outcome, or the error with
/// its stable reason and metadata.
pub fn append_result(r: Result<AppendOutcome, BoundaryError>) -> v1::AppendFactResult {
    use v1::append_fact_result::Result as R;
    v1::AppendFactResult {
        result: Some(match r {
            Ok(o) => R::Appended(o.into()),
            Err(e) => R::Error((&e).into()),
        }),
    }
}

/// One fact's answer of an AppendFacts call, as received (an empty one is
/// `internal`).
pub fn append_result_back(r: v1::AppendFactResult) -> Result<AppendOutcome, BoundaryError> {
    use v1::append_fact_result::Result as R;
    match r.result {
        Some(R::Appended(o)) => Ok(o.into()),
        Some(R::Error(e)) => Err(e.into()),
        None => Err(BoundaryError::Internal(
            "an AppendFacts answer without outcome or error".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prost::Message as _;

    #[test]
    fn an_append_facts_answer_keeps_each_outcome_and_each_reason() {
        let ok = AppendOutcome {
            stream: "facts_operational".into(),
            offset: 7,
            duplicate: true,
        };
        assert_eq!(append_result_back(append_result(Ok(ok.clone()))), Ok(ok));
        let e = BoundaryError::invalid("fact.subject", "must be kind:id");
        assert_eq!(append_result_back(append_result(Err(e.clone()))), Err(e));
        assert!(append_result_back(v1::AppendFactResult { result: None }).is_err());
    }

    fn sample() -> Message {
        let mut m = Message::default();
        m.envelope.message_id = "id-1".into();
        m.envelope.from_zone = "plant-a".into();
        m.envelope.to_zone = "enterprise".into();
        m.envelope.produced_at_unix_ms = 1;
        m.envelope.correlation_id = Some("c".into());
        m.envelope.labels.insert("class".into(), "audit".into());
        m.envelope.object_media_type = Some("application/pdf".into());
        m.fact.subject = "batch:PlantA/B1".into();
        m.fact.predicate = "has_artifact".into();
        m.fact.object_json = "{}".into();
        m.fact.artifacts.push(ArtifactRef {
            bucket: "b".into(),
            key: "k".into(),
            digest: "sha256:00".into(),
            size: 3,
        });
        m
    }

    #[test]
    fn message_survives_protobuf_encoding_unchanged() {
        let wire = v1::FactMessage::from(sample()).encode_to_vec();
        let back = Message::try_from(v1::FactMessage::decode(wire.as_slice()).unwrap()).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn missing_envelope_or_fact_is_named() {
        let mut p = v1::FactMessage::from(sample());
        p.envelope = None;
        assert_eq!(Message::try_from(p).unwrap_err().field(), Some("envelope"));
        let mut p = v1::FactMessage::from(sample());
        p.fact = None;
        assert_eq!(Message::try_from(p).unwrap_err().field(), Some("fact"));
    }

    #[test]
    fn conflicting_duplicate_metadata_carries_the_original_offset() {
        let e = BoundaryError::ConflictingDuplicate {
            message_id: "id".into(),
            stream: "facts_audit".into(),
            offset: 42,
        };
        let m = error_metadata(&e);
        assert_eq!(m.get("offset").map(String::as_str), Some("42"));
        assert_eq!(e.reason().as_str(), "conflicting_duplicate");
    }
}
