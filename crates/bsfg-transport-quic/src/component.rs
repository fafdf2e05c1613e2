//! QUIC as a registered transport: `quic://` (always mutual TLS 1.3, ALPN
//! `bsfg/1`). Its keys, on a listener and on a link: `quic = { congestion, windows,
//! mtu, keep_alive, idle_timeout, max_concurrent_streams, socket_buffer }`, checked
//! here ([`Tuning::check`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::component::{
    ComponentError, Dial, Listen, Scheme, Security, ServeContext, ServeLimits, Serving, Setup,
    Spanned, TlsMaterial, Transport,
};
use bsfg_core::{BoundaryApi, BoundaryError};
use bsfg_tls::{ClientTls, ServerTls};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::{ClientConfig, Congestion, Listener, QuicClient, ServerConfig, Tuning};

/// Registers `quic://`.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuicTransport;

const SCHEMES: &[Scheme] = &[Scheme {
    name: "quic",
    security: Security::MutualTls { alpn: crate::ALPN },
    example: "quic://0.0.0.0:7443",
}];

/// The QUIC keys of a listener or link.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    quic: Option<Spanned<RawQuic>>,
}

/// `quic = { ... }`: the transport's tuning.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuic {
    congestion: Option<Spanned<String>>,
    stream_window: Option<Spanned<u64>>,
    connection_window: Option<Spanned<u64>>,
    send_window: Option<Spanned<u64>>,
    initial_mtu: Option<Spanned<u16>>,
    mtu_discovery: Option<Spanned<bool>>,
    keep_alive: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_concurrent_streams: Option<Spanned<u32>>,
    socket_buffer: Option<Spanned<usize>>,
}

/// The `quic = { ... }` tuning of the entry, checked; defaults where absent.
fn tuning(at: &mut Setup<'_, '_>) -> Option<Tuning> {
    let prefix = format!("{}.quic", at.entry_key());
    let raw: RawKeys = at.read()?;
    let c = at.checks();
    let mut t = Tuning::default();
    let Some(spanned) = raw.quic else {
        return Some(t);
    };
    let span = spanned.span();
    let q = spanned.into_inner();
    let key = prefix.as_str();
    if let Some(v) = &q.congestion {
        match Congestion::parse(v.get_ref()) {
            Some(v) => t.congestion = v,
            None => c.at(
                v.span(),
                format!("{key}.congestion"),
                format!(
                    "`{}` is not a congestion controller; known: cubic, bbr, newreno",
                    v.get_ref()
                ),
            ),
        }
    }
    for (v, slot) in [
        (&q.stream_window, &mut t.stream_window),
        (&q.connection_window, &mut t.connection_window),
        (&q.send_window, &mut t.send_window),
    ] {
        if let Some(v) = v {
            *slot = *v.get_ref();
        }
    }
    if let Some(v) = &q.initial_mtu {
        t.initial_mtu = *v.get_ref();
    }
    if let Some(v) = &q.mtu_discovery {
        t.mtu_discovery = *v.get_ref();
    }
    if let Some(v) = &q.max_concurrent_streams {
        t.max_concurrent_streams = *v.get_ref();
    }
    if let Some(v) = &q.socket_buffer {
        t.socket_buffer = *v.get_ref();
    }
    t.keep_alive = c.duration(&q.keep_alive, &format!("{key}.keep_alive"), t.keep_alive);
    t.idle_timeout = c.duration(
        &q.idle_timeout,
        &format!("{key}.idle_timeout"),
        t.idle_timeout,
    );
    if let Err(e) = t.check() {
        let at = match e.field {
            "stream_window" => q.stream_window.as_ref().map(|v| v.span()),
            "connection_window" => q.connection_window.as_ref().map(|v| v.span()),
            "send_window" => q.send_window.as_ref().map(|v| v.span()),
            "initial_mtu" => q.initial_mtu.as_ref().map(|v| v.span()),
            "keep_alive" => q.keep_alive.as_ref().map(|v| v.span()),
            "idle_timeout" => q.idle_timeout.as_ref().map(|v| v.span()),
            "max_concurrent_streams" => q.max_concurrent_streams.as_ref().map(|v| v.span()),
            _ => None,
        };
        c.at(at.unwrap_or(span), format!("{key}.{}", e.field), e.rule);
    }
    Some(t)
}

impl Transport for QuicTransport {
    fn schemes(&self) -> &'static [Scheme] {
        SCHEMES
    }

    fn listener(&self, mut at: Setup<'_, '_>, limits: &ServeLimits) -> Option<Arc<dyn Listen>> {
        let tuning = tuning(&mut at);
        let addr = at.socket_addr()?;
        let config = ServerConfig {
            tuning: tuning?,
            limits: limits.clone(),
            ..ServerConfig::default()
        };
        Some(Arc::new(QuicListen { addr, config }))
    }

    fn dialer(&self, mut at: Setup<'_, '_>, request_timeout: Duration) -> Option<Arc<dyn Dial>> {
        let tuning = tuning(&mut at);
        if !at.host_port() {
            return None;
        }
        Some(Arc::new(QuicDial(ClientConfig {
            tuning: tuning?,
            request_timeout,
            ..ClientConfig::default()
        })))
    }
}

/// A QUIC listener on a UDP port.
#[derive(Debug)]
struct QuicListen {
    addr: SocketAddr,
    config: ServerConfig,
}

impl Listen for QuicListen {
    fn socket(&self) -> String {
        format!("udp {}", self.addr)
    }

    fn is_local(&self) -> bool {
        self.addr.ip().is_loopback()
    }

    fn start(&self, ctx: ServeContext) -> BoxFuture<'_, Result<Serving, ComponentError>> {
        async move {
            let what = format!("listener quic://{}", self.addr);
            let tls = TlsMaterial::server::<ServerTls>(ctx.tls.as_ref(), &what)?;
            let listener = Listener::bind(self.addr, self.config.clone(), tls)
                .map_err(|e| ComponentError::new(&what, e))?;
            let addr = listener
                .local_addr()
                .map_err(|e| ComponentError::new(&what, e))?;
            let serve = async move {
                listener
                    .serve(ctx.gate, ctx.served, ctx.stopped)
                    .await
                    .map_err(|e| ComponentError::new("serving QUIC", e))
            }
            .boxed();
            Ok(Serving {
                url: format!("quic://{addr}"),
                summary: format!(
                    "QUIC, mutual TLS 1.3, congestion {}",
                    self.config.tuning.congestion.as_str()
                ),
                serve,
            })
        }
        .boxed()
    }
}

/// A QUIC client with a link's tuning.
#[derive(Debug)]
struct QuicDial(ClientConfig);

impl Dial for QuicDial {
    fn dial(
        &self,
        url: &str,
        tls: Option<(TlsMaterial, Option<String>)>,
    ) -> Result<Arc<dyn BoundaryApi>, BoundaryError> {
        let (tls, name) = TlsMaterial::client::<ClientTls>(url, tls)?;
        QuicClient::new(url, self.0.clone(), tls, name).map(|c| Arc::new(c) as _)
    }
}
