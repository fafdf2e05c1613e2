//! Settings of QUIC listeners and clients, and the quinn transport built from them.

use std::sync::Arc;

use bsfg_core::component::ServeLimits;
use std::time::Duration;

use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

/// The congestion controller of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438): the common loss-based choice; backs off on every loss, so
    /// random loss on a radio link starves it.
    Cubic,
    /// BBR (quinn's BBRv1): paces to the measured bandwidth and round-trip time and
    /// does not take random loss for congestion. The default: QUIC is BSFG's
    /// transport for lossy links (see docs/benchmarks.md for the measurements).
    #[default]
    Bbr,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
}

impl Congestion {
    /// The config spelling: `cubic`, `bbr`, `newreno`.
    pub fn as_str(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::NewReno => "newreno",
        }
    }

    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<Congestion> {
        Some(match s {
            "cubic" => Congestion::Cubic,
            "bbr" => Congestion::Bbr,
            "newreno" => Congestion::NewReno,
            _ => return None,
        })
    }
}

/// Transport settings shared by both ends of a connection. Defaults suit a link of up
/// to a few hundred milliseconds and some tens of Mbit/s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// Congestion controller. Default `bbr`.
    pub congestion: Congestion,
    /// Bytes one stream may have in flight towards this end (its receive window).
    /// Default 8 MiB.
    pub stream_window: u64,
    /// Bytes all streams together may have in flight towards this end. Default 16 MiB.
    pub connection_window: u64,
    /// Bytes this end keeps unacknowledged in flight. Default 16 MiB.
    pub send_window: u64,
    /// Size of the first packets, before path MTU discovery (at least 1200, the QUIC
    /// minimum). Default 1200.
    pub initial_mtu: u16,
    /// Probe for a larger path MTU (RFC 8899). Default on.
    pub mtu_discovery: bool,
    /// Keep-alive interval: keeps NAT and firewall state open and notices a dead path.
    /// Default 5 s.
    pub keep_alive: Duration,
    /// A connection that hears nothing for this long is closed (and a client makes a
    /// new one on its next call). Default 30 s.
    pub idle_timeout: Duration,
    /// Concurrent calls (bidirectional streams) per connection. Default 256.
    pub max_concurrent_streams: u32,
    /// UDP socket receive and send buffers. A burst that finds the receive buffer
    /// full is dropped by the kernel and must be sent again; the default 4 MiB
    /// absorbs a fast sender while the receiver is busy appending. The kernel caps
    /// it at `net.core.rmem_max` / `wmem_max`.
    pub socket_buffer: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            congestion: Congestion::Bbr,
            stream_window: 8 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            send_window: 16 * 1024 * 1024,
            initial_mtu: 1200,
            mtu_discovery: true,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_concurrent_streams: 256,
            socket_buffer: 4 * 1024 * 1024,
        }
    }
}

/// A UDP socket bound to `addr` with `buffer` bytes of receive and send buffer (as
/// much as the kernel allows).
pub(crate) fn udp_socket(
    addr: std::net::SocketAddr,
    buffer: usize,
) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    // Best effort: a smaller buffer still works, it only drops bursts sooner.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Why a [`Tuning`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("quic.{field}: {rule}")]
pub struct TuningError {
    /// The setting.
    pub field: &'static str,
    /// The rule it broke.
    pub rule: String,
}

impl Tuning {
    /// Checks the settings against quinn's and QUIC's bounds.
    pub fn check(&self) -> Result<(), TuningError> {
        let err = |field, rule: &str| {
            Err(TuningError {
                field,
                rule: rule.to_owned(),
            })
        };
        if self.initial_mtu < 1200 {
            return err("initial_mtu", "must be at least 1200 (the QUIC minimum)");
        }
        for (field, v) in [
            ("stream_window", self.stream_window),
            ("connection_window", self.connection_window),
            ("send_window", self.send_window),
        ] {
            if v < 16 * 1024 || VarInt::from_u64(v).is_err() {
                return err(field, "must be between 16 KiB and 2^62 bytes");
            }
        }
        if self.connection_window < self.stream_window {
            return err("connection_window", "must be at least stream_window");
        }
        if self.idle_timeout < Duration::from_millis(100)
            || IdleTimeout::try_from(self.idle_timeout).is_err()
        {
            return err("idle_timeout", "must be at least 100ms");
        }
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return err(
                "keep_alive",
                "must be above zero and shorter than idle_timeout",
            );
        }
        if self.max_concurrent_streams == 0 {
            return err("max_concurrent_streams", "must be at least 1");
        }
        Ok(())
    }

    /// The quinn transport for these settings. Unreliable datagrams are off: every
    /// byte BSFG sends travels on a reliable stream.
    pub fn transport(&self) -> Result<Arc<TransportConfig>, TuningError> {
        self.check()?;
        let mut t = TransportConfig::default();
        let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
        t.stream_receive_window(varint(self.stream_window))
            .receive_window(varint(self.connection_window))
            .send_window(self.send_window)
            .initial_mtu(self.initial_mtu)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok())
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(None);
        t.mtu_discovery_config(self.mtu_discovery.then(MtuDiscoveryConfig::default));
        match self.congestion {
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
        };
        Ok(Arc::new(t))
    }
}

/// Settings of a QUIC listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Transport settings (its `max_concurrent_streams` bounds calls per connection).
    pub tuning: Tuning,
    /// The serving limits every listener keeps. A PutObject is bounded by
    /// `idle_timeout` between chunks and `max_object_bytes`, not by `request_timeout`.
    pub limits: ServeLimits,
    /// On shutdown, how long calls in flight may take to finish before the
    /// connections are closed. Default 10 s.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tuning: Tuning::default(),
            limits: ServeLimits::default(),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Settings of a QUIC client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Transport settings.
    pub tuning: Tuning,
    /// Largest message sent or accepted. Default 16 MiB.
    pub max_message_bytes: usize,
    /// Largest PutObject chunk sent. Default 1 MiB.
    pub chunk_bytes: usize,
    /// Handshake deadline of a new connection. Default 10 s.
    pub connect_timeout: Duration,
    /// Per-call timeout on top of any long-poll wait. Default 60 s.
    pub request_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            tuning: Tuning::default(),
            max_message_bytes: 16 * 1024 * 1024,
            chunk_bytes: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tuning_builds_a_transport_with_each_controller() {
        for c in [Congestion::Cubic, Congestion::Bbr, Congestion::NewReno] {
            assert_eq!(Congestion::parse(c.as_str()), Some(c));
            let t = Tuning {
                congestion: c,
                ..Tuning::default()
            };
            assert!(t.transport().is_ok());
        }
        assert_eq!(Congestion::parse("vegas"), None);
    }

    #[test]
    fn out_of_bounds_tuning_names_the_setting() {
        let bad = [
            (
                Tuning {
                    initial_mtu: 1000,
                    ..Tuning::default()
                },
                "initial_mtu",
            ),
            (
                Tuning {
                    stream_window: 10,
                    ..Tuning::default()
                },
                "stream_window",
            ),
            (
                Tuning {
                    connection_window: 1024 * 1024,
                    ..Tuning::default()
                },
                "connection_window",
            ),
            (
                Tuning {
                    keep_alive: Duration::from_secs(60),
                    ..Tuning::default()
                },
                "keep_alive",
            ),
        ];
        for (t, field) in bad {
            assert_eq!(t.check().err().map(|e| e.field), Some(field));
        }
    }
}
