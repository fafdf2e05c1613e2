//! The one place the gateway names its adapters: every transport and sink a zone
//! file may use. Adding one is adding a line here; the zone file, `bsfg validate`
//! and `bsfg run` find it through [`Registry`] by its scheme or `type`.

use bsfg_core::component::Registry;

/// Where the command-line client goes without `--url`: the plaintext loopback
/// listener of the examples.
pub const DEFAULT_CLIENT_URL: &str = "grpc://127.0.0.1:7443";

/// The transports and sinks of this build.
pub fn builtin() -> Registry {
    Registry::new()
        .with_transport(bsfg_transport_grpc::GrpcTransport)
        .with_transport(bsfg_transport_quic::QuicTransport)
        .with_transport(bsfg_transport_unix::UnixTransport)
        .with_sink(bsfg_sink_jetstream::JetStreamSink)
}
