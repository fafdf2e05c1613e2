//! A gRPC client that is itself a [`BoundaryApi`], so a replicator or a CLI talks to a
//! remote zone exactly as to a local engine.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bsfg_core::{
    ApiResult, AppendOutcome, BoundaryApi, BoundaryError, ByteStream, FactPage, FetchRequest,
    Frontier, Message, ObjectInfo, ObjectRead,
};
use bsfg_proto::transfer::{object_read, upload_parts};
use bsfg_proto::v1::{self, boundary_client::BoundaryClient};
use bsfg_tls::ClientTls;
use futures::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::status::from_status;

/// Settings of a client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Largest message sent or accepted. Default 16 MiB.
    pub max_message_bytes: usize,
    /// Largest PutObject chunk sent. Default 1 MiB.
    pub chunk_bytes: usize,
    /// Connect timeout. Default 10 s.
    pub connect_timeout: Duration,
    /// Per-call timeout on top of any long-poll wait. Default 60 s.
    pub request_timeout: Duration,
    /// Adaptive HTTP/2 windows (see the server's setting). Default off: the
    /// HTTP/2 layer's budget for small DATA frames follows the connection window,
    /// and adaptive windows start at 64 KiB, so many answers arriving at once on one
    /// connection were taken for an attack ("too_many_data_frames").
    pub adaptive_window: bool,
    /// Receive window of the connection (bytes), when not adaptive. Default 16 MiB.
    pub connection_window: u32,
    /// Receive window of one call (bytes), when not adaptive. Default 4 MiB.
    pub stream_window: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_message_bytes: 16 * 1024 * 1024,
            chunk_bytes: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            adaptive_window: false,
            connection_window: 16 * 1024 * 1024,
            stream_window: 4 * 1024 * 1024,
        }
    }
}

/// A `BoundaryApi` backed by a remote gateway over gRPC. Cheap to clone; clones share
/// one HTTP/2 connection.
#[derive(Clone)]
pub struct GrpcClient {
    inner: BoundaryClient<Channel>,
    config: ClientConfig,
}

/// Converts `grpc://host:port`, `grpcs://host:port` (or `http://`) to the URI tonic
/// dials (TLS, if any, is done by this crate's connector, not by tonic).
pub fn endpoint_uri(url: &str) -> Result<String, BoundaryError> {
    if let Some(rest) = url
        .strip_prefix("grpc://")
        .or_else(|| url.strip_prefix("grpcs://"))
    {
        Ok(format!("http://{rest}"))
    } else if url.starts_with("http://") {
        Ok(url.to_owned())
    } else {
        Err(BoundaryError::invalid(
            "url",
            format!("`{url}` is not a gRPC URL (grpc://host:port or grpcs://host:port)"),
        ))
    }
}

/// `host:port` and the host alone of a gRPC URL.
fn host_port(url: &str) -> Result<(String, String), BoundaryError> {
    bsfg_tls::dial_target(url)
        .ok_or_else(|| BoundaryError::invalid("url", format!("`{url}` has no port (host:port)")))
}

impl GrpcClient {
    /// Prepares a plaintext client for `url` (`grpc://host:port`). The connection is
    /// made on first use and remade after a failure, so a peer that is down now is not
    /// an error here. A `grpcs://` URL is refused: it needs [`GrpcClient::connect_lazy_tls`]
    /// and must never fall back to plaintext.
    pub fn connect_lazy(url: &str, config: ClientConfig) -> Result<Self, BoundaryError> {
        if url.starts_with("grpcs://") {
            return Err(BoundaryError::invalid(
                "url",
                format!("`{url}` is mutual TLS: it needs a client certificate (connect_lazy_tls)"),
            ));
        }
        let channel = endpoint(url, &config)?.tcp_nodelay(true).connect_lazy();
        Ok(Self::over(channel, config))
    }

    fn over(channel: Channel, config: ClientConfig) -> Self {
        let inner = BoundaryClient::new(channel)
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
        GrpcClient { inner, config }
    }

    /// Prepares a mutual-TLS client for `url` (`grpcs://host:port`): see
    /// [`tls_channel`]. Lazy like [`GrpcClient::connect_lazy`].
    pub fn connect_lazy_tls(
        url: &str,
        config: ClientConfig,
        tls: Arc<ClientTls>,
        server_name: Option<String>,
    ) -> Result<Self, BoundaryError> {
        let channel = tls_channel(url, &config, tls, server_name)?;
        Ok(Self::over(channel, config))
    }

    /// Prepares a client whose connections `connect` opens (a Unix socket, ...):
    /// the same HTTP/2 settings, made on first use and remade after a failure.
    pub fn connect_lazy_with<C>(config: ClientConfig, connect: C) -> Result<Self, BoundaryError>
    where
        C: Fn() -> futures::future::BoxFuture<'static, std::io::Result<Box<dyn crate::server::Io>>>
            + Send
            + Sync
            + 'static,
    {
        let connect = Arc::new(connect);
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let connect = connect.clone();
            async move {
                let io = connect().await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
            }
        });
        let channel = endpoint("http://localhost", &config)?.connect_with_connector_lazy(connector);
        Ok(Self::over(channel, config))
    }

    fn request<T>(&self, msg: T, extra: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.config.request_timeout + extra);
        r
    }
}

/// A lazy HTTP/2 channel to `url` over mutual TLS: it presents the certificate of
/// `tls` and accepts only a server whose certificate chains to `tls`'s anchors and
/// names `server_name` (default: the URL's host). Each new connection uses the
/// certificates in use at that moment, so a reload takes effect on reconnect.
pub fn tls_channel(
    url: &str,
    config: &ClientConfig,
    tls: Arc<ClientTls>,
    server_name: Option<String>,
) -> Result<Channel, BoundaryError> {
    let (addr, host) = host_port(url)?;
    let name = server_name.unwrap_or(host);
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let (tls, addr, name) = (tls.clone(), addr.clone(), name.clone());
        async move {
            let s = tls.connect(&addr, &name).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    Ok(endpoint(url, config)?.connect_with_connector_lazy(connector))
}

/// The HTTP/2 settings every connection to a gateway uses, whatever carries it.
fn endpoint(url: &str, config: &ClientConfig) -> Result<Endpoint, BoundaryError> {
    Ok(Endpoint::from_shared(endpoint_uri(url)?)
        .map_err(|e| BoundaryError::invalid("url", e.to_string()))?
        .connect_timeout(config.connect_timeout)
        .http2_adaptive_window(config.adaptive_window)
        .initial_connection_window_size(
            (!config.adaptive_window).then_some(config.connection_window),
        )
        .initial_stream_window_size((!config.adaptive_window).then_some(config.stream_window))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

#[async_trait]
impl BoundaryApi for GrpcClient {
    async fn append_fact(&self, message: Message) -> Result<AppendOutcome, BoundaryError> {
        let req = self.request(
            v1::AppendFactRequest {
                message: Some(message.into()),
            },
            Duration::ZERO,
        );
        let r = self
            .inner
            .clone()
            .append_fact(req)
            .await
            .map_err(|s| from_status(&s))?;
        Ok(r.into_inner().into())
    }

    async fn append_facts(
        &self,
        messages: Vec<Message>,
    ) -> Result<Vec<Result<AppendOutcome, BoundaryError>>, BoundaryError> {
        let n = messages.len();
        let req = self.request(
            v1::AppendFactsRequest {
                messages: messages.into_iter().map(Into::into).collect(),
            },
            Duration::ZERO,
        );
        let r = self
            .inner
            .clone()
            .append_facts(req)
            .await
            .map_err(|s| from_status(&s))?;
        let results: Vec<_> = r
            .into_inner()
            .results
            .into_iter()
            .map(bsfg_proto::append_result_back)
            .collect();
        if results.len() != n {
            return Err(BoundaryError::Internal(format!(
                "AppendFacts answered {} of {n} facts",
                results.len()
            )));
        }
        Ok(results)
    }

    async fn fetch_facts(&self, request: FetchRequest) -> Result<FactPage, BoundaryError> {
        let wait_ms = u32::try_from(request.wait.as_millis()).unwrap_or(u32::MAX);
        let req = self.request(
            v1::FetchFactsRequest {
                consumer_name: request.consumer,
                limit: request.limit,
                wait_ms,
            },
            request.wait,
        );
        let r = self
            .inner
            .clone()
            .fetch_facts(req)
            .await
            .map_err(|s| from_status(&s))?;
        FactPage::try_from(r.into_inner())
    }

    async fn confirm_receipt(&self, consumer: &str, offset: u64) -> ApiResult<Frontier> {
        let req = self.request(
            v1::ConfirmReceiptRequest {
                consumer_name: consumer.to_owned(),
                offset,
            },
            Duration::ZERO,
        );
        let r = self
            .inner
            .clone()
            .confirm_receipt(req)
            .await
            .map_err(|s| from_status(&s))?;
        Ok(Frontier {
            offset: r.into_inner().frontier,
        })
    }

    async fn put_object(&self, bucket: &str, key: &str, body: ByteStream) -> ApiResult<ObjectInfo> {
        let (err_tx, mut err_rx) = tokio::sync::oneshot::channel();
        let parts = upload_parts(bucket, key, body, self.config.chunk_bytes, err_tx);
        let mut req = tonic::Request::new(parts);
        req.set_timeout(Duration::from_secs(24 * 3600));
        let result = self.inner.clone().put_object(req).await;
        if let Ok(e) = err_rx.try_recv() {
            return Err(e);
        }
        let r = result.map_err(|s| from_status(&s))?.into_inner();
        Ok(r.into())
    }

    async fn head_object(&self, bucket: &str, key: &str) -> ApiResult<ObjectInfo> {
        let req = self.request(
            v1::HeadObjectRequest {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            },
            Duration::ZERO,
        );
        let r = self
            .inner
            .clone()
            .head_object(req)
            .await
            .map_err(|s| from_status(&s))?;
        Ok(r.into_inner().into())
    }

    /// The body is bounded by `request_timeout` between parts, not as a whole.
    async fn get_object(&self, bucket: &str, key: &str, offset: u64) -> ApiResult<ObjectRead> {
        let req = self.request(
            v1::GetObjectRequest {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                offset,
            },
            Duration::ZERO,
        );
        let parts = self
            .inner
            .clone()
            .get_object(req)
            .await
            .map_err(|s| from_status(&s))?
            .into_inner()
            .map(|r| r.map_err(|s| from_status(&s)));
        object_read(parts, offset, self.config.request_timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_grpcs_url_never_falls_back_to_plaintext() {
        let e = GrpcClient::connect_lazy("grpcs://127.0.0.1:7443", ClientConfig::default())
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("mutual TLS")),
            "{e:?}"
        );
        assert!(GrpcClient::connect_lazy("grpc://127.0.0.1:7443", ClientConfig::default()).is_ok());
    }
}
