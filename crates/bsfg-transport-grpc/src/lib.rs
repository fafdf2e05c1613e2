//! # bsfg-transport-grpc
//!
//! The gRPC transport (tonic): [`server::serve`] exposes any `BoundaryApi` as
//! `bsfg.v1.Boundary` with the standard health service and server reflection, so any
//! gRPC client in any language can discover and call it; [`client::GrpcClient`] is a
//! `BoundaryApi` backed by a remote gateway. Errors travel as gRPC status codes with
//! the stable reason in a `google.rpc.ErrorInfo` detail ([`status`]).
//!
//! URL scheme: `grpc://host:port` (plaintext; TLS arrives with zone identity).

pub mod client;
pub mod server;
pub mod status;

pub use client::{ClientConfig, GrpcClient};
pub use server::{Incoming, PeerInfo, ServeError, ServerConfig, bind, serve};
