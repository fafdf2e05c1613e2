//! The message model: `message = envelope + fact`, and its validation.
//!
//! [`Message`] is what crosses the boundary, unvalidated. [`Limits::validate`] is the
//! only way to obtain a [`ValidatedMessage`], which carries the canonical (RFC 8785)
//! form of `object_json` and the payload digest that idempotency compares.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::BoundaryError;
use crate::names;

/// System metadata of a message (contract: "The message", envelope table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Envelope {
    /// Idempotency key, derived from the business event; never random per retry.
    pub message_id: String,
    /// Zone that produced the fact.
    pub from_zone: String,
    /// Declared destination zone.
    pub to_zone: String,
    /// Producer clock in Unix milliseconds; not an ordering authority.
    pub produced_at_unix_ms: i64,
    /// Workflow / batch grouping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// message_id of the immediate cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Policy and operations hints (`classification=GMP`, `class=audit`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// MIME type of the referenced artifact; required when the fact has artifacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_media_type: Option<String>,
    /// Schema hint URI; never validated against by the boundary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_schema: Option<String>,
}

/// A reference from a fact to an artifact already stored with PutObject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Object store bucket.
    pub bucket: String,
    /// Object key inside the bucket.
    pub key: String,
    /// `sha256:<64 lowercase hex>` of the bytes.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// The immutable domain statement. Corrections are new facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Fact {
    /// `kind:id` or `kind:scope/id`, kind a lowercase noun.
    pub subject: String,
    /// Stable lower_snake_case relation.
    pub predicate: String,
    /// JSON text; canonical (RFC 8785) once validated.
    pub object_json: String,
    /// Artifacts this fact refers to; part of the payload identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactRef>,
}

/// `message = envelope + fact`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Message {
    /// System metadata.
    pub envelope: Envelope,
    /// Domain statement.
    pub fact: Fact,
}

/// SHA-256 over the canonical fact and its artifact references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PayloadDigest(pub [u8; 32]);

impl PayloadDigest {
    /// Lowercase hex form (64 characters).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the 64-character hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(PayloadDigest(out))
    }
}

/// A message that passed every rule of [`Limits`]. Its `object_json` is canonical.
///
/// Guarantee: only [`Limits::validate`] builds one, so holding it proves validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedMessage {
    message: Message,
    digest: PayloadDigest,
    provenance: Option<Provenance>,
    stored: bytes::Bytes,
}

/// Where a replicated fact came from: the source zone and its offset there. Stored
/// beside the fact (never inside it), so the fact and its payload digest are the same
/// in every zone.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Provenance {
    /// Zone the link fetched the fact from (the previous hop, not necessarily the
    /// origin; the origin is `envelope.from_zone`).
    pub zone: String,
    /// Stream of the fact in the source zone.
    pub stream: String,
    /// Offset of the fact in that stream.
    pub offset: u64,
    /// Link that carried it.
    pub link: String,
}

impl ValidatedMessage {
    /// The message, with canonical `object_json`.
    pub fn message(&self) -> &Message {
        &self.message
    }
    /// Consumes it, returning the message.
    pub fn into_message(self) -> Message {
        self.message
    }
    /// Payload identity for idempotency.
    pub fn digest(&self) -> PayloadDigest {
        self.digest
    }
    /// The message's stored form (see [`encode_stored`]): exactly the bytes a sink
    /// keeps, already measured against [`Limits::max_fact_bytes`].
    pub fn stored_form(&self) -> &bytes::Bytes {
        &self.stored
    }
    /// Where the fact came from, when a link appends it.
    pub fn provenance(&self) -> Option<&Provenance> {
        self.provenance.as_ref()
    }
    /// Attaches provenance, after checking it (it comes from the source zone over the
    /// network and is stored as message headers): zone, stream and link must be
    /// names (`invalid_argument` on `provenance.<field>` otherwise). It travels beside
    /// the fact and does not change the digest.
    pub fn with_provenance(mut self, provenance: Provenance) -> Result<Self, BoundaryError> {
        crate::names::validate_zone("provenance.zone", &provenance.zone)?;
        crate::names::validate_consumer("provenance.stream", &provenance.stream)?;
        crate::names::validate_consumer("provenance.link", &provenance.link)?;
        self.provenance = Some(provenance);
        Ok(self)
    }
    /// Shorthand for the envelope's message_id.
    pub fn message_id(&self) -> &str {
        &self.message.envelope.message_id
    }
    /// The subject kind (`batch` in `batch:PlantA/B1042`).
    pub fn subject_kind(&self) -> &str {
        subject_kind(&self.message.fact.subject)
    }
}

/// The `kind` part of a subject (everything before the first `:`).
pub fn subject_kind(subject: &str) -> &str {
    subject.split_once(':').map_or(subject, |(k, _)| k)
}

/// Size and count limits applied by validation. Configurable per zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Upper bound on a whole fact as stored: its stored form ([`encode_stored`]: the
    /// envelope and fact as JSON with the canonical object_json embedded, escaping
    /// included). A zone's store must accept this plus its headers. Default 1 000 000.
    pub max_fact_bytes: usize,
    /// Upper bound on message_id, correlation_id, causation_id. Default 256.
    pub max_id_bytes: usize,
    /// Upper bound on the number of labels. Default 64.
    pub max_labels: usize,
    /// Upper bound on a label value. Default 1024.
    pub max_label_value_bytes: usize,
    /// Upper bound on artifacts per fact. Default 16.
    pub max_artifacts: usize,
    /// Upper bound on a FetchFacts page. Default 1000.
    pub max_fetch_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_fact_bytes: 1_000_000,
            max_id_bytes: 256,
            max_labels: 64,
            max_label_value_bytes: 1024,
            max_artifacts: 16,
            max_fetch_limit: 1000,
        }
    }
}

fn check_id(field: &str, value: &str, max: usize) -> Result<(), BoundaryError> {
    if value.is_empty() {
        return Err(BoundaryError::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(BoundaryError::invalid(
            field,
            format!("must be at most {max} bytes, got {}", value.len()),
        ));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(BoundaryError::invalid(
            field,
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

fn is_lower_word(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '~' | ':' | '@' | '+')
}

/// Checks `kind:id` / `kind:scope/id`.
pub fn validate_subject(field: &str, subject: &str) -> Result<(), BoundaryError> {
    const RULE: &str = "must be `kind:id` or `kind:scope/id` with kind a lowercase noun ([a-z][a-z0-9_]*) and scope/id made of letters, digits and . _ - ~ : @ +";
    if subject.len() > 512 {
        return Err(BoundaryError::invalid(field, "must be at most 512 bytes"));
    }
    let Some((kind, rest)) = subject.split_once(':') else {
        return Err(BoundaryError::invalid(field, RULE));
    };
    if !is_lower_word(kind) || kind.len() > 64 {
        return Err(BoundaryError::invalid(field, RULE));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() > 2
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.chars().all(is_id_char))
    {
        return Err(BoundaryError::invalid(field, RULE));
    }
    Ok(())
}

/// Checks a lower_snake_case predicate.
pub fn validate_predicate(field: &str, predicate: &str) -> Result<(), BoundaryError> {
    let ok = predicate.len() <= 128
        && is_lower_word(predicate)
        && !predicate.ends_with('_')
        && !predicate.contains("__");
    if ok {
        Ok(())
    } else {
        Err(BoundaryError::invalid(
            field,
            "must be lower_snake_case ([a-z][a-z0-9]*(_[a-z0-9]+)*), at most 128 bytes",
        ))
    }
}

/// Checks `sha256:<64 lowercase hex>`.
pub fn validate_object_digest(field: &str, digest: &str) -> Result<(), BoundaryError> {
    let ok = digest
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
    if ok {
        Ok(())
    } else {
        Err(BoundaryError::invalid(
            field,
            "must be `sha256:` followed by 64 lowercase hex digits",
        ))
    }
}

/// Parses JSON text strictly (I-JSON: numbers a double holds exactly, unique keys;
/// see [`crate::json`]) and returns its RFC 8785 canonical form, or refuses it naming
/// the JSON path under `field` and the rule.
pub fn canonicalize_json(field: &str, json: &str) -> Result<String, BoundaryError> {
    crate::json::canonicalize(field, json)
}

impl Limits {
    /// Validates every field, canonicalizes `object_json` and computes the payload digest.
    ///
    /// Errors name the first offending field by its dotted path and the rule broken.
    pub fn validate(&self, msg: Message) -> Result<ValidatedMessage, BoundaryError> {
        self.try_validate(msg).map_err(|r| r.error)
    }

    /// [`Limits::validate`], handing the message back untouched when it is refused
    /// (a link keeps a refused fact in the quarantine exactly as it was fetched).
    pub fn try_validate(&self, mut msg: Message) -> Result<ValidatedMessage, Refused> {
        match self.canonical_and_stored(&msg) {
            Err(error) => Err(Refused {
                error,
                message: Box::new(msg),
            }),
            Ok((canonical, stored)) => {
                msg.fact.object_json = canonical;
                let digest = payload_digest(&msg.fact);
                Ok(ValidatedMessage {
                    message: msg,
                    digest,
                    provenance: None,
                    stored,
                })
            }
        }
    }

    /// Every rule, the stored size included: the canonical object_json and the
    /// stored form with it.
    fn canonical_and_stored(&self, msg: &Message) -> Result<(String, bytes::Bytes), BoundaryError> {
        let canonical = self.check(msg)?;
        let stored = encode_parts(&msg.envelope, &msg.fact, &canonical)?;
        if stored.len() > self.max_fact_bytes {
            return Err(BoundaryError::invalid(
                "fact",
                format!(
                    "must be at most {} bytes as stored (envelope and fact as JSON, canonical object_json, escaping included), got {}",
                    self.max_fact_bytes,
                    stored.len()
                ),
            ));
        }
        Ok((canonical, stored.into()))
    }

    /// Every rule but the stored size; returns the canonical object_json.
    fn check(&self, msg: &Message) -> Result<String, BoundaryError> {
        let e = &msg.envelope;
        check_id("envelope.message_id", &e.message_id, self.max_id_bytes)?;
        names::validate_zone("envelope.from_zone", &e.from_zone)?;
        names::validate_zone("envelope.to_zone", &e.to_zone)?;
        if e.produced_at_unix_ms <= 0 {
            return Err(BoundaryError::invalid(
                "envelope.produced_at_unix_ms",
                "must be a positive Unix time in milliseconds",
            ));
        }
        if let Some(c) = &e.correlation_id {
            check_id("envelope.correlation_id", c, self.max_id_bytes)?;
        }
        if let Some(c) = &e.causation_id {
            check_id("envelope.causation_id", c, self.max_id_bytes)?;
        }
        if e.labels.len() > self.max_labels {
            return Err(BoundaryError::invalid(
                "envelope.labels",
                format!("must hold at most {} labels", self.max_labels),
            ));
        }
        for (k, v) in &e.labels {
            let field = format!("envelope.labels.{k}");
            let key_ok = !k.is_empty()
                && k.len() <= 128
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
            if !key_ok {
                return Err(BoundaryError::invalid(
                    "envelope.labels",
                    format!("key `{k}` must be 1-128 of letters, digits and _ - . /"),
                ));
            }
            if v.len() > self.max_label_value_bytes || v.chars().any(char::is_control) {
                return Err(BoundaryError::invalid(
                    field,
                    format!(
                        "must be at most {} bytes with no control characters",
                        self.max_label_value_bytes
                    ),
                ));
            }
        }
        if let Some(mt) = &e.object_media_type {
            let ok = mt.len() <= 255
                && mt.split_once('/').is_some_and(|(t, s)| {
                    !t.is_empty() && !s.is_empty() && !mt.chars().any(|c| c.is_whitespace())
                });
            if !ok {
                return Err(BoundaryError::invalid(
                    "envelope.object_media_type",
                    "must be a MIME type `type/subtype`",
                ));
            }
        }
        if let Some(s) = &e.object_schema
            && (s.len() > 1024 || s.chars().any(char::is_control))
        {
            return Err(BoundaryError::invalid(
                "envelope.object_schema",
                "must be at most 1024 bytes with no control characters",
            ));
        }

        let f = &msg.fact;
        validate_subject("fact.subject", &f.subject)?;
        validate_predicate("fact.predicate", &f.predicate)?;
        if f.artifacts.len() > self.max_artifacts {
            return Err(BoundaryError::invalid(
                "fact.artifacts",
                format!("must hold at most {} artifacts", self.max_artifacts),
            ));
        }
        for (i, a) in f.artifacts.iter().enumerate() {
            names::validate_bucket(&format!("fact.artifacts[{i}].bucket"), &a.bucket)?;
            names::validate_object_key(&format!("fact.artifacts[{i}].key"), &a.key)?;
            validate_object_digest(&format!("fact.artifacts[{i}].digest"), &a.digest)?;
        }
        if !f.artifacts.is_empty() && e.object_media_type.is_none() {
            return Err(BoundaryError::invalid(
                "envelope.object_media_type",
                "is required when the fact refers to an artifact",
            ));
        }
        if f.object_json.len() > self.max_fact_bytes {
            return Err(BoundaryError::invalid(
                "fact.object_json",
                format!("must be at most {} bytes", self.max_fact_bytes),
            ));
        }
        canonicalize_json("fact.object_json", &f.object_json)
    }
}

/// A message [`Limits::try_validate`] refused, handed back as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why: `invalid_argument` naming the field and the rule.
    pub error: BoundaryError,
    /// The message, unchanged.
    pub message: Box<Message>,
}

/// The stored form of a message whose `object_json` is canonical JSON:
/// `{"envelope":{..},"fact":{"subject":..,"predicate":..,"object":<object_json>,"artifacts":[..]}}`
/// with `object_json` embedded as JSON rather than as an escaped string, so a fact
/// does not grow with escaping on its way to disk. [`decode_stored`] reads it back
/// byte for byte.
pub fn encode_stored(m: &Message) -> Result<Vec<u8>, BoundaryError> {
    encode_parts(&m.envelope, &m.fact, &m.fact.object_json)
}

/// [`encode_stored`] of `envelope` and `f` with `object_json` as the object.
fn encode_parts(
    envelope: &Envelope,
    f: &Fact,
    object_json: &str,
) -> Result<Vec<u8>, BoundaryError> {
    fn put<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<(), BoundaryError> {
        serde_json::to_writer(out, v)
            .map_err(|e| BoundaryError::Internal(format!("encoding a fact: {e}")))
    }
    let mut out = Vec::with_capacity(object_json.len() + 256);
    out.extend_from_slice(b"{\"envelope\":");
    put(&mut out, envelope)?;
    out.extend_from_slice(b",\"fact\":{\"subject\":");
    put(&mut out, &f.subject)?;
    out.extend_from_slice(b",\"predicate\":");
    put(&mut out, &f.predicate)?;
    out.extend_from_slice(b",\"object\":");
    out.extend_from_slice(object_json.as_bytes());
    if !f.artifacts.is_empty() {
        out.extend_from_slice(b",\"artifacts\":");
        put(&mut out, &f.artifacts)?;
    }
    out.extend_from_slice(b"}}");
    Ok(out)
}

#[derive(Deserialize)]
struct StoredMessage {
    envelope: Envelope,
    fact: StoredFact,
}

#[derive(Deserialize)]
struct StoredFact {
    subject: String,
    predicate: String,
    /// The canonical object, embedded (current form). `null` is an object too.
    #[serde(default, deserialize_with = "present")]
    object: Option<Box<serde_json::value::RawValue>>,
    /// The canonical object as an escaped string (the form before `object`).
    #[serde(default)]
    object_json: Option<String>,
    #[serde(default)]
    artifacts: Vec<ArtifactRef>,
}

/// A field that is there, whatever its value (JSON `null` included).
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Box<serde_json::value::RawValue>>, D::Error> {
    Box::<serde_json::value::RawValue>::deserialize(d).map(Some)
}

/// Reads a stored form back (the current one of [`encode_stored`], or the earlier one
/// with `object_json` as a string). The object text comes back exactly as stored.
pub fn decode_stored(bytes: &[u8]) -> Result<Message, serde_json::Error> {
    let s: StoredMessage = serde_json::from_slice(bytes)?;
    let object_json = match (s.fact.object, s.fact.object_json) {
        (Some(raw), _) => String::from(Box::<str>::from(raw)),
        (None, Some(text)) => text,
        (None, None) => return Err(serde::de::Error::missing_field("object")),
    };
    Ok(Message {
        envelope: s.envelope,
        fact: Fact {
            subject: s.fact.subject,
            predicate: s.fact.predicate,
            object_json,
            artifacts: s.fact.artifacts,
        },
    })
}

/// SHA-256 over the RFC 8785 form of `{subject, predicate, object, artifacts}`.
///
/// `object_json` must already be canonical (it is inside [`ValidatedMessage`]).
/// Envelope fields are not part of the identity: a retry may carry a new
/// `produced_at_unix_ms` and still be the same message.
pub fn payload_digest(fact: &Fact) -> PayloadDigest {
    // Domain separation by field name; every string is JSON-escaped by serde, so no
    // two distinct facts share an encoding.
    let artifacts: Vec<serde_json::Value> = fact
        .artifacts
        .iter()
        .map(|a| {
            serde_json::json!({"bucket": a.bucket, "key": a.key, "digest": a.digest, "size": a.size})
        })
        .collect();
    let mut h = Sha256::new();
    h.update(b"bsfg.v1.fact\0");
    h.update(serde_json::Value::String(fact.subject.clone()).to_string());
    h.update(b"\0");
    h.update(serde_json::Value::String(fact.predicate.clone()).to_string());
    h.update(b"\0");
    h.update(fact.object_json.as_bytes());
    h.update(b"\0");
    // serde_json's map is ordered by key, so this rendering is stable.
    h.update(serde_json::Value::Array(artifacts).to_string());
    PayloadDigest(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Message {
        Message {
            envelope: Envelope {
                message_id: "plant-a:batch:B1042:step:3".into(),
                from_zone: "plant-a".into(),
                to_zone: "enterprise".into(),
                produced_at_unix_ms: 1_764_000_000_000,
                ..Default::default()
            },
            fact: Fact {
                subject: "batch:PlantA/B1042".into(),
                predicate: "step_completed".into(),
                object_json: r#"{ "step": 3, "operator": "jdoe" }"#.into(),
                artifacts: vec![],
            },
        }
    }

    fn field_of(m: Message) -> String {
        Limits::default()
            .validate(m)
            .expect_err("must be invalid")
            .field()
            .map(str::to_owned)
            .unwrap_or_default()
    }

    #[test]
    fn valid_message_gets_canonical_object_json() {
        let v = Limits::default().validate(sample()).expect("valid");
        assert_eq!(
            v.message().fact.object_json,
            r#"{"operator":"jdoe","step":3}"#
        );
        assert_eq!(v.subject_kind(), "batch");
    }

    #[test]
    fn digest_ignores_json_whitespace_and_key_order_but_not_values() {
        let a = Limits::default().validate(sample()).expect("valid");
        let mut m = sample();
        m.fact.object_json = r#"{"step":3.0,"operator":"jdoe"}"#.into();
        m.envelope.produced_at_unix_ms += 5;
        let b = Limits::default().validate(m).expect("valid");
        assert_eq!(a.digest(), b.digest());
        let mut m = sample();
        m.fact.object_json = r#"{"step":4,"operator":"jdoe"}"#.into();
        let c = Limits::default().validate(m).expect("valid");
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn the_stored_form_embeds_the_canonical_object_and_reads_back_byte_for_byte() {
        let mut m = sample();
        m.fact.object_json = format!("{{\"q\":\"{}\",\"n\":[1,2.5]}}", "\\\"".repeat(1000));
        let v = Limits::default().validate(m).expect("valid");
        let stored = v.stored_form();
        // Quotes are escaped once (as in the canonical form), not twice.
        assert!(
            stored.len() < v.message().fact.object_json.len() + 300,
            "{}",
            stored.len()
        );
        let back = decode_stored(stored).expect("decodes");
        assert_eq!(&back, v.message());
        // Every JSON value is an object, `null` included.
        for object in ["null", "0", "\"s\"", "[]"] {
            let mut m = sample();
            m.fact.object_json = object.into();
            let v = Limits::default().validate(m).expect("valid");
            assert_eq!(&decode_stored(v.stored_form()).expect(object), v.message());
        }
        // The earlier form (object_json as a string) still reads.
        let legacy = serde_json::to_vec(v.message()).expect("json");
        assert_eq!(&decode_stored(&legacy).expect("legacy"), v.message());
    }

    #[test]
    fn size_is_measured_on_the_stored_form_with_escaping() {
        let limits = Limits {
            max_fact_bytes: 2000,
            ..Limits::default()
        };
        let mut m = sample();
        // 1500 bytes of input, but the message_id's quote characters grow when escaped.
        m.fact.object_json = format!("\"{}\"", "x".repeat(1500));
        m.envelope.message_id = "\"".repeat(250);
        match limits.validate(m) {
            Err(BoundaryError::InvalidArgument { field, rule }) => {
                assert_eq!(field, "fact");
                assert!(rule.contains("as stored"), "{rule}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn digest_covers_artifact_references() {
        let mut m = sample();
        m.envelope.object_media_type = Some("application/pdf".into());
        m.fact.artifacts.push(ArtifactRef {
            bucket: "batch-files".into(),
            key: "B1042/report.pdf".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 10,
        });
        let a = Limits::default().validate(m.clone()).expect("valid");
        m.fact.artifacts[0].size = 11;
        let b = Limits::default().validate(m).expect("valid");
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn each_invalid_field_is_named() {
        type Mutation = Box<dyn Fn(&mut Message)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "envelope.message_id",
                Box::new(|m| m.envelope.message_id.clear()),
            ),
            (
                "envelope.message_id",
                Box::new(|m| m.envelope.message_id = "x".repeat(300)),
            ),
            (
                "envelope.message_id",
                Box::new(|m| m.envelope.message_id = "a b".into()),
            ),
            (
                "envelope.from_zone",
                Box::new(|m| m.envelope.from_zone = "plant.a".into()),
            ),
            (
                "envelope.to_zone",
                Box::new(|m| m.envelope.to_zone = String::new()),
            ),
            (
                "envelope.produced_at_unix_ms",
                Box::new(|m| m.envelope.produced_at_unix_ms = 0),
            ),
            (
                "envelope.correlation_id",
                Box::new(|m| m.envelope.correlation_id = Some(String::new())),
            ),
            (
                "envelope.causation_id",
                Box::new(|m| m.envelope.causation_id = Some("\n".into())),
            ),
            (
                "envelope.labels",
                Box::new(|m| {
                    m.envelope.labels.insert("bad key".into(), "v".into());
                }),
            ),
            (
                "envelope.labels.site",
                Box::new(|m| {
                    m.envelope.labels.insert("site".into(), "\u{7}".into());
                }),
            ),
            (
                "envelope.object_media_type",
                Box::new(|m| m.envelope.object_media_type = Some("pdf".into())),
            ),
            (
                "fact.subject",
                Box::new(|m| m.fact.subject = "Batch:B1".into()),
            ),
            (
                "fact.subject",
                Box::new(|m| m.fact.subject = "batch".into()),
            ),
            (
                "fact.subject",
                Box::new(|m| m.fact.subject = "batch:a/b/c".into()),
            ),
            (
                "fact.subject",
                Box::new(|m| m.fact.subject = "batch:".into()),
            ),
            (
                "fact.predicate",
                Box::new(|m| m.fact.predicate = "StepCompleted".into()),
            ),
            (
                "fact.predicate",
                Box::new(|m| m.fact.predicate = "step__done".into()),
            ),
            (
                "fact.object_json",
                Box::new(|m| m.fact.object_json = "{not json".into()),
            ),
            (
                "fact.object_json",
                Box::new(|m| m.fact.object_json = format!("\"{}\"", "x".repeat(1024 * 1024 + 1))),
            ),
            (
                "fact.artifacts[0].digest",
                Box::new(|m| {
                    m.envelope.object_media_type = Some("application/pdf".into());
                    m.fact.artifacts.push(ArtifactRef {
                        bucket: "b".into(),
                        key: "k".into(),
                        digest: "md5:00".into(),
                        size: 1,
                    });
                }),
            ),
            (
                "envelope.object_media_type",
                Box::new(|m| {
                    m.fact.artifacts.push(ArtifactRef {
                        bucket: "b".into(),
                        key: "k".into(),
                        digest: format!("sha256:{}", "0".repeat(64)),
                        size: 1,
                    });
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut m = sample();
            mutate(&mut m);
            assert_eq!(field_of(m), field, "expected field {field}");
        }
    }

    #[test]
    fn subjects_of_the_contract_are_accepted() {
        for s in [
            "batch:PlantA/B1042",
            "asset:PlantB/FILLER-07",
            "document:QMS/SOP-123.v4",
            "order:4711",
        ] {
            validate_subject("s", s).expect(s);
        }
    }

    #[test]
    fn provenance_that_is_not_made_of_names_is_refused_by_field() {
        let v = Limits::default().validate(sample()).expect("valid");
        let good = Provenance {
            zone: "plant-a".into(),
            stream: "facts_operational".into(),
            offset: 7,
            link: "from-plant".into(),
        };
        assert!(v.clone().with_provenance(good.clone()).is_ok());
        for (field, bad) in [
            (
                "provenance.zone",
                Provenance {
                    zone: "plant\r\nNats-Expected-Stream: x".into(),
                    ..good.clone()
                },
            ),
            (
                "provenance.stream",
                Provenance {
                    stream: String::new(),
                    ..good.clone()
                },
            ),
            (
                "provenance.link",
                Provenance {
                    link: "a b".into(),
                    ..good.clone()
                },
            ),
        ] {
            match v.clone().with_provenance(bad) {
                Err(BoundaryError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
