//! A QUIC client that is itself a [`BoundaryApi`]: one connection reused across
//! calls, made on first use and made again after it is lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bsfg_core::{
    ApiResult, AppendOutcome, BoundaryApi, BoundaryError, ByteStream, FactPage, FetchRequest,
    Frontier, Message, ObjectInfo, ObjectRead,
};
use bsfg_proto::transfer::{object_read, upload_parts};
use bsfg_proto::v1;
use bsfg_tls::ClientTls;
use futures::StreamExt;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, RecvStream, VarInt};

use crate::config::{ClientConfig, udp_socket};
use crate::handshake_reason;
use crate::wire::{self, Op, STATUS_ERROR, STATUS_OK};

/// A `BoundaryApi` backed by a remote gateway over QUIC (`quic://host:port`), with
/// mutual TLS 1.3 (ALPN `bsfg/1`). Cheap to clone; clones share one connection.
///
/// Guarantees: calls never go out unencrypted or to a server whose certificate does
/// not chain to the client's anchors and name the expected server; 0-RTT is never
/// used (an append replayed by an attacker could not be told apart); a lost
/// connection (idle timeout, peer restart, closed by the server) is replaced on the
/// next call, so the caller only ever sees `unavailable` for calls made while the
/// path was down.
#[derive(Clone)]
pub struct QuicClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    url: String,
    target: String,
    server_name: String,
    tls: Arc<ClientTls>,
    config: ClientConfig,
    transport: Arc<quinn::TransportConfig>,
    /// The live connection and its registration with the TLS endpoint (closed when a
    /// reload leaves the server untrusted).
    conn: tokio::sync::Mutex<Option<(Connection, Option<bsfg_tls::LiveGuard>)>>,
    connects: AtomicU64,
}

/// `host:port` and the host alone of a `quic://` URL.
fn host_port(url: &str) -> Result<(String, String), BoundaryError> {
    if !url.starts_with("quic://") {
        return Err(BoundaryError::invalid(
            "url",
            format!("`{url}` is not a QUIC URL (quic://host:port)"),
        ));
    }
    bsfg_tls::dial_target(url)
        .ok_or_else(|| BoundaryError::invalid("url", format!("`{url}` has no port (host:port)")))
}

impl QuicClient {
    /// Prepares a client for `url` (`quic://host:port`) that presents `tls`'s
    /// certificate and accepts only a server that chains to `tls`'s anchors and names
    /// `server_name` (default: the URL's host). `tls` must offer ALPN
    /// [`wire::ALPN`]. Nothing is dialed until the first call, so a peer that is down
    /// now is not an error here. Must be called inside a tokio runtime (it opens the
    /// UDP socket).
    pub fn new(
        url: &str,
        config: ClientConfig,
        tls: Arc<ClientTls>,
        server_name: Option<String>,
    ) -> Result<Self, BoundaryError> {
        let (target, host) = host_port(url)?;
        let transport = config
            .tuning
            .transport()
            .map_err(|e| BoundaryError::invalid(format!("quic.{}", e.field), e.rule))?;
        // Dual-stack where the host has IPv6 (a name may resolve to either family);
        // IPv4 only where it has not.
        let buffer = config.tuning.socket_buffer;
        let endpoint = udp_socket(SocketAddr::from(([0u16; 8], 0)), buffer)
            .or_else(|_| udp_socket(SocketAddr::from(([0u8; 4], 0)), buffer))
            .and_then(|s| {
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    s,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|e| {
                BoundaryError::Unavailable(format!("cannot open a UDP socket for {url}: {e}"))
            })?;
        Ok(QuicClient {
            inner: Arc::new(Inner {
                endpoint,
                url: url.to_owned(),
                target,
                server_name: server_name.unwrap_or(host),
                tls,
                config,
                transport,
                conn: tokio::sync::Mutex::new(None),
                connects: AtomicU64::new(0),
            }),
        })
    }

    /// How many connections this client has established so far (1 while the first
    /// one lives; each reconnection adds one).
    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::Relaxed)
    }

    /// Statistics of the current connection (round-trip time, lost packets, bytes
    /// sent and received over UDP), if there is one.
    pub async fn connection_stats(&self) -> Option<quinn::ConnectionStats> {
        let g = self.inner.conn.lock().await;
        g.as_ref()
            .filter(|(c, _)| c.close_reason().is_none())
            .map(|(c, _)| c.stats())
    }

    /// Moves the client to a new local UDP socket bound to `addr`, as when the host's
    /// address changes: the open connection migrates to the new path (the server
    /// validates it) instead of being rebuilt.
    pub fn rebind(&self, addr: SocketAddr) -> std::io::Result<()> {
        // A dual-stack endpoint stays dual-stack: its connections' peers are IPv6
        // (mapped) addresses, which an IPv4 socket cannot reach.
        let addr = match (self.inner.endpoint.local_addr()?, addr) {
            (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => addr,
        };
        let socket = udp_socket(addr, self.inner.config.tuning.socket_buffer)?;
        self.inner.endpoint.rebind(socket)
    }

    /// Closes the connection gracefully (the server sees an application close, not a
    /// timeout). The next call connects again.
    pub async fn close(&self) {
        if let Some((c, _)) = self.inner.conn.lock().await.take() {
            c.close(VarInt::from_u32(0), b"client closing");
        }
    }

    /// The live connection, or a new one.
    async fn connection(&self) -> Result<Connection, BoundaryError> {
        let inner = &self.inner;
        let mut slot = inner.conn.lock().await;
        if let Some((c, _)) = slot.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            tracing::info!(url = %inner.url, reason = ?c.close_reason(), "QUIC connection lost; reconnecting");
            *slot = None;
        }
        let unavailable =
            |what: String| BoundaryError::Unavailable(format!("QUIC {}: {what}", inner.url));
        let addr = tokio::net::lookup_host(&inner.target)
            .await
            .map_err(|e| unavailable(format!("cannot resolve {}: {e}", inner.target)))?
            .next()
            .ok_or_else(|| unavailable(format!("{} resolves to no address", inner.target)))?;
        let crypto = QuicClientConfig::try_from(inner.tls.config())
            .map_err(|e| BoundaryError::Internal(format!("QUIC TLS configuration: {e}")))?;
        let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
        cc.transport_config(inner.transport.clone());
        let connecting = inner
            .endpoint
            .connect_with(cc, addr, &inner.server_name)
            .map_err(|e| unavailable(format!("cannot connect to {addr}: {e}")))?;
        let conn = match tokio::time::timeout(inner.config.connect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let reason = handshake_reason(&e);
                use bsfg_tls::Reloadable as _;
                inner
                    .tls
                    .stats()
                    .handshake_failed(inner.tls.endpoint(), reason);
                tracing::warn!(url = %inner.url, %addr, reason, error = %e, "QUIC handshake with the server failed");
                return Err(unavailable(format!(
                    "handshake with {addr} failed ({reason}): {e}"
                )));
            }
            Err(_) => {
                return Err(unavailable(format!(
                    "no handshake with {addr} within {:?}",
                    inner.config.connect_timeout
                )));
            }
        };
        inner.connects.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(url = %inner.url, %addr, "QUIC connection established");
        let chain = conn
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .map(|b| *b)
            .unwrap_or_default();
        let guard = rustls_pki_types::ServerName::try_from(inner.server_name.clone())
            .ok()
            .and_then(|name| {
                let closer = {
                    let conn = conn.clone();
                    Box::new(move || {
                        conn.close(
                            VarInt::from_u32(crate::server::CLOSE_REVOKED),
                            b"server no longer trusted",
                        )
                    })
                };
                let presented = bsfg_tls::Presented {
                    chain,
                    server_name: Some(name),
                    identity: None,
                };
                inner.tls.admit(presented, closer, None).ok()
            });
        *slot = Some((conn.clone(), guard));
        Ok(conn)
    }

    /// One call: open a stream, send `op` and its frames, read the answer.
    async fn call<Req, Resp>(
        &self,
        op: Op,
        req: &Req,
        extra: Duration,
    ) -> Result<Resp, BoundaryError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        self.within(extra, async {
            let (conn, mut recv) = self.send_request(op, req).await?;
            self.response(&mut recv)
                .await
                .map_err(|e| self.explain(&conn, e))
        })
        .await
    }

    /// Opens a stream, sends `op` and its request, and reads the answer's status:
    /// the stream the answer follows on, or the call's error.
    async fn send_request<Req: prost::Message>(
        &self,
        op: Op,
        req: &Req,
    ) -> Result<(Connection, RecvStream), BoundaryError> {
        let max = self.inner.config.max_message_bytes;
        let conn = self.connection().await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| self.lost(e))?;
        wire::write_frame(&mut send, Some(op as u8), req, max)
            .await
            .map_err(|e| e.into_boundary("request"))?;
        let _ = send.finish();
        match self.status(&mut recv).await {
            Ok(()) => Ok((conn, recv)),
            Err(e) => Err(self.explain(&conn, e)),
        }
    }

    /// `attempt`, bounded by `request_timeout + extra`.
    async fn within<T>(
        &self,
        extra: Duration,
        attempt: impl std::future::Future<Output = Result<T, BoundaryError>>,
    ) -> Result<T, BoundaryError> {
        let limit = self.inner.config.request_timeout + extra;
        tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(BoundaryError::Unavailable(format!(
                    "QUIC {}: no answer within {limit:?}",
                    self.inner.url
                )))
            })
    }

    /// A call that failed because its connection closed says why it closed: a
    /// server that rejected our certificate does so after the client's side of the
    /// TLS 1.3 handshake completed, so the reason arrives with the first answer.
    fn explain(&self, conn: &Connection, e: BoundaryError) -> BoundaryError {
        let Some(closed) = conn.close_reason() else {
            return e;
        };
        if !matches!(e, BoundaryError::Unavailable(_)) {
            return e;
        }
        let reason = handshake_reason(&closed);
        if reason.starts_with("peer_rejected") || reason == "no_common_alpn" {
            use bsfg_tls::Reloadable as _;
            let tls = &self.inner.tls;
            tls.stats().handshake_failed(tls.endpoint(), reason);
            tracing::warn!(url = %self.inner.url, reason, error = %closed, "the server refused this client's certificate");
        }
        BoundaryError::Unavailable(format!(
            "QUIC {}: connection closed ({reason}): {closed}",
            self.inner.url
        ))
    }

    fn lost(&self, e: quinn::ConnectionError) -> BoundaryError {
        BoundaryError::Unavailable(format!("QUIC {}: connection lost: {e}", self.inner.url))
    }

    /// Reads the status byte and the response (or error) frame.
    async fn answer<Resp: prost::Message + Default>(
        &self,
        recv: &mut RecvStream,
    ) -> Result<Resp, BoundaryError> {
        self.status(recv).await?;
        self.response(recv).await
    }

    /// The response frame that follows an ok status.
    async fn response<Resp: prost::Message + Default>(
        &self,
        recv: &mut RecvStream,
    ) -> Result<Resp, BoundaryError> {
        let url = &self.inner.url;
        wire::read_frame::<Resp>(recv, self.inner.config.max_message_bytes, "response")
            .await
            .map_err(|e| BoundaryError::Unavailable(format!("QUIC {url}: answer: {e}")))?
            .ok_or_else(|| BoundaryError::Unavailable(format!("QUIC {url}: empty answer")))
    }

    /// Reads the status byte: `Ok` when the answer follows, the call's error (its
    /// `CallError` frame) otherwise.
    async fn status(&self, recv: &mut RecvStream) -> Result<(), BoundaryError> {
        let max = self.inner.config.max_message_bytes;
        let url = &self.inner.url;
        let broken =
            |e: wire::WireError| BoundaryError::Unavailable(format!("QUIC {url}: answer: {e}"));
        match wire::read_byte(recv).await.map_err(broken)? {
            Some(STATUS_OK) => Ok(()),
            Some(STATUS_ERROR) => {
                let e = wire::read_frame::<v1::CallError>(recv, max, "CallError")
                    .await
                    .map_err(broken)?
                    .ok_or_else(|| {
                        BoundaryError::Unavailable(format!("QUIC {url}: empty error"))
                    })?;
                Err(BoundaryError::from(e))
            }
            Some(other) => Err(BoundaryError::Internal(format!(
                "QUIC {url}: unknown answer status {other}"
            ))),
            None => Err(BoundaryError::Unavailable(format!(
                "QUIC {url}: the stream closed without an answer"
            ))),
        }
    }
}

#[async_trait]
impl BoundaryApi for QuicClient {
    async fn append_fact(&self, message: Message) -> Result<AppendOutcome, BoundaryError> {
        let req = v1::AppendFactRequest {
            message: Some(message.into()),
        };
        let r: v1::AppendFactResponse = self.call(Op::Append, &req, Duration::ZERO).await?;
        Ok(r.into())
    }

    async fn fetch_facts(&self, request: FetchRequest) -> Result<FactPage, BoundaryError> {
        let wait_ms = u32::try_from(request.wait.as_millis()).unwrap_or(u32::MAX);
        let req = v1::FetchFactsRequest {
            consumer_name: request.consumer,
            limit: request.limit,
            wait_ms,
        };
        let r: v1::FetchFactsResponse = self.call(Op::Fetch, &req, request.wait).await?;
        FactPage::try_from(r)
    }

    async fn confirm_receipt(&self, consumer: &str, offset: u64) -> ApiResult<Frontier> {
        let req = v1::ConfirmReceiptRequest {
            consumer_name: consumer.to_owned(),
            offset,
        };
        let r: v1::ConfirmReceiptResponse = self.call(Op::Confirm, &req, Duration::ZERO).await?;
        Ok(Frontier { offset: r.frontier })
    }

    async fn put_object(&self, bucket: &str, key: &str, body: ByteStream) -> ApiResult<ObjectInfo> {
        let max = self.inner.config.max_message_bytes;
        let (err_tx, mut err_rx) = tokio::sync::oneshot::channel();
        let chunk = self
            .inner
            .config
            .chunk_bytes
            .min(max.saturating_sub(64))
            .max(1);
        let mut parts = upload_parts(bucket, key, body, chunk, err_tx);
        let conn = self.connection().await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| self.lost(e))?;
        let mut prefix = Some(Op::Put as u8);
        while let Some(part) = parts.next().await {
            // A write fails when the server gave up on the upload (a denied bucket,
            // an oversized object): its answer says why.
            if wire::write_frame(&mut send, prefix.take(), &part, max)
                .await
                .is_err()
            {
                break;
            }
        }
        if let Ok(e) = err_rx.try_recv() {
            // The body failed: no end marker was sent, so the server stores nothing.
            let _ = send.reset(VarInt::from_u32(1));
            return Err(e);
        }
        let _ = send.finish();
        let r: v1::PutObjectResponse = self
            .answer(&mut recv)
            .await
            .map_err(|e| self.explain(&conn, e))?;
        Ok(r.into())
    }

    async fn head_object(&self, bucket: &str, key: &str) -> ApiResult<ObjectInfo> {
        let req = v1::HeadObjectRequest {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        };
        let r: v1::PutObjectResponse = self.call(Op::Head, &req, Duration::ZERO).await?;
        Ok(r.into())
    }

    /// The answer must start within `request_timeout`; the body is then bounded by
    /// `request_timeout` between parts, not as a whole.
    async fn get_object(&self, bucket: &str, key: &str, offset: u64) -> ApiResult<ObjectRead> {
        let max = self.inner.config.max_message_bytes;
        let limit = self.inner.config.request_timeout;
        let url = self.inner.url.clone();
        let req = v1::GetObjectRequest {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            offset,
        };
        let (_, recv) = self
            .within(Duration::ZERO, self.send_request(Op::Get, &req))
            .await?;
        let parts = futures::stream::unfold(Some(recv), move |state| {
            let url = url.clone();
            async move {
                let mut r = state?;
                match wire::read_frame::<v1::GetObjectResponse>(&mut r, max, "GetObjectResponse")
                    .await
                {
                    Ok(Some(m)) => Some((Ok(m), Some(r))),
                    Ok(None) => None,
                    Err(e) => Some((
                        Err(BoundaryError::Unavailable(format!(
                            "QUIC {url}: object read: {e}"
                        ))),
                        None,
                    )),
                }
            }
        })
        .boxed();
        object_read(parts, offset, limit).await
    }
}
