//! # bsfg-transport-quic
//!
//! The QUIC transport (quinn) for lossy links: the four boundary operations with the
//! same `bsfg.v1` protobuf messages as gRPC, one call per bidirectional stream
//! ([`wire`]), over mutual TLS 1.3 with ALPN `bsfg/1` (bsfg-tls). A lost packet
//! delays only the stream it belongs to, and the congestion controller (cubic, bbr,
//! newreno), windows and MTU are chosen in config ([`config::Tuning`]).
//!
//! [`server::Listener`] serves a `Gate`, each call as the connection's authenticated
//! peer; [`client::QuicClient`] is a `BoundaryApi` backed by a remote gateway. Errors
//! carry the same stable reasons as gRPC (a `CallError` frame). 0-RTT is never
//! offered or used: an early-data append could be replayed.

pub mod client;
pub mod component;
pub mod config;
pub mod server;
pub mod wire;

pub use client::QuicClient;
pub use component::QuicTransport;
pub use config::{ClientConfig, Congestion, ServerConfig, Tuning, TuningError};
pub use server::{Listener, ServeError};
pub use wire::ALPN;

/// A stable name for why a QUIC handshake failed (the same names as TLS over TCP:
/// `unknown_ca`, `expired_certificate`, `peer_rejected_our_certificate`, ...).
pub fn handshake_reason(e: &quinn::ConnectionError) -> &'static str {
    use quinn::ConnectionError as E;
    let alert = |code: u64| {
        (0x100..=0x1ff)
            .contains(&code)
            .then(|| u8::try_from(code - 0x100).unwrap_or(0))
    };
    match e {
        E::TransportError(t) => match alert(u64::from(t.code)) {
            Some(a) => bsfg_tls::alert_reason(a, &t.reason, true),
            None => "tls_error",
        },
        E::ConnectionClosed(c) => match alert(u64::from(c.error_code)) {
            Some(a) => bsfg_tls::alert_reason(a, "", false),
            None => "closed_during_handshake",
        },
        E::TimedOut => "handshake_timeout",
        E::ApplicationClosed(_) | E::Reset | E::LocallyClosed | E::CidsExhausted => {
            "closed_during_handshake"
        }
        E::VersionMismatch => "incompatible_peer",
    }
}
