//! The framework: a zone is composed of components registered by name.
//!
//! - A [`Transport`] registers its URL [`Scheme`]s (with what each promises about
//!   who the caller is: [`Security`]), reads and checks its own keys of a
//!   `[[listeners]]` or `[[links]]` table, and returns a [`Listen`] (serve a
//!   [`Gate`]) or a [`Dial`] (a [`BoundaryApi`] to a remote gateway).
//! - A [`Sink`] registers its `type`, reads and checks its `[sink]` table and the
//!   zone's `[[consumers]]`, and opens the zone's store ([`ZoneStore`]: the
//!   [`FactLog`] and [`ObjectStore`] ports).
//! - A [`Registry`] holds them. The gateway composes a zone from its TOML file
//!   through the registry only: no scheme or type is named anywhere else, and an
//!   unknown one is a configuration problem listing the registered ones.
//!
//! Settings are read from [`Table`]s that keep every value's position in the file,
//! so each component reports its problems as `file:line:column: key: rule` without
//! knowing the file ([`Checks`]).
//!
//! Architecture invariant: this module names no adapter; adapters implement these
//! traits and the binary registers them.

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;
pub use toml::Spanned;
pub use toml::de::{DeTable, DeValue};

use crate::authz::{Gate, ServeStats};
use crate::error::BoundaryError;
use crate::model::Limits;
use crate::ports::{BoundaryApi, FactLog, ObjectStore};

/// One problem in a zone file: where, under which key, and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Byte range in the file.
    pub span: Range<usize>,
    /// Dotted key (`listeners[0].quic.congestion`).
    pub key: String,
    /// What is wrong and what is expected.
    pub rule: String,
}

/// Collects the problems of a zone file; components add theirs.
#[derive(Debug, Default)]
pub struct Checks {
    /// Every problem found so far, in the order found.
    pub problems: Vec<Problem>,
}

impl Checks {
    /// Records a problem at `span` under `key`.
    pub fn at(&mut self, span: Range<usize>, key: impl Into<String>, rule: impl Into<String>) {
        self.problems.push(Problem {
            span,
            key: key.into(),
            rule: rule.into(),
        });
    }

    /// A duration written like `"30s"`, `"5m"`, `"30d"`; `default` when absent, and
    /// when it does not read (the problem is recorded).
    pub fn duration(
        &mut self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                self.at(
                    v.span(),
                    key,
                    format!(
                        "`{}` is not a duration ({e}); write e.g. \"30s\", \"5m\", \"30d\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// A name checked by one of [`crate::names`]' rules (`validate_zone`, ...): the
    /// rule it breaks is recorded at its position.
    pub fn name(
        &mut self,
        v: &Spanned<String>,
        key: &str,
        check: fn(&str, &str) -> Result<(), BoundaryError>,
    ) {
        if let Err(e) = check(key, v.get_ref()) {
            let rule = match e {
                BoundaryError::InvalidArgument { rule, .. } => rule,
                other => other.to_string(),
            };
            self.at(v.span(), key, rule);
        }
    }

    /// A number that must be at least `min`: its value, or `default` when absent.
    pub fn at_least<T: Copy + PartialOrd + fmt::Display>(
        &mut self,
        v: &Option<Spanned<T>>,
        key: &str,
        min: T,
        default: T,
    ) -> T {
        let Some(v) = v else { return default };
        if *v.get_ref() < min {
            self.at(v.span(), key, format!("must be at least {min}"));
        }
        *v.get_ref()
    }
}

/// A table of the zone file handed to one component: its dotted key, where it is,
/// and its entries with their positions.
#[derive(Debug)]
pub struct Table<'i> {
    key: String,
    span: Range<usize>,
    entries: DeTable<'i>,
}

impl<'i> Table<'i> {
    /// The table `entries` found at `span` under `key` (`listeners[0]`).
    pub fn new(key: impl Into<String>, span: Range<usize>, entries: DeTable<'i>) -> Self {
        Table {
            key: key.into(),
            span,
            entries,
        }
    }

    /// An empty table (a component configured with its defaults, e.g. a CLI dial).
    pub fn empty(key: impl Into<String>) -> Self {
        Table::new(key, 0..0, DeTable::new())
    }

    /// Its dotted key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Where it is in the file.
    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// Moves the entries named in `keys` into a table of their own under the same
    /// key; the others stay.
    pub fn split_off(&mut self, keys: &[&str]) -> Table<'i> {
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|(k, _)| keys.contains(&k.get_ref().as_ref()));
        self.entries = kept.into_iter().collect();
        Table::new(
            self.key.clone(),
            self.span.clone(),
            taken.into_iter().collect(),
        )
    }

    /// Reads the table as `T` (a component's raw settings, `deny_unknown_fields`
    /// so a misspelt key is a problem, not a silent default). A value that does not
    /// read is recorded at its position, under this table's key.
    pub fn read<T: Deserialize<'i>>(self, checks: &mut Checks) -> Option<T> {
        let value = Spanned::new(self.span.clone(), DeValue::Table(self.entries));
        match T::deserialize(toml::de::ValueDeserializer::from(value)) {
            Ok(t) => Some(t),
            Err(e) => {
                let message = e.message().trim().to_owned();
                // A key this component does not have: name it in the key.
                let key = match message
                    .strip_prefix("unknown field `")
                    .and_then(|m| m.split_once('`'))
                {
                    Some((field, _)) => format!("{}.{field}", self.key),
                    None => self.key,
                };
                checks.at(e.span().unwrap_or(self.span), key, message);
                None
            }
        }
    }
}

/// What a scheme promises about who the caller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// No authentication: only with `insecure = true`, a listener only on a local
    /// address, and its callers are [`crate::Caller::Local`] with full access.
    Plaintext,
    /// Mutual TLS 1.3 with the zone's `[tls]` identity; callers are the certificate's
    /// identity and issuing anchor. The ALPN protocol names the transport, so a
    /// client of one never completes a handshake with another.
    MutualTls {
        /// ALPN protocol id.
        alpn: &'static [u8],
    },
    /// The operating system vouches for the peer (a Unix socket's credentials);
    /// callers are `identity@anchor` with this anchor name, granted like any peer.
    LocalCredentials {
        /// The anchor name grants use for these callers (`ca = "..."`).
        anchor: &'static str,
    },
}

/// A URL scheme a transport serves and dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    /// `grpc`, `grpcs`, `quic`, `unix`, ...
    pub name: &'static str,
    /// Who the caller is on it.
    pub security: Security,
    /// An example listener URL, for messages.
    pub example: &'static str,
}

/// What a transport is given to set up a listener or a client: the URL, split
/// (where it is written, what follows `scheme://`), the transport's own keys of the
/// entry, and where its problems go.
pub struct Setup<'a, 'i> {
    /// The scheme.
    pub scheme: &'a Scheme,
    /// What follows `scheme://`.
    pub address: &'a str,
    span: Range<usize>,
    key: &'a str,
    table: Table<'i>,
    checks: &'a mut Checks,
}

impl<'a, 'i> Setup<'a, 'i> {
    /// A URL of `scheme` (`address` after `scheme://`), written at `span` under
    /// `key`; `table` holds the transport's keys of the entry.
    pub fn new(
        scheme: &'a Scheme,
        address: &'a str,
        (key, span): (&'a str, Range<usize>),
        table: Table<'i>,
        checks: &'a mut Checks,
    ) -> Self {
        Setup {
            scheme,
            address,
            span,
            key,
            table,
            checks,
        }
    }

    /// Reads the transport's keys as `T` (see [`Table::read`]); once.
    pub fn read<T: Deserialize<'i>>(&mut self) -> Option<T> {
        let empty = Table::empty(self.table.key().to_owned());
        std::mem::replace(&mut self.table, empty).read(self.checks)
    }

    /// The dotted key of the entry (`listeners[0]`).
    pub fn entry_key(&self) -> &str {
        self.table.key()
    }

    /// Records a problem with the URL.
    pub fn url_problem(&mut self, rule: impl Into<String>) {
        self.checks.at(self.span.clone(), self.key, rule);
    }

    /// Where the transport records its other problems.
    pub fn checks(&mut self) -> &mut Checks {
        self.checks
    }

    /// The address as an IP address and port (a listener's), or the problem.
    pub fn socket_addr(&mut self) -> Option<std::net::SocketAddr> {
        let rest = self.address.trim_end_matches('/');
        let parsed = rest.parse().ok();
        if parsed.is_none() {
            self.url_problem(format!(
                "`{rest}` is not an IP address and port (e.g. 127.0.0.1:7443)"
            ));
        }
        parsed
    }

    /// True when the address is a host (a name or an IP) and a port (a source's);
    /// otherwise the problem is recorded.
    pub fn host_port(&mut self) -> bool {
        let rest = self.address.trim_end_matches('/');
        let ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            self.url_problem(format!(
                "`{rest}` is not a host and port (e.g. 10.0.0.5:7453 or idmz.example:7453)"
            ));
        }
        ok
    }
}

/// The serving limits every listener keeps, whatever its transport: the
/// `[[listeners]]` keys the gateway reads before handing the rest to the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeLimits {
    /// Largest message accepted or sent (a fact page, a chunk). Default 16 MiB.
    pub max_message_bytes: usize,
    /// Longest long-poll a FetchFacts may ask for. Default 30 s.
    pub max_fetch_wait: Duration,
    /// How long a call may take before the server gives up on it. Default 60 s.
    pub request_timeout: Duration,
    /// Longest pause inside a request (between PutObject chunks). Default 30 s.
    pub idle_timeout: Duration,
    /// Deadline for a new connection's handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Largest artifact one PutObject may carry. Default 4 GiB.
    pub max_object_bytes: u64,
    /// Concurrent calls per connection. Default 256.
    pub max_concurrent_streams: u32,
    /// Connections one peer identity may hold open at once on this listener (more are
    /// refused at the handshake): with `max_concurrent_streams` and the transport's
    /// flow-control windows, what one peer can make the gateway buffer. Default 8.
    pub max_connections_per_peer: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_message_bytes: 16 * 1024 * 1024,
            max_fetch_wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_object_bytes: 4 * 1024 * 1024 * 1024,
            max_concurrent_streams: 256,
            max_connections_per_peer: 8,
        }
    }
}

/// TLS material the gateway made for one endpoint (the zone's identity, its trust
/// anchors, the scheme's ALPN), handed to the transport that uses it. The transport
/// takes it as the type its TLS library made; any other type is refused, so an
/// endpoint never falls back to plaintext.
#[derive(Clone)]
pub struct TlsMaterial(Arc<dyn Any + Send + Sync>);

impl TlsMaterial {
    /// Wraps `tls`.
    pub fn new<T: Any + Send + Sync>(tls: Arc<T>) -> Self {
        TlsMaterial(tls)
    }

    /// The material as `T`, if it is one.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.0.clone().downcast::<T>().ok()
    }

    /// What a mutual-TLS listener (`what`, for the error) serves with: the
    /// material as `T`; refused when there is none or it is another type.
    pub fn server<T: Any + Send + Sync>(
        tls: Option<&TlsMaterial>,
        what: &str,
    ) -> Result<Arc<T>, ComponentError> {
        let m = tls.ok_or_else(|| {
            ComponentError::new(what, "mutual TLS needs the zone's [tls] section")
        })?;
        m.get::<T>().ok_or_else(|| {
            ComponentError::new(what, "the TLS material is not the transport's kind")
        })
    }

    /// What a mutual-TLS client of `url` presents: the material as `T` and the
    /// name the server must carry; refused when there is none (never dialed in
    /// plaintext) or it is another type.
    pub fn client<T: Any + Send + Sync>(
        url: &str,
        tls: Option<(TlsMaterial, Option<String>)>,
    ) -> Result<(Arc<T>, Option<String>), BoundaryError> {
        let (m, name) = tls.ok_or_else(|| {
            BoundaryError::invalid(
                "url",
                format!("`{url}` is mutual TLS: it needs a client certificate"),
            )
        })?;
        let tls = m.get::<T>().ok_or_else(|| {
            BoundaryError::invalid("url", "the TLS material is not the transport's kind")
        })?;
        Ok((tls, name))
    }
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsMaterial")
    }
}

/// A component that could not start or serve, with what it was doing.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct ComponentError {
    /// What failed (`binding 127.0.0.1:7443`).
    pub context: String,
    /// Why.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl ComponentError {
    /// `source` while doing `context`.
    pub fn new(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        ComponentError {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// What a listener is given to serve.
pub struct ServeContext {
    /// Every call goes through it (authorization, policies, engine).
    pub gate: Gate,
    /// Refused requests, counted by peer.
    pub served: Arc<ServeStats>,
    /// The TLS material when the scheme is [`Security::MutualTls`].
    pub tls: Option<TlsMaterial>,
    /// Resolves when the gateway stops: stop accepting, finish what is in flight.
    pub stopped: BoxFuture<'static, ()>,
    /// Whether the zone can serve now (its store answers, it is not stopping): what a
    /// transport's own health service reports.
    pub ready: Readiness,
}

/// Whether a zone can serve now, as the gateway last judged it (its store answers
/// and it is not stopping). Cheap to clone; every clone sees the same value.
#[derive(Debug, Clone)]
pub struct Readiness(tokio::sync::watch::Receiver<bool>);

impl Readiness {
    /// A readiness the gateway sets through the returned sender; starts not ready.
    pub fn channel() -> (tokio::sync::watch::Sender<bool>, Readiness) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Readiness(rx))
    }

    /// Always ready (tests, benchmarks: a listener with no store to ask).
    pub fn always() -> Readiness {
        let (tx, rx) = tokio::sync::watch::channel(true);
        // The value stays readable after the sender is gone.
        drop(tx);
        Readiness(rx)
    }

    /// The current judgement.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves with the new value when it changes; `None` once it can change no
    /// more (the gateway dropped its sender).
    pub async fn changed(&mut self) -> Option<bool> {
        self.0.changed().await.ok()?;
        Some(*self.0.borrow_and_update())
    }
}

/// A listener bound and ready: where it listens and the future that serves.
pub struct Serving {
    /// The URL it is reachable at (the bound port when 0 was asked).
    pub url: String,
    /// One line for the start-up log (`gRPC, mutual TLS 1.3`).
    pub summary: String,
    /// Serves until the context's `stopped` resolves and the calls in flight end.
    pub serve: BoxFuture<'static, Result<(), ComponentError>>,
}

/// A configured listener of some transport.
pub trait Listen: fmt::Debug + Send + Sync {
    /// What it occupies (`tcp 127.0.0.1:7443`, `udp ...`, `unix /run/...`): two
    /// listeners of a zone may not occupy the same.
    fn socket(&self) -> String;
    /// True when only this host can reach it (loopback, a local socket): where
    /// plaintext may be allowed.
    fn is_local(&self) -> bool;
    /// Binds (a failure here stops the gateway's start) and returns the serving future.
    fn start(&self, ctx: ServeContext) -> BoxFuture<'_, Result<Serving, ComponentError>>;
}

/// A configured client of some transport.
pub trait Dial: fmt::Debug + Send + Sync {
    /// A lazy client for `url` (the connection is made on first use and remade after
    /// a failure), over `tls` and checking the server's name (default: the URL's
    /// host) when the scheme is [`Security::MutualTls`]. A TLS scheme without
    /// material is refused, never dialed in plaintext.
    fn dial(
        &self,
        url: &str,
        tls: Option<(TlsMaterial, Option<String>)>,
    ) -> Result<Arc<dyn BoundaryApi>, BoundaryError>;
}

/// A transport: its schemes, its listeners and its clients.
pub trait Transport: Send + Sync {
    /// The schemes it serves and dials.
    fn schemes(&self) -> &'static [Scheme];
    /// Reads and checks a listener (its keys: the `[[listeners]]` entry without
    /// `url`, `insecure` and the [`ServeLimits`] keys). `None` when a problem was
    /// recorded.
    fn listener(&self, at: Setup<'_, '_>, limits: &ServeLimits) -> Option<Arc<dyn Listen>>;
    /// Reads and checks a client (its keys: the `[[links]]` entry without the link's
    /// own keys); `request_timeout` bounds every call.
    fn dialer(&self, at: Setup<'_, '_>, request_timeout: Duration) -> Option<Arc<dyn Dial>>;
}

/// What a sink is told about the zone it stores.
#[derive(Debug, Clone)]
pub struct ZoneSettings {
    /// The zone's name.
    pub zone: String,
    /// The zone's validation limits (a store must hold the largest fact).
    pub limits: Limits,
    /// The config file's folder: relative paths are resolved against it.
    pub base_dir: PathBuf,
}

/// One number a store reports for the metrics endpoint (`bsfg_` names).
#[derive(Debug, Clone, PartialEq)]
pub struct Gauge {
    /// Metric name.
    pub name: &'static str,
    /// Its help text.
    pub help: &'static str,
    /// Its value.
    pub value: f64,
}

/// Why a sink refused to check, open or upgrade a zone's store.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The configuration or the store's layout is wrong; retrying will not help
    /// (`bsfg run`/`validate` exit 2).
    #[error("{0}")]
    Refused(String),
    /// The store could not be reached or failed.
    #[error("{0}")]
    Failed(String),
}

/// A zone's store, open: the ports the engine uses and what operators see.
pub trait ZoneStore: Send + Sync {
    /// The zone log.
    fn fact_log(&self) -> Arc<dyn FactLog>;
    /// The artifact store.
    fn object_store(&self) -> Arc<dyn ObjectStore>;
    /// The store's gauges (index size, server memory, ...), read when asked; may
    /// take a round trip, so the gateway refreshes them in the background and keeps
    /// the last values when a read fails.
    fn gauges(&self) -> BoxFuture<'_, Result<Vec<Gauge>, SinkError>>;
    /// `Ok` when the store answers now (for readiness probes: `/readyz`); the error
    /// says what does not. Bounded by the store's own short timeout.
    fn ready(&self) -> BoxFuture<'_, Result<(), SinkError>>;
    /// Makes sure every write answered has left the process (called at shutdown).
    fn close(&self) -> BoxFuture<'_, ()>;
    /// The zone's link leases and this gateway's name as their holder, when the store
    /// coordinates several gateways of a zone (each link then runs on one of them at
    /// a time). `None`: every link runs here.
    fn leases(&self) -> Option<(Arc<dyn crate::link::LinkLease>, String)> {
        None
    }
}

/// A configured sink.
pub trait SinkPlan: fmt::Debug + Send + Sync {
    /// Where it stores (for messages), e.g. `nats://127.0.0.1:4222`.
    fn location(&self) -> String;
    /// The stream classes facts are sorted into.
    fn classes(&self) -> Vec<String>;
    /// The declared consumers (grants name them).
    fn consumers(&self) -> Vec<String>;
    /// `bsfg validate`: reaches the store and checks what start-up would; the answer
    /// is a line for the operator.
    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<String, SinkError>>;
    /// Opens the store (creating or verifying what the configuration declares).
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn ZoneStore>, SinkError>>;
    /// `bsfg index migrate`: brings the store's layout to the current one, once,
    /// with every gateway of the zone stopped; a line for the operator.
    fn upgrade(&self) -> BoxFuture<'_, Result<String, SinkError>>;
}

/// A sink: a `type` of zone store.
pub trait Sink: Send + Sync {
    /// The `type` a `[sink]` table names.
    fn kind(&self) -> &'static str;
    /// Reads and checks the `[sink]` table (without `type`) and the zone's
    /// `[[consumers]]`. `None` when a problem was recorded.
    fn configure(
        &self,
        zone: &ZoneSettings,
        table: Table<'_>,
        consumers: Vec<Table<'_>>,
        checks: &mut Checks,
    ) -> Option<Arc<dyn SinkPlan>>;
}

/// The transports and sinks a gateway knows, by scheme and by type.
#[derive(Clone, Default)]
pub struct Registry {
    transports: Vec<Arc<dyn Transport>>,
    sinks: Vec<Arc<dyn Sink>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("schemes", &self.schemes())
            .field("sinks", &self.sink_kinds())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers a transport. A scheme registered before keeps its first transport.
    pub fn with_transport(mut self, t: impl Transport + 'static) -> Self {
        self.transports.push(Arc::new(t));
        self
    }

    /// Registers a sink. A type registered before keeps its first sink.
    pub fn with_sink(mut self, s: impl Sink + 'static) -> Self {
        self.sinks.push(Arc::new(s));
        self
    }

    /// The transport serving `scheme`, with the scheme's description.
    pub fn scheme(&self, scheme: &str) -> Option<(&dyn Transport, &'static Scheme)> {
        self.transports.iter().find_map(|t| {
            t.schemes()
                .iter()
                .find(|s| s.name == scheme)
                .map(|s| (t.as_ref(), s))
        })
    }

    /// Every registered scheme, in registration order.
    pub fn schemes(&self) -> Vec<&'static str> {
        self.all_schemes().iter().map(|s| s.name).collect()
    }

    /// Every scheme's description.
    pub fn all_schemes(&self) -> Vec<&'static Scheme> {
        self.transports
            .iter()
            .flat_map(|t| t.schemes().iter())
            .collect()
    }

    /// The sink of `type` `kind`.
    pub fn sink(&self, kind: &str) -> Option<&dyn Sink> {
        self.sinks
            .iter()
            .find(|s| s.kind() == kind)
            .map(|s| s.as_ref())
    }

    /// Every registered sink type.
    pub fn sink_kinds(&self) -> Vec<&'static str> {
        self.sinks.iter().map(|s| s.kind()).collect()
    }

    /// Splits `url` into its registered scheme and the rest.
    pub fn endpoint<'u>(
        &self,
        url: &'u str,
    ) -> Result<(&dyn Transport, &'static Scheme, &'u str), String> {
        match url.split_once("://") {
            Some((scheme, rest)) => match self.scheme(scheme) {
                Some((t, s)) => Ok((t, s, rest)),
                None => Err(format!(
                    "no transport for scheme `{scheme}`; registered: {}",
                    self.schemes().join(", ")
                )),
            },
            None => Err(format!(
                "`{url}` is not a URL; write e.g. {}",
                self.all_schemes()
                    .first()
                    .map_or("scheme://address", |s| s.example)
            )),
        }
    }

    /// A client for `url` with its transport's defaults (the command-line client).
    pub fn dial(
        &self,
        url: &str,
        tls: Option<(TlsMaterial, Option<String>)>,
    ) -> Result<Arc<dyn BoundaryApi>, BoundaryError> {
        let (transport, scheme, address) = self
            .endpoint(url)
            .map_err(|e| BoundaryError::invalid("url", e))?;
        let mut checks = Checks::default();
        let at = Setup::new(
            scheme,
            address,
            ("url", 0..0),
            Table::empty("url"),
            &mut checks,
        );
        let dialer = transport.dialer(at, Duration::from_secs(60));
        let Some(dialer) = dialer else {
            let rules: Vec<_> = checks.problems.into_iter().map(|p| p.rule).collect();
            return Err(BoundaryError::invalid("url", rules.join("; ")));
        };
        dialer.dial(url, tls)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Raw {
        congestion: Option<Spanned<String>>,
        window: Option<Spanned<u64>>,
    }

    fn table(src: &str) -> Table<'_> {
        let doc = DeTable::parse(src).unwrap();
        let span = doc.span();
        Table::new("listeners[0]", span, doc.into_inner())
    }

    #[test]
    fn a_component_table_reads_with_positions_and_split_off_keys_leave_the_rest() {
        let src = "url = \"x://a\"\ncongestion = \"bbr\"\nwindow = 5\n";
        let mut t = table(src);
        let common: Option<Raw> = t.split_off(&["url"]).read(&mut Checks::default());
        assert!(common.is_none(), "`url` went to its own table");
        let mut checks = Checks::default();
        let raw: Raw = t.read(&mut checks).unwrap();
        let c = raw.congestion.unwrap();
        assert_eq!(&src[c.span()], "\"bbr\"");
        assert!(checks.problems.is_empty());
    }

    #[test]
    fn an_unknown_key_is_a_problem_at_its_position_naming_the_table() {
        let src = "congestion = \"bbr\"\nwindw = 5\n";
        let mut checks = Checks::default();
        assert!(table(src).read::<Raw>(&mut checks).is_none());
        let p = &checks.problems[0];
        assert_eq!(p.key, "listeners[0].windw");
        assert!(p.rule.contains("unknown field `windw`"), "{}", p.rule);
        assert_eq!(&src[p.span.clone()], "windw");
    }

    #[test]
    fn an_unregistered_scheme_lists_the_registered_ones() {
        let r = Registry::new();
        let e = r.endpoint("carrier-pigeon://x").err().unwrap();
        assert!(
            e.contains("no transport for scheme `carrier-pigeon`"),
            "{e}"
        );
        assert!(r.dial("carrier-pigeon://x", None).is_err());
    }
}
