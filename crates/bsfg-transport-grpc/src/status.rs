//! BoundaryError <-> gRPC status, with the stable reason in `google.rpc.ErrorInfo`.

use std::collections::HashMap;

use bsfg_core::{BoundaryError, Reason};
use bsfg_proto::{ERROR_DOMAIN, error_from_parts, error_metadata};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The gRPC code for each reason.
pub fn code_for(reason: Reason) -> Code {
    match reason {
        Reason::InvalidArgument => Code::InvalidArgument,
        Reason::ConflictingDuplicate => Code::AlreadyExists,
        Reason::UnknownConsumer | Reason::NotFound => Code::NotFound,
        Reason::Backpressure => Code::ResourceExhausted,
        Reason::PermissionDenied => Code::PermissionDenied,
        Reason::Unavailable => Code::Unavailable,
        Reason::Internal => Code::Internal,
        Reason::FailedPrecondition => Code::FailedPrecondition,
    }
}

/// Builds the status a server returns: code by reason, the error's text as message,
/// and `ErrorInfo { reason, domain: "bsfg.v1", metadata }` in the details.
pub fn to_status(e: &BoundaryError) -> Status {
    let reason = e.reason();
    let metadata: HashMap<String, String> = error_metadata(e).into_iter().collect();
    Status::with_error_details(
        code_for(reason),
        e.to_string(),
        ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, metadata),
    )
}

/// Turns a status received by a client back into the error the server raised. A
/// status without BSFG details (a proxy, a transport failure) maps by its code.
pub fn from_status(s: &Status) -> BoundaryError {
    if let Some(info) = s.get_details_error_info()
        && info.domain == ERROR_DOMAIN
        && let Some(reason) = Reason::parse(&info.reason)
    {
        let m: std::collections::BTreeMap<String, String> = info.metadata.into_iter().collect();
        return error_from_parts(reason, s.message(), &m);
    }
    // Connection failures hide their cause (a refused certificate arrives as a TLS
    // alert deep in the chain): name the innermost error.
    let mut msg = format!("{}: {}", s.code(), s.message());
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(s);
    let mut deepest = None;
    while let Some(c) = cause {
        deepest = Some(c.to_string());
        cause = c.source();
    }
    if let Some(d) = deepest.filter(|d| !msg.contains(d.as_str())) {
        msg = format!("{msg} (cause: {d})");
    }
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => BoundaryError::invalid("request", msg),
        Code::PermissionDenied | Code::Unauthenticated => BoundaryError::PermissionDenied(msg),
        Code::ResourceExhausted => BoundaryError::Backpressure(msg),
        Code::NotFound => BoundaryError::NotFound(msg),
        Code::FailedPrecondition => BoundaryError::FailedPrecondition(msg),
        Code::Internal | Code::DataLoss | Code::Unimplemented => BoundaryError::Internal(msg),
        _ => BoundaryError::Unavailable(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_survives_the_trip_through_a_status() {
        let errors = [
            BoundaryError::invalid("envelope.message_id", "must not be empty"),
            BoundaryError::ConflictingDuplicate {
                message_id: "m".into(),
                stream: "facts_audit".into(),
                offset: 7,
            },
            BoundaryError::UnknownConsumer("c".into()),
            BoundaryError::Backpressure("full".into()),
            BoundaryError::PermissionDenied("no".into()),
            BoundaryError::Unavailable("down".into()),
            BoundaryError::NotFound("gone".into()),
            BoundaryError::Internal("bug".into()),
            BoundaryError::FailedPrecondition("not yours".into()),
        ];
        for e in errors {
            let s = to_status(&e);
            assert_eq!(s.code(), code_for(e.reason()));
            let back = from_status(&s);
            assert_eq!(back.reason(), e.reason());
            if matches!(
                e,
                BoundaryError::InvalidArgument { .. }
                    | BoundaryError::ConflictingDuplicate { .. }
                    | BoundaryError::UnknownConsumer(_)
            ) {
                assert_eq!(back, e);
            }
        }
    }

    #[test]
    fn a_bare_status_maps_by_its_code() {
        let e = from_status(&Status::unavailable("connection refused"));
        assert_eq!(e.reason(), Reason::Unavailable);
    }
}
