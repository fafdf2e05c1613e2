//! The one error type every port and transport speaks.
//!
//! Each variant maps to a stable, machine-readable [`Reason`] that transports put in
//! their status details, so a client in any language can branch on it.

use std::fmt;

/// Stable machine-readable reason carried with every boundary error.
///
/// The string forms (see [`Reason::as_str`]) are part of the wire contract and never
/// change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A field broke a validation rule; the error names the field and the rule.
    InvalidArgument,
    /// The message_id (or object key) is already stored with a different payload.
    ConflictingDuplicate,
    /// The consumer name is not declared in this zone.
    UnknownConsumer,
    /// The zone is at its high-water mark and refuses new work rather than drop it.
    Backpressure,
    /// The caller is not allowed to do this.
    PermissionDenied,
    /// The zone's store cannot be reached right now; retrying later is safe.
    Unavailable,
    /// The requested object does not exist.
    NotFound,
    /// An invariant broke inside the gateway; retrying is safe, the bug is ours.
    Internal,
    /// The request does not fit the state it acts on (a ConfirmReceipt for offsets
    /// this caller was not delivered); it changed nothing.
    FailedPrecondition,
}

impl Reason {
    /// The stable wire form, e.g. `conflicting_duplicate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidArgument => "invalid_argument",
            Reason::ConflictingDuplicate => "conflicting_duplicate",
            Reason::UnknownConsumer => "unknown_consumer",
            Reason::Backpressure => "backpressure",
            Reason::PermissionDenied => "permission_denied",
            Reason::Unavailable => "unavailable",
            Reason::NotFound => "not_found",
            Reason::Internal => "internal",
            Reason::FailedPrecondition => "failed_precondition",
        }
    }

    /// Parses the wire form back; unknown strings yield `None`.
    pub fn parse(s: &str) -> Option<Reason> {
        Some(match s {
            "invalid_argument" => Reason::InvalidArgument,
            "conflicting_duplicate" => Reason::ConflictingDuplicate,
            "unknown_consumer" => Reason::UnknownConsumer,
            "backpressure" => Reason::Backpressure,
            "permission_denied" => Reason::PermissionDenied,
            "unavailable" => Reason::Unavailable,
            "not_found" => Reason::NotFound,
            "internal" => Reason::Internal,
            "failed_precondition" => Reason::FailedPrecondition,
            _ => return None,
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every failure of a boundary operation.
///
/// Guarantee: an operation that returns an error has stored nothing new (appends) or
/// changed no frontier (confirms), except `Unavailable`, after which the outcome is
/// unknown and the caller retries with the same message_id (idempotent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundaryError {
    /// A field broke a rule. `field` is the dotted path (`envelope.message_id`).
    #[error("invalid_argument: field `{field}`: {rule}")]
    InvalidArgument {
        /// Dotted path of the offending field.
        field: String,
        /// The rule it broke, in words.
        rule: String,
    },
    /// Same message_id, different payload.
    #[error(
        "conflicting_duplicate: message_id `{message_id}` is already stored at {stream}:{offset} with a different payload"
    )]
    ConflictingDuplicate {
        /// The id that clashed.
        message_id: String,
        /// Stream holding the original.
        stream: String,
        /// Offset of the original (0 if it has aged out of retention).
        offset: u64,
    },
    /// An object key already holds different bytes; referenced artifacts are immutable.
    #[error(
        "conflicting_duplicate: object `{bucket}/{key}` already holds {existing_digest}, refusing {offered_digest}"
    )]
    ImmutableObject {
        /// Bucket name.
        bucket: String,
        /// Object key.
        key: String,
        /// Digest of what is stored.
        existing_digest: String,
        /// Digest of what was offered.
        offered_digest: String,
    },
    /// Consumer name not declared.
    #[error("unknown_consumer: `{0}` is not declared in this zone")]
    UnknownConsumer(String),
    /// High-water mark reached.
    #[error("backpressure: {0}")]
    Backpressure(String),
    /// Not allowed.
    #[error("permission_denied: {0}")]
    PermissionDenied(String),
    /// Store unreachable or timed out.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No such object.
    #[error("not_found: {0}")]
    NotFound(String),
    /// A broken invariant inside the gateway.
    #[error("internal: {0}")]
    Internal(String),
    /// The request does not fit the state it acts on; nothing changed.
    #[error("failed_precondition: {0}")]
    FailedPrecondition(String),
}

impl BoundaryError {
    /// Shorthand for [`BoundaryError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        BoundaryError::InvalidArgument {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// The stable reason for this error.
    pub fn reason(&self) -> Reason {
        match self {
            BoundaryError::InvalidArgument { .. } => Reason::InvalidArgument,
            BoundaryError::ConflictingDuplicate { .. } | BoundaryError::ImmutableObject { .. } => {
                Reason::ConflictingDuplicate
            }
            BoundaryError::UnknownConsumer(_) => Reason::UnknownConsumer,
            BoundaryError::Backpressure(_) => Reason::Backpressure,
            BoundaryError::PermissionDenied(_) => Reason::PermissionDenied,
            BoundaryError::Unavailable(_) => Reason::Unavailable,
            BoundaryError::NotFound(_) => Reason::NotFound,
            BoundaryError::Internal(_) => Reason::Internal,
            BoundaryError::FailedPrecondition(_) => Reason::FailedPrecondition,
        }
    }

    /// True when the error is about the fact itself and the same fact would get it
    /// again on every retry (`invalid_argument`, `conflicting_duplicate`): a link
    /// sets such a fact aside in the quarantine instead of retrying its page.
    pub fn refuses_the_fact(&self) -> bool {
        matches!(
            self,
            BoundaryError::InvalidArgument { .. } | BoundaryError::ConflictingDuplicate { .. }
        )
    }

    /// The offending field, for `invalid_argument` errors.
    pub fn field(&self) -> Option<&str> {
        match self {
            BoundaryError::InvalidArgument { field, .. } => Some(field),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_its_wire_form() {
        for r in [
            Reason::InvalidArgument,
            Reason::ConflictingDuplicate,
            Reason::UnknownConsumer,
            Reason::Backpressure,
            Reason::PermissionDenied,
            Reason::Unavailable,
            Reason::NotFound,
            Reason::Internal,
            Reason::FailedPrecondition,
        ] {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reason::parse("nope"), None);
    }

    #[test]
    fn invalid_argument_message_names_field_and_rule() {
        let e = BoundaryError::invalid("fact.subject", "must be kind:id");
        assert_eq!(e.reason(), Reason::InvalidArgument);
        assert_eq!(e.field(), Some("fact.subject"));
        assert_eq!(
            e.to_string(),
            "invalid_argument: field `fact.subject`: must be kind:id"
        );
    }
}
