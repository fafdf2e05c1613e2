//! The JetStream sink as a registered component (`type = "jetstream"`): its
//! `[sink]` keys and the zone's `[[consumers]]`, checked here beside the code that
//! uses them, and the zone store it opens.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::component::{
    Checks, Gauge, Sink, SinkError as ComponentSinkError, SinkPlan, Spanned, Table, ZoneSettings,
    ZoneStore,
};
use bsfg_core::names;
use bsfg_core::ports::{FactLog, ObjectStore};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::{
    ConsumerConfig, Durability, JetStreamConfig, JetStreamZone, NatsAuth, NatsTls, PublishMode,
    SinkError, StreamClass,
};

/// The `[sink]` table of `type = "jetstream"` (without `type`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJetStream {
    url: Spanned<String>,
    domain: Option<Spanned<String>>,
    monitor_url: Option<Spanned<String>>,
    class_label: Option<String>,
    default_class: Option<Spanned<String>>,
    replicas: Option<Spanned<usize>>,
    duplicate_window: Option<Spanned<String>>,
    index_max_age: Option<Spanned<String>>,
    max_batch: Option<Spanned<usize>>,
    max_inflight_batches: Option<Spanned<usize>>,
    queue_capacity: Option<Spanned<usize>>,
    publish_mode: Option<Spanned<String>>,
    index_path: Option<String>,
    classes: Option<Vec<RawClass>>,
    credentials: Option<Spanned<String>>,
    nkey_seed_file: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    tls_ca: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    lease_ttl: Option<Spanned<String>>,
}

/// Checks that a secret file (credentials, seed, password) can be read and is not
/// readable by every user; returns its path resolved against the config's folder.
fn secret_file(
    c: &mut Checks,
    base: &std::path::Path,
    value: &Spanned<String>,
    key: &str,
) -> std::path::PathBuf {
    let path = base.join(value.get_ref());
    match std::fs::metadata(&path) {
        Err(e) => c.at(
            value.span(),
            key,
            format!("cannot read {}: {e}", path.display()),
        ),
        Ok(m) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = m.permissions().mode();
                if mode & 0o007 != 0 {
                    c.at(
                        value.span(),
                        key,
                        format!(
                            "{} may be read or written by every user (mode {:o}); chmod 600 it",
                            path.display(),
                            mode & 0o777
                        ),
                    );
                }
            }
            #[cfg(not(unix))]
            let _ = m;
        }
    }
    path
}

/// Checks that a certificate file exists; returns its path resolved against the
/// config's folder.
fn plain_file(
    c: &mut Checks,
    base: &std::path::Path,
    value: &Spanned<String>,
    key: &str,
) -> std::path::PathBuf {
    let path = base.join(value.get_ref());
    if let Err(e) = std::fs::metadata(&path) {
        c.at(
            value.span(),
            key,
            format!("cannot read {}: {e}", path.display()),
        );
    }
    path
}

/// `[sink]` credentials and TLS to the nats-server.
fn connection(
    c: &mut Checks,
    base: &std::path::Path,
    js: &RawJetStream,
    sink: &mut JetStreamConfig,
) {
    let methods: Vec<&Spanned<String>> = [&js.credentials, &js.nkey_seed_file, &js.user]
        .into_iter()
        .flatten()
        .collect();
    if let Some(second) = methods.get(1) {
        c.at(
            second.span(),
            "sink",
            "give one of credentials, nkey_seed_file, user (with password_file)",
        );
    }
    sink.auth = if let Some(f) = &js.credentials {
        NatsAuth::Credentials(secret_file(c, base, f, "sink.credentials"))
    } else if let Some(f) = &js.nkey_seed_file {
        NatsAuth::NkeySeedFile(secret_file(c, base, f, "sink.nkey_seed_file"))
    } else if let Some(u) = &js.user {
        match &js.password_file {
            Some(f) => NatsAuth::UserPassword {
                user: u.get_ref().clone(),
                password_file: secret_file(c, base, f, "sink.password_file"),
            },
            None => {
                c.at(
                    u.span(),
                    "sink.password_file",
                    "`user` needs `password_file` (a file holding the password)",
                );
                NatsAuth::None
            }
        }
    } else {
        NatsAuth::None
    };
    if let (Some(f), None) = (&js.password_file, &js.user) {
        c.at(f.span(), "sink.user", "`password_file` needs `user`");
    }
    let client = match (&js.tls_cert, &js.tls_key) {
        (Some(cert), Some(key)) => Some((
            plain_file(c, base, cert, "sink.tls_cert"),
            secret_file(c, base, key, "sink.tls_key"),
        )),
        (Some(one), None) | (None, Some(one)) => {
            c.at(
                one.span(),
                "sink.tls_cert",
                "`tls_cert` and `tls_key` go together",
            );
            None
        }
        (None, None) => None,
    };
    let ca = js
        .tls_ca
        .as_ref()
        .map(|f| plain_file(c, base, f, "sink.tls_ca"));
    if ca.is_some() || client.is_some() || js.url.get_ref().starts_with("tls://") {
        sink.tls = Some(NatsTls { ca, client });
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: Spanned<String>,
    max_age: Spanned<String>,
}

/// One `[[consumers]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    name: Spanned<String>,
    class: Spanned<String>,
    #[serde(default)]
    subject_kinds: Vec<String>,
    ack_wait: Option<Spanned<String>>,
    max_ack_pending: Option<Spanned<i64>>,
}

/// The JetStream zone log: registers `type = "jetstream"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JetStreamSink;

impl Sink for JetStreamSink {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    fn configure(
        &self,
        zone: &ZoneSettings,
        table: Table<'_>,
        consumers: Vec<Table<'_>>,
        c: &mut Checks,
    ) -> Option<Arc<dyn SinkPlan>> {
        let sink_span = table.span();
        let js: RawJetStream = table.read(c)?;
        let mut sink = JetStreamConfig::new(zone.zone.clone(), js.url.get_ref().clone());
        // Connect refuses a server that cannot hold a fact of this size with its headers.
        sink.max_fact_bytes = Some(zone.limits.max_fact_bytes);
        sink.max_id_bytes = zone.limits.max_id_bytes;
        for url in js.url.get_ref().split(',').map(str::trim) {
            let scheme = ["nats://", "tls://"].iter().any(|p| url.starts_with(p));
            if !scheme || url.parse::<async_nats::ServerAddr>().is_err() {
                c.at(
                    js.url.span(),
                    "sink.url",
                    format!("`{url}` is not a nats:// (or tls://) URL of the zone's nats-server (several servers of a cluster: comma-separated)"),
                );
            }
        }
        connection(c, &zone.base_dir, &js, &mut sink);
        if let Some(d) = &js.domain {
            c.name(d, "sink.domain", names::validate_zone);
            sink.domain = Some(d.get_ref().clone());
        }
        if let Some(m) = &js.monitor_url {
            if !m.get_ref().starts_with("http://") {
                c.at(
                    m.span(),
                    "sink.monitor_url",
                    "must be the http:// monitoring URL of the nats-server",
                );
            }
            sink.monitor_url = Some(m.get_ref().clone());
        }
        if let Some(l) = js.class_label {
            sink.class_label = l;
        }
        if let Some(r) = &js.replicas {
            if !(1..=5).contains(r.get_ref()) {
                c.at(r.span(), "sink.replicas", "must be between 1 and 5");
            }
            sink.replicas = *r.get_ref();
        }
        sink.duplicate_window = c.duration(
            &js.duplicate_window,
            "sink.duplicate_window",
            sink.duplicate_window,
        );
        sink.index_max_age =
            c.duration(&js.index_max_age, "sink.index_max_age", sink.index_max_age);
        sink.lease_ttl = c.duration(&js.lease_ttl, "sink.lease_ttl", sink.lease_ttl);
        if let Some(l) = &js.lease_ttl
            && sink.lease_ttl < Duration::from_secs(3)
        {
            c.at(l.span(), "sink.lease_ttl", "must be at least 3s");
        }
        if let Some(b) = &js.max_batch {
            if !(1..=1000).contains(b.get_ref()) {
                c.at(
                    b.span(),
                    "sink.max_batch",
                    "must be between 1 and 1000 (JetStream's atomic batch limit)",
                );
            }
            sink.max_batch = *b.get_ref();
        }
        if js.max_inflight_batches.is_some() {
            sink.max_inflight_batches =
                Some(c.at_least(&js.max_inflight_batches, "sink.max_inflight_batches", 1, 1));
        }
        sink.queue_capacity = c.at_least(
            &js.queue_capacity,
            "sink.queue_capacity",
            1,
            sink.queue_capacity,
        );
        if let Some(m) = &js.publish_mode {
            sink.publish_mode = match m.get_ref().as_str() {
                "auto" => None,
                "atomic_batch" => Some(PublishMode::AtomicBatch),
                "pipelined" => Some(PublishMode::Pipelined),
                other => {
                    c.at(
                        m.span(),
                        "sink.publish_mode",
                        format!("`{other}` is not one of auto, atomic_batch, pipelined"),
                    );
                    None
                }
            };
        }
        let duplicate_window = sink.duplicate_window;
        if let Some(classes) = &js.classes {
            if classes.is_empty() {
                c.at(
                    sink_span.clone(),
                    "sink.classes",
                    "must name at least one stream class",
                );
            }
            let mut seen = HashSet::new();
            sink.classes = classes
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let key = format!("sink.classes[{i}].name");
                    c.name(&k.name, &key, names::validate_class);
                    if !seen.insert(k.name.get_ref().clone()) {
                        c.at(
                            k.name.span(),
                            key,
                            format!("class `{}` is declared twice", k.name.get_ref()),
                        );
                    }
                    let max_age = c.duration(
                        &Some(k.max_age.clone()),
                        &format!("sink.classes[{i}].max_age"),
                        Duration::ZERO,
                    );
                    if !max_age.is_zero() && max_age < duplicate_window {
                        c.at(
                            k.max_age.span(),
                            format!("sink.classes[{i}].max_age"),
                            format!(
                                "must be at least sink.duplicate_window ({}); JetStream refuses shorter",
                                humantime::format_duration(duplicate_window)
                            ),
                        );
                    }
                    StreamClass::new(k.name.get_ref().clone(), max_age)
                })
                .collect();
        }
        let class_names: Vec<String> = sink.classes.iter().map(|k| k.name.clone()).collect();
        if let Some(d) = &js.default_class {
            if !class_names.contains(d.get_ref()) {
                c.at(
                    d.span(),
                    "sink.default_class",
                    format!(
                        "`{}` is not one of the classes {class_names:?}",
                        d.get_ref()
                    ),
                );
            }
            sink.default_class = d.get_ref().clone();
        } else if !class_names.contains(&sink.default_class) {
            c.at(
                sink_span,
                "sink.default_class",
                format!(
                    "must be set: the default `operational` is not one of the classes {class_names:?}"
                ),
            );
        }
        let mut consumer_names = HashSet::new();
        for (i, t) in consumers.into_iter().enumerate() {
            let Some(rc) = t.read::<RawConsumer>(c) else {
                continue;
            };
            let key = format!("consumers[{i}].name");
            c.name(&rc.name, &key, names::validate_consumer);
            if !consumer_names.insert(rc.name.get_ref().clone()) {
                c.at(
                    rc.name.span(),
                    key,
                    format!("consumer `{}` is declared twice", rc.name.get_ref()),
                );
            }
            if !class_names.contains(rc.class.get_ref()) {
                c.at(
                    rc.class.span(),
                    format!("consumers[{i}].class"),
                    format!(
                        "`{}` is not one of the classes {class_names:?}",
                        rc.class.get_ref()
                    ),
                );
            }
            let mut cc = ConsumerConfig::new(rc.name.get_ref().clone(), rc.class.get_ref().clone());
            cc.subject_kinds = rc.subject_kinds.clone();
            cc.ack_wait = c.duration(
                &rc.ack_wait,
                &format!("consumers[{i}].ack_wait"),
                cc.ack_wait,
            );
            if let Some(a) = &rc.ack_wait
                && cc.ack_wait < Duration::from_secs(1)
            {
                c.at(
                    a.span(),
                    format!("consumers[{i}].ack_wait"),
                    "must be at least 1s",
                );
            }
            cc.max_ack_pending = c.at_least(
                &rc.max_ack_pending,
                &format!("consumers[{i}].max_ack_pending"),
                1,
                cc.max_ack_pending,
            );
            sink.consumers.push(cc);
        }
        // The idempotency look-up lives beside the config unless placed elsewhere.
        sink.index_path = Some(
            zone.base_dir.join(
                js.index_path
                    .unwrap_or_else(|| format!("state/{}/index.redb", sink.zone)),
            ),
        );
        Some(Arc::new(JetStreamPlan(sink)))
    }
}

/// A checked `[sink]` of type `jetstream`.
#[derive(Debug, Clone)]
pub struct JetStreamPlan(pub JetStreamConfig);

/// A refusal the configuration or the zone's layout causes (exit 2) or a failure.
fn classify(e: SinkError) -> ComponentSinkError {
    match e {
        e @ (SinkError::Config(_) | SinkError::Conflict { .. } | SinkError::Layout(_)) => {
            ComponentSinkError::Refused(e.to_string())
        }
        other => ComponentSinkError::Failed(other.to_string()),
    }
}

impl SinkPlan for JetStreamPlan {
    fn location(&self) -> String {
        self.0.url.clone()
    }

    fn classes(&self) -> Vec<String> {
        self.0.classes.iter().map(|k| k.name.clone()).collect()
    }

    fn consumers(&self) -> Vec<String> {
        self.0.consumers.iter().map(|k| k.name.clone()).collect()
    }

    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<String, ComponentSinkError>> {
        async move {
            let max_payload = crate::check_server(&self.0, timeout).await.map_err(classify)?;
            Ok(format!(
                "nats-server at {} accepts {max_payload} bytes per message: limits.max_fact_bytes = {} fits",
                self.0.url,
                self.0.max_fact_bytes.unwrap_or_default()
            ))
        }
        .boxed()
    }

    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn ZoneStore>, ComponentSinkError>> {
        async move {
            let zone = JetStreamZone::connect(self.0.clone()).await.map_err(classify)?;
            if zone.durability() == Durability::Lazy {
                tracing::warn!(zone = %self.0.zone, "this zone's confirmations are not durable until nats-server runs with sync_interval: always");
            }
            Ok(Arc::new(Store(Arc::new(zone))) as Arc<dyn ZoneStore>)
        }
        .boxed()
    }

    fn upgrade(&self) -> BoxFuture<'_, Result<String, ComponentSinkError>> {
        async move {
            let m = crate::migrate_index(&self.0).await.map_err(classify)?;
            let zone = &self.0.zone;
            let mut lines = Vec::new();
            if m.removed_legacy {
                lines.push(format!(
                    "zone {zone}: moved {} of {} per-id index entries to the two-stream index ({} unreadable, skipped); stream bsfg_ids removed",
                    m.written, m.read, m.skipped
                ));
            }
            if m.moved_two_stream {
                lines.push(format!(
                    "zone {zone}: copied {} facts with their ids into the one-stream log (bsfg_log); kept {} ids whose facts expired; dropped {} reservations whose facts were never stored (a retry stores them); {} consumers moved at their frontiers; streams bsfg_index and facts_<class> removed; offsets changed: receivers continue after the new frontiers",
                    m.facts, m.kept_without_fact, m.dropped_unstored, m.consumers
                ));
            }
            if lines.is_empty() {
                lines.push(format!(
                    "zone {zone}: already of the one-stream layout (bsfg_log); nothing changed"
                ));
            }
            Ok(lines.join("\n"))
        }
        .boxed()
    }
}

/// An open JetStream zone as the framework's store.
struct Store(Arc<JetStreamZone>);

impl ZoneStore for Store {
    fn fact_log(&self) -> Arc<dyn FactLog> {
        self.0.clone()
    }

    fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.0.clone()
    }

    fn gauges(&self) -> BoxFuture<'_, Result<Vec<Gauge>, ComponentSinkError>> {
        async move {
            let u = self
                .0
                .index_usage()
                .await
                .map_err(|e| ComponentSinkError::Failed(e.to_string()))?;
            let mut g = vec![
                Gauge {
                    name: "bsfg_index_ids",
                    help: "message_ids the zone's idempotency index remembers.",
                    value: u.ids as f64,
                },
                Gauge {
                    name: "bsfg_index_disk_bytes",
                    help: "Bytes the idempotency index stream holds on disk.",
                    value: u.disk_bytes as f64,
                },
                Gauge {
                    name: "bsfg_index_lookup_bytes",
                    help: "Bytes of this gateway's on-disk look-up of the idempotency index.",
                    value: u.lookup_bytes as f64,
                },
                Gauge {
                    name: "bsfg_index_horizon_seconds",
                    help: "How long the index remembers an id (index_max_age); 0 = forever.",
                    value: u.horizon.as_secs_f64(),
                },
            ];
            if let Some(m) = u.server_memory_bytes {
                g.push(Gauge {
                    name: "bsfg_store_server_memory_bytes",
                    help: "Resident memory of the zone's nats-server (its /varz `mem`); the bounded index does not grow it per remembered id.",
                    value: m as f64,
                });
            }
            Ok(g)
        }
        .boxed()
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), ComponentSinkError>> {
        async move {
            self.0
                .ready()
                .await
                .map_err(|e| ComponentSinkError::Failed(e.to_string()))
        }
        .boxed()
    }

    fn leases(&self) -> Option<(Arc<dyn bsfg_core::link::LinkLease>, String)> {
        Some((self.0.leases(), self.0.lease_holder()))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            let _ = self.0.client().flush().await;
        }
        .boxed()
    }
}
