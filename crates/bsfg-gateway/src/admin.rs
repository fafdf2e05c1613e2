//! The admin endpoint (loopback only, no authentication): Prometheus metrics on
//! `/metrics`, link status as JSON on `/status`, and the operator's deliberate gap
//! acceptance on `POST /links/{name}/accept-gap?from=F&to=T&by=WHO`; `/healthz`
//! (200 while the process serves) and `/readyz` (200 when the zone's store answers and
//! the gateway is not stopping, 503 with the reason otherwise).
//!
//! Every request must name this endpoint in its `Host` (its listen address,
//! `localhost`, `127.0.0.1` or `[::1]`, with its port or without) and may carry an
//! `Origin` only of the same host: a web page a local browser opens cannot reach it
//! through a DNS name that resolves to loopback, nor post to it from another site
//! (403 otherwise). Every state-changing call (a POST) must carry the zone's admin
//! token (`Authorization: Bearer`, from `[admin] token_file`): 401 without it, 403
//! with another, 403 when the gateway has none.
//!
//! A second, read-only listener (`[admin] metrics_listen`, any address) serves only
//! `/metrics`, `/healthz` and `/readyz`, for a scraper on another host.
//!
//! Metric names follow the contract (`bsfg_` prefix). Per link (labels `zone`,
//! `link`, `consumer`): `bsfg_replication_lag_seconds`, `bsfg_replication_lag_facts`,
//! `bsfg_frontier_offset`, `bsfg_source_last_offset`, `bsfg_link_state` (1 for the
//! current state), `bsfg_link_last_success_timestamp_seconds`,
//! `bsfg_fetch_requests_total`, `bsfg_fetch_failures_total`,
//! `bsfg_confirm_requests_total`, `bsfg_confirm_failures_total`,
//! `bsfg_append_requests_total`, `bsfg_append_failures_total`,
//! `bsfg_replicated_facts_total`, `bsfg_replayed_facts_total`,
//! `bsfg_gaps_accepted_total`, `bsfg_artifact_transfers_total{outcome}` (copied,
//! present, failed, unavailable), `bsfg_artifact_bytes_total` (received from the
//! source), `bsfg_artifacts_pending`. The zone's own API (label `link=""`):
//! `bsfg_append_requests_total`, `bsfg_append_failures_total`,
//! `bsfg_fetch_requests_total`, `bsfg_confirm_requests_total`, and the
//! `bsfg_append_latency_seconds` histogram; `bsfg_object_requests_total{operation}`
//! and `bsfg_object_failures_total{operation}` (put_object, head_object, get_object).
//! Security (label `zone`):
//! `bsfg_certificate_expiry_timestamp_seconds{endpoint,role,name}`,
//! `bsfg_tls_handshake_failures_total{endpoint,reason}` (`too_many_connections`: a
//! peer identity at its `max_connections_per_peer`),
//! `bsfg_tls_connections_revoked_total{endpoint}`, `bsfg_tls_reloads_total`,
//! `bsfg_tls_reload_failures_total`, `bsfg_authz_denials_total{peer,operation}`,
//! `bsfg_requests_refused_total{listener,peer,code}`. Policies (labels `zone`,
//! `policy`): decisions, faults, fail-open, reloads, broken, instantiations, and
//! `bsfg_policy_sandbox_refusals_total{what}` (filesystem, environment, arguments,
//! network: what a guest reached for in WASI and did not get). The gateway (label
//! `zone`): `bsfg_ready` (1 ready, 0 not: the store does not answer or it is
//! stopping) and the idempotency index's and server's gauges.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bsfg_core::BoundaryError;
use bsfg_core::link::{LinkHandle, LinkStatus};
use bsfg_core::observe::{Observer, Op, Outcome};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// Counters of the zone's own API (what listeners serve), an [`Observer`] of it.
#[derive(Debug)]
pub struct ApiMetrics {
    append_requests: AtomicU64,
    append_failures: AtomicU64,
    fetch_requests: AtomicU64,
    confirm_requests: AtomicU64,
    /// PutObject, HeadObject, GetObject: requests and failures.
    objects: [(AtomicU64, AtomicU64); 3],
    append_latency: Histogram,
}

const OBJECT_OPS: [&str; 3] = ["put_object", "head_object", "get_object"];

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics {
            append_requests: AtomicU64::new(0),
            append_failures: AtomicU64::new(0),
            fetch_requests: AtomicU64::new(0),
            confirm_requests: AtomicU64::new(0),
            objects: Default::default(),
            // 0.5 ms .. ~4 s
            append_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14),
            ),
        }
    }
}

/// The engine as served to listeners is observed by these counters: requests,
/// failures and append latency.
impl Observer for ApiMetrics {
    fn observed(&self, op: Op, elapsed: Duration, outcome: Result<Outcome<'_>, &BoundaryError>) {
        match op {
            Op::Append => {
                self.append_requests.fetch_add(1, Ordering::Relaxed);
                self.append_latency.observe(elapsed.as_secs_f64());
                if outcome.is_err() {
                    self.append_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            Op::Fetch { .. } => {
                self.fetch_requests.fetch_add(1, Ordering::Relaxed);
            }
            Op::Confirm { .. } => {
                self.confirm_requests.fetch_add(1, Ordering::Relaxed);
            }
            Op::PutObject | Op::HeadObject | Op::GetObject { .. } => {
                let i = match op {
                    Op::PutObject => 0,
                    Op::HeadObject => 1,
                    _ => 2,
                };
                let (requests, failures) = &self.objects[i];
                requests.fetch_add(1, Ordering::Relaxed);
                if outcome.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// What the admin endpoint serves.
#[derive(Clone)]
pub struct Admin {
    /// Zone name.
    pub zone: String,
    /// The engine, for the quarantine commands.
    pub engine: bsfg_core::Boundary,
    /// The zone's policies, for their metrics.
    pub policies: Vec<Arc<bsfg_policy_wasm::WasmPolicy>>,
    /// The zone's links.
    pub links: Vec<LinkHandle>,
    /// The zone's API counters.
    pub api: Arc<ApiMetrics>,
    /// TLS endpoints and authorization, for their metrics.
    pub security: Security,
    /// The idempotency index's size and the server's memory, refreshed in the
    /// background (`None` until the first reading).
    pub index: IndexGauge,
    /// The zone's store, asked by `/readyz`.
    pub store: Arc<dyn bsfg_core::component::ZoneStore>,
    /// Turns true when the gateway stops (`/readyz` then answers 503).
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// The gateway's last judgement of readiness (every 2 s), as `bsfg_ready`.
    pub ready: bsfg_core::component::Readiness,
}

/// The zone store's latest gauges ([`bsfg_core::component::ZoneStore::gauges`]),
/// shared with their refresher.
pub type IndexGauge = Arc<std::sync::Mutex<Vec<bsfg_core::component::Gauge>>>;

/// What the security metrics read: every TLS endpoint (for certificate expiry), the
/// shared handshake and reload counters, and the authorization denials.
#[derive(Clone)]
pub struct Security {
    /// Listeners' and links' TLS endpoints.
    pub endpoints: Vec<Arc<dyn bsfg_tls::Reloadable>>,
    /// Handshake failures and reloads.
    pub tls: Arc<bsfg_tls::TlsStats>,
    /// Grants and denial counts.
    pub authz: Arc<bsfg_core::Authorization>,
    /// Refused requests per listener (by URL).
    pub listeners: Vec<(String, Arc<bsfg_core::ServeStats>)>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

/// `/status` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ZoneStatus {
    /// Zone name.
    pub zone: String,
    /// Each link, in config order.
    pub links: Vec<LinkStatus>,
}

#[derive(Debug)]
struct Collector {
    zone: String,
    policies: Vec<Arc<bsfg_policy_wasm::WasmPolicy>>,
    links: Vec<LinkHandle>,
    api: Arc<ApiMetrics>,
    security: Security,
    index: IndexGauge,
    ready: bsfg_core::component::Readiness,
}

type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, M)],
) -> Result<(), std::fmt::Error> {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let mut fam = encoder.encode_descriptor(name, help, None, first.1.metric_type())?;
    for (labels, metric) in rows {
        metric.encode(fam.encode_family(labels)?)?;
    }
    Ok(())
}

const STATES: &[&str] = &[
    "starting",
    "running",
    "backing_off",
    "gapped",
    "standby",
    "stopped",
];

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let statuses: Vec<LinkStatus> = self.links.iter().map(LinkHandle::status).collect();
        let labels = |s: &LinkStatus| -> Labels {
            vec![
                ("zone", self.zone.clone()),
                ("link", s.name.clone()),
                ("consumer", s.consumer.clone()),
            ]
        };
        let api: Labels = vec![
            ("zone", self.zone.clone()),
            ("link", String::new()),
            ("consumer", String::new()),
        ];
        let gauge = |f: fn(&LinkStatus) -> f64| -> Vec<(Labels, ConstGauge<f64>)> {
            statuses
                .iter()
                .map(|s| (labels(s), ConstGauge::new(f(s))))
                .collect()
        };
        let counter = |f: fn(&LinkStatus) -> u64| -> Vec<(Labels, ConstCounter<u64>)> {
            statuses
                .iter()
                .map(|s| (labels(s), ConstCounter::new(f(s))))
                .collect()
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        family(
            &mut e,
            "bsfg_replication_lag_seconds",
            "How far behind the source a link is, in seconds (0 when caught up).",
            &gauge(|s| s.lag_seconds),
        )?;
        family(
            &mut e,
            "bsfg_replication_lag_facts",
            "Facts the source holds beyond the link's frontier.",
            &gauge(|s| s.lag_facts as f64),
        )?;
        family(
            &mut e,
            "bsfg_frontier_offset",
            "The link consumer's frontier on the source.",
            &gauge(|s| s.frontier as f64),
        )?;
        family(
            &mut e,
            "bsfg_source_last_offset",
            "The source stream's newest offset at the link's last step.",
            &gauge(|s| s.source_last_offset as f64),
        )?;
        family(
            &mut e,
            "bsfg_link_last_success_timestamp_seconds",
            "Unix time of the link's last successful step (0 before the first).",
            &gauge(|s| s.last_success_unix_ms.unwrap_or(0) as f64 / 1000.0),
        )?;
        let state_rows: Vec<(Labels, ConstGauge<i64>)> = statuses
            .iter()
            .flat_map(|s| {
                STATES.iter().map(move |st| {
                    let mut l = labels(s);
                    l.push(("state", (*st).to_owned()));
                    (l, ConstGauge::new(i64::from(s.state.name() == *st)))
                })
            })
            .collect();
        family(
            &mut e,
            "bsfg_link_state",
            "1 for the link's current state (starting, running, backing_off, gapped, standby: another gateway of the zone runs it, stopped).",
            &state_rows,
        )?;
        let holders: Vec<(Labels, ConstGauge<i64>)> = statuses
            .iter()
            .filter_map(|s| {
                let holder = s.holder.clone()?;
                let mut l = labels(s);
                l.push(("holder", holder));
                Some((l, ConstGauge::new(1)))
            })
            .collect();
        family(
            &mut e,
            "bsfg_link_lease_holder",
            "1 for the gateway of the zone that holds the link's lease (runs it), as this gateway last saw it.",
            &holders,
        )?;

        let mut fetches = counter(|s| s.fetch_requests);
        fetches.push((
            api.clone(),
            ConstCounter::new(load(&self.api.fetch_requests)),
        ));
        family(
            &mut e,
            "bsfg_fetch_requests",
            "FetchFacts calls (link: made to the source; link=\"\": served by this zone).",
            &fetches,
        )?;
        family(
            &mut e,
            "bsfg_fetch_failures",
            "Failed FetchFacts calls of a link.",
            &counter(|s| s.fetch_failures),
        )?;
        let mut confirms = counter(|s| s.confirm_requests);
        confirms.push((
            api.clone(),
            ConstCounter::new(load(&self.api.confirm_requests)),
        ));
        family(
            &mut e,
            "bsfg_confirm_requests",
            "ConfirmReceipt calls (link: made to the source; link=\"\": served by this zone).",
            &confirms,
        )?;
        family(
            &mut e,
            "bsfg_confirm_failures",
            "Failed ConfirmReceipt calls of a link.",
            &counter(|s| s.confirm_failures),
        )?;
        let mut appends = counter(|s| s.append_requests);
        appends.push((
            api.clone(),
            ConstCounter::new(load(&self.api.append_requests)),
        ));
        family(
            &mut e,
            "bsfg_append_requests",
            "Appends into this zone (by a link, or link=\"\" through the API).",
            &appends,
        )?;
        let mut append_failures = counter(|s| s.append_failures);
        append_failures.push((
            api.clone(),
            ConstCounter::new(load(&self.api.append_failures)),
        ));
        family(
            &mut e,
            "bsfg_append_failures",
            "Failed appends into this zone.",
            &append_failures,
        )?;
        family(
            &mut e,
            "bsfg_replicated_facts",
            "Facts a link stored newly in this zone.",
            &counter(|s| s.facts_stored),
        )?;
        family(
            &mut e,
            "bsfg_replayed_facts",
            "Facts a link found already stored (replays absorbed).",
            &counter(|s| s.facts_duplicate),
        )?;
        let quarantined: Vec<(Labels, ConstCounter<u64>)> = statuses
            .iter()
            .flat_map(|s| {
                [
                    ("policy_denied", s.quarantined.saturating_sub(s.refused)),
                    ("refused", s.refused),
                ]
                .map(|(cause, n)| {
                    let mut l = labels(s);
                    l.push(("cause", cause.to_owned()));
                    (l, ConstCounter::new(n))
                })
            })
            .collect();
        family(
            &mut e,
            "bsfg_quarantined_facts",
            "Facts a link set aside in this zone's quarantine, by cause: policy_denied (an intake policy) or refused (invalid under this zone's rules, conflicting duplicate, too large for its server).",
            &quarantined,
        )?;
        family(
            &mut e,
            "bsfg_filtered_facts",
            "Facts an intake policy filtered on a link (dropped, recorded in one facts_filtered audit fact per page).",
            &counter(|s| s.filtered),
        )?;
        family(
            &mut e,
            "bsfg_gaps_accepted",
            "Gaps an operator accepted on a link.",
            &counter(|s| s.gaps_accepted),
        )?;
        let transfers: Vec<(Labels, ConstCounter<u64>)> = statuses
            .iter()
            .flat_map(|s| {
                [
                    ("copied", s.artifacts_copied),
                    ("present", s.artifacts_present),
                    ("failed", s.artifact_failures),
                    ("unavailable", s.artifacts_unavailable),
                ]
                .map(|(outcome, n)| {
                    let mut l = labels(s);
                    l.push(("outcome", outcome.to_owned()));
                    (l, ConstCounter::new(n))
                })
            })
            .collect();
        family(
            &mut e,
            "bsfg_artifact_transfers",
            "Artifacts a link's facts referenced, by outcome: copied from the source, present already, failed (retried, resumed), unavailable (the source could not serve them as referenced: their facts quarantined).",
            &transfers,
        )?;
        family(
            &mut e,
            "bsfg_artifact_bytes",
            "Artifact bytes a link received from the source.",
            &counter(|s| s.artifact_bytes),
        )?;
        family(
            &mut e,
            "bsfg_artifacts_pending",
            "Artifacts of the page a link is applying that this zone does not hold yet.",
            &gauge(|s| s.artifacts_pending as f64),
        )?;
        type Pick = fn(&(AtomicU64, AtomicU64)) -> &AtomicU64;
        let families: [(&str, &str, Pick); 2] = [
            (
                "bsfg_object_requests",
                "PutObject, HeadObject and GetObject calls served by this zone.",
                |p| &p.0,
            ),
            (
                "bsfg_object_failures",
                "Failed PutObject, HeadObject and GetObject calls served by this zone.",
                |p| &p.1,
            ),
        ];
        for (name, help, pick) in families {
            let rows: Vec<(Labels, ConstCounter<u64>)> = OBJECT_OPS
                .iter()
                .zip(&self.api.objects)
                .map(|(op, pair)| {
                    (
                        vec![("zone", self.zone.clone()), ("operation", (*op).to_owned())],
                        ConstCounter::new(load(pick(pair))),
                    )
                })
                .collect();
            family(&mut e, name, help, &rows)?;
        }
        let hist = self.api.append_latency.clone();
        family(
            &mut e,
            "bsfg_append_latency_seconds",
            "AppendFact latency through the zone's API.",
            &[(api, hist)],
        )?;
        self.encode_security(&mut e)?;
        self.encode_index(&mut e)?;
        self.encode_policies(&mut e)
    }
}

impl Collector {
    fn encode_index(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = self.index.lock().map(|g| g.clone()).unwrap_or_default();
        let zone: Labels = vec![("zone", self.zone.clone())];
        family(
            e,
            "bsfg_ready",
            "1 while the gateway is ready (its store answers and it is not stopping; judged every 2 s), else 0.",
            &[(
                zone.clone(),
                ConstGauge::new(i64::from(self.ready.is_ready())),
            )],
        )?;
        for g in gauges {
            family(
                e,
                g.name,
                g.help,
                &[(zone.clone(), ConstGauge::new(g.value))],
            )?;
        }
        Ok(())
    }

    fn encode_policies(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats: Vec<_> = self
            .policies
            .iter()
            .map(|p| (p.config().name.clone(), p.stats()))
            .collect();
        let labels = |name: &str| -> Labels {
            vec![("zone", self.zone.clone()), ("policy", name.to_owned())]
        };
        let with = |name: &str, k: &'static str, v: &str| -> Labels {
            let mut l = labels(name);
            l.push((k, v.to_owned()));
            l
        };
        let mut decisions = Vec::new();
        let mut faults = Vec::new();
        let mut reloads = Vec::new();
        let mut fail_open = Vec::new();
        let mut broken = Vec::new();
        let mut instantiations = Vec::new();
        let mut reached = Vec::new();
        let mut filtered = Vec::new();
        for (n, s) in &stats {
            let mut all = 0;
            for (reason, c) in &s.filtered {
                all += c;
                filtered.push((with(n, "reason", reason), ConstCounter::new(*c)));
            }
            decisions.push((with(n, "verdict", "filter"), ConstCounter::new(all)));
            for (what, c) in &s.reach {
                reached.push((with(n, "what", what), ConstCounter::new(*c)));
            }
            decisions.push((with(n, "verdict", "allow"), ConstCounter::new(s.allowed)));
            decisions.push((with(n, "verdict", "deny"), ConstCounter::new(s.denied)));
            // Every kind from the start (at 0), so rates and alerts see the series.
            for kind in bsfg_policy_wasm::Fault::KINDS {
                let c = s
                    .faults
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map_or(0, |(_, c)| *c);
                faults.push((with(n, "kind", kind), ConstCounter::new(c)));
            }
            for (r, c) in [
                ("applied", s.reloads_applied),
                ("rejected", s.reloads_rejected),
                ("unchanged", s.reloads_unchanged),
            ] {
                reloads.push((with(n, "result", r), ConstCounter::new(c)));
            }
            fail_open.push((labels(n), ConstCounter::new(s.fail_open)));
            broken.push((labels(n), ConstGauge::new(i64::from(s.broken))));
            instantiations.push((labels(n), ConstCounter::new(s.instantiations)));
        }
        family(
            e,
            "bsfg_policy_decisions",
            "Facts a policy decided, by verdict (fault denials and fail-open allows included).",
            &decisions,
        )?;
        family(
            e,
            "bsfg_policy_faults",
            "Batches a policy could not decide (trap, deadline, memory, fuel, count, other) or failed while broken.",
            &faults,
        )?;
        family(
            e,
            "bsfg_policy_fail_open",
            "Facts allowed without a decision because the policy faulted and its config says on_fault = \"allow\".",
            &fail_open,
        )?;
        family(
            e,
            "bsfg_policy_reloads",
            "Module reloads by result (applied, rejected, unchanged).",
            &reloads,
        )?;
        family(
            e,
            "bsfg_policy_broken",
            "1 while a policy is broken (failing batches without calling it).",
            &broken,
        )?;
        family(
            e,
            "bsfg_policy_instantiations",
            "Instances made (the first and one after each fault).",
            &instantiations,
        )?;
        family(
            e,
            "bsfg_policy_filtered",
            "Facts a policy filtered, by its reason (the first 32 reasons apart, then other): dropped at intake and listed in the page's facts_filtered audit fact.",
            &filtered,
        )?;
        family(
            e,
            "bsfg_policy_sandbox_refusals",
            "What a policy reached for in WASI and did not get: filesystem (it looked for directories to open files in), environment, arguments, network (a socket or a name lookup).",
            &reached,
        )?;
        Ok(())
    }

    fn encode_security(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let zone = || ("zone", self.zone.clone());
        let expiry: Vec<(Labels, ConstGauge<i64>)> = self
            .security
            .endpoints
            .iter()
            .flat_map(|ep| {
                ep.expiries().into_iter().map(move |x| {
                    (
                        vec![
                            zone(),
                            ("endpoint", ep.endpoint().to_owned()),
                            ("role", x.role.to_owned()),
                            ("name", x.name),
                        ],
                        ConstGauge::new(x.not_after_unix),
                    )
                })
            })
            .collect();
        family(
            e,
            "bsfg_certificate_expiry_timestamp_seconds",
            "notAfter of each certificate in use (role cert: this gateway's; role ca: a trust anchor), Unix seconds.",
            &expiry,
        )?;
        let handshakes: Vec<(Labels, ConstCounter<u64>)> = self
            .security
            .tls
            .handshake_failures()
            .into_iter()
            .map(|((endpoint, reason), n)| {
                (
                    vec![
                        zone(),
                        ("endpoint", endpoint),
                        ("reason", reason.to_owned()),
                    ],
                    ConstCounter::new(n),
                )
            })
            .collect();
        family(
            e,
            "bsfg_tls_handshake_failures",
            "TLS handshakes refused or failed, by endpoint and reason (unknown_ca, expired_certificate, not_tls, handshake_timeout, ...).",
            &handshakes,
        )?;
        let revoked: Vec<(Labels, ConstCounter<u64>)> = self
            .security
            .tls
            .revoked()
            .into_iter()
            .map(|(endpoint, n)| (vec![zone(), ("endpoint", endpoint)], ConstCounter::new(n)))
            .collect();
        family(
            e,
            "bsfg_tls_connections_revoked",
            "Open connections closed because a certificate reload left their peer untrusted (an anchor removed or replaced), by endpoint.",
            &revoked,
        )?;
        family(
            e,
            "bsfg_tls_reloads",
            "Certificate files reloaded after a change.",
            &[(vec![zone()], ConstCounter::new(self.security.tls.reloads()))],
        )?;
        family(
            e,
            "bsfg_tls_reload_failures",
            "Changed certificate files that were rejected (the previous ones stayed in use).",
            &[(
                vec![zone()],
                ConstCounter::new(self.security.tls.reload_failures()),
            )],
        )?;
        let denials: Vec<(Labels, ConstCounter<u64>)> = self
            .security
            .authz
            .denials()
            .into_iter()
            .map(|((peer, op), n)| {
                (
                    vec![
                        zone(),
                        ("peer", peer),
                        ("operation", op.as_str().to_owned()),
                    ],
                    ConstCounter::new(n),
                )
            })
            .collect();
        let refused: Vec<(Labels, ConstCounter<u64>)> = self
            .security
            .listeners
            .iter()
            .flat_map(|(url, st)| {
                st.errors().into_iter().map(move |((peer, code), n)| {
                    (
                        vec![
                            zone(),
                            ("listener", url.clone()),
                            ("peer", peer),
                            ("code", code.to_owned()),
                        ],
                        ConstCounter::new(n),
                    )
                })
            })
            .collect();
        family(
            e,
            "bsfg_requests_refused",
            "Requests answered with an error status, by listener, peer and gRPC code (internal: malformed protobuf; out_of_range: oversized message; permission_denied: authorization).",
            &refused,
        )?;
        family(
            e,
            "bsfg_authz_denials",
            "Requests refused by authorization, by peer identity and operation.",
            &denials,
        )
    }
}

impl Admin {
    fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register_collector(Box::new(Collector {
            zone: self.zone.clone(),
            policies: self.policies.clone(),
            links: self.links.clone(),
            api: self.api.clone(),
            security: self.security.clone(),
            index: self.index.clone(),
            ready: self.ready.clone(),
        }));
        r
    }

    /// The `/status` body.
    pub fn status(&self) -> ZoneStatus {
        ZoneStatus {
            zone: self.zone.clone(),
            links: self.links.iter().map(LinkHandle::status).collect(),
        }
    }
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("zone", &self.zone).finish()
    }
}

async fn metrics(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &admin.registry()) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "could not encode metrics\n".to_owned(),
        ),
    }
}

async fn status(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    axum::Json(admin.status())
}

#[derive(Debug, Deserialize)]
struct AcceptGap {
    from: u64,
    to: u64,
    by: String,
}

async fn accept_gap(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(q): Query<AcceptGap>,
) -> impl IntoResponse {
    let Some(link) = admin.links.iter().find(|l| l.name() == name) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no link `{name}` in this zone\n"),
        );
    };
    if q.by.trim().is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "by: must name who accepts the gap\n".to_owned(),
        );
    }
    match link.accept_gap(q.from, q.to, &q.by) {
        Ok(()) => {
            tracing::warn!(zone = %admin.zone, link = %name, from = q.from, to = q.to, accepted_by = %q.by, "operator accepted a gap");
            (
                StatusCode::OK,
                format!(
                    "link `{name}`: gap {}..={} accepted by {}; it is recorded as a fact and the link goes on\n",
                    q.from, q.to, q.by
                ),
            )
        }
        Err(e) => (StatusCode::CONFLICT, format!("{e}\n")),
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct EntryQuery {
    id: String,
    payload: Option<String>,
    by: Option<String>,
}

fn boundary_error(e: &bsfg_core::BoundaryError) -> (StatusCode, String) {
    let code = match e.reason() {
        bsfg_core::Reason::NotFound => StatusCode::NOT_FOUND,
        bsfg_core::Reason::InvalidArgument
        | bsfg_core::Reason::ConflictingDuplicate
        | bsfg_core::Reason::FailedPrecondition => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, format!("{e}\n"))
}

async fn quarantine_list(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<ListQuery>,
) -> axum::response::Response {
    match admin.engine.quarantined(q.limit.unwrap_or(100)).await {
        Ok(entries) => axum::Json(entries).into_response(),
        Err(e) => boundary_error(&e).into_response(),
    }
}

async fn quarantine_show(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<EntryQuery>,
) -> axum::response::Response {
    match admin
        .engine
        .quarantined_entry(&q.id, q.payload.as_deref())
        .await
    {
        Ok(entry) => axum::Json(entry).into_response(),
        Err(e) => boundary_error(&e).into_response(),
    }
}

async fn settle(
    admin: &Admin,
    q: EntryQuery,
    action: bsfg_core::QuarantineAction,
) -> (StatusCode, String) {
    let by = q.by.unwrap_or_default();
    if by.trim().is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "by: must name who decides (it is recorded as a fact)\n".to_owned(),
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    match admin
        .engine
        .settle_quarantined(&q.id, q.payload.as_deref(), action, &admin.zone, &by, now)
        .await
    {
        Ok(s) => {
            let verb = match action {
                bsfg_core::QuarantineAction::Release => "released",
                bsfg_core::QuarantineAction::Drop => "dropped",
            };
            tracing::warn!(zone = %admin.zone, message_id = %q.id, payload = %s.entry.payload_short(), by = %by, cause = %s.entry.cause, policy = %s.entry.denial.policy, "operator {verb} a quarantined fact");
            let stored = s
                .released
                .map(|o| format!(", stored at {}:{}", o.stream, o.offset))
                .unwrap_or_default();
            (
                StatusCode::OK,
                format!(
                    "`{}` {verb} by {by}{stored}; recorded at {}:{}\n",
                    q.id, s.record.stream, s.record.offset
                ),
            )
        }
        Err(e) => boundary_error(&e),
    }
}

async fn quarantine_release(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<EntryQuery>,
) -> impl IntoResponse {
    settle(&admin, q, bsfg_core::QuarantineAction::Release).await
}

async fn quarantine_drop(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<EntryQuery>,
) -> impl IntoResponse {
    settle(&admin, q, bsfg_core::QuarantineAction::Drop).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(admin): State<Arc<Admin>>) -> (StatusCode, String) {
    if *admin.stopping.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".to_owned());
    }
    match admin.store.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the zone's store does not answer: {e}\n"),
        ),
    }
}

/// The `Host` values that name an endpoint listening on `addr` (loopback): its
/// address and the loopback names, with its port or without (a name rebound to
/// loopback by DNS is never one of them).
fn own_hosts(addr: SocketAddr) -> Vec<String> {
    let port = addr.port();
    let ip = match addr.ip() {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    let mut hosts = Vec::new();
    for name in [ip.as_str(), "localhost", "127.0.0.1", "[::1]"] {
        for h in [format!("{name}:{port}"), name.to_owned()] {
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
    }
    hosts
}

/// Why a request may not reach the admin endpoint, if it may not: its `Host` does not
/// name this endpoint (a DNS name rebound to loopback), or it comes from a web page
/// of another origin.
fn foreign(hosts: &[String], headers: &axum::http::HeaderMap) -> Option<String> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    let Some(host) = host.filter(|h| hosts.iter().any(|o| o == h)) else {
        return Some(format!(
            "Host must name this endpoint ({}); got {:?}",
            hosts.join(", "),
            headers.get(header::HOST)
        ));
    };
    if let Some(origin) = headers.get(header::ORIGIN) {
        let same = origin
            .to_str()
            .is_ok_and(|o| o.eq_ignore_ascii_case(&format!("http://{host}")));
        if !same {
            return Some(format!(
                "requests from web pages of another origin are refused (Origin {origin:?})"
            ));
        }
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|s| s.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return Some("cross-site requests are refused".to_owned());
    }
    None
}

/// Binds the admin endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Why a state-changing request (any method but GET and HEAD) may not proceed, if it
/// may not: the gateway has no token, the request names none, or not this one.
fn uncredentialed(
    token: Option<&crate::config::AdminToken>,
    headers: &axum::http::HeaderMap,
) -> Option<(StatusCode, &'static str)> {
    let Some(token) = token else {
        return Some((
            StatusCode::FORBIDDEN,
            "state-changing calls are refused: this gateway has no [admin] token_file",
        ));
    };
    let offered = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match offered {
        None => Some((
            StatusCode::UNAUTHORIZED,
            "state-changing calls need the admin token: Authorization: Bearer <token> (bsfg: --token-file, or --config with [admin] token_file)",
        )),
        Some(t) if token.matches(t) => None,
        Some(_) => Some((StatusCode::FORBIDDEN, "the admin token does not match")),
    }
}

/// Serves the admin endpoint until `shutdown` resolves. Every request must pass the
/// Host/Origin check; every state-changing one must carry the zone's admin token.
pub async fn serve(
    admin: Arc<Admin>,
    listener: tokio::net::TcpListener,
    token: Option<crate::config::AdminToken>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let hosts = Arc::new(own_hosts(listener.local_addr()?));
    let token = Arc::new(token);
    let zone = admin.zone.clone();
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/links/{name}/accept-gap", post(accept_gap))
        .route("/quarantine", get(quarantine_list))
        .route("/quarantine/entry", get(quarantine_show))
        .route("/quarantine/release", post(quarantine_release))
        .route("/quarantine/drop", post(quarantine_drop))
        .with_state(admin)
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let (hosts, token, zone) = (hosts.clone(), token.clone(), zone.clone());
                async move {
                    if let Some(why) = foreign(&hosts, req.headers()) {
                        tracing::warn!(zone = %zone, uri = %req.uri(), method = %req.method(), %why, "admin request refused");
                        return (StatusCode::FORBIDDEN, format!("{why}\n")).into_response();
                    }
                    let reads = matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
                    if !reads
                        && let Some((code, why)) = uncredentialed(token.as_ref().as_ref(), req.headers())
                    {
                        tracing::warn!(zone = %zone, uri = %req.uri(), method = %req.method(), %why, "admin request refused");
                        let mut resp = (code, format!("{why}\n")).into_response();
                        if code == StatusCode::UNAUTHORIZED {
                            resp.headers_mut().insert(
                                header::WWW_AUTHENTICATE,
                                axum::http::HeaderValue::from_static("Bearer realm=\"bsfg admin\""),
                            );
                        }
                        return resp;
                    }
                    next.run(req).await
                }
            },
        ));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the read-only metrics listener until `shutdown` resolves: `GET /metrics`,
/// `/healthz` and `/readyz` and nothing else (no status, no state change), so it may
/// bind an address other hosts reach.
pub async fn serve_metrics(
    admin: Arc<Admin>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(admin);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
