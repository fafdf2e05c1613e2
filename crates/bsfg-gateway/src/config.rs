//! A zone's gateway, composed from one TOML file.
//!
//! Every component is chosen by name through the [`Registry`]: the sink by `type`,
//! each listener and link by its URL scheme. The gateway reads only what is its own
//! (the zone, limits, TLS, peers, policies, the admin endpoint, a link's loop
//! settings, a listener's serving limits and the security rules of each scheme's
//! kind); every component reads and checks its own keys. [`load`] checks everything
//! before anything starts, and reports each problem as `file:line:column: key: rule`.
//! String values may take `${VAR}` and `${VAR:-default}` from the environment
//! ([`env`]); secrets have only `*_file` keys, so none is ever written in the file.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use bsfg_core::component::{
    Checks, DeTable, DeValue, Dial, Listen, Registry, Scheme, Security, ServeLimits, Setup,
    SinkPlan, Spanned, Table, ZoneSettings,
};
use bsfg_core::{Limits, names};
use serde::Deserialize;

pub mod env;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key (`listeners[0].url`), empty for syntax errors.
    pub key: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem of one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct Problems(pub Vec<Problem>);

/// What the gateway itself reads of a zone file; the `[sink]`, `[[consumers]]`,
/// `[[listeners]]` and `[[links]]` tables go to their components.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    zone: RawZone,
    #[serde(default)]
    limits: RawLimits,
    admin: Option<RawAdmin>,
    tls: Option<Spanned<RawTls>>,
    #[serde(default, alias = "peer")]
    peers: Vec<RawPeer>,
    #[serde(default, alias = "policy")]
    policies: Vec<RawPolicy>,
}

/// `[[policies]]`: a WASM policy component and the hooks whose chains it joins.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    module: Spanned<String>,
    hooks: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    settings: std::collections::BTreeMap<String, Spanned<String>>,
    memory_mib: Option<Spanned<u32>>,
    timeout: Option<Spanned<String>>,
    fuel: Option<Spanned<u64>>,
    on_fault: Option<Spanned<String>>,
    #[serde(default)]
    grants: Vec<Spanned<String>>,
    instances: Option<Spanned<u32>>,
    broken_after: Option<Spanned<u32>>,
    backoff_min: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    identity_from: Option<Spanned<String>>,
    reload_interval: Option<Spanned<String>>,
    #[serde(default)]
    trust: std::collections::BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    identity: Spanned<String>,
    ca: Spanned<String>,
    #[serde(default)]
    claim_from_zones: Vec<Spanned<String>>,
    #[serde(default)]
    to_zones: Vec<Spanned<String>>,
    #[serde(default)]
    consumers: Vec<Spanned<String>>,
    #[serde(default)]
    put_buckets: Vec<Spanned<String>>,
    #[serde(default)]
    read_buckets: Vec<Spanned<String>>,
}

/// The keys of a `[[links]]` entry the link itself reads; the rest go to the
/// source's transport.
const LINK_KEYS: &[&str] = &[
    "name",
    "source",
    "insecure",
    "consumer",
    "classes",
    "page_size",
    "pages_in_flight",
    "wait",
    "backoff_min",
    "backoff_max",
    "request_timeout",
    "ca",
    "server_name",
    "source_zone",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    name: Spanned<String>,
    source: Spanned<String>,
    insecure: Option<Spanned<bool>>,
    consumer: Spanned<String>,
    #[serde(default)]
    classes: Vec<Spanned<String>>,
    page_size: Option<Spanned<u32>>,
    pages_in_flight: Option<Spanned<u32>>,
    wait: Option<Spanned<String>>,
    backoff_min: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
    server_name: Option<Spanned<String>>,
    source_zone: Option<Spanned<String>>,
}

/// The keys of a `[[listeners]]` entry every listener has (its URL, `insecure`,
/// the serving limits); the rest go to the URL's transport.
const LISTENER_KEYS: &[&str] = &[
    "url",
    "insecure",
    "max_message_bytes",
    "max_fetch_wait",
    "max_concurrent_streams",
    "max_connections_per_peer",
    "request_timeout",
    "idle_timeout",
    "handshake_timeout",
    "max_object_bytes",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    url: Spanned<String>,
    insecure: Option<Spanned<bool>>,
    max_message_bytes: Option<Spanned<usize>>,
    max_fetch_wait: Option<Spanned<String>>,
    max_concurrent_streams: Option<Spanned<u32>>,
    max_connections_per_peer: Option<Spanned<usize>>,
    request_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    handshake_timeout: Option<Spanned<String>>,
    max_object_bytes: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
    token_file: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    name: Spanned<String>,
    stop_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_fact_bytes: Option<Spanned<usize>>,
    max_fetch_limit: Option<Spanned<u32>>,
    max_labels: Option<Spanned<usize>>,
}

/// The `type` of the `[sink]` table: names the sink in the registry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSinkType {
    #[serde(rename = "type")]
    kind: Spanned<String>,
}

/// A listener, resolved: its transport's checked plan.
#[derive(Debug, Clone)]
pub struct Listener {
    /// The URL as written, after `${VAR}` expansion (`grpcs://0.0.0.0:7443`).
    pub url: String,
    /// Its scheme, as the transport registered it.
    pub scheme: &'static Scheme,
    /// The transport's listener, ready to start.
    pub listen: Arc<dyn Listen>,
}

/// The zone's TLS identity and trust anchors (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Certificate, key and every trust anchor (paths resolved against the config
    /// file's directory).
    pub files: bsfg_tls::TlsFiles,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

impl TlsSettings {
    /// The same identity, trusting only the anchor `name` (a link's source).
    pub fn trusting_only(&self, name: &str) -> bsfg_tls::TlsFiles {
        let mut f = self.files.clone();
        f.trust.retain(|a| a.name == name);
        f
    }
}

/// How a link authenticates its source (a [`Security::MutualTls`] scheme).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTls {
    /// The trust anchor the source's certificate must chain to.
    pub ca: String,
    /// The name the source's certificate must carry (default: the URL's host).
    pub server_name: Option<String>,
}

/// A link, resolved: pull from `source` into this zone.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The source gateway's URL as written; its scheme picks the transport.
    pub source: String,
    /// Its scheme, as the transport registered it.
    pub scheme: &'static Scheme,
    /// Mutual TLS to the source, when the scheme is mutual TLS.
    pub tls: Option<LinkTls>,
    /// The transport's client, checked.
    pub dial: Arc<dyn Dial>,
    /// The link loop's settings.
    pub settings: bsfg_core::link::LinkSettings,
}

/// A checked gateway configuration: everything needed to start the zone.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Zone name.
    pub zone: String,
    /// How long a stop (SIGINT/SIGTERM) waits for the work in flight before the
    /// gateway exits anyway, saying what it could not finish. Default 30 s.
    pub stop_timeout: Duration,
    /// Validation limits of the engine.
    pub limits: Limits,
    /// The zone's store, as its sink checked it.
    pub sink: Arc<dyn SinkPlan>,
    /// The sink's registered `type`.
    pub sink_type: &'static str,
    /// Listeners, in file order.
    pub listeners: Vec<Listener>,
    /// Links pulling into this zone, in file order.
    pub links: Vec<LinkConfig>,
    /// The admin endpoint (`/metrics`, `/status`, gap acceptance, quarantine), if
    /// any.
    pub admin: Option<AdminSettings>,
    /// The zone's TLS identity, if it has one.
    pub tls: Option<TlsSettings>,
    /// What each peer identity may do (default deny).
    pub grants: Vec<bsfg_core::Grant>,
    /// WASM policies in file order; each joins the chain of every hook it names.
    pub policies: Vec<PolicyEntry>,
}

/// `[admin]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    /// Loopback address of the admin endpoint.
    pub listen: SocketAddr,
    /// The credential its state-changing calls need (`token_file`); without one they
    /// are refused.
    pub token: Option<AdminToken>,
    /// Address of a read-only listener (`/metrics`, `/healthz`, `/readyz` only) that
    /// may be any address, for a scraper on another host.
    pub metrics_listen: Option<SocketAddr>,
}

/// The admin credential read from a token file: at least 32 visible ASCII characters,
/// the file not readable by every user. Its `Debug` shows the file, never the token.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// The file it was read from.
    pub path: PathBuf,
    secret: Arc<str>,
}

impl AdminToken {
    /// Fewest characters a token may have.
    pub const MIN_LEN: usize = 32;

    /// Reads and checks a token file (trailing whitespace, e.g. the newline, is not
    /// part of the token). The error is the rule it breaks.
    pub fn read(path: &Path) -> Result<AdminToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path)
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o007 != 0 {
                return Err(format!(
                    "the token file {} may be read or written by every user (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                ));
            }
        }
        let token = text.trim_end();
        if token.len() < Self::MIN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the token in {} must be at least {} visible ASCII characters with no spaces (`bsfg certs admin-token --out FILE` makes one)",
                path.display(),
                Self::MIN_LEN
            ));
        }
        Ok(AdminToken {
            path: path.to_path_buf(),
            secret: token.into(),
        })
    }

    /// The token, for a client's `Authorization: Bearer` header.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// True when `offered` is the token (compared in constant time).
    pub fn matches(&self, offered: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        self.secret.as_bytes().ct_eq(offered).into()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn socket_addr(c: &mut Checks, value: &Spanned<String>, key: &str) -> Option<SocketAddr> {
    match value.get_ref().parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            c.at(
                value.span(),
                key,
                format!(
                    "`{}` is not an IP address and port (e.g. 127.0.0.1:9464)",
                    value.get_ref()
                ),
            );
            None
        }
    }
}

fn admin_section(
    c: &mut Checks,
    a: &RawAdmin,
    base: &Path,
    sockets: &HashSet<String>,
) -> Option<AdminSettings> {
    let listen = socket_addr(c, &a.listen, "admin.listen");
    if let Some(addr) = listen
        && !addr.ip().is_loopback()
    {
        c.at(
            a.listen.span(),
            "admin.listen",
            format!("the admin endpoint may listen on loopback only ({addr} is not); `metrics_listen` serves metrics and probes on any address"),
        );
    }
    let metrics_listen = a
        .metrics_listen
        .as_ref()
        .and_then(|m| socket_addr(c, m, "admin.metrics_listen").map(|addr| (m, addr)));
    for (value, key, addr) in [
        listen.map(|addr| (&a.listen, "admin.listen", addr)),
        metrics_listen.map(|(m, addr)| (m, "admin.metrics_listen", addr)),
    ]
    .into_iter()
    .flatten()
    {
        if sockets.contains(&format!("tcp {addr}")) {
            c.at(value.span(), key, format!("{addr} is used by a listener"));
        }
    }
    if let (Some(l), Some((m, addr))) = (listen, metrics_listen)
        && (l == addr || (l.port() == addr.port() && addr.ip().is_unspecified()))
    {
        c.at(
            m.span(),
            "admin.metrics_listen",
            format!("{addr} overlaps `listen` ({l})"),
        );
    }
    let token = a.token_file.as_ref().and_then(|t| {
        AdminToken::read(&base.join(t.get_ref()))
            .map_err(|rule| c.at(t.span(), "admin.token_file", rule))
            .ok()
    });
    Some(AdminSettings {
        listen: listen.filter(|a| a.ip().is_loopback())?,
        token,
        metrics_listen: metrics_listen.map(|(_, addr)| addr),
    })
}

/// One `[[policies]]` entry, resolved (module path against the config's folder).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyEntry {
    /// The sandbox's configuration.
    pub config: bsfg_policy_wasm::PolicyConfig,
    /// The hooks whose chains it joins (`append`, `intake`).
    pub hooks: Vec<bsfg_core::Hook>,
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The problems every part of the file recorded (the gateway's and each
/// component's), as `file:line:column: key: rule`, in file order.
fn located(path: &Path, src: &str, checks: Checks) -> Problems {
    let mut problems: Vec<Problem> = checks
        .problems
        .into_iter()
        .map(|p| {
            let (line, column) = line_col(src, p.span.start);
            Problem {
                file: path.to_path_buf(),
                line,
                column,
                key: p.key,
                message: p.rule,
            }
        })
        .collect();
    problems.sort_by_key(|p| (p.line, p.column));
    Problems(problems)
}

/// Reads and checks a config file, composing its components from `registry`.
pub fn load(registry: &Registry, path: &Path) -> Result<GatewayConfig, Problems> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![Problem {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(registry, path, &src)
}

/// Removes the entry `name` (or its `alias`) from `root`.
fn take<'i>(
    root: &mut DeTable<'i>,
    name: &str,
    alias: Option<&str>,
) -> Option<Spanned<DeValue<'i>>> {
    let key = root
        .keys()
        .find(|k| k.get_ref() == name || Some(k.get_ref().as_ref()) == alias)
        .cloned()?;
    root.remove(&key)
}

/// The tables of an array of tables (`[[listeners]]`), each under `name[i]`.
fn tables<'i>(c: &mut Checks, v: Option<Spanned<DeValue<'i>>>, name: &str) -> Vec<Table<'i>> {
    let Some(v) = v else { return Vec::new() };
    let span = v.span();
    match v.into_inner() {
        DeValue::Array(items) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let span = item.span();
                match item.into_inner() {
                    DeValue::Table(t) => Some(Table::new(format!("{name}[{i}]"), span, t)),
                    _ => {
                        c.at(span, format!("{name}[{i}]"), "must be a table");
                        None
                    }
                }
            })
            .collect(),
        _ => {
            c.at(
                span,
                name,
                format!("must be an array of tables ([[{name}]])"),
            );
            Vec::new()
        }
    }
}

/// The schemes of one kind of security, as `a://, b://` for messages.
fn schemes_where(registry: &Registry, f: fn(&Security) -> bool) -> String {
    let s: Vec<String> = registry
        .all_schemes()
        .into_iter()
        .filter(|s| f(&s.security))
        .map(|s| format!("{}://", s.name))
        .collect();
    if s.is_empty() {
        "none registered".into()
    } else {
        s.join(" or ")
    }
}

fn is_tls(s: &Security) -> bool {
    matches!(s, Security::MutualTls { .. })
}

fn is_plaintext(s: &Security) -> bool {
    matches!(s, Security::Plaintext)
}

/// Parses and checks config text; `path` is only used in messages and to resolve
/// relative paths.
pub fn parse(registry: &Registry, path: &Path, src: &str) -> Result<GatewayConfig, Problems> {
    parse_with_env(registry, path, src, &|name| std::env::var(name).ok())
}

/// [`parse`] with the environment `${VAR}` references read from `lookup`: every
/// string value is expanded before it is checked; a reference that cannot be
/// expanded is a problem at that value's line, and only those are reported.
pub fn parse_with_env(
    registry: &Registry,
    path: &Path,
    src: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<GatewayConfig, Problems> {
    let syntax = |e: toml::de::Error| {
        let (line, column) = e.span().map_or((0, 0), |s| line_col(src, s.start));
        Problems(vec![Problem {
            file: path.to_path_buf(),
            line,
            column,
            key: String::new(),
            message: e.message().trim().to_owned(),
        }])
    };
    let doc = DeTable::parse(src).map_err(syntax)?;
    let doc_span = doc.span();
    let mut root = doc.into_inner();
    let mut unexpanded = Checks::default();
    env::expand_table(&mut root, lookup, &mut unexpanded);
    if !unexpanded.problems.is_empty() {
        return Err(located(path, src, unexpanded));
    }
    let raw_sink = take(&mut root, "sink", None);
    let raw_consumers = take(&mut root, "consumers", None);
    let raw_listeners = take(&mut root, "listeners", None);
    let raw_links = take(&mut root, "links", Some("link"));
    let raw = RawConfig::deserialize(toml::de::ValueDeserializer::from(Spanned::new(
        doc_span.clone(),
        DeValue::Table(root),
    )))
    .map_err(syntax)?;
    let mut c = Checks::default();
    let base = path.parent().unwrap_or(Path::new("."));

    c.name(&raw.zone.name, "zone.name", names::validate_zone);
    let zone = raw.zone.name.get_ref().clone();
    let stop_timeout = c.duration(
        &raw.zone.stop_timeout,
        "zone.stop_timeout",
        Duration::from_secs(30),
    );

    let mut limits = Limits::default();
    if let Some(v) = &raw.limits.max_fact_bytes {
        if *v.get_ref() == 0 || *v.get_ref() > 64 * 1024 * 1024 {
            c.at(
                v.span(),
                "limits.max_fact_bytes",
                "must be between 1 and 67108864 (64 MiB)",
            );
        }
        limits.max_fact_bytes = *v.get_ref();
    }
    if let Some(v) = &raw.limits.max_fetch_limit {
        if *v.get_ref() == 0 || *v.get_ref() > 10_000 {
            c.at(
                v.span(),
                "limits.max_fetch_limit",
                "must be between 1 and 10000",
            );
        }
        limits.max_fetch_limit = *v.get_ref();
    }
    if let Some(v) = &raw.limits.max_labels {
        limits.max_labels = *v.get_ref();
    }

    // The sink: its `type` picks the component, which reads the rest.
    let zone_settings = ZoneSettings {
        zone: zone.clone(),
        limits: limits.clone(),
        base_dir: base.to_path_buf(),
    };
    let consumers = tables(&mut c, raw_consumers, "consumers");
    let sink = match raw_sink {
        None => {
            c.at(
                0..0,
                "sink",
                "missing: the zone's store, e.g. [sink] type = \"...\"",
            );
            None
        }
        Some(v) => {
            let span = v.span();
            match v.into_inner() {
                DeValue::Table(t) => {
                    let mut rest = Table::new("sink", span, t);
                    let kind = rest.split_off(&["type"]).read::<RawSinkType>(&mut c);
                    kind.and_then(|k| match registry.sink(k.kind.get_ref()) {
                        Some(s) => s
                            .configure(&zone_settings, rest, consumers, &mut c)
                            .map(|p| (p, s.kind())),
                        None => {
                            c.at(
                                k.kind.span(),
                                "sink.type",
                                format!(
                                    "unknown sink type `{}`; registered: {}",
                                    k.kind.get_ref(),
                                    registry.sink_kinds().join(", ")
                                ),
                            );
                            None
                        }
                    })
                }
                _ => {
                    c.at(span, "sink", "must be a table");
                    None
                }
            }
        }
    };
    let local_anchors: Vec<&'static str> = registry
        .all_schemes()
        .into_iter()
        .filter_map(|s| match s.security {
            Security::LocalCredentials { anchor } => Some(anchor),
            _ => None,
        })
        .collect();

    let mut listeners = Vec::new();
    let mut sockets = HashSet::new();
    let raw_listeners = tables(&mut c, raw_listeners, "listeners");
    if raw_listeners.is_empty() {
        let example = registry
            .all_schemes()
            .into_iter()
            .find(|s| is_plaintext(&s.security))
            .map_or("scheme://127.0.0.1:7443", |s| s.example);
        c.at(
            0..0,
            "listeners",
            format!("at least one [[listeners]] entry is needed, e.g. url = \"{example}\""),
        );
    }
    for (i, mut table) in raw_listeners.into_iter().enumerate() {
        let Some(rl) = table.split_off(LISTENER_KEYS).read::<RawListener>(&mut c) else {
            continue;
        };
        let key = format!("listeners[{i}].url");
        let url = rl.url.get_ref();
        let (transport, scheme, address) = match registry.endpoint(url) {
            Ok(t) => t,
            Err(e) => {
                c.at(rl.url.span(), key, e);
                continue;
            }
        };
        let limits = serve_limits(&mut c, &rl, i, &limits);
        let at = Setup::new(scheme, address, (&key, rl.url.span()), table, &mut c);
        let listen = transport.listener(at, &limits);
        let Some(listen) = listen else { continue };
        if !sockets.insert(listen.socket()) {
            c.at(
                rl.url.span(),
                key.clone(),
                format!("{} is used by another listener", listen.socket()),
            );
        }
        let insecure = rl.insecure.as_ref().is_some_and(|v| *v.get_ref());
        let name = scheme.name;
        match scheme.security {
            Security::MutualTls { .. } => {
                if insecure && let Some(v) = &rl.insecure {
                    c.at(
                        v.span(),
                        format!("listeners[{i}].insecure"),
                        format!(
                            "a {name}:// listener is mutual TLS; remove `insecure` or use {}",
                            schemes_where(registry, is_plaintext)
                        ),
                    );
                }
                if raw.tls.is_none() {
                    c.at(
                        rl.url.span(),
                        key.clone(),
                        format!(
                            "a {name}:// listener needs the zone's [tls] section (cert, key, trust)"
                        ),
                    );
                }
            }
            Security::LocalCredentials { .. } => {
                if let Some(v) = &rl.insecure {
                    c.at(
                        v.span(),
                        format!("listeners[{i}].insecure"),
                        format!("a {name}:// listener authenticates every caller by its operating-system credentials; remove `insecure`"),
                    );
                }
            }
            Security::Plaintext if !insecure => {
                let span = rl.insecure.as_ref().map_or(rl.url.span(), |v| v.span());
                c.at(
                    span,
                    format!("listeners[{i}].insecure"),
                    format!(
                        "{name}:// is plaintext: use {} (mutual TLS), or set `insecure = true` on a loopback address",
                        schemes_where(registry, is_tls)
                    ),
                );
            }
            Security::Plaintext if !listen.is_local() => {
                c.at(
                    rl.url.span(),
                    key,
                    format!("plaintext is allowed only on loopback; {address} is not"),
                );
            }
            Security::Plaintext => {}
        }
        listeners.push(Listener {
            url: url.clone(),
            scheme,
            listen,
        });
    }

    let mut links = Vec::new();
    let mut link_names = HashSet::new();
    for (i, mut table) in tables(&mut c, raw_links, "links").into_iter().enumerate() {
        let Some(rl) = table.split_off(LINK_KEYS).read::<RawLink>(&mut c) else {
            continue;
        };
        let key = |k: &str| format!("links[{i}].{k}");
        c.name(&rl.name, &key("name"), names::validate_consumer);
        if !link_names.insert(rl.name.get_ref().clone()) {
            c.at(
                rl.name.span(),
                key("name"),
                format!("link `{}` is declared twice", rl.name.get_ref()),
            );
        }
        c.name(&rl.consumer, &key("consumer"), names::validate_consumer);
        let url = rl.source.get_ref();
        let (transport, scheme, address) = match registry.endpoint(url) {
            Ok(t) => t,
            Err(e) => {
                c.at(rl.source.span(), key("source"), e);
                continue;
            }
        };
        let insecure = rl.insecure.as_ref().is_some_and(|v| *v.get_ref());
        let name = scheme.name;
        let mut link_tls = None;
        match scheme.security {
            Security::MutualTls { .. } => {
                if insecure && let Some(v) = &rl.insecure {
                    c.at(
                        v.span(),
                        key("insecure"),
                        format!(
                            "a {name}:// source is mutual TLS; remove `insecure` or use {}",
                            schemes_where(registry, is_plaintext)
                        ),
                    );
                }
                match (&rl.ca, &raw.tls) {
                    (None, _) => c.at(
                        rl.source.span(),
                        key("ca"),
                        format!("a {name}:// link needs `ca`: the [tls.trust] anchor the source's certificate must chain to"),
                    ),
                    (Some(_), None) => c.at(
                        rl.source.span(),
                        key("source"),
                        format!("a {name}:// link needs the zone's [tls] section (its client certificate)"),
                    ),
                    (Some(ca), Some(t)) => {
                        if !t.get_ref().trust.contains_key(ca.get_ref()) {
                            c.at(
                                ca.span(),
                                key("ca"),
                                format!("`{}` is not an anchor in [tls.trust]", ca.get_ref()),
                            );
                        }
                        link_tls = Some(LinkTls {
                            ca: ca.get_ref().clone(),
                            server_name: rl.server_name.as_ref().map(|n| n.get_ref().clone()),
                        });
                    }
                }
            }
            Security::LocalCredentials { .. } => {}
            Security::Plaintext if !insecure => {
                let span = rl.insecure.as_ref().map_or(rl.source.span(), |v| v.span());
                c.at(
                    span,
                    key("insecure"),
                    format!(
                        "{name}:// is plaintext: use {} (mutual TLS), or set `insecure = true` to pull over plaintext",
                        schemes_where(registry, is_tls)
                    ),
                );
            }
            Security::Plaintext => {}
        }
        // Provenance and the intake context name the source zone from here, never
        // from what the source says about itself.
        let source_zone = match (&rl.source_zone, &link_tls) {
            (Some(z), _) => {
                c.name(z, &key("source_zone"), names::validate_zone);
                z.get_ref().clone()
            }
            (None, Some(t)) => {
                if names::validate_zone("source_zone", &t.ca).is_err() {
                    c.at(
                        rl.name.span(),
                        key("source_zone"),
                        format!(
                            "the anchor name `{}` is not a zone name: set `source_zone`",
                            t.ca
                        ),
                    );
                }
                t.ca.clone()
            }
            // A TLS link without `ca` is reported above.
            (None, None) if is_tls(&scheme.security) => String::new(),
            (None, None) => {
                let what = match scheme.security {
                    Security::Plaintext => "a plaintext link".to_owned(),
                    _ => format!("a {name}:// link"),
                };
                c.at(
                    rl.source.span(),
                    key("source_zone"),
                    format!("{what} must name its source zone (`source_zone`): there is no certificate to take it from"),
                );
                String::new()
            }
        };
        let mut streams = Vec::new();
        for (j, k) in rl.classes.iter().enumerate() {
            c.name(
                k,
                &format!("links[{i}].classes[{j}]"),
                names::validate_class,
            );
            streams.push(format!("facts_{}", k.get_ref()));
        }
        let page_size = rl.page_size.as_ref().map_or(500, |p| *p.get_ref());
        if let Some(p) = &rl.page_size
            && !(1..=limits.max_fetch_limit).contains(p.get_ref())
        {
            c.at(
                p.span(),
                key("page_size"),
                format!(
                    "must be between 1 and {} (the source refuses larger pages)",
                    limits.max_fetch_limit
                ),
            );
        }
        let pages_in_flight = rl
            .pages_in_flight
            .as_ref()
            .map_or(bsfg_core::link::PAGES_IN_FLIGHT, |p| *p.get_ref() as usize);
        if let Some(p) = &rl.pages_in_flight
            && !(1..=64).contains(p.get_ref())
        {
            c.at(
                p.span(),
                key("pages_in_flight"),
                "must be between 1 and 64 (pages between fetch and confirm; each holds up to page_size facts in memory and in the source consumer's max_ack_pending)",
            );
        }
        let wait = c.duration(&rl.wait, &key("wait"), Duration::from_secs(5));
        let backoff_min = c.duration(
            &rl.backoff_min,
            &key("backoff_min"),
            Duration::from_millis(200),
        );
        let backoff_max = c.duration(
            &rl.backoff_max,
            &key("backoff_max"),
            Duration::from_secs(30),
        );
        let request_timeout = c.duration(
            &rl.request_timeout,
            &key("request_timeout"),
            Duration::from_secs(10),
        );
        if backoff_min.is_zero() || backoff_max < backoff_min {
            let span = rl
                .backoff_max
                .as_ref()
                .or(rl.backoff_min.as_ref())
                .map_or(rl.name.span(), |v| v.span());
            c.at(
                span,
                key("backoff_max"),
                "backoff_min must be above zero and backoff_max at least backoff_min",
            );
        }
        if wait < Duration::from_millis(10) {
            let span = rl.wait.as_ref().map_or(rl.name.span(), |v| v.span());
            c.at(
                span,
                key("wait"),
                "must be at least 10ms: an idle link waits in long-poll rather than spinning",
            );
        }
        let source_key = key("source");
        let at = Setup::new(
            scheme,
            address,
            (&source_key, rl.source.span()),
            table,
            &mut c,
        );
        let dial = transport.dialer(at, request_timeout);
        let Some(dial) = dial else { continue };
        links.push(LinkConfig {
            source: url.clone(),
            scheme,
            tls: link_tls,
            dial,
            settings: bsfg_core::link::LinkSettings {
                name: rl.name.get_ref().clone(),
                local_zone: zone.clone(),
                source_zone,
                consumer: rl.consumer.get_ref().clone(),
                page_size,
                pages_in_flight,
                wait,
                streams,
                backoff_min,
                backoff_max,
                request_timeout,
            },
        });
    }

    let admin = raw
        .admin
        .as_ref()
        .and_then(|a| admin_section(&mut c, a, base, &sockets));
    let tls = raw.tls.as_ref().and_then(|t| tls_section(&mut c, t, base));
    let declared: HashSet<String> = sink
        .as_ref()
        .map(|(s, _)| s.consumers().into_iter().collect())
        .unwrap_or_default();
    // Anchors a grant may name: the [tls.trust] anchors, and the anchor of every
    // scheme whose callers the operating system vouches for.
    let anchors: Option<HashSet<String>> = match &raw.tls {
        Some(t) => Some(
            t.get_ref()
                .trust
                .keys()
                .cloned()
                .chain(local_anchors.iter().map(|a| a.to_string()))
                .collect(),
        ),
        None if listeners
            .iter()
            .any(|l| matches!(l.scheme.security, Security::LocalCredentials { .. })) =>
        {
            Some(local_anchors.iter().map(|a| a.to_string()).collect())
        }
        None => None,
    };
    let grants = peers(&mut c, &raw.peers, anchors.as_ref(), &declared);
    let policies = policies(&mut c, &raw.policies, base);

    match sink {
        Some((sink, sink_type)) if c.problems.is_empty() => Ok(GatewayConfig {
            zone,
            stop_timeout,
            limits,
            sink,
            sink_type,
            listeners,
            links,
            admin,
            tls,
            grants,
            policies,
        }),
        _ => Err(located(path, src, c)),
    }
}

/// The serving limits of listener `i`, checked.
fn serve_limits(c: &mut Checks, rl: &RawListener, i: usize, zone: &Limits) -> ServeLimits {
    let mut l = ServeLimits::default();
    if let Some(m) = &rl.max_message_bytes {
        let needed = zone.max_fact_bytes * 2;
        if *m.get_ref() < needed {
            c.at(m.span(), format!("listeners[{i}].max_message_bytes"), format!("must be at least twice limits.max_fact_bytes ({needed}) so that a fact and its envelope fit"));
        }
        l.max_message_bytes = *m.get_ref();
    }
    let key = |k: &str| format!("listeners[{i}].{k}");
    l.max_fetch_wait = c.duration(&rl.max_fetch_wait, &key("max_fetch_wait"), l.max_fetch_wait);
    l.request_timeout = c.duration(
        &rl.request_timeout,
        &key("request_timeout"),
        l.request_timeout,
    );
    if l.request_timeout <= l.max_fetch_wait {
        c.at(
            rl.url.span(),
            key("request_timeout"),
            "must be longer than max_fetch_wait, or long-polls time out",
        );
    }
    l.idle_timeout = c.duration(&rl.idle_timeout, &key("idle_timeout"), l.idle_timeout);
    l.handshake_timeout = c.duration(
        &rl.handshake_timeout,
        &key("handshake_timeout"),
        l.handshake_timeout,
    );
    for (v, k, d) in [
        (&rl.idle_timeout, "idle_timeout", l.idle_timeout),
        (
            &rl.handshake_timeout,
            "handshake_timeout",
            l.handshake_timeout,
        ),
    ] {
        if let Some(v) = v
            && d < Duration::from_millis(100)
        {
            c.at(v.span(), key(k), "must be at least 100ms");
        }
    }
    l.max_object_bytes = c.at_least(
        &rl.max_object_bytes,
        &key("max_object_bytes"),
        1,
        l.max_object_bytes,
    );
    l.max_concurrent_streams = c.at_least(
        &rl.max_concurrent_streams,
        &key("max_concurrent_streams"),
        1,
        l.max_concurrent_streams,
    );
    l.max_connections_per_peer = c.at_least(
        &rl.max_connections_per_peer,
        &key("max_connections_per_peer"),
        1,
        l.max_connections_per_peer,
    );
    l
}

/// `[[policies]]`: names unique, module files present, hooks, limits and grants known.
/// The modules themselves are loaded (compiled, checked, initialised) by
/// `bsfg validate` and at start-up, not here.
fn policies(c: &mut Checks, raw: &[RawPolicy], base: &Path) -> Vec<PolicyEntry> {
    use bsfg_policy_wasm::{HostGrant, OnFault, PolicyConfig};
    let mut out: Vec<PolicyEntry> = Vec::new();
    for (i, rp) in raw.iter().enumerate() {
        let key = |k: &str| format!("policies[{i}].{k}");
        let name = rp.name.get_ref();
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            c.at(
                rp.name.span(),
                key("name"),
                "must be letters, digits, `-` and `_` (it labels metrics and denials)",
            );
        } else if out.iter().any(|p| p.config.name == *name) {
            c.at(
                rp.name.span(),
                key("name"),
                format!("`{name}` is defined twice"),
            );
        }
        let module = base.join(rp.module.get_ref());
        if !module.is_file() {
            c.at(
                rp.module.span(),
                key("module"),
                format!(
                    "`{}` is not a file (paths are relative to the config's folder; example policies are built by scripts/setup.sh)",
                    module.display()
                ),
            );
        }
        let mut hooks = Vec::new();
        for (j, h) in rp.hooks.get_ref().iter().enumerate() {
            match h.get_ref().as_str() {
                "append" => hooks.push(bsfg_core::Hook::Append),
                "intake" => hooks.push(bsfg_core::Hook::Intake),
                other => c.at(
                    h.span(),
                    format!("policies[{i}].hooks[{j}]"),
                    format!("`{other}` is not a hook; use \"append\" or \"intake\""),
                ),
            }
        }
        if rp.hooks.get_ref().is_empty() {
            c.at(
                rp.hooks.span(),
                key("hooks"),
                "name at least one hook (\"append\", \"intake\")",
            );
        }
        let mut cfg = PolicyConfig::new(name.clone(), module);
        cfg.settings = rp
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), v.get_ref().clone()))
            .collect();
        if let Some(m) = &rp.memory_mib {
            match *m.get_ref() {
                1..=4096 => cfg.memory_bytes = (*m.get_ref() as usize) << 20,
                _ => c.at(m.span(), key("memory_mib"), "must be between 1 and 4096"),
            }
        }
        cfg.timeout = c.duration(&rp.timeout, &key("timeout"), cfg.timeout);
        if cfg.timeout < Duration::from_millis(1) || cfg.timeout > Duration::from_secs(60) {
            let span = rp.timeout.as_ref().map_or(rp.name.span(), |v| v.span());
            c.at(span, key("timeout"), "must be between 1ms and 60s");
        }
        if let Some(f) = &rp.fuel {
            if *f.get_ref() == 0 {
                c.at(
                    f.span(),
                    key("fuel"),
                    "must be above zero (omit it to disable fuel)",
                );
            }
            cfg.fuel = Some(*f.get_ref());
        }
        if let Some(o) = &rp.on_fault {
            match o.get_ref().as_str() {
                "deny" => cfg.on_fault = OnFault::Deny,
                "allow" => cfg.on_fault = OnFault::Allow,
                other => c.at(
                    o.span(),
                    key("on_fault"),
                    format!("`{other}` is not one of \"deny\" (default), \"allow\""),
                ),
            }
        }
        for (j, g) in rp.grants.iter().enumerate() {
            match HostGrant::parse(g.get_ref()) {
                Some(h) => cfg.grants.push(h),
                None => c.at(
                    g.span(),
                    format!("policies[{i}].grants[{j}]"),
                    format!(
                        "`{}` cannot be granted; grantable: \"clock\" (the host's clocks), \"random\" (the host's randomness); files, environment and network are never granted",
                        g.get_ref()
                    ),
                ),
            }
        }
        if let Some(n) = &rp.instances {
            match *n.get_ref() {
                1..=64 => cfg.instances = *n.get_ref(),
                _ => c.at(n.span(), key("instances"), "must be between 1 and 64"),
            }
        }
        if let Some(n) = &rp.broken_after {
            match *n.get_ref() {
                0 => c.at(n.span(), key("broken_after"), "must be at least 1"),
                v => cfg.broken_after = v,
            }
        }
        cfg.backoff_min = c.duration(&rp.backoff_min, &key("backoff_min"), cfg.backoff_min);
        cfg.backoff_max = c.duration(&rp.backoff_max, &key("backoff_max"), cfg.backoff_max);
        if cfg.backoff_min.is_zero() || cfg.backoff_max < cfg.backoff_min {
            let span = rp.backoff_max.as_ref().map_or(rp.name.span(), |v| v.span());
            c.at(
                span,
                key("backoff_max"),
                "backoff_min must be above zero and backoff_max at least backoff_min",
            );
        }
        out.push(PolicyEntry { config: cfg, hooks });
    }
    out
}

/// `[tls]`: files resolved against `base`, loaded once so that a wrong path, a key
/// that does not match its certificate or a non-PEM file is a config problem.
fn tls_section(c: &mut Checks, t: &Spanned<RawTls>, base: &Path) -> Option<TlsSettings> {
    let raw = t.get_ref();
    let identity_from = match raw
        .identity_from
        .as_ref()
        .map(|v| (v, v.get_ref().as_str()))
    {
        None | Some((_, "san")) => bsfg_tls::IdentityFrom::San,
        Some((_, "cn")) => bsfg_tls::IdentityFrom::Cn,
        Some((v, other)) => {
            c.at(
                v.span(),
                "tls.identity_from",
                format!("`{other}` is not one of san, cn"),
            );
            bsfg_tls::IdentityFrom::San
        }
    };
    let reload_interval = c.duration(
        &raw.reload_interval,
        "tls.reload_interval",
        Duration::from_secs(10),
    );
    if reload_interval < Duration::from_secs(1) {
        let span = raw.reload_interval.as_ref().map_or(t.span(), |v| v.span());
        c.at(span, "tls.reload_interval", "must be at least 1s");
    }
    if raw.trust.is_empty() {
        c.at(
            t.span(),
            "tls.trust",
            "name at least one CA, e.g. trust = { plant = \"certs/plant/ca.pem\" }",
        );
    }
    let mut trust = Vec::new();
    for (name, p) in &raw.trust {
        c.name(
            &Spanned::new(p.span(), name.clone()),
            &format!("tls.trust.{name}"),
            names::validate_zone,
        );
        trust.push(bsfg_tls::Anchor {
            name: name.clone(),
            path: base.join(p.get_ref()),
        });
    }
    let files = bsfg_tls::TlsFiles {
        cert: base.join(raw.cert.get_ref()),
        key: base.join(raw.key.get_ref()),
        trust,
        identity_from,
    };
    if !raw.trust.is_empty()
        && let Err(e) = bsfg_tls::check(&files)
    {
        let (span, key) = match &e {
            bsfg_tls::TlsError::Read { path, .. } | bsfg_tls::TlsError::Material { path, .. } => {
                if *path == files.key {
                    (raw.key.span(), "tls.key".to_owned())
                } else if let Some((n, p)) = raw
                    .trust
                    .iter()
                    .find(|(_, p)| base.join(p.get_ref()) == *path)
                {
                    (p.span(), format!("tls.trust.{n}"))
                } else {
                    (raw.cert.span(), "tls.cert".to_owned())
                }
            }
            _ => (raw.key.span(), "tls.key".to_owned()),
        };
        c.at(span, key, e.to_string());
        return None;
    }
    Some(TlsSettings {
        files,
        reload_interval,
    })
}

/// `[[peers]]`: one grant per identity, bound to a trust anchor.
fn peers(
    c: &mut Checks,
    raw: &[RawPeer],
    anchors: Option<&HashSet<String>>,
    consumers: &HashSet<String>,
) -> Vec<bsfg_core::Grant> {
    let mut seen = HashSet::new();
    let mut grants = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let key = |k: &str| format!("peers[{i}].{k}");
        let identity = p.identity.get_ref();
        if identity.is_empty() || identity.chars().any(|ch| ch.is_control() || ch == ' ') {
            c.at(
                p.identity.span(),
                key("identity"),
                "must be the certificate's identity, e.g. idmz-bsfg (no spaces)",
            );
        }
        if !seen.insert(identity.clone()) {
            c.at(
                p.identity.span(),
                key("identity"),
                format!("`{identity}` has a grant already; merge the two"),
            );
        }
        match anchors {
            None => c.at(
                p.ca.span(),
                key("ca"),
                "peers are authenticated by certificate: the zone needs a [tls] section",
            ),
            Some(a) if !a.contains(p.ca.get_ref()) => c.at(
                p.ca.span(),
                key("ca"),
                format!("`{}` is not an anchor in [tls.trust]", p.ca.get_ref()),
            ),
            Some(_) => {}
        }
        let mut list = |values: &[Spanned<String>],
                        k: &str,
                        check: fn(&str, &str) -> Result<(), bsfg_core::BoundaryError>|
         -> Vec<String> {
            values
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    if v.get_ref() != "*" {
                        c.name(v, &format!("peers[{i}].{k}[{j}]"), check);
                    }
                    v.get_ref().clone()
                })
                .collect()
        };
        let claim_from_zones = list(
            &p.claim_from_zones,
            "claim_from_zones",
            names::validate_zone,
        );
        let to_zones = list(&p.to_zones, "to_zones", names::validate_zone);
        let granted = list(&p.consumers, "consumers", names::validate_consumer);
        let put_buckets = list(&p.put_buckets, "put_buckets", names::validate_bucket);
        let read_buckets = list(&p.read_buckets, "read_buckets", names::validate_bucket);
        for (j, v) in p.consumers.iter().enumerate() {
            if v.get_ref() != "*" && !consumers.contains(v.get_ref()) {
                c.at(
                    v.span(),
                    format!("peers[{i}].consumers[{j}]"),
                    format!("`{}` is not declared in [[consumers]]", v.get_ref()),
                );
            }
        }
        grants.push(bsfg_core::Grant {
            identity: identity.clone(),
            ca: p.ca.get_ref().clone(),
            claim_from_zones,
            to_zones,
            consumers: granted,
            put_buckets,
            read_buckets,
        });
    }
    grants
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[zone]
name = "plant-a"

[sink]
type = "jetstream"
url = "nats://127.0.0.1:4222"

[[consumers]]
name = "to-enterprise"
class = "operational"

[[listeners]]
url = "grpc://127.0.0.1:7443"
insecure = true
"#;

    fn problems(src: &str) -> Vec<Problem> {
        parse(&crate::registry::builtin(), Path::new("zone.toml"), src)
            .expect_err("must be refused")
            .0
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn environment_references_in_string_values_expand_with_their_defaults() {
        let src = GOOD
            .replace("name = \"plant-a\"", "name = \"${ZONE}\"")
            .replace(
                "nats://127.0.0.1:4222",
                "${NATS_URL:-nats://127.0.0.1:4222}",
            )
            .replace(
                "grpc://127.0.0.1:7443",
                "grpc://${LISTEN_HOST}:${LISTEN_PORT:-7443}",
            )
            + "# a comment may say ${ANYTHING}\n";
        let env = env_of(&[("ZONE", "plant-b"), ("LISTEN_HOST", "127.0.0.2")]);
        let cfg = parse_with_env(
            &crate::registry::builtin(),
            Path::new("zone.toml"),
            &src,
            &env,
        )
        .expect("expands");
        assert_eq!(cfg.zone, "plant-b");
        assert_eq!(cfg.listeners[0].url, "grpc://127.0.0.2:7443");
    }

    #[test]
    fn an_unset_variable_is_a_problem_at_its_file_line_and_key() {
        let src = GOOD
            .replace("name = \"plant-a\"", "name = \"${ZONE}\"")
            .replace("grpc://127.0.0.1:7443", "grpc://${LISTEN_HOST}:7443");
        let env = env_of(&[]);
        let problems = parse_with_env(
            &crate::registry::builtin(),
            Path::new("zone.toml"),
            &src,
            &env,
        )
        .expect_err("unset variables are refused")
        .0;
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{shown:?}");
        assert_eq!(
            (problems[0].line, problems[0].key.as_str()),
            (3, "zone.name")
        );
        assert!(shown[0].starts_with("zone.toml:3:"), "{shown:?}");
        assert!(shown[0].contains("ZONE is not set"), "{shown:?}");
        assert_eq!(problems[1].key, "listeners[0].url");
        assert!(shown[1].contains("LISTEN_HOST"), "{shown:?}");
    }

    /// Every section, for the fuzzer to start from.
    const FULL: &str = r#"
[zone]
name = "idmz"

[limits]
max_fact_bytes = 65536

[sink]
type = "jetstream"
url = "nats://127.0.0.1:4222"
domain = "idmz"
classes = [{ name = "operational", max_age = "30d" }]

[[consumers]]
name = "to-enterprise"
class = "operational"
ack_wait = "5s"

[[listeners]]
url = "grpcs://0.0.0.0:7453"
idle_timeout = "30s"

[[listeners]]
url = "grpc://127.0.0.1:7454"
insecure = true

[[listeners]]
url = "quic://0.0.0.0:7453"
quic = { congestion = "bbr", stream_window = 4194304, keep_alive = "2s" }

[[links]]
name = "from-plant"
source = "grpcs://10.0.0.5:7443"
ca = "plant"
consumer = "to-idmz"
classes = ["operational"]
wait = "5s"

[[links]]
name = "from-plant-radio"
source = "quic://10.0.0.6:7443"
ca = "plant"
server_name = "plant-bsfg"
consumer = "to-idmz"
quic = { congestion = "bbr", idle_timeout = "20s", initial_mtu = 1280 }

[tls]
cert = "certs/idmz/idmz-bsfg.pem"
key = "certs/idmz/idmz-bsfg.key"
trust = { plant = "certs/plant/ca.pem", idmz = "certs/idmz/ca.pem" }

[[peers]]
identity = "enterprise-bsfg"
ca = "idmz"
claim_from_zones = ["enterprise"]
to_zones = ["*"]
consumers = ["to-enterprise"]
put_buckets = ["batch-files"]

[admin]
listen = "127.0.0.1:9465"
"#;

    #[test]
    fn fuzz_config_parsing_never_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("zone.toml");
        bsfg_testkit::fuzz::run("config", |u| {
            let seed = if u.arbitrary()? { FULL } else { GOOD };
            let bytes = bsfg_testkit::fuzz::mutate(u, seed.as_bytes())?;
            let _ = parse(
                &crate::registry::builtin(),
                &path,
                &String::from_utf8_lossy(&bytes),
            );
            Ok(())
        });
    }

    /// A CA and a gateway certificate in `dir/<zone>/`, made by `bsfg certs`.
    fn zone_pki(dir: &Path, zone: &str, name: &str) {
        let d = dir.join("certs").join(zone);
        crate::certs::init(&crate::certs::Init {
            zone: zone.into(),
            dir: d.clone(),
            valid_for: Duration::from_secs(86_400),
            force: false,
        })
        .expect("ca");
        crate::certs::issue(&crate::certs::Issue {
            dir: d,
            name: name.into(),
            server: true,
            client: true,
            dns: vec![],
            ip: vec![],
            valid_for: Duration::from_secs(86_400),
            force: false,
        })
        .expect("leaf");
    }

    #[test]
    fn tls_listeners_links_and_peers_resolve_against_the_config_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        zone_pki(dir.path(), "idmz", "idmz-bsfg");
        zone_pki(dir.path(), "plant", "plant-bsfg");
        let full = FULL.replace("to-idmz", "to-enterprise");
        let c = parse(
            &crate::registry::builtin(),
            &dir.path().join("zone.toml"),
            &full,
        )
        .expect("valid");
        let tls = c.tls.expect("tls");
        assert_eq!(tls.files.cert, dir.path().join("certs/idmz/idmz-bsfg.pem"));
        assert_eq!(tls.files.trust.len(), 2);
        assert!(
            is_tls(&c.listeners[0].scheme.security) && !is_tls(&c.listeners[1].scheme.security)
        );
        assert_eq!(c.links[0].tls.as_ref().expect("link tls").ca, "plant");
        assert_eq!(tls.trusting_only("plant").trust.len(), 1);
        assert_eq!(c.grants[0].identity, "enterprise-bsfg");
        assert_eq!(c.grants[0].to_zones, vec!["*".to_owned()]);
        // gRPC and QUIC side by side: one zone listens on both, pulls over both.
        let q = &c.listeners[2];
        assert!(is_tls(&q.scheme.security) && q.scheme.name == "quic");
        assert_eq!(
            (q.listen.socket(), c.listeners[0].listen.socket()),
            ("udp 0.0.0.0:7453".to_owned(), "tcp 0.0.0.0:7453".to_owned()),
            "a TCP and a UDP port may share a number"
        );
        // The transport read its own keys (`quic = {...}`) and the serving limits.
        let q = format!("{:?}", q.listen);
        for expected in [
            "congestion: Bbr",
            "stream_window: 4194304",
            "keep_alive: 2s",
            "idle_timeout: 30s",
        ] {
            assert!(q.contains(expected), "{expected} in {q}");
        }
        let l = &c.links[1];
        assert_eq!(l.scheme.name, "quic");
        assert_eq!(
            l.tls.as_ref().and_then(|t| t.server_name.as_deref()),
            Some("plant-bsfg")
        );
        let d = format!("{:?}", l.dial);
        for expected in [
            "initial_mtu: 1280",
            "idle_timeout: 20s",
            "request_timeout: 10s",
        ] {
            assert!(d.contains(expected), "{expected} in {d}");
        }
    }

    #[test]
    fn broken_tls_and_peer_entries_name_their_line_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        zone_pki(dir.path(), "idmz", "idmz-bsfg");
        zone_pki(dir.path(), "plant", "plant-bsfg");
        let at = |src: String| -> Vec<String> {
            parse(
                &crate::registry::builtin(),
                &dir.path().join("zone.toml"),
                &src,
            )
            .expect_err("must be refused")
            .0
            .iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect()
        };
        let full = FULL.replace("to-idmz", "to-enterprise");
        let cases: Vec<(String, &str)> = vec![
            (full.replace("idmz-bsfg.key", "missing.key"), "tls.key: "),
            (
                full.replace("certs/idmz/idmz-bsfg.key", "certs/plant/plant-bsfg.key"),
                "tls.key: TLS configuration",
            ),
            (
                full.replace("ca = \"idmz\"", "ca = \"corp\""),
                "peers[0].ca: `corp` is not an anchor",
            ),
            (
                full.replace("ca = \"plant\"", "ca = \"corp\""),
                "links[0].ca: `corp` is not an anchor",
            ),
            (
                full.replace(
                    "consumers = [\"to-enterprise\"]\nput",
                    "consumers = [\"nobody\"]\nput",
                ),
                "peers[0].consumers[0]: `nobody` is not declared",
            ),
            (
                full.replace(
                    "claim_from_zones = [\"enterprise\"]",
                    "claim_from_zones = [\"bad zone\"]",
                ),
                "peers[0].claim_from_zones[0]",
            ),
            (
                full.replace(
                    "url = \"grpcs://0.0.0.0:7453\"",
                    "url = \"grpcs://0.0.0.0:7453\"\ninsecure = true",
                ),
                "listeners[0].insecure: a grpcs:// listener is mutual TLS",
            ),
            (
                GOOD.replace("grpc://127.0.0.1:7443", "grpcs://127.0.0.1:7443"),
                "a grpcs:// listener needs the zone's [tls] section",
            ),
            (
                full.replacen("\nca = \"plant\"", "", 1),
                "links[0].ca: a grpcs:// link needs `ca`",
            ),
            (
                GOOD.replace("grpc://127.0.0.1:7443", "quic://127.0.0.1:7443"),
                "a quic:// listener needs the zone's [tls] section",
            ),
            (
                full.replace("\"bbr\", stream", "\"vegas\", stream"),
                "listeners[2].quic.congestion: `vegas` is not a congestion controller",
            ),
            (
                full.replace("initial_mtu = 1280", "initial_mtu = 1000"),
                "links[1].quic.initial_mtu: must be at least 1200",
            ),
            (
                full.replace("keep_alive = \"2s\"", "keep_alive = \"1m\""),
                "listeners[2].quic.keep_alive: must be above zero and shorter than idle_timeout",
            ),
            (
                full.replace(
                    "idle_timeout = \"30s\"",
                    "idle_timeout = \"30s\"\nquic = { congestion = \"bbr\" }",
                ),
                "listeners[0].quic: unknown field `quic`",
            ),
            (
                full.replace(
                    "\"quic://10.0.0.6:7443\"\nca = \"plant\"",
                    "\"quic://10.0.0.6:7443\"",
                ),
                "links[1].ca: a quic:// link needs `ca`",
            ),
        ];
        for (src, expected) in cases {
            let got = at(src);
            assert!(
                got.iter().any(|g| g.contains(expected)),
                "expected `{expected}` in {got:#?}"
            );
        }
    }

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let c = parse(&crate::registry::builtin(), Path::new("zone.toml"), GOOD).expect("valid");
        assert_eq!(c.zone, "plant-a");
        assert_eq!(c.sink_type, "jetstream");
        assert_eq!(c.sink.classes().len(), 3);
        let sink = format!("{:?}", c.sink);
        for expected in ["default_class: \"operational\"", "ack_wait: 30s"] {
            assert!(sink.contains(expected), "{expected} in {sink}");
        }
        assert_eq!(c.listeners[0].listen.socket(), "tcp 127.0.0.1:7443");
        assert_eq!(c.limits, Limits::default());
    }

    /// Each broken config: what to change, then the line, key and words expected.
    #[test]
    fn each_broken_config_names_file_line_and_key() {
        let cases: &[(&str, &str, usize, &str, &str)] = &[
            // (find, replace, line, key, words in message)
            (
                "name = \"plant-a\"",
                "name = \"plant a\"",
                3,
                "zone.name",
                "letters, digits",
            ),
            (
                "type = \"jetstream\"",
                "type = \"kafka\"",
                6,
                "sink.type",
                "unknown sink type `kafka`; registered: jetstream",
            ),
            (
                "url = \"nats://127.0.0.1:4222\"",
                "url = \"http://127.0.0.1:4222\"",
                7,
                "sink.url",
                "nats://",
            ),
            (
                "url = \"nats://127.0.0.1:4222\"",
                "url = \"nats://127.0.0.1:4222\"\nmax_batch = 5000",
                8,
                "sink.max_batch",
                "between 1 and 1000",
            ),
            (
                "url = \"nats://127.0.0.1:4222\"",
                "url = \"nats://127.0.0.1:4222\"\nduplicate_window = \"2 fortnights\"",
                8,
                "sink.duplicate_window",
                "not a duration",
            ),
            (
                "url = \"nats://127.0.0.1:4222\"",
                "url = \"nats://127.0.0.1:4222\"\nmax_batchez = 5",
                8,
                "sink.max_batchez",
                "unknown field `max_batchez`",
            ),
            (
                "class = \"operational\"",
                "class = \"secret\"",
                11,
                "consumers[0].class",
                "not one of the classes",
            ),
            (
                "url = \"grpc://127.0.0.1:7443\"",
                "url = \"http3://127.0.0.1:7443\"",
                14,
                "listeners[0].url",
                "no transport for scheme `http3`; registered: grpc, grpcs, quic, unix",
            ),
            (
                "url = \"grpc://127.0.0.1:7443\"",
                "url = \"grpc://gateway.local\"",
                14,
                "listeners[0].url",
                "not an IP address and port",
            ),
            (
                "url = \"grpc://127.0.0.1:7443\"",
                "url = \"grpc://0.0.0.0:7443\"",
                14,
                "listeners[0].url",
                "only on loopback",
            ),
            (
                "insecure = true",
                "insecure = false",
                15,
                "listeners[0].insecure",
                "grpc:// is plaintext: use grpcs://",
            ),
            (
                "insecure = true",
                "insecure = true\nmax_message_bytes = 1024",
                16,
                "listeners[0].max_message_bytes",
                "at least twice",
            ),
            (
                "insecure = true",
                "insecure = \"yes\"",
                15,
                "listeners[0]",
                "invalid type",
            ),
            (
                "name = \"to-enterprise\"",
                "name = \"to.enterprise\"",
                10,
                "consumers[0].name",
                "consumer name",
            ),
            ("[zone]", "[zone\n", 2, "", "unclosed table"),
            (
                "url = \"nats://127.0.0.1:4222\"",
                "url = \"nats://127.0.0.1:4222\"\n[[sink.classes]]\nname = \"operational\"\nmax_age = \"30s\"",
                10,
                "sink.classes[0].max_age",
                "at least sink.duplicate_window",
            ),
        ];
        for (find, replace, line, key, words) in cases {
            assert!(GOOD.contains(find), "fixture lacks {find}");
            let src = GOOD.replacen(find, replace, 1);
            let p = problems(&src);
            let hit = p
                .iter()
                .find(|p| p.key == *key && p.message.contains(words));
            let Some(hit) = hit else {
                panic!("{replace:?}: expected {key} with {words:?}, got {p:?}");
            };
            assert_eq!(hit.line, *line, "{replace:?}: {hit}");
            assert!(
                hit.to_string().starts_with(&format!("zone.toml:{line}:")),
                "{hit}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let src = GOOD
            .replacen("class = \"operational\"", "class = \"secret\"", 1)
            .replacen("insecure = true", "insecure = false", 1);
        let p = problems(&src);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].line < p[1].line);
    }

    #[test]
    fn two_listeners_on_one_address_are_refused() {
        let src =
            format!("{GOOD}\n[[listeners]]\nurl = \"grpc://127.0.0.1:7443\"\ninsecure = true\n");
        let p = problems(&src);
        assert!(
            p.iter()
                .any(|p| p.key == "listeners[1].url" && p.message.contains("another listener")),
            "{p:?}"
        );
    }

    #[test]
    fn a_unix_socket_listener_is_granted_by_uid_without_tls_and_refuses_insecure() {
        const UNIX: &str = "\n[[listeners]]\nurl = \"unix:///run/bsfg/plant.sock\"\nmode = \"0600\"\n\n[[peers]]\nidentity = \"uid:1000\"\nca = \"unix\"\nconsumers = [\"to-enterprise\"]\n";
        let c = parse(
            &crate::registry::builtin(),
            Path::new("zone.toml"),
            &format!("{GOOD}{UNIX}"),
        )
        .expect("a uid grant needs no [tls]");
        assert_eq!(c.listeners[1].listen.socket(), "unix /run/bsfg/plant.sock");
        assert_eq!(
            (c.grants[0].identity.as_str(), c.grants[0].ca.as_str()),
            ("uid:1000", "unix")
        );
        let at = |src: String| -> Vec<String> {
            problems(&src)
                .iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect()
        };
        let p = at(format!(
            "{GOOD}{}",
            UNIX.replace("mode = \"0600\"", "insecure = true")
        ));
        assert!(
            p.iter()
                .any(|p| p.starts_with("listeners[1].insecure: a unix:// listener authenticates")),
            "{p:?}"
        );
        let p = at(format!("{GOOD}{}", UNIX.replace("0600", "0066")));
        assert!(
            p.iter().any(|p| p.starts_with("listeners[1].mode:")),
            "{p:?}"
        );
        let p = at(format!(
            "{GOOD}{}",
            UNIX.replace("unix:///run", "unix://run")
        ));
        assert!(
            p.iter().any(|p| p.contains("not an absolute socket path")),
            "{p:?}"
        );
        // Without a unix listener (or [tls]) nothing can authenticate the grant.
        let p = at(format!(
            "{GOOD}{}",
            UNIX.replace(
                "url = \"unix:///run/bsfg/plant.sock\"\nmode = \"0600\"",
                "url = \"grpc://127.0.0.1:7444\"\ninsecure = true"
            )
        ));
        assert!(p.iter().any(|p| p.starts_with("peers[0].ca:")), "{p:?}");
        // A link over a socket names its source zone; it needs no `ca`.
        let link = "\n[[links]]\nname = \"from-idmz\"\nsource = \"unix:///run/bsfg/idmz.sock\"\nconsumer = \"to-plant-a\"\n";
        let p = at(format!("{GOOD}{link}"));
        assert!(
            p.iter()
                .any(|p| p
                    .starts_with("links[0].source_zone: a unix:// link must name its source zone")),
            "{p:?}"
        );
        let c = parse(
            &crate::registry::builtin(),
            Path::new("zone.toml"),
            &format!("{GOOD}{link}source_zone = \"idmz\"\n"),
        )
        .expect("valid");
        assert_eq!(
            (c.links[0].scheme.name, c.links[0].tls.is_none()),
            ("unix", true)
        );
    }

    const LINK: &str = r#"
[[links]]
name = "from-idmz"
source = "grpc://10.0.0.5:7453"
source_zone = "idmz"
insecure = true
consumer = "to-plant-a"
"#;

    #[test]
    fn the_source_zone_comes_from_config_the_link_ca_or_is_required_for_plaintext() {
        let plain = LINK.replace("source_zone = \"idmz\"\n", "");
        let p = problems(&format!("{GOOD}{plain}"));
        assert!(
            p.iter().any(|p| p.key == "links[0].source_zone"
                && p.message
                    .contains("plaintext link must name its source zone")),
            "{p:?}"
        );
        // A TLS link takes it from its `ca` anchor (FULL's files do not exist here,
        // so only the certificate problems remain).
        let p = problems(FULL);
        assert!(p.iter().all(|p| p.key.starts_with("tls.")), "{p:?}");
        let c = parse(
            &crate::registry::builtin(),
            Path::new("zone.toml"),
            &format!("{GOOD}{LINK}"),
        )
        .expect("valid");
        assert_eq!(c.links[0].settings.source_zone, "idmz");
        let bad = LINK.replace("source_zone = \"idmz\"", "source_zone = \"id mz\"");
        assert!(
            problems(&format!("{GOOD}{bad}"))
                .iter()
                .any(|p| p.key == "links[0].source_zone"),
        );
    }

    #[test]
    fn a_link_gets_the_documented_defaults_and_admin_its_address() {
        let src = format!("{GOOD}{LINK}\n[admin]\nlisten = \"127.0.0.1:9464\"\n");
        let c = parse(&crate::registry::builtin(), Path::new("zone.toml"), &src).expect("valid");
        let l = &c.links[0];
        assert_eq!(
            (l.scheme.name, l.source.as_str()),
            ("grpc", "grpc://10.0.0.5:7453")
        );
        let s = &l.settings;
        assert_eq!(
            (s.name.as_str(), s.consumer.as_str(), s.local_zone.as_str()),
            ("from-idmz", "to-plant-a", "plant-a")
        );
        assert_eq!((s.page_size, s.wait), (500, Duration::from_secs(5)));
        assert_eq!(s.pages_in_flight, bsfg_core::link::PAGES_IN_FLIGHT);
        assert_eq!(
            (s.backoff_min, s.backoff_max),
            (Duration::from_millis(200), Duration::from_secs(30))
        );
        assert!(s.streams.is_empty());
        let admin = c.admin.as_ref().expect("admin");
        assert_eq!(admin.listen, "127.0.0.1:9464".parse().expect("addr"));
        assert_eq!((admin.token.as_ref(), admin.metrics_listen), (None, None));
        // `[[link]]` is accepted as well.
        let singular = src.replace("[[links]]", "[[link]]");
        assert_eq!(
            parse(
                &crate::registry::builtin(),
                Path::new("zone.toml"),
                &singular
            )
            .expect("valid")
            .links
            .len(),
            1
        );
    }

    #[test]
    fn each_broken_link_or_admin_entry_names_its_line_and_key() {
        let base = format!("{GOOD}{LINK}");
        let line_of = |needle: &str, src: &str| {
            src.lines()
                .position(|l| l.contains(needle))
                .expect("needle")
                + 1
        };
        let cases: &[(&str, &str, &str, &str)] = &[
            // (find, replace, key, words in message)
            (
                "source = \"grpc://10.0.0.5:7453\"",
                "source = \"grpc://10.0.0.5\"",
                "links[0].source",
                "not a host and port",
            ),
            (
                "source = \"grpc://10.0.0.5:7453\"",
                "source = \"10.0.0.5:7453\"",
                "links[0].source",
                "not a URL",
            ),
            (
                "source = \"grpc://10.0.0.5:7453\"",
                "source = \"mqtt://10.0.0.5:1883\"",
                "links[0].source",
                "no transport for scheme `mqtt`",
            ),
            (
                "insecure = true\nconsumer",
                "insecure = false\nconsumer",
                "links[0].insecure",
                "grpc:// is plaintext: use grpcs://",
            ),
            (
                "consumer = \"to-plant-a\"",
                "consumer = \"to plant\"",
                "links[0].consumer",
                "letters, digits",
            ),
            (
                "consumer = \"to-plant-a\"",
                "consumer = \"to-plant-a\"\npage_size = 50000",
                "links[0].page_size",
                "between 1 and",
            ),
            (
                "consumer = \"to-plant-a\"",
                "consumer = \"to-plant-a\"\npages_in_flight = 0",
                "links[0].pages_in_flight",
                "between 1 and 64",
            ),
            (
                "consumer = \"to-plant-a\"",
                "consumer = \"to-plant-a\"\nbackoff_min = \"5s\"\nbackoff_max = \"1s\"",
                "links[0].backoff_max",
                "at least backoff_min",
            ),
            (
                "consumer = \"to-plant-a\"",
                "consumer = \"to-plant-a\"\nwait = \"0s\"",
                "links[0].wait",
                "at least 10ms",
            ),
            (
                "consumer = \"to-plant-a\"",
                "consumer = \"to-plant-a\"\nclasses = [\"Ops!\"]",
                "links[0].classes[0]",
                "stream class must be",
            ),
            (
                "consumer = \"to-plant-a\"",
                "consumer = \"to-plant-a\"\n[admin]\nlisten = \"0.0.0.0:9464\"",
                "admin.listen",
                "loopback only",
            ),
            (
                "consumer = \"to-plant-a\"",
                "consumer = \"to-plant-a\"\n[admin]\nlisten = \"127.0.0.1:7443\"",
                "admin.listen",
                "used by a listener",
            ),
        ];
        for (find, replace, key, words) in cases {
            assert!(base.contains(find), "{find}");
            let src = base.replacen(find, replace, 1);
            let ps = problems(&src);
            let p = ps
                .iter()
                .find(|p| p.key == *key)
                .unwrap_or_else(|| panic!("{key}: {ps:?}"));
            assert!(p.message.contains(words), "{key}: {}", p.message);
            // The problem points at the replaced line that holds the key.
            let field = key.rsplit('.').next().unwrap_or_default();
            let field = field.split('[').next().unwrap_or_default();
            let needle = replace
                .lines()
                .find(|l| l.trim_start().starts_with(field))
                .unwrap_or_default();
            let expected = line_of(needle, &src);
            assert_eq!(p.line, expected, "{key}: {p}");
        }
        // A link name used twice.
        let twice = format!("{base}{LINK}");
        let ps = problems(&twice);
        assert!(
            ps.iter()
                .any(|p| p.key == "links[1].name" && p.message.contains("declared twice")),
            "{ps:?}"
        );
    }

    #[test]
    fn an_admin_token_file_is_read_against_the_config_folder_and_a_metrics_listener_may_bind_any_address()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = "0123456789abcdef0123456789abcdef";
        let file = dir.path().join("admin.token");
        std::fs::write(&file, format!("{token}\n")).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        }
        let src = format!(
            "{GOOD}\n[admin]\nlisten = \"127.0.0.1:9464\"\ntoken_file = \"admin.token\"\nmetrics_listen = \"0.0.0.0:9465\"\n"
        );
        let c = parse(
            &crate::registry::builtin(),
            &dir.path().join("zone.toml"),
            &src,
        )
        .expect("valid");
        let admin = c.admin.expect("admin");
        let t = admin.token.expect("token");
        assert_eq!((t.path.as_path(), t.secret()), (file.as_path(), token));
        assert!(t.matches(token.as_bytes()) && !t.matches(b"0123456789abcdef0123456789abcdeX"));
        assert!(!format!("{t:?}").contains(token), "Debug shows no secret");
        assert_eq!(
            admin.metrics_listen,
            Some("0.0.0.0:9465".parse().expect("addr"))
        );
    }

    #[test]
    fn a_weak_or_exposed_admin_token_file_or_an_overlapping_metrics_listener_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str, mode: u32| {
            let f = dir.path().join(name);
            std::fs::write(&f, text).expect("write");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).expect("chmod");
            }
            #[cfg(not(unix))]
            let _ = mode;
        };
        write("short.token", "tooshort\n", 0o600);
        write("spaced.token", "0123456789abcdef 0123456789abcdef\n", 0o600);
        let mut cases = vec![
            (
                "token_file = \"missing.token\"",
                "admin.token_file",
                "cannot read",
            ),
            (
                "token_file = \"short.token\"",
                "admin.token_file",
                "at least 32",
            ),
            (
                "token_file = \"spaced.token\"",
                "admin.token_file",
                "no spaces",
            ),
            (
                "metrics_listen = \"0.0.0.0:9464\"",
                "admin.metrics_listen",
                "overlaps",
            ),
            (
                "metrics_listen = \"127.0.0.1:7443\"",
                "admin.metrics_listen",
                "used by a listener",
            ),
            (
                "metrics_listen = \"nowhere\"",
                "admin.metrics_listen",
                "not an IP",
            ),
        ];
        if cfg!(unix) {
            write("open.token", "0123456789abcdef0123456789abcdef\n", 0o644);
            cases.push((
                "token_file = \"open.token\"",
                "admin.token_file",
                "chmod 600",
            ));
        }
        for (line, key, words) in cases {
            let src = format!("{GOOD}\n[admin]\nlisten = \"127.0.0.1:9464\"\n{line}\n");
            let ps = parse(
                &crate::registry::builtin(),
                &dir.path().join("zone.toml"),
                &src,
            )
            .expect_err(line)
            .0;
            assert!(
                ps.iter().any(|p| p.key == key && p.message.contains(words)),
                "{line}: {ps:?}"
            );
        }
    }

    #[test]
    fn the_sink_takes_one_kind_of_nats_credentials_from_private_files_and_tls_to_the_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let private = |name: &str, mode: u32| {
            let f = dir.path().join(name);
            std::fs::write(&f, "secret\n").expect("write");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).expect("chmod");
            }
            #[cfg(not(unix))]
            let _ = mode;
        };
        for (name, mode) in [
            ("nats.password", 0o600),
            ("bsfg.nk", 0o400),
            ("bsfg.creds", 0o640),
            ("ca.pem", 0o644),
            ("c.pem", 0o644),
            ("c.key", 0o600),
            ("open.password", 0o604),
        ] {
            private(name, mode);
        }
        let sink = |keys: &str| GOOD.replacen("[sink]\n", &format!("[sink]\n{keys}\n"), 1);
        // Each kind of credential alone, and TLS with a CA and a client certificate.
        for keys in [
            "user = \"bsfg\"\npassword_file = \"nats.password\"",
            "nkey_seed_file = \"bsfg.nk\"",
            "credentials = \"bsfg.creds\"\ntls_ca = \"ca.pem\"\ntls_cert = \"c.pem\"\ntls_key = \"c.key\"",
        ] {
            parse(
                &crate::registry::builtin(),
                &dir.path().join("zone.toml"),
                &sink(keys),
            )
            .unwrap_or_else(|e| panic!("{keys}: {e:?}"));
        }
        let url = sink("").replace("nats://", "tls://");
        parse(
            &crate::registry::builtin(),
            &dir.path().join("zone.toml"),
            &url,
        )
        .expect("tls://");
        for (keys, key, words) in [
            (
                "user = \"bsfg\"\npassword_file = \"nats.password\"\nnkey_seed_file = \"bsfg.nk\"",
                "sink",
                "give one of",
            ),
            (
                "user = \"bsfg\"",
                "sink.password_file",
                "needs `password_file`",
            ),
            (
                "password_file = \"nats.password\"",
                "sink.user",
                "needs `user`",
            ),
            (
                "user = \"bsfg\"\npassword_file = \"open.password\"",
                "sink.password_file",
                "chmod 600",
            ),
            (
                "credentials = \"none.creds\"",
                "sink.credentials",
                "cannot read",
            ),
            ("tls_cert = \"c.pem\"", "sink.tls_cert", "go together"),
        ] {
            let ps = parse(
                &crate::registry::builtin(),
                &dir.path().join("zone.toml"),
                &sink(keys),
            )
            .expect_err(keys)
            .0;
            assert!(
                ps.iter().any(|p| p.key == key && p.message.contains(words)),
                "{keys}: {ps:?}"
            );
        }
    }

    #[test]
    fn a_policy_entry_resolves_its_module_against_the_config_folder_with_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("p.wasm"), b"x").expect("write");
        let src = format!(
            "{GOOD}\n[[policies]]\nname = \"labels\"\nmodule = \"p.wasm\"\nhooks = [\"append\", \"intake\"]\nsettings = {{ label = \"site\" }}\n"
        );
        let c = parse(
            &crate::registry::builtin(),
            &dir.path().join("zone.toml"),
            &src,
        )
        .expect("valid");
        let p = &c.policies[0];
        assert_eq!(p.config.module, dir.path().join("p.wasm"));
        assert_eq!(p.hooks, [bsfg_core::Hook::Append, bsfg_core::Hook::Intake]);
        assert_eq!(
            p.config.settings.get("label").map(String::as_str),
            Some("site")
        );
        assert_eq!(p.config.memory_bytes, 16 << 20);
        assert_eq!(p.config.timeout, Duration::from_millis(100));
        assert_eq!(p.config.on_fault, bsfg_policy_wasm::OnFault::Deny);
        assert!(p.config.grants.is_empty());
    }

    #[test]
    fn each_broken_policy_entry_names_its_key_and_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("p.wasm"), b"x").expect("write");
        let entry =
            "\n[[policies]]\nname = \"labels\"\nmodule = \"p.wasm\"\nhooks = [\"append\"]\n";
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "module = \"p.wasm\"",
                "module = \"none.wasm\"",
                "policies[0].module",
                "is not a file",
            ),
            (
                "hooks = [\"append\"]",
                "hooks = [\"egress\"]",
                "policies[0].hooks[0]",
                "is not a hook",
            ),
            (
                "hooks = [\"append\"]",
                "hooks = []",
                "policies[0].hooks",
                "at least one hook",
            ),
            (
                "name = \"labels\"",
                "name = \"a b\"",
                "policies[0].name",
                "letters, digits",
            ),
            (
                "hooks = [\"append\"]",
                "hooks = [\"append\"]\non_fault = \"ignore\"",
                "policies[0].on_fault",
                "not one of",
            ),
            (
                "hooks = [\"append\"]",
                "hooks = [\"append\"]\ngrants = [\"filesystem\"]",
                "policies[0].grants[0]",
                "cannot be granted",
            ),
            (
                "hooks = [\"append\"]",
                "hooks = [\"append\"]\ntimeout = \"0s\"",
                "policies[0].timeout",
                "between 1ms and 60s",
            ),
            (
                "hooks = [\"append\"]",
                "hooks = [\"append\"]\nmemory_mib = 0",
                "policies[0].memory_mib",
                "between 1 and 4096",
            ),
            (
                "hooks = [\"append\"]",
                "hooks = [\"append\"]\nfuel = 0",
                "policies[0].fuel",
                "above zero",
            ),
        ];
        for (find, replace, key, words) in cases {
            let src = format!("{GOOD}{}", entry.replace(find, replace));
            let ps = parse(
                &crate::registry::builtin(),
                &dir.path().join("zone.toml"),
                &src,
            )
            .expect_err("must be refused")
            .0;
            assert!(
                ps.iter()
                    .any(|p| p.key == *key && p.message.contains(words)),
                "{replace}: {ps:?}"
            );
        }
        let twice = format!("{GOOD}{entry}{entry}");
        let ps = parse(
            &crate::registry::builtin(),
            &dir.path().join("zone.toml"),
            &twice,
        )
        .expect_err("must be refused")
        .0;
        assert!(
            ps.iter()
                .any(|p| p.key == "policies[1].name" && p.message.contains("defined twice")),
            "{ps:?}"
        );
    }
}
