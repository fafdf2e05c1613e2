//! # bsfg-sink-jetstream
//!
//! A zone's [`FactLog`] and [`ObjectStore`] on its own JetStream domain:
//! - one log stream (`bsfg_log`) holding the facts of every stream class (shown as
//!   `facts_operational`, ... over subjects `bsfg.log.facts.<class>.<kind>.<bucket>`,
//!   the class picked from a label, its retention a per-fact TTL) and the permanent
//!   idempotency index in bounded bucket subjects, so a round of appends is one
//!   atomic batch: one durable commit, which no crash can turn into a lost or
//!   doubled fact (see [`append`], [`index`]); an on-disk look-up beside the gateway
//!   ([`lookup`], rebuilt from the stream when lost);
//! - durable pull consumers with explicit acks for FetchFacts / ConfirmReceipt;
//! - JetStream Object Store buckets for artifacts.
//!
//! Start-up creates what is missing and reports what conflicts; it never silently
//! changes an existing stream or consumer.

pub mod append;
pub mod baseline;
pub mod component;
pub mod config;
pub mod durability;
pub mod error;
mod fetch;
pub mod index;
pub mod lease;
pub mod lookup;
pub mod migrate;
mod objects;
pub mod quarantine;
pub mod streams;
pub mod usage;

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream;
use async_trait::async_trait;
use bsfg_core::model::ArtifactRef;
use bsfg_core::{
    ApiResult, AppendOutcome, BoundaryError, ByteStream, FactLog, FactPage, FetchRequest, Frontier,
    ObjectInfo, ObjectRead, ObjectStore, QuarantineEntry, ValidatedMessage, names,
};
use tokio::sync::{RwLock, mpsc, oneshot};

pub use append::PublishMode;
pub use component::JetStreamSink;
pub use config::{ConsumerConfig, JetStreamConfig, NatsAuth, NatsTls, StreamClass};
pub use durability::Durability;
pub use error::SinkError;
pub use usage::IndexUsage;

/// A zone log on JetStream. Cheap to share behind an `Arc`.
pub struct JetStreamZone {
    config: JetStreamConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    /// The log stream: facts of every class and the idempotency index.
    log: jetstream::stream::Stream,
    queue: mpsc::Sender<append::Job>,
    links: jetstream::stream::Stream,
    quarantine: jetstream::stream::Stream,
    /// The on-disk look-up, for the number of ids.
    lookup: lookup::Lookup,
    /// This gateway's writer number (see [`lookup::Lookup::writer`]).
    writer: u16,
    /// The zone's link leases.
    leases: Arc<lease::Leases>,
    consumers: RwLock<HashMap<String, Arc<fetch::ConsumerHandle>>>,
    buckets: RwLock<HashMap<String, jetstream::object_store::ObjectStore>>,
    durability: Durability,
    mode: PublishMode,
    /// The server's `max_payload`, read at connect: the largest message it accepts.
    max_payload: usize,
}

/// Refuses a `max_fact_bytes` that a server with this `max_payload` cannot hold with
/// the largest headers a fact carries: every fact that passes validation must be
/// storable.
fn check_fact_size(config: &JetStreamConfig, max_payload: usize) -> Result<(), SinkError> {
    let Some(max_fact) = config.max_fact_bytes else {
        return Ok(());
    };
    let headers = append::max_header_bytes(config.max_id_bytes);
    let needed = max_fact + headers;
    if needed > max_payload {
        return Err(SinkError::Config(format!(
            "limits.max_fact_bytes = {max_fact}: with its headers a fact can take {needed} bytes, but the nats-server at {} accepts at most {max_payload} (max_payload); lower max_fact_bytes to {} or raise max_payload in the server's config",
            config.url,
            max_payload.saturating_sub(headers)
        )));
    }
    Ok(())
}

/// Moves a zone of an earlier layout (the per-id index `bsfg_ids`, the two-stream
/// layout `bsfg_index` + `facts_<class>`) to the one-stream log ([`migrate`]); does
/// nothing when there is none. Every gateway of the zone must be stopped.
pub async fn migrate_index(config: &JetStreamConfig) -> Result<migrate::Migration, SinkError> {
    validate_config(config)?;
    let (client, js, _) = connect_client(config, "migrate", None).await?;
    migrate::migrate(&js, &client, config).await
}

/// Connects to the zone's server only to read its `max_payload` and check that it
/// can hold the largest fact the zone accepts, and that the zone is not of the per-id
/// index layout (as [`JetStreamZone::connect`] does); creates nothing. Returns the
/// server's `max_payload`. For `bsfg validate`.
pub async fn check_server(
    config: &JetStreamConfig,
    timeout: std::time::Duration,
) -> Result<usize, SinkError> {
    let (_, js, max_payload) = connect_client(config, "check", Some(timeout)).await?;
    // A zone of an earlier layout is refused at start-up: say so here too.
    index::refuse_old(&js, &config.zone).await?;
    Ok(max_payload)
}

/// Connects to the zone's server and checks that its `max_payload` holds the largest
/// fact (see [`check_fact_size`]); returns the client, its JetStream context in the
/// zone's domain and that `max_payload`.
async fn connect_client(
    config: &JetStreamConfig,
    role: &str,
    timeout: Option<std::time::Duration>,
) -> Result<(async_nats::Client, jetstream::Context, usize), SinkError> {
    let name = match role {
        "" => format!("bsfg-{}", config.zone),
        r => format!("bsfg-{}-{r}", config.zone),
    };
    let mut options = connect_options(config).await?.name(name);
    if let Some(t) = timeout {
        options = options.connection_timeout(t);
    }
    // A zone on a cluster lists several of its servers (comma-separated): the client
    // connects to any and fails over to the others (and to those the cluster
    // announces).
    let servers = config
        .url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SinkError::Config(format!("url `{}`: {e}", config.url)))?;
    let client = options
        .connect(servers)
        .await
        .map_err(|source| SinkError::Connect {
            url: config.url.clone(),
            source,
        })?;
    let max_payload = client.server_info().max_payload;
    check_fact_size(config, max_payload)?;
    let js = match &config.domain {
        Some(d) => jetstream::with_domain(client.clone(), d),
        None => jetstream::new(client.clone()),
    };
    Ok((client, js, max_payload))
}

/// The connection's credentials and TLS, from [`JetStreamConfig::auth`] and
/// [`JetStreamConfig::tls`]; the secret files are read here, each time.
async fn connect_options(
    config: &JetStreamConfig,
) -> Result<async_nats::ConnectOptions, SinkError> {
    let unreadable = |what: &str, path: &std::path::Path, e: std::io::Error| {
        SinkError::Config(format!("cannot read the {what} {}: {e}", path.display()))
    };
    let mut options = match &config.auth {
        NatsAuth::None => async_nats::ConnectOptions::new(),
        NatsAuth::Credentials(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| unreadable("NATS credentials file", path, e))?,
        NatsAuth::NkeySeedFile(path) => {
            let seed = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| unreadable("nkey seed file", path, e))?;
            async_nats::ConnectOptions::with_nkey(seed.trim().to_owned())
        }
        NatsAuth::UserPassword {
            user,
            password_file,
        } => {
            let password = tokio::fs::read_to_string(password_file)
                .await
                .map_err(|e| unreadable("NATS password file", password_file, e))?;
            async_nats::ConnectOptions::with_user_and_password(
                user.clone(),
                password.trim_end().to_owned(),
            )
        }
    };
    if let Some(tls) = &config.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &tls.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    Ok(options)
}

fn validate_config(cfg: &JetStreamConfig) -> Result<(), SinkError> {
    let bad = |e: BoundaryError| SinkError::Config(e.to_string());
    if cfg.classes.is_empty() {
        return Err(SinkError::Config(
            "at least one stream class is required".into(),
        ));
    }
    for c in &cfg.classes {
        names::validate_class("classes.name", &c.name).map_err(bad)?;
        if !c.max_age.is_zero() && c.max_age < cfg.duplicate_window {
            return Err(SinkError::Config(format!(
                "class `{}` keeps facts for {:?}, less than duplicate_window {:?}; JetStream refuses that",
                c.name, c.max_age, cfg.duplicate_window
            )));
        }
    }
    if !cfg.classes.iter().any(|c| c.name == cfg.default_class) {
        return Err(SinkError::Config(format!(
            "default_class `{}` is not one of the configured classes",
            cfg.default_class
        )));
    }
    if !(1..=1000).contains(&cfg.max_batch) {
        return Err(SinkError::Config(
            "max_batch must be between 1 and 1000".into(),
        ));
    }
    if cfg.queue_capacity == 0 || cfg.max_inflight_batches == Some(0) {
        return Err(SinkError::Config(
            "queue_capacity and max_inflight_batches must be at least 1".into(),
        ));
    }
    if !cfg.index_max_age.is_zero() {
        for c in &cfg.classes {
            if c.max_age.is_zero() || c.max_age > cfg.index_max_age {
                return Err(SinkError::Config(format!(
                    "index_max_age {:?} is shorter than class `{}`'s retention ({}): a fact replayed after its id was forgotten would be stored a second time while the class still holds the first; make index_max_age 0 (permanent) or at least every class's max_age",
                    cfg.index_max_age,
                    c.name,
                    if c.max_age.is_zero() {
                        "forever".to_owned()
                    } else {
                        format!("{:?}", c.max_age)
                    }
                )));
            }
        }
    }
    for c in &cfg.consumers {
        names::validate_consumer("consumers.name", &c.name).map_err(bad)?;
        if !cfg.classes.iter().any(|k| k.name == c.class) {
            return Err(SinkError::Config(format!(
                "consumer `{}` reads class `{}`, which is not configured",
                c.name, c.class
            )));
        }
    }
    Ok(())
}

impl JetStreamZone {
    /// Connects, creates or verifies the streams, index and declared consumers, probes
    /// durability, and starts the append pipeline.
    pub async fn connect(config: JetStreamConfig) -> Result<Self, SinkError> {
        validate_config(&config)?;
        let (client, js, max_payload) = connect_client(&config, "", None).await?;
        index::refuse_old(&js, &config.zone).await?;
        let mut log = streams::ensure(&js, index::stream_config(&config)).await?;
        let created = log
            .info()
            .await
            .map_err(|e| SinkError::js("stream info", e))?
            .created
            .unix_timestamp_nanos() as u64;
        let path = config.index_path.clone();
        let config_horizon = config.index_max_age;
        let lookup = tokio::task::spawn_blocking(move || {
            lookup::Lookup::open(path.as_deref(), created, config_horizon)
        })
        .await
        .map_err(|e| SinkError::Lookup(e.to_string()))??;
        let links = streams::ensure(&js, streams::links_stream_config(&config)).await?;
        let quarantine = streams::ensure(&js, quarantine::stream_config(&config)).await?;

        let (durability, server_memory) = match &config.monitor_url {
            Some(url) => durability::probe(url).await,
            None => (Durability::Unknown, None),
        };
        match durability {
            Durability::Lazy => tracing::warn!(
                zone = %config.zone,
                "nats-server flushes JetStream lazily: acknowledged facts can be lost on power failure; run it with `sync_interval: always`"
            ),
            Durability::Unknown => tracing::info!(
                zone = %config.zone,
                "could not tell whether nats-server syncs every write (set monitor_url to check)"
            ),
            Durability::SyncAlways => {
                tracing::info!(zone = %config.zone, "nats-server syncs every JetStream write")
            }
        }

        let mode = config.publish_mode.unwrap_or(match durability {
            Durability::Lazy => PublishMode::Pipelined,
            Durability::SyncAlways | Durability::Unknown => PublishMode::AtomicBatch,
        });
        let inflight = config.max_inflight_batches.unwrap_or(match mode {
            PublishMode::AtomicBatch => 2,
            PublishMode::Pipelined => 8,
        });
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let appender = append::Appender::open(
            client.clone(),
            js.clone(),
            log.clone(),
            config.max_batch,
            config.zone.clone(),
            lookup.clone(),
            config.index_max_age,
        )
        .await
        .map_err(|e| SinkError::Lookup(e.to_string()))?;
        tracing::info!(zone = %config.zone, ?mode, inflight, "append pipeline ready");
        let appender = Arc::new(appender);
        tokio::spawn(append::run(appender, rx, inflight));

        let writer = lookup
            .writer()
            .map_err(|e| SinkError::Lookup(e.to_string()))?;
        let leases = Arc::new(lease::Leases::open(&js, config.lease_ttl, config.replicas).await?);
        let zone = JetStreamZone {
            log,
            lookup,
            writer,
            leases,
            max_payload,
            mode,
            config,
            client,
            js,
            queue: tx,
            links,
            quarantine,
            consumers: RwLock::new(HashMap::new()),
            buckets: RwLock::new(HashMap::new()),
            durability,
        };
        for c in zone.config.consumers.clone() {
            zone.declare_consumer(&c).await?;
        }
        // Capacity, visible before it bites: what the index holds and where it goes.
        match zone.index_stream_usage(server_memory).await {
            Ok(u) => {
                let (line, warn) = u.projection(now_unix_ms());
                if warn {
                    tracing::warn!(zone = %zone.config.zone, "{line}; a permanent index grows the disk with every id: see docs/configuration.md (index_max_age)");
                } else {
                    tracing::info!(zone = %zone.config.zone, "{line}");
                }
            }
            Err(e) => {
                tracing::warn!(zone = %zone.config.zone, error = %e, "could not read the idempotency index's size")
            }
        }
        Ok(zone)
    }

    /// What start-up learned about the server's flushing.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// How appends travel to JetStream (configured, or picked from the durability probe).
    pub fn publish_mode(&self) -> PublishMode {
        self.mode
    }

    /// `Ok` when the zone's nats-server is connected and its JetStream answers for
    /// the log stream within two seconds.
    pub async fn ready(&self) -> Result<(), BoundaryError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(BoundaryError::Unavailable(format!(
                "not connected to nats-server ({})",
                self.client.connection_state()
            )));
        }
        let name = self.log.cached_info().config.name.clone();
        match tokio::time::timeout(std::time::Duration::from_secs(2), self.js.get_stream(&name))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(BoundaryError::Unavailable(format!(
                "JetStream does not answer for stream {name}: {e}"
            ))),
            Err(_) => Err(BoundaryError::Unavailable(format!(
                "JetStream did not answer for stream {name} within 2s"
            ))),
        }
    }

    /// The idempotency index's size and the server's memory now (see [`usage`]).
    pub async fn index_usage(&self) -> Result<IndexUsage, BoundaryError> {
        let server_memory_bytes = match &self.config.monitor_url {
            Some(url) => durability::server_memory(url).await,
            None => None,
        };
        self.index_stream_usage(server_memory_bytes).await
    }

    /// [`JetStreamZone::index_usage`] with the server's memory already read.
    async fn index_stream_usage(
        &self,
        server_memory_bytes: Option<u64>,
    ) -> Result<IndexUsage, BoundaryError> {
        let mut log = self.log.clone();
        let info = log
            .info()
            .await
            .map_err(|e| error::unavailable("log stream info", e))?;
        let state = &info.state;
        let l = self.lookup.clone();
        let ids = tokio::task::spawn_blocking(move || l.len())
            .await
            .map_err(|e| BoundaryError::Internal(e.to_string()))?
            .map_err(|e| BoundaryError::Unavailable(e.to_string()))?;
        let lookup_bytes = self
            .config
            .index_path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        Ok(IndexUsage {
            ids,
            lookup_bytes,
            disk_bytes: state.bytes,
            first_at_unix_ms: (state.messages > 0)
                .then(|| (state.first_timestamp.unix_timestamp_nanos() / 1_000_000) as i64),
            horizon: self.config.index_max_age,
            server_memory_bytes,
        })
    }

    /// The server's `max_payload` (bytes), read at connect.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// The configuration in force.
    pub fn config(&self) -> &JetStreamConfig {
        &self.config
    }

    /// The NATS client (shared connection), for tools and tests.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The zone's link leases.
    pub fn leases(&self) -> Arc<lease::Leases> {
        self.leases.clone()
    }

    /// This gateway's name as a lease holder: the host and the writer number of its
    /// look-up file, so a restarted gateway (same file) takes its own leases back at
    /// once, and two gateways of a zone never share a name.
    pub fn lease_holder(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "gateway".into());
        format!("{host}/{:04x}", self.writer)
    }

    /// Creates or verifies a durable consumer at run time.
    pub async fn declare_consumer(&self, c: &ConsumerConfig) -> Result<(), SinkError> {
        names::validate_consumer("consumer.name", &c.name)
            .map_err(|e| SinkError::Config(e.to_string()))?;
        let class = self
            .config
            .classes
            .iter()
            .find(|k| k.name == c.class)
            .ok_or_else(|| SinkError::Config(format!("class `{}` is not configured", c.class)))?;
        let handle = fetch::ensure(
            &self.log,
            c,
            class.stream_name(),
            fetch::page_budget(self.config.max_fact_bytes),
        )
        .await?;
        self.consumers
            .write()
            .await
            .insert(c.name.clone(), Arc::new(handle));
        Ok(())
    }

    async fn consumer(&self, name: &str) -> Result<Arc<fetch::ConsumerHandle>, BoundaryError> {
        if let Some(h) = self.consumers.read().await.get(name) {
            return Ok(h.clone());
        }
        Err(BoundaryError::UnknownConsumer(name.to_owned()))
    }

    /// Picks the class for a message from its class label: the job for the pipeline.
    fn route(
        &self,
        message: ValidatedMessage,
        reply: oneshot::Sender<Result<AppendOutcome, BoundaryError>>,
    ) -> Result<append::Job, BoundaryError> {
        let m = message.message();
        let wanted = m
            .envelope
            .labels
            .get(&self.config.class_label)
            .unwrap_or(&self.config.default_class);
        let class = self
            .config
            .classes
            .iter()
            .find(|c| &c.name == wanted)
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .config
                    .classes
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect();
                BoundaryError::invalid(
                    format!("envelope.labels.{}", self.config.class_label),
                    format!("must be one of the zone's stream classes {known:?}"),
                )
            })?;
        let token = index::token(message.message_id());
        let subject = index::fact_subject(&class.name, message.subject_kind(), self.writer, &token);
        Ok(append::Job {
            token,
            stream: class.stream_name(),
            class: class.name.clone(),
            subject,
            ttl: (!class.max_age.is_zero()).then_some(class.max_age),
            msg: message,
            reply,
        })
    }

    /// The bucket if it exists; reads never create one (a created one is cached).
    async fn existing_bucket(
        &self,
        name: &str,
    ) -> Result<Option<jetstream::object_store::ObjectStore>, BoundaryError> {
        if let Some(b) = self.buckets.read().await.get(name) {
            return Ok(Some(b.clone()));
        }
        let found = objects::existing_bucket(&self.js, name).await?;
        if let Some(b) = &found {
            self.buckets
                .write()
                .await
                .insert(name.to_owned(), b.clone());
        }
        Ok(found)
    }

    async fn bucket(
        &self,
        name: &str,
    ) -> Result<jetstream::object_store::ObjectStore, BoundaryError> {
        if let Some(b) = self.buckets.read().await.get(name) {
            return Ok(b.clone());
        }
        let b = objects::bucket(&self.js, name, self.config.replicas).await?;
        self.buckets
            .write()
            .await
            .insert(name.to_owned(), b.clone());
        Ok(b)
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `bsfg.links.<token of the link name>`: one checkpoint per link.
fn links_subject(link: &str) -> String {
    format!("{}.{}", streams::LINKS_PREFIX, append::id_token(link))
}

fn checkpoint_unavailable(link: &str, e: impl std::fmt::Display) -> BoundaryError {
    BoundaryError::Unavailable(format!("checkpoint of link `{link}`: {e}"))
}

#[async_trait]
impl FactLog for JetStreamZone {
    async fn append(&self, message: ValidatedMessage) -> Result<AppendOutcome, BoundaryError> {
        // Refused here, alone, rather than failing the batch it would have joined.
        let size = append::wire_size(&message);
        if size > self.max_payload {
            return Err(BoundaryError::invalid(
                "fact",
                format!(
                    "takes {size} bytes as stored with its headers; zone {}'s nats-server accepts at most {} (max_payload)",
                    self.config.zone, self.max_payload
                ),
            ));
        }
        let (reply, rx) = oneshot::channel();
        let job = self.route(message, reply)?;
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BoundaryError::Backpressure(format!(
                "zone {} has {} appends waiting; retry later",
                self.config.zone, self.config.queue_capacity
            )),
            mpsc::error::TrySendError::Closed(_) => {
                BoundaryError::Unavailable("append pipeline stopped".into())
            }
        })?;
        rx.await
            .map_err(|_| BoundaryError::Unavailable("append pipeline dropped the request".into()))?
    }

    async fn fetch(
        &self,
        request: &FetchRequest,
        receiver: &str,
    ) -> Result<FactPage, BoundaryError> {
        self.consumer(&request.consumer)
            .await?
            .fetch(&self.config.zone, request, receiver)
            .await
    }

    async fn confirm(
        &self,
        consumer: &str,
        offset: u64,
        receiver: &str,
    ) -> Result<Frontier, BoundaryError> {
        self.consumer(consumer)
            .await?
            .confirm(&self.client, consumer, offset, receiver)
            .await
    }

    async fn link_checkpoint(&self, link: &str) -> Result<Option<u64>, BoundaryError> {
        match self
            .links
            .direct_get_last_for_subject(links_subject(link))
            .await
        {
            Ok(m) => std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| {
                    BoundaryError::Internal(format!("corrupt checkpoint of link `{link}`"))
                }),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(checkpoint_unavailable(link, e)),
        }
    }

    async fn record_link_checkpoint(&self, link: &str, offset: u64) -> Result<(), BoundaryError> {
        // Compare-and-set on the subject's last sequence: the checkpoint only moves
        // forward, whichever gateway of the zone records it (several may, around a
        // lease's hand-over).
        for _ in 0..8 {
            let (seq, current) = match self
                .links
                .direct_get_last_for_subject(links_subject(link))
                .await
            {
                Ok(m) => (
                    m.sequence,
                    std::str::from_utf8(&m.payload)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok()),
                ),
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => (0, None),
                Err(e) => return Err(checkpoint_unavailable(link, e)),
            };
            if current.is_some_and(|c| c >= offset) {
                return Ok(());
            }
            let publish = jetstream::message::PublishMessage::build()
                .payload(offset.to_string().into())
                .expected_last_subject_sequence(seq);
            let ack = self
                .js
                .send_publish(links_subject(link), publish)
                .await
                .map_err(|e| checkpoint_unavailable(link, e))?;
            match ack.await {
                Ok(_) => return Ok(()),
                // Another gateway recorded in between: read it again.
                Err(e) if append::lost_compare_and_set(&e) => continue,
                Err(e) => return Err(checkpoint_unavailable(link, e)),
            }
        }
        Err(BoundaryError::Unavailable(format!(
            "checkpoint of link `{link}`: recorded concurrently too often; retried"
        )))
    }

    async fn quarantine(&self, entry: &QuarantineEntry) -> Result<bool, BoundaryError> {
        quarantine::put(&self.js, entry, self.max_payload).await
    }

    async fn quarantined(&self, limit: usize) -> Result<Vec<QuarantineEntry>, BoundaryError> {
        quarantine::list(&self.quarantine, limit).await
    }

    async fn quarantined_entries(
        &self,
        message_id: &str,
    ) -> Result<Vec<QuarantineEntry>, BoundaryError> {
        quarantine::of(&self.quarantine, message_id).await
    }

    async fn unquarantine(&self, entry: &QuarantineEntry) -> Result<bool, BoundaryError> {
        quarantine::remove(&self.quarantine, entry).await
    }
}

#[async_trait]
impl ObjectStore for JetStreamZone {
    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: ByteStream,
    ) -> Result<ObjectInfo, BoundaryError> {
        let store = self.bucket(bucket).await?;
        let chunk = self.config.object_chunk_size;
        objects::put(&self.js, &store, bucket, key, chunk, body).await
    }

    async fn head(&self, bucket: &str, key: &str) -> ApiResult<Option<ObjectInfo>> {
        match self.existing_bucket(bucket).await? {
            Some(store) => objects::head(&store, bucket, key).await,
            None => Ok(None),
        }
    }

    async fn get(&self, bucket: &str, key: &str, offset: u64) -> ApiResult<ObjectRead> {
        match self.existing_bucket(bucket).await? {
            Some(store) => objects::get(&store, bucket, key, offset).await,
            None => Err(BoundaryError::NotFound(format!("object `{bucket}/{key}`"))),
        }
    }

    async fn staged(&self, artifact: &ArtifactRef) -> ApiResult<u64> {
        if self.existing_bucket(&artifact.bucket).await?.is_none() {
            return Ok(0);
        }
        objects::staged(&self.js, artifact, self.config.object_chunk_size).await
    }

    async fn stage(
        &self,
        artifact: &ArtifactRef,
        from: u64,
        body: ByteStream,
    ) -> ApiResult<ObjectInfo> {
        self.bucket(&artifact.bucket).await?;
        let chunk = self.config.object_chunk_size;
        objects::stage(&self.js, artifact, chunk, from, body).await
    }

    async fn discard_staged(&self, artifact: &ArtifactRef) -> ApiResult<()> {
        match self.existing_bucket(&artifact.bucket).await? {
            Some(store) => {
                let chunk = self.config.object_chunk_size;
                objects::discard_staged(&self.js, &store, artifact, chunk).await
            }
            None => Ok(()),
        }
    }
}
