//! gRPC as a registered transport: `grpc://` (plaintext, loopback only) and
//! `grpcs://` (mutual TLS 1.3, ALPN `h2`). A gRPC listener has no keys beyond the
//! serving limits every listener has; a gRPC link none beyond the link's own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::component::{
    ComponentError, Dial, Listen, Scheme, Security, ServeContext, ServeLimits, Serving, Setup,
    TlsMaterial, Transport,
};
use bsfg_core::{BoundaryApi, BoundaryError};
use bsfg_tls::{ClientTls, ServerTls};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::{ClientConfig, GrpcClient, Incoming, ServerConfig};

/// Registers `grpc://` and `grpcs://`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTransport;

const SCHEMES: &[Scheme] = &[
    Scheme {
        name: "grpc",
        security: Security::Plaintext,
        example: "grpc://127.0.0.1:7443",
    },
    Scheme {
        name: "grpcs",
        security: Security::MutualTls {
            alpn: bsfg_tls::ALPN_H2,
        },
        example: "grpcs://0.0.0.0:7443",
    },
];

/// No gRPC-specific keys: anything left is a misspelling or another transport's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

/// The gRPC server settings for a listener's limits.
pub fn server_config(limits: &ServeLimits) -> ServerConfig {
    ServerConfig {
        limits: limits.clone(),
        ..ServerConfig::default()
    }
}

impl Transport for GrpcTransport {
    fn schemes(&self) -> &'static [Scheme] {
        SCHEMES
    }

    fn listener(&self, mut at: Setup<'_, '_>, limits: &ServeLimits) -> Option<Arc<dyn Listen>> {
        let keys = at.read::<NoKeys>();
        let addr = at.socket_addr()?;
        keys?;
        Some(Arc::new(GrpcListen {
            addr,
            tls: matches!(at.scheme.security, Security::MutualTls { .. }),
            scheme: at.scheme.name,
            config: server_config(limits),
        }))
    }

    fn dialer(&self, mut at: Setup<'_, '_>, _request_timeout: Duration) -> Option<Arc<dyn Dial>> {
        let keys = at.read::<NoKeys>();
        (at.host_port() && keys.is_some()).then(|| {
            Arc::new(GrpcDial {
                tls: matches!(at.scheme.security, Security::MutualTls { .. }),
            }) as Arc<dyn Dial>
        })
    }
}

/// A gRPC listener on a TCP port.
#[derive(Debug)]
struct GrpcListen {
    addr: SocketAddr,
    tls: bool,
    scheme: &'static str,
    config: ServerConfig,
}

impl Listen for GrpcListen {
    fn socket(&self) -> String {
        format!("tcp {}", self.addr)
    }

    fn is_local(&self) -> bool {
        self.addr.ip().is_loopback()
    }

    fn start(&self, ctx: ServeContext) -> BoxFuture<'_, Result<Serving, ComponentError>> {
        async move {
            let what = format!("listener {}://{}", self.scheme, self.addr);
            let tls = match self.tls {
                true => Some(TlsMaterial::server::<ServerTls>(ctx.tls.as_ref(), &what)?),
                false => None,
            };
            let (listener, addr) = crate::bind(self.addr)
                .await
                .map_err(|e| ComponentError::new(format!("binding {}", self.addr), e))?;
            let (incoming, summary) = match tls {
                Some(tls) => (Incoming::Tls(listener, tls), "gRPC, mutual TLS 1.3"),
                None => (Incoming::Plain(listener), "gRPC, PLAINTEXT"),
            };
            let config = self.config.clone();
            let serve = async move {
                crate::serve(
                    ctx.gate,
                    config,
                    incoming,
                    ctx.served,
                    ctx.ready,
                    ctx.stopped,
                )
                .await
                .map_err(|e| ComponentError::new("serving gRPC", e))
            }
            .boxed();
            Ok(Serving {
                url: format!("{}://{addr}", self.scheme),
                summary: summary.into(),
                serve,
            })
        }
        .boxed()
    }
}

/// A gRPC client, plaintext or mutual TLS.
#[derive(Debug)]
struct GrpcDial {
    tls: bool,
}

impl Dial for GrpcDial {
    fn dial(
        &self,
        url: &str,
        tls: Option<(TlsMaterial, Option<String>)>,
    ) -> Result<Arc<dyn BoundaryApi>, BoundaryError> {
        if self.tls {
            let (tls, name) = TlsMaterial::client::<ClientTls>(url, tls)?;
            GrpcClient::connect_lazy_tls(url, ClientConfig::default(), tls, name)
                .map(|c| Arc::new(c) as _)
        } else {
            GrpcClient::connect_lazy(url, ClientConfig::default()).map(|c| Arc::new(c) as _)
        }
    }
}
