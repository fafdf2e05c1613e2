//! # bsfg-core
//!
//! The heart of BSFG, the Bidirectional Store-and-Forward Gateway: the message model
//! and its validation ([`model`]), the one error type with stable reasons
//! ([`error`]), the ports that adapters implement ([`ports`]) and the Boundary engine
//! that serves the four operations over them ([`engine`]), and receiver-driven
//! replication ([`link`]: the link's state machine and its drivers), and the
//! framework a zone is composed from ([`component`]: Transport and Sink traits and
//! their registry).
//!
//! Architecture invariant: this crate performs no I/O and depends on no adapter.

pub mod authz;
pub mod component;
pub mod engine;
pub mod error;
pub mod json;
pub mod link;
pub mod model;
pub mod names;
pub mod observe;
pub mod policy;
pub mod ports;

pub use authz::{Authorization, Caller, Gate, Grant, ServeStats};
pub use engine::{Boundary, LOCAL_RECEIVER, QuarantineAction, Settled};
pub use error::{BoundaryError, Reason};
pub use model::{
    ArtifactRef, Envelope, Fact, Limits, Message, PayloadDigest, Provenance, Refused,
    ValidatedMessage,
};
pub use policy::{
    Candidate, Denial, Hook, Policy, PolicyChain, PolicyContext, QuarantineEntry, Verdict,
};
pub use ports::{
    ApiResult, AppendOutcome, BoundaryApi, ByteStream, FactLog, FactPage, FetchRequest,
    FetchedFact, Frontier, MAX_APPEND_FACTS, ObjectInfo, ObjectRead, ObjectStore,
};
