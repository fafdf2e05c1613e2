//! The tonic server: serves any [`BoundaryApi`](bsfg_core::BoundaryApi) as `bsfg.v1.Boundary`, with the
//! standard health service and server reflection beside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::component::{Readiness, ServeLimits};
use bsfg_core::{BoundaryError, Caller, FetchRequest, Gate, Message};
use bsfg_proto::transfer::{fit_page, object_body, read_parts};
use bsfg_proto::v1::{
    self,
    boundary_server::{Boundary, BoundaryServer},
    put_object_request::Part,
};
use bsfg_tls::ServerTls;
use futures::StreamExt;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use crate::status::to_status;

/// Settings of a gRPC listener. Defaults suit a WAN link with long round trips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The serving limits every listener keeps (message size, long-poll, request and
    /// idle timeouts, handshake deadline, object size, concurrent streams).
    pub limits: ServeLimits,
    /// HTTP/2 flow-control windows grow with the measured bandwidth-delay product.
    /// Default off: adaptive windows start at the protocol's 64 KiB, and the HTTP/2
    /// layer's budget for small DATA frames follows the connection window, so a
    /// client opening many calls at once on one connection was disconnected
    /// ("too_many_data_frames"). The fixed windows below carry a 200 ms link at
    /// 20 MiB/s per call.
    pub adaptive_window: bool,
    /// Receive window of a connection (bytes), when not adaptive. Default 16 MiB.
    pub connection_window: u32,
    /// Receive window of one call (bytes), when not adaptive. Default 4 MiB.
    pub stream_window: u32,
    /// Keep-alive ping interval. Default 20 s.
    pub keepalive_interval: Duration,
    /// TLS handshakes in progress at once; more connections wait. Default 256.
    pub max_handshakes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: ServeLimits::default(),
            adaptive_window: false,
            connection_window: 16 * 1024 * 1024,
            stream_window: 4 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(20),
            max_handshakes: 256,
        }
    }
}

/// Why a listener could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding or serving failed.
    #[error("gRPC listener: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be built from the descriptor set.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// Address tried.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where a listener's connections come from.
pub enum Incoming {
    /// Plaintext TCP: every caller is [`Caller::Local`]. The gateway allows this only
    /// on loopback with `insecure = true`.
    Plain(TcpListener),
    /// Mutual TLS: only peers with a certificate from a trust anchor get through, and
    /// each call carries the peer's identity.
    Tls(TcpListener, Arc<ServerTls>),
    /// Connections whose peer another transport established (a Unix socket's
    /// credentials): each call carries that peer, none is local.
    Peers(futures::stream::BoxStream<'static, std::io::Result<PeerConn>>),
}

/// Any byte stream a connection can run over.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection with the peer its transport authenticated.
pub struct PeerConn {
    /// The bytes.
    pub io: Box<dyn Io>,
    /// Who is at the other end.
    pub info: PeerInfo,
}

/// The authenticated peer of a TLS connection, as tonic hands it to each request.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Who the peer is.
    pub caller: Caller,
    /// Its address (`10.0.0.5:51234`, a socket path, a process id).
    pub remote: String,
}

/// A connection with its authenticated peer, as tonic serves it.
struct Conn<S> {
    inner: S,
    info: PeerInfo,
    /// Keeps a TLS connection registered with its endpoint (revocation, the
    /// per-peer cap) while tonic serves it.
    _guard: Option<bsfg_tls::LiveGuard>,
}

impl<S> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Conn<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Conn<S> {
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

/// Adapts a [`Gate`] to the generated tonic service: each call is made as the
/// connection's [`Caller`].
pub struct BoundaryService {
    gate: Gate,
    config: ServerConfig,
    plaintext: bool,
}

impl BoundaryService {
    /// Serves `gate`; `plaintext` says the listener has no TLS (callers are local).
    pub fn new(gate: Gate, config: ServerConfig, plaintext: bool) -> Self {
        BoundaryService {
            gate,
            config,
            plaintext,
        }
    }

    /// The caller of `request`: the TLS peer, or local on a plaintext listener. A
    /// request on a TLS listener without an authenticated peer is refused (never
    /// treated as local).
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        match request.extensions().get::<PeerInfo>() {
            Some(p) => Ok(p.caller.clone()),
            None if self.plaintext => Ok(Caller::Local),
            None => Err(Status::unauthenticated(
                "no authenticated peer on this connection",
            )),
        }
    }
}

fn status(e: BoundaryError) -> Status {
    to_status(&e)
}

impl BoundaryService {
    /// Bounds a unary call by `request_timeout` (an upload is bounded by its idle
    /// timeout between parts, a download's body by the client's reading).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, BoundaryError>>,
    ) -> Result<T, Status> {
        let limit = self.config.limits.request_timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r.map_err(status),
            Err(_) => Err(status(BoundaryError::Unavailable(format!(
                "the call took longer than request_timeout ({limit:?})"
            )))),
        }
    }
}

/// The client's PutObject parts after the header, with a broken stream as
/// `unavailable` (see [`object_body`]).
fn parts(
    s: Streaming<v1::PutObjectRequest>,
) -> impl futures::Stream<Item = Result<v1::PutObjectRequest, BoundaryError>> + Send + Unpin + 'static
{
    s.map(|r| {
        r.map_err(|e| BoundaryError::Unavailable(format!("upload interrupted: {}", e.message())))
    })
}

#[tonic::async_trait]
impl Boundary for BoundaryService {
    async fn append_fact(
        &self,
        request: Request<v1::AppendFactRequest>,
    ) -> Result<Response<v1::AppendFactResponse>, Status> {
        let caller = self.caller(&request)?;
        let m = request
            .into_inner()
            .message
            .ok_or_else(|| status(BoundaryError::invalid("message", "is required")))?;
        let message = Message::try_from(m).map_err(status)?;
        let out = self
            .bounded(self.gate.append_fact(&caller, message))
            .await?;
        Ok(Response::new(out.into()))
    }

    async fn append_facts(
        &self,
        request: Request<v1::AppendFactsRequest>,
    ) -> Result<Response<v1::AppendFactsResponse>, Status> {
        let caller = self.caller(&request)?;
        let messages = request.into_inner().messages;
        if messages.len() > bsfg_core::MAX_APPEND_FACTS {
            return Err(status(BoundaryError::invalid(
                "messages",
                format!(
                    "at most {} per call, got {}",
                    bsfg_core::MAX_APPEND_FACTS,
                    messages.len()
                ),
            )));
        }
        // A message that does not convert is that fact's answer; the rest go on.
        let mut results: Vec<Option<Result<bsfg_core::AppendOutcome, BoundaryError>>> =
            Vec::with_capacity(messages.len());
        let mut at = Vec::with_capacity(messages.len());
        let mut good = Vec::with_capacity(messages.len());
        for (i, m) in messages.into_iter().enumerate() {
            match Message::try_from(m) {
                Ok(m) => {
                    at.push(i);
                    good.push(m);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let answers = self.bounded(self.gate.append_facts(&caller, good)).await?;
        for (i, a) in at.into_iter().zip(answers) {
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(a);
            }
        }
        Ok(Response::new(v1::AppendFactsResponse {
            results: results
                .into_iter()
                .map(|r| {
                    bsfg_proto::append_result(r.unwrap_or_else(|| {
                        Err(BoundaryError::Internal("no answer for this fact".into()))
                    }))
                })
                .collect(),
        }))
    }

    async fn fetch_facts(
        &self,
        request: Request<v1::FetchFactsRequest>,
    ) -> Result<Response<v1::FetchFactsResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let wait =
            Duration::from_millis(u64::from(r.wait_ms)).min(self.config.limits.max_fetch_wait);
        let request = FetchRequest {
            consumer: r.consumer_name,
            limit: r.limit,
            wait,
        };
        let page = self
            .bounded(self.gate.fetch_facts(&caller, request))
            .await?;
        Ok(Response::new(fit_page(
            page.into(),
            self.config.limits.max_message_bytes,
        )))
    }

    async fn confirm_receipt(
        &self,
        request: Request<v1::ConfirmReceiptRequest>,
    ) -> Result<Response<v1::ConfirmReceiptResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let f = self
            .bounded(
                self.gate
                    .confirm_receipt(&caller, &r.consumer_name, r.offset),
            )
            .await?;
        Ok(Response::new(v1::ConfirmReceiptResponse {
            frontier: f.offset,
        }))
    }

    async fn put_object(
        &self,
        request: Request<Streaming<v1::PutObjectRequest>>,
    ) -> Result<Response<v1::PutObjectResponse>, Status> {
        let caller = self.caller(&request)?;
        let mut s = request.into_inner();
        let idle = self.config.limits.idle_timeout;
        let first = tokio::time::timeout(idle, s.message()).await.map_err(|_| {
            status(BoundaryError::invalid(
                "header",
                format!("no header within {idle:?}; the upload was cut off"),
            ))
        })?;
        let header = match first? {
            Some(v1::PutObjectRequest {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                return Err(status(BoundaryError::invalid(
                    "header",
                    "a PutObject stream must start with its header",
                )));
            }
        };
        let body_error = Arc::new(std::sync::Mutex::new(None));
        let info = self
            .gate
            .put_object(
                &caller,
                &header.bucket,
                &header.key,
                object_body(
                    parts(s),
                    idle,
                    self.config.limits.max_object_bytes,
                    body_error.clone(),
                ),
            )
            .await
            .map_err(|e| {
                let cause = body_error.lock().ok().and_then(|mut b| b.take());
                status(cause.unwrap_or(e))
            })?;
        Ok(Response::new(info.into()))
    }

    async fn head_object(
        &self,
        request: Request<v1::HeadObjectRequest>,
    ) -> Result<Response<v1::PutObjectResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let info = self
            .bounded(self.gate.head_object(&caller, &r.bucket, &r.key))
            .await?;
        Ok(Response::new(info.into()))
    }

    type GetObjectStream =
        futures::stream::BoxStream<'static, Result<v1::GetObjectResponse, Status>>;

    async fn get_object(
        &self,
        request: Request<v1::GetObjectRequest>,
    ) -> Result<Response<Self::GetObjectStream>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let read = self
            .bounded(self.gate.get_object(&caller, &r.bucket, &r.key, r.offset))
            .await?;
        // Chunks well inside the message limit, whatever the store's chunk size.
        let chunk = (self.config.limits.max_message_bytes / 2).clamp(1024, 256 * 1024);
        Ok(Response::new(
            read_parts(read, chunk).map(|p| p.map_err(status)).boxed(),
        ))
    }
}

pub use bsfg_core::authz::ServeStats;

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// Counts and logs every refused request with its peer. It sees what the handlers
/// never see: bodies that are not protobuf, messages over the size limit.
#[derive(Clone)]
struct Observe<S> {
    inner: S,
    stats: Arc<ServeStats>,
}

impl<S, ReqB, ResB> tower::Service<tonic::codegen::http::Request<ReqB>> for Observe<S>
where
    S: tower::Service<
            tonic::codegen::http::Request<ReqB>,
            Response = tonic::codegen::http::Response<ResB>,
        >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<ReqB>) -> Self::Future {
        let info = req.extensions().get::<PeerInfo>();
        let peer = info.map_or_else(|| "local".to_owned(), |p| p.caller.label().to_owned());
        let stats = self.stats.clone();
        // Everything logged while serving the call carries the peer's identity (the
        // span records its fields now, so nothing is copied for it).
        let span = tracing::info_span!(
            "request",
            %peer,
            remote = ?info.map(|p| p.remote.as_str()),
            path = %req.uri().path()
        );
        let fut = self.inner.call(req);
        Box::pin(tracing::Instrument::instrument(
            async move {
                let resp = fut.await?;
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .map(|v| tonic::Code::from_bytes(v.as_bytes()));
                if let Some(code) = code.filter(|c| *c != tonic::Code::Ok) {
                    let name = code_name(code);
                    stats.refused(&peer, name);
                    let message = resp
                        .headers()
                        .get("grpc-message")
                        .and_then(|m| m.to_str().ok())
                        .unwrap_or("");
                    tracing::info!(code = name, detail = message, "request refused");
                }
                Ok(resp)
            },
            span,
        ))
    }
}

#[derive(Clone)]
struct ObserveLayer(Arc<ServeStats>);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            stats: self.0.clone(),
        }
    }
}

/// Sets the server's (`""`) and the Boundary service's health.
async fn set_health(health: &tonic_health::server::HealthReporter, ready: bool) {
    let status = match ready {
        true => tonic_health::ServingStatus::Serving,
        false => tonic_health::ServingStatus::NotServing,
    };
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <BoundaryServer<BoundaryService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Stops a background task when the serving future ends or is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `addr` (port 0 picks a free port) and returns the listener and its address.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    Ok((l, local))
}

/// Serves `gate` on `incoming` until `shutdown` resolves, then stops accepting and
/// waits for the requests in flight to finish (graceful). Every refused request is
/// counted in `stats` and logged with its peer.
///
/// The standard health service (`grpc.health.v1.Health`) answers `SERVING` for the
/// whole server (`""`) and for `bsfg.v1.Boundary` while `ready` says so, and
/// `NOT_SERVING` otherwise (the zone's store does not answer, or it is stopping);
/// `Watch` streams every change.
pub async fn serve(
    gate: Gate,
    config: ServerConfig,
    incoming: Incoming,
    stats: Arc<ServeStats>,
    ready: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ready.is_ready()).await;
    let mirror = tokio::spawn({
        let mut ready = ready;
        async move {
            while let Some(now) = ready.changed().await {
                set_health(&health, now).await;
            }
        }
    });
    let _mirror = AbortOnDrop(mirror);
    // Both reflection versions: grpcurl, Postman and grpcio still speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(bsfg_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let max = config.limits.max_message_bytes;
    let plaintext = matches!(incoming, Incoming::Plain(_));
    let boundary = BoundaryServer::new(BoundaryService::new(gate, config.clone(), plaintext))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let router = tonic::transport::Server::builder()
        .http2_adaptive_window(Some(config.adaptive_window))
        .initial_connection_window_size(
            (!config.adaptive_window).then_some(config.connection_window),
        )
        .initial_stream_window_size((!config.adaptive_window).then_some(config.stream_window))
        .max_concurrent_streams(Some(config.limits.max_concurrent_streams))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(ObserveLayer(stats))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(boundary);
    match incoming {
        // Without TCP_NODELAY small replies wait for delayed ACKs: a ~40 ms tail.
        Incoming::Plain(listener) => {
            router
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown,
                )
                .await?
        }
        Incoming::Tls(listener, tls) => {
            let accepted = bsfg_tls::accept(
                listener,
                tls,
                config.limits.handshake_timeout,
                config.max_handshakes,
                config.limits.max_connections_per_peer,
            );
            let conns = tokio_stream::wrappers::ReceiverStream::new(accepted).map(|a| {
                Ok::<_, std::io::Error>(Conn {
                    inner: a.stream,
                    _guard: a.guard,
                    info: PeerInfo {
                        caller: Caller::Peer {
                            identity: a.peer.identity,
                            anchor: a.peer.anchor,
                        },
                        remote: a.remote.to_string(),
                    },
                })
            });
            router.serve_with_incoming_shutdown(conns, shutdown).await?
        }
        Incoming::Peers(conns) => {
            let conns = conns.map(|c| {
                c.map(|c| Conn {
                    inner: c.io,
                    info: c.info,
                    _guard: None,
                })
            });
            router.serve_with_incoming_shutdown(conns, shutdown).await?
        }
    }
    Ok(())
}
