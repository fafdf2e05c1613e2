//! The QUIC listener: serves a [`Gate`] over mutual TLS 1.3, one call per
//! bidirectional stream (see [`crate::wire`]), each call made as the connection's
//! authenticated peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::{BoundaryError, Caller, FetchRequest, Gate, Message, ServeStats};
use bsfg_proto::transfer::{BodyError, fit_page, object_body, read_parts};
use bsfg_proto::v1::{self, put_object_request::Part};
use bsfg_tls::ServerTls;
use futures::StreamExt;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

use crate::config::{ServerConfig, TuningError, udp_socket};
use crate::handshake_reason;
use crate::wire::{self, Op, STATUS_ERROR, STATUS_OK, WireError};

/// Application close code: the server is shutting down (graceful).
pub const CLOSE_SHUTDOWN: u32 = 0;
/// Application close code: the peer presented no usable identity.
pub const CLOSE_UNAUTHENTICATED: u32 = 1;
/// Application close code: a reload of the trust anchors left the peer untrusted.
pub const CLOSE_REVOKED: u32 = 2;
/// Application close code: the peer's identity holds as many connections as it may.
pub const CLOSE_TOO_MANY: u32 = 3;

/// Why a QUIC listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The UDP address could not be bound.
    #[error("cannot bind udp {addr}: {source}")]
    Bind {
        /// Address tried.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS configuration cannot carry QUIC.
    #[error("QUIC TLS configuration: {0}")]
    Tls(String),
    /// A transport setting is out of bounds.
    #[error(transparent)]
    Tuning(#[from] TuningError),
}

/// A bound QUIC listener, not yet serving (so a test or the gateway can learn its
/// address first).
pub struct Listener {
    endpoint: quinn::Endpoint,
    config: ServerConfig,
    tls: Arc<ServerTls>,
    transport: Arc<quinn::TransportConfig>,
}

fn server_config(
    tls: &ServerTls,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, ServeError> {
    let crypto =
        QuicServerConfig::try_from(tls.config()).map_err(|e| ServeError::Tls(e.to_string()))?;
    let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(transport.clone());
    // A client whose address changes (NAT rebinding, a new uplink) keeps its
    // connection; quinn validates the new path before using it.
    c.migration(true);
    Ok(c)
}

impl Listener {
    /// Binds UDP `addr` (port 0 picks a free port). `tls` must offer ALPN
    /// [`wire::ALPN`]; it is re-read when its files are reloaded.
    pub fn bind(
        addr: SocketAddr,
        config: ServerConfig,
        tls: Arc<ServerTls>,
    ) -> Result<Listener, ServeError> {
        let transport = config.tuning.transport()?;
        let sc = server_config(&tls, &transport)?;
        let bind = |source| ServeError::Bind { addr, source };
        let socket = udp_socket(addr, config.tuning.socket_buffer).map_err(bind)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config(&tls, addr),
            Some(sc),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind)?;
        Ok(Listener {
            endpoint,
            config,
            tls,
            transport,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, std::io::Error> {
        self.endpoint.local_addr()
    }

    /// Serves `gate` until `shutdown` resolves; then stops taking connections and
    /// calls, lets the calls in flight finish (up to `drain_timeout`), and closes every
    /// connection with [`CLOSE_SHUTDOWN`] so clients reconnect elsewhere or later.
    /// Refused calls are counted in `stats` by peer and reason.
    pub async fn serve(
        self,
        gate: Gate,
        stats: Arc<ServeStats>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let Listener {
            endpoint,
            config,
            tls,
            transport,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every call holds a permit; draining takes them all.
        const CALLS: u32 = 1 << 20;
        let calls = Arc::new(Semaphore::new(CALLS as usize));
        let ctx = Arc::new(Ctx {
            gate,
            config: config.clone(),
            tls: tls.clone(),
            stats,
            calls: calls.clone(),
            stop: stop_rx.clone(),
        });
        // Certificates reloaded from disk apply to new connections.
        let reload = {
            let (endpoint, tls, transport, mut stop) = (
                endpoint.clone(),
                tls.clone(),
                transport.clone(),
                stop_rx.clone(),
            );
            tokio::spawn(async move {
                let mut current = tls.config();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    let now = tls.config();
                    if !Arc::ptr_eq(&now, &current) {
                        match server_config(&tls, &transport) {
                            Ok(sc) => endpoint.set_server_config(Some(sc)),
                            Err(e) => {
                                tracing::error!(error = %e, "reloaded certificates cannot serve QUIC; keeping the previous ones")
                            }
                        }
                        current = now;
                    }
                }
            })
        };
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = &mut shutdown => break,
            };
            let Some(incoming) = incoming else { break };
            tokio::spawn(connection(incoming, ctx.clone()));
        }
        // Graceful: no new connections or calls; the calls in flight finish.
        endpoint.set_server_config(None);
        let _ = stop_tx.send(true);
        reload.abort();
        let drained = tokio::time::timeout(config.drain_timeout, calls.acquire_many(CALLS)).await;
        if drained.is_err() {
            tracing::warn!(
                drain_timeout = ?config.drain_timeout,
                "calls still in flight at the end of the drain; their clients retry"
            );
        }
        endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        Ok(())
    }
}

/// The endpoint's stateless-reset key and connection-ID key are derived from the
/// listener's TLS key, so a listener restarted after a crash recognises the
/// connection IDs of its previous life and answers their packets with a reset their
/// clients accept: they reconnect at once instead of waiting out the idle timeout.
/// (quinn's defaults are random per process: such packets would be dropped.)
fn endpoint_config(tls: &ServerTls, addr: SocketAddr) -> quinn::EndpointConfig {
    let (Some(reset), Some(cid)) = (
        tls.derived_secret(&format!("quic stateless reset {addr}")),
        tls.derived_secret(&format!("quic connection ids {addr}")),
    ) else {
        return quinn::EndpointConfig::default();
    };
    let mut c = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &reset,
    )));
    let cid_key = u64::from_le_bytes([
        cid[0], cid[1], cid[2], cid[3], cid[4], cid[5], cid[6], cid[7],
    ]);
    c.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    c
}

struct Ctx {
    gate: Gate,
    config: ServerConfig,
    tls: Arc<ServerTls>,
    stats: Arc<ServeStats>,
    calls: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
}

/// One connection: handshake under a deadline, identify the peer from its
/// certificate, then serve each stream it opens as one call.
async fn connection(incoming: quinn::Incoming, ctx: Arc<Ctx>) {
    use bsfg_tls::Reloadable as _;
    let remote = incoming.remote_address();
    let endpoint = ctx.tls.endpoint();
    let conn = match tokio::time::timeout(ctx.config.limits.handshake_timeout, incoming).await {
        Ok(Ok(c)) => c,
        failed => {
            let (reason, error) = match failed {
                Ok(Err(e)) => (handshake_reason(&e), e.to_string()),
                _ => ("handshake_timeout", "no handshake in time".to_owned()),
            };
            ctx.tls.stats().handshake_failed(endpoint, reason);
            tracing::warn!(endpoint, %remote, reason, error, "QUIC handshake failed");
            return;
        }
    };
    let certs = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .map(|b| *b);
    let Some(peer) = ctx.tls.identify(certs.as_deref()) else {
        // The handshake requires a client certificate; one without a usable name
        // is not a caller.
        tracing::warn!(endpoint, %remote, "QUIC peer has no usable identity; closed");
        conn.close(
            VarInt::from_u32(CLOSE_UNAUTHENTICATED),
            b"no authenticated peer",
        );
        return;
    };
    // Registered for revocation and counted against the identity's cap.
    let presented = bsfg_tls::Presented {
        chain: certs.unwrap_or_default(),
        server_name: None,
        identity: Some(peer.identity.clone()),
    };
    let closer = {
        let conn = conn.clone();
        Box::new(move || conn.close(VarInt::from_u32(CLOSE_REVOKED), b"peer no longer trusted"))
    };
    let _guard = match ctx.tls.admit(
        presented,
        closer,
        Some(ctx.config.limits.max_connections_per_peer),
    ) {
        Ok(g) => g,
        Err(e) => {
            ctx.tls
                .stats()
                .handshake_failed(endpoint, "too_many_connections");
            tracing::warn!(endpoint, %remote, peer = %peer.identity, reason = "too_many_connections", error = %e, "QUIC connection refused");
            conn.close(VarInt::from_u32(CLOSE_TOO_MANY), b"too many connections");
            return;
        }
    };
    let caller = Caller::Peer {
        identity: peer.identity,
        anchor: peer.anchor,
    };
    let label = caller.label().to_owned();
    let span = tracing::info_span!("quic_connection", peer = %label, %remote);
    async move {
        tracing::debug!("QUIC connection established");
        let mut stop = ctx.stop.clone();
        loop {
            let stream = tokio::select! {
                s = conn.accept_bi() => s,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (send, recv) = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(reason = %e, "QUIC connection ended");
                    return;
                }
            };
            let Ok(permit) = ctx.calls.clone().try_acquire_owned() else {
                break;
            };
            let (ctx, caller) = (ctx.clone(), caller.clone());
            tokio::spawn(
                async move {
                    call(&ctx, &caller, send, recv).await;
                    drop(permit);
                }
                .in_current_span(),
            );
        }
    }
    .instrument(span)
    .await;
}

/// Serves one call and answers it; a refused call is counted and logged.
async fn call(ctx: &Ctx, caller: &Caller, mut send: SendStream, mut recv: RecvStream) {
    let idle = ctx.config.limits.idle_timeout;
    let max = ctx.config.limits.max_message_bytes;
    let op = match tokio::time::timeout(idle, wire::read_byte(&mut recv)).await {
        Ok(Ok(Some(b))) => Op::from_byte(b),
        Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return,
    };
    let name = op.map_or("unknown", Op::as_str);
    // An upload is bounded by idle_timeout between parts and max_object_bytes, not
    // by a total time: 64 MiB over a slow radio link takes what it takes. A download
    // must start answering within request_timeout; its body then streams.
    let limit = (op != Some(Op::Put)).then_some(ctx.config.limits.request_timeout);
    let served = async {
        match op {
            None => Err(BoundaryError::invalid(
                "op",
                "unknown operation byte (1 append, 2 fetch, 3 confirm, 4 put, 5 head, 6 get)",
            )),
            Some(op) => serve_op(ctx, caller, op, recv).await,
        }
    };
    let answer = match limit {
        None => Ok(served.await),
        Some(limit) => tokio::time::timeout(limit, served).await,
    }
    .unwrap_or_else(|_| {
        Err(BoundaryError::Unavailable(format!(
            "the call took longer than request_timeout ({:?})",
            ctx.config.limits.request_timeout
        )))
    });
    let written = match answer {
        Ok(Answer::Message(bytes)) => {
            wire::write_encoded(&mut send, Some(STATUS_OK), &bytes, max).await
        }
        Ok(Answer::Object(read)) => {
            // One frame per part; a read that breaks off resets the stream, so the
            // client never takes a short read for a whole one.
            let chunk = (max / 2).clamp(1024, 256 * 1024);
            let mut parts = std::pin::pin!(read_parts(read, chunk));
            let mut prefix = Some(STATUS_OK);
            while let Some(part) = parts.next().await {
                let sent = match part {
                    Ok(p) => wire::write_frame(&mut send, prefix.take(), &p, max)
                        .await
                        .is_ok(),
                    Err(e) => {
                        tracing::warn!(op = name, error = %e, "object read broke off");
                        false
                    }
                };
                if !sent {
                    let _ = send.reset(quinn::VarInt::from_u32(1));
                    return;
                }
            }
            Ok(())
        }
        Err(e) => {
            let reason = e.reason().as_str();
            ctx.stats.refused(caller.label(), reason);
            tracing::info!(op = name, reason, error = %e, "request refused");
            wire::write_frame(&mut send, Some(STATUS_ERROR), &v1::CallError::from(&e), max).await
        }
    };
    if written.is_ok() {
        let _ = send.finish();
        // Wait for the peer to take the answer (or go away), so that closing the
        // connection on shutdown does not cut an answer short.
        let _ = tokio::time::timeout(idle, send.stopped()).await;
    }
}

/// What a served call answers: one encoded response message, or an object whose
/// parts stream after the status.
enum Answer {
    Message(Vec<u8>),
    Object(bsfg_core::ObjectRead),
}

/// The request frame of a call, within `idle`.
async fn request<M: prost::Message + Default>(
    recv: &mut RecvStream,
    max: usize,
    idle: Duration,
    what: &'static str,
) -> Result<M, BoundaryError> {
    match tokio::time::timeout(idle, wire::read_frame::<M>(recv, max, what)).await {
        Err(_) => Err(BoundaryError::invalid(
            "request",
            format!("incomplete after {idle:?}"),
        )),
        Ok(Err(e)) => Err(e.into_boundary("request")),
        Ok(Ok(None)) => Err(BoundaryError::invalid("request", "is missing")),
        Ok(Ok(Some(m))) => Ok(m),
    }
}

/// Reads the request of `op`, makes the call through the gate and returns the
/// answer.
async fn serve_op(
    ctx: &Ctx,
    caller: &Caller,
    op: Op,
    mut recv: RecvStream,
) -> Result<Answer, BoundaryError> {
    use prost::Message as _;
    let max = ctx.config.limits.max_message_bytes;
    let idle = ctx.config.limits.idle_timeout;
    let gate = &ctx.gate;
    Ok(Answer::Message(match op {
        Op::Append => {
            let r: v1::AppendFactRequest =
                request(&mut recv, max, idle, "AppendFactRequest").await?;
            let m = r
                .message
                .ok_or_else(|| BoundaryError::invalid("message", "is required"))?;
            let out = gate.append_fact(caller, Message::try_from(m)?).await?;
            v1::AppendFactResponse::from(out).encode_to_vec()
        }
        Op::Fetch => {
            let r: v1::FetchFactsRequest =
                request(&mut recv, max, idle, "FetchFactsRequest").await?;
            let wait =
                Duration::from_millis(u64::from(r.wait_ms)).min(ctx.config.limits.max_fetch_wait);
            let page = gate
                .fetch_facts(
                    caller,
                    FetchRequest {
                        consumer: r.consumer_name,
                        limit: r.limit,
                        wait,
                    },
                )
                .await?;
            fit_page(page.into(), max).encode_to_vec()
        }
        Op::Confirm => {
            let r: v1::ConfirmReceiptRequest =
                request(&mut recv, max, idle, "ConfirmReceiptRequest").await?;
            let f = gate
                .confirm_receipt(caller, &r.consumer_name, r.offset)
                .await?;
            v1::ConfirmReceiptResponse { frontier: f.offset }.encode_to_vec()
        }
        Op::Put => {
            let first: v1::PutObjectRequest =
                request(&mut recv, max, idle, "PutObjectRequest").await?;
            let Some(Part::Header(header)) = first.part else {
                return Err(BoundaryError::invalid(
                    "header",
                    "a PutObject stream must start with its header",
                ));
            };
            let body_error: BodyError = Arc::default();
            let parts = parts(recv, max);
            let info = gate
                .put_object(
                    caller,
                    &header.bucket,
                    &header.key,
                    object_body(
                        parts,
                        idle,
                        ctx.config.limits.max_object_bytes,
                        body_error.clone(),
                    ),
                )
                .await
                .map_err(|e| {
                    let cause = body_error.lock().ok().and_then(|mut b| b.take());
                    cause.unwrap_or(e)
                })?;
            v1::PutObjectResponse::from(info).encode_to_vec()
        }
        Op::Head => {
            let r: v1::HeadObjectRequest =
                request(&mut recv, max, idle, "HeadObjectRequest").await?;
            let info = gate.head_object(caller, &r.bucket, &r.key).await?;
            v1::PutObjectResponse::from(info).encode_to_vec()
        }
        Op::Get => {
            let r: v1::GetObjectRequest = request(&mut recv, max, idle, "GetObjectRequest").await?;
            let read = gate.get_object(caller, &r.bucket, &r.key, r.offset).await?;
            return Ok(Answer::Object(read));
        }
    }))
}

/// The PutObject parts still on `recv`, as a stream (ends when the client finishes
/// its side).
fn parts(
    recv: RecvStream,
    max: usize,
) -> futures::stream::BoxStream<'static, Result<v1::PutObjectRequest, BoundaryError>> {
    futures::stream::unfold(Some(recv), move |state| async move {
        let mut r = state?;
        match wire::read_frame::<v1::PutObjectRequest>(&mut r, max, "PutObjectRequest").await {
            Ok(Some(m)) => Some((Ok(m), Some(r))),
            Ok(None) => None,
            Err(WireError::Stream(s)) => Some((
                Err(BoundaryError::Unavailable(format!(
                    "upload interrupted: {s}"
                ))),
                None,
            )),
            Err(e) => Some((Err(e.into_boundary("chunk")), None)),
        }
    })
    .boxed()
}
