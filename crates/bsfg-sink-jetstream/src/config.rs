//! Typed configuration of a zone's JetStream sink, with documented defaults.

use std::path::PathBuf;
use std::time::Duration;

use crate::append::PublishMode;

/// One stream class: a JetStream stream `facts_<name>` over subjects `facts.<name>.>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamClass {
    /// Class name, `[a-z0-9_]`; also the value of the class label that selects it.
    pub name: String,
    /// Retention: facts older than this are removed by JetStream.
    pub max_age: Duration,
}

impl StreamClass {
    /// A class with the given retention.
    pub fn new(name: impl Into<String>, max_age: Duration) -> Self {
        StreamClass {
            name: name.into(),
            max_age,
        }
    }

    /// JetStream stream name (`facts_<class>`; stream names cannot contain dots).
    pub fn stream_name(&self) -> String {
        format!("facts_{}", self.name)
    }
}

/// A durable pull consumer declared in config ("governed infrastructure").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// Durable name, stable across restarts, shareable by instances of one reader.
    pub name: String,
    /// Stream class it reads.
    pub class: String,
    /// Subject kinds to read (`batch`, `asset`); empty reads the whole class.
    pub subject_kinds: Vec<String>,
    /// Delivered but unconfirmed facts come again after this long.
    pub ack_wait: Duration,
    /// Upper bound on delivered-but-unconfirmed facts.
    pub max_ack_pending: i64,
}

impl ConsumerConfig {
    /// A consumer of a whole class with default ack wait (30 s) and 10 000 pending.
    pub fn new(name: impl Into<String>, class: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            class: class.into(),
            subject_kinds: Vec::new(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
        }
    }

    /// Sets the ack wait.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }
}

/// How the gateway proves who it is to the zone's nats-server. The secrets stay in
/// their files and are read at each connect (a rotated file counts at the next
/// start); none is kept in the configuration or logged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NatsAuth {
    /// No credentials (a server without authorization).
    #[default]
    None,
    /// A `.creds` file (user JWT and nkey seed), as `nsc` writes it.
    Credentials(PathBuf),
    /// A file holding an nkey seed (`SU...`).
    NkeySeedFile(PathBuf),
    /// A user name and a file holding its password.
    UserPassword {
        /// The user.
        user: String,
        /// The file whose content (trailing whitespace removed) is the password.
        password_file: PathBuf,
    },
}

/// TLS to the zone's nats-server: required whenever set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsTls {
    /// CA certificates (PEM) the server's certificate must chain to; `None` uses the
    /// system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), when the server verifies clients.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Everything the sink needs to run a zone log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// Zone name, for logs.
    pub zone: String,
    /// NATS URL of the zone-local server, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// JetStream domain of the zone, if the server has one.
    pub domain: Option<String>,
    /// nats-server monitoring URL (`http://127.0.0.1:8222`); when set, start-up warns
    /// if the server flushes lazily (no `sync_interval: always`).
    pub monitor_url: Option<String>,
    /// Stream classes. Default: operational (30 d), audit (365 d), documents (90 d).
    pub classes: Vec<StreamClass>,
    /// Label whose value picks the class. Default `class`.
    pub class_label: String,
    /// Class used when the label is absent. Default `operational`.
    pub default_class: String,
    /// JetStream replicas of every stream. Default 1.
    pub replicas: usize,
    /// JetStream's own duplicate window (BSFG's idempotency does not depend on it).
    /// Default 2 minutes.
    pub duplicate_window: Duration,
    /// Retention of the idempotency index; zero keeps entries forever. Default zero.
    pub index_max_age: Duration,
    /// Where the gateway keeps the on-disk look-up of the idempotency index (a redb
    /// file). `None` keeps it in memory, read from the index stream at every start.
    /// Losing the file loses nothing: it is rebuilt from the stream.
    pub index_path: Option<PathBuf>,
    /// Consumers created or verified at start-up.
    pub consumers: Vec<ConsumerConfig>,
    /// Most facts committed in one atomic batch (at most 1000). Default 500.
    pub max_batch: usize,
    /// How writes travel: `None` (default) picks from what start-up learns about the
    /// server: atomic batches when it syncs every write (or cannot tell), pipelined
    /// publishes when it flushes lazily. Correctness does not depend on the choice.
    pub publish_mode: Option<PublishMode>,
    /// Rounds of appends in flight at once. `None` (default): 2 with atomic batches
    /// (one reserving while the other publishes; each stage admits one round, since
    /// every commit has a fixed server-side cost and holds its stream's lock, see
    /// docs/benchmarks.md), 8 pipelined.
    pub max_inflight_batches: Option<usize>,
    /// Appends waiting for a batch before new ones get `backpressure`. Default 20 000.
    pub queue_capacity: usize,
    /// Replicas and storage for object store buckets follow `replicas`; buckets are
    /// created on first put.
    pub object_chunk_size: usize,
    /// The engine's `limits.max_fact_bytes`, when known: connect refuses a server
    /// whose `max_payload` cannot hold a fact of that size with its headers, so that
    /// every fact that passes validation is storable. `None` skips the check (every
    /// append is still measured against `max_payload`).
    pub max_fact_bytes: Option<usize>,
    /// The engine's `limits.max_id_bytes` (headers carry the message_id). Default 256.
    pub max_id_bytes: usize,
    /// Credentials for the zone's nats-server. Default none.
    pub auth: NatsAuth,
    /// TLS to the zone's nats-server (required when set). Default none.
    pub tls: Option<NatsTls>,
    /// How long a link's lease lasts without renewal: when its gateway dies, another
    /// gateway of the zone takes the link over within it. Default 10 s.
    pub lease_ttl: Duration,
}

impl JetStreamConfig {
    /// Defaults for a zone reachable at `url`.
    pub fn new(zone: impl Into<String>, url: impl Into<String>) -> Self {
        const DAY: u64 = 24 * 3600;
        JetStreamConfig {
            zone: zone.into(),
            url: url.into(),
            domain: None,
            monitor_url: None,
            classes: vec![
                StreamClass::new("operational", Duration::from_secs(30 * DAY)),
                StreamClass::new("audit", Duration::from_secs(365 * DAY)),
                StreamClass::new("documents", Duration::from_secs(90 * DAY)),
            ],
            class_label: "class".into(),
            default_class: "operational".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            index_max_age: Duration::ZERO,
            index_path: None,
            consumers: Vec::new(),
            max_batch: 500,
            publish_mode: None,
            max_inflight_batches: None,
            queue_capacity: 20_000,
            object_chunk_size: 128 * 1024,
            max_fact_bytes: None,
            max_id_bytes: 256,
            auth: NatsAuth::None,
            tls: None,
            lease_ttl: crate::lease::LEASE_TTL,
        }
    }
}
