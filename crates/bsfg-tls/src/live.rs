//! The connections an endpoint has open, with the certificate chain their peer
//! presented: checked again against the trust anchors after every reload, and closed
//! when their peer is no longer trusted (an anchor removed, a certificate replaced);
//! and counted per peer identity, so one identity cannot hold more than its share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls_pki_types::{CertificateDer, ServerName};

/// Closes one connection (shuts its socket down, closes its QUIC connection).
pub type Closer = Box<dyn Fn() + Send + Sync>;

/// What a connection's peer presented, for checking it again later.
pub struct Presented {
    /// Its certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The name this end dialled (client side), which the server's certificate must
    /// carry.
    pub server_name: Option<ServerName<'static>>,
    /// The peer identity (server side), counted against the per-identity cap.
    pub identity: Option<String>,
}

struct Entry {
    presented: Presented,
    close: Closer,
}

#[derive(Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

/// Why a connection was not admitted.
#[derive(Debug, thiserror::Error)]
#[error("peer `{identity}` already has {open} connection(s) open here (at most {max})")]
pub struct TooManyConnections {
    /// The peer.
    pub identity: String,
    /// How many it has.
    pub open: usize,
    /// The cap.
    pub max: usize,
}

/// Keeps a connection registered while it lives; dropping it forgets the connection
/// (and whatever its closer holds, e.g. a duplicate of its socket).
pub struct LiveGuard {
    registry: Arc<Registry>,
    id: u64,
}

impl std::fmt::Debug for LiveGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveGuard").field("id", &self.id).finish()
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut live) = self.registry.live.lock() {
            live.remove(&self.id);
        }
    }
}

impl Registry {
    /// Registers a connection, unless its identity already holds `max_per_identity`.
    pub(crate) fn admit(
        self: &Arc<Self>,
        presented: Presented,
        close: Closer,
        max_per_identity: Option<usize>,
    ) -> Result<LiveGuard, TooManyConnections> {
        let mut live = match self.live.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if let (Some(max), Some(identity)) = (max_per_identity, &presented.identity) {
            let open = live
                .values()
                .filter(|e| e.presented.identity.as_ref() == Some(identity))
                .count();
            if open >= max {
                return Err(TooManyConnections {
                    identity: identity.clone(),
                    open,
                    max,
                });
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        live.insert(id, Entry { presented, close });
        Ok(LiveGuard {
            registry: self.clone(),
            id,
        })
    }

    /// Closes every connection whose peer `still_trusted` no longer accepts; returns
    /// the identities (or server names) of those closed.
    pub(crate) fn revoke(
        &self,
        still_trusted: impl Fn(&Presented) -> Result<(), rustls::Error>,
    ) -> Vec<(String, rustls::Error)> {
        let live = match self.live.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        let mut closed = Vec::new();
        for e in live.values() {
            if let Err(why) = still_trusted(&e.presented) {
                (e.close)();
                let who = e
                    .presented
                    .identity
                    .clone()
                    .or_else(|| {
                        e.presented
                            .server_name
                            .as_ref()
                            .map(|n| n.to_str().into_owned())
                    })
                    .unwrap_or_default();
                closed.push((who, why));
            }
        }
        closed
    }

    /// Connections open now.
    pub(crate) fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }
}

/// A closer that shuts a TCP socket down in both directions (its reads and writes
/// end at once, so the connection's tasks finish), through a duplicate of its
/// descriptor. `None` when the descriptor cannot be duplicated.
#[cfg(unix)]
pub fn tcp_closer(tcp: &tokio::net::TcpStream) -> Option<Closer> {
    use std::os::fd::AsFd as _;
    let fd = tcp.as_fd().try_clone_to_owned().ok()?;
    let socket = std::net::TcpStream::from(fd);
    Some(Box::new(move || {
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }))
}

/// Without Unix descriptors a TCP connection cannot be closed from outside.
#[cfg(not(unix))]
pub fn tcp_closer(_tcp: &tokio::net::TcpStream) -> Option<Closer> {
    None
}

/// A stream that keeps its connection registered for as long as it lives.
pub struct Tracked<S> {
    inner: S,
    _guard: Option<LiveGuard>,
}

impl<S> Tracked<S> {
    /// Wraps `inner`, keeping `guard` until the stream is dropped.
    pub fn new(inner: S, guard: Option<LiveGuard>) -> Self {
        Tracked {
            inner,
            _guard: guard,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
