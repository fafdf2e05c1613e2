//! The tonic server: serves any [`BoundaryApi`] as `bsfg.v1.Boundary`, with the
//! standard health service and server reflection beside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::{BoundaryApi, BoundaryError, ByteStream, FetchRequest, Message};
use bsfg_proto::v1::{
    self,
    boundary_server::{Boundary, BoundaryServer},
    put_object_request::Part,
};
use futures::StreamExt;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use crate::status::to_status;

/// Settings of a gRPC listener. Defaults suit a WAN link with long round trips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest message accepted or sent (a fact page, a chunk). Default 16 MiB.
    pub max_message_bytes: usize,
    /// Longest long-poll a FetchFacts may ask for. Default 30 s.
    pub max_fetch_wait: Duration,
    /// HTTP/2 flow-control windows grow with the measured bandwidth-delay product, so
    /// a 200 ms link is not capped at one window per round trip. Default on.
    pub adaptive_window: bool,
    /// Concurrent streams per connection. Default 256.
    pub max_concurrent_streams: u32,
    /// Keep-alive ping interval. Default 20 s.
    pub keepalive_interval: Duration,
    /// How long a request may take before the server gives up on it. Default 60 s.
    pub request_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_message_bytes: 16 * 1024 * 1024,
            max_fetch_wait: Duration::from_secs(30),
            adaptive_window: true,
            max_concurrent_streams: 256,
            keepalive_interval: Duration::from_secs(20),
            request_timeout: Duration::from_secs(60),
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

/// Adapts a [`BoundaryApi`] to the generated tonic service.
pub struct BoundaryService {
    api: Arc<dyn BoundaryApi>,
    config: ServerConfig,
}

impl BoundaryService {
    /// Wraps `api`.
    pub fn new(api: Arc<dyn BoundaryApi>, config: ServerConfig) -> Self {
        BoundaryService { api, config }
    }
}

fn status(e: BoundaryError) -> Status {
    to_status(&e)
}

/// Turns the client's PutObject stream (after the header) into chunks. A stream that
/// ends without the end marker, or whose size disagrees, ends in an error, so that the
/// store refuses the object: a broken upload never stores a truncated artifact.
fn chunks(s: Streaming<v1::PutObjectRequest>) -> ByteStream {
    futures::stream::unfold(Some((s, 0u64)), |state| async move {
        let (mut s, size) = state?;
        let failure = match s.message().await {
            Err(e) => BoundaryError::Unavailable(format!("upload interrupted: {}", e.message())),
            Ok(None) => BoundaryError::invalid(
                "end",
                "the upload ended without its end marker; nothing was stored",
            ),
            Ok(Some(m)) => match m.part {
                Some(Part::Chunk(c)) => {
                    let size = size + c.len() as u64;
                    return Some((Ok(c), Some((s, size))));
                }
                Some(Part::End(end)) if end.size == size => return None,
                Some(Part::End(end)) => BoundaryError::invalid(
                    "end.size",
                    format!("says {} bytes but {size} arrived", end.size),
                ),
                Some(Part::Header(_)) | None => BoundaryError::invalid(
                    "part",
                    "after the header only chunks and one end marker may follow",
                ),
            },
        };
        Some((Err(failure), None))
    })
    .boxed()
}

#[tonic::async_trait]
impl Boundary for BoundaryService {
    async fn append_fact(
        &self,
        request: Request<v1::AppendFactRequest>,
    ) -> Result<Response<v1::AppendFactResponse>, Status> {
        let m = request
            .into_inner()
            .message
            .ok_or_else(|| status(BoundaryError::invalid("message", "is required")))?;
        let message = Message::try_from(m).map_err(status)?;
        let out = self.api.append_fact(message).await.map_err(status)?;
        Ok(Response::new(out.into()))
    }

    async fn fetch_facts(
        &self,
        request: Request<v1::FetchFactsRequest>,
    ) -> Result<Response<v1::FetchFactsResponse>, Status> {
        let r = request.into_inner();
        let wait = Duration::from_millis(u64::from(r.wait_ms)).min(self.config.max_fetch_wait);
        let page = self
            .api
            .fetch_facts(FetchRequest {
                consumer: r.consumer_name,
                limit: r.limit,
                wait,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(page.into()))
    }

    async fn confirm_receipt(
        &self,
        request: Request<v1::ConfirmReceiptRequest>,
    ) -> Result<Response<v1::ConfirmReceiptResponse>, Status> {
        let r = request.into_inner();
        let f = self
            .api
            .confirm_receipt(&r.consumer_name, r.offset)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::ConfirmReceiptResponse {
            frontier: f.offset,
        }))
    }

    async fn put_object(
        &self,
        request: Request<Streaming<v1::PutObjectRequest>>,
    ) -> Result<Response<v1::PutObjectResponse>, Status> {
        let mut s = request.into_inner();
        let header = match s.message().await? {
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
        let info = self
            .api
            .put_object(&header.bucket, &header.key, chunks(s))
            .await
            .map_err(status)?;
        Ok(Response::new(v1::PutObjectResponse {
            bucket: info.bucket,
            key: info.key,
            digest: info.digest,
            size: info.size,
        }))
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

/// Serves `api` on `listener` until `shutdown` resolves, then stops accepting and
/// waits for the requests in flight to finish (graceful).
pub async fn serve(
    api: Arc<dyn BoundaryApi>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<BoundaryServer<BoundaryService>>()
        .await;
    // Both reflection versions: grpcurl, Postman and grpcio still speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(bsfg_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let max = config.max_message_bytes;
    let boundary = BoundaryServer::new(BoundaryService::new(api, config.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    tonic::transport::Server::builder()
        .http2_adaptive_window(Some(config.adaptive_window))
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .timeout(config.request_timeout)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(boundary)
        // Without TCP_NODELAY small replies wait for delayed ACKs: a ~40 ms tail.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}
