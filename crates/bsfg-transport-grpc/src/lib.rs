//! # bsfg-transport-grpc
//!
//! The gRPC transport (tonic): [`server::serve`] exposes any `BoundaryApi` as
//! `bsfg.v1.Boundary` with the standard health service and server reflection, so any
//! gRPC client in any language can discover and call it; [`client::GrpcClient`] is a
//! `BoundaryApi` backed by a remote gateway. Errors travel as gRPC status codes with
//! the stable reason in a `google.rpc.ErrorInfo` detail ([`status`]).
//!
//! URL schemes: `grpcs://host:port` is gRPC over mutual TLS 1.3 (bsfg-tls): the
//! server serves each call as the peer's identity through a `Gate`; `grpc://host:port`
//! is plaintext, for loopback only.

pub mod client;
pub mod component;
pub mod server;
pub mod status;

pub use client::{ClientConfig, GrpcClient, tls_channel};
pub use component::GrpcTransport;
pub use server::{
    Incoming, Io, PeerConn, PeerInfo, ServeError, ServeStats, ServerConfig, bind, serve,
};
