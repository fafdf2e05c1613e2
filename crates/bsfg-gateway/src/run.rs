//! `bsfg run`: starts a zone from its checked config and serves until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context as _;
use bsfg_core::component::{Readiness, Security, ServeContext, TlsMaterial};
use bsfg_core::link::{Intake, Link};
use bsfg_core::{Authorization, Boundary, BoundaryApi, Gate, Hook};
use bsfg_tls::{ClientTls, Reloadable, ServerTls};
use futures::{FutureExt as _, StreamExt};
use tokio::sync::watch;

use crate::admin;
use crate::config::GatewayConfig;

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The SIGHUP listener, registered before the gateway says it is ready: from then
/// on a SIGHUP never ends the process, whatever the zone configures (the default
/// action of SIGHUP is to terminate).
#[cfg(unix)]
pub type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub type Hangup = Option<()>;

pub fn listen_for_hangup(zone: &str) -> Hangup {
    #[cfg(unix)]
    {
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        if hup.is_none() {
            tracing::warn!(zone = %zone, "cannot listen for SIGHUP; reloads happen on file changes only");
        }
        hup
    }
    #[cfg(not(unix))]
    {
        let _ = zone;
        None
    }
}

/// On SIGHUP (`systemctl reload`): every TLS endpoint's files are checked and
/// reloaded now rather than at the next `reload_interval` (policies reload on the
/// same signal in `policies::watch`).
async fn reload_on_hangup(
    zone: String,
    hup: Hangup,
    tls: Vec<Arc<dyn Reloadable>>,
    mut stop: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    {
        let Some(mut hup) = hup else { return };
        loop {
            tokio::select! {
                r = hup.recv() => if r.is_none() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            let mono = sd_notify::NotifyState::monotonic_usec_now().ok();
            let mut states = vec![sd_notify::NotifyState::Reloading];
            states.extend(mono);
            crate::systemd::notify(&states);
            let (mut reloaded, mut failed) = (0, 0);
            for e in &tls {
                match e.reload_if_changed() {
                    Ok(true) => reloaded += 1,
                    Ok(false) => {}
                    Err(_) => failed += 1,
                }
            }
            tracing::info!(zone = %zone, endpoints = tls.len(), reloaded, failed, "SIGHUP: certificates checked, reloaded where changed");
            crate::systemd::notify(&[sd_notify::NotifyState::Ready]);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (zone, hup, tls, stop);
    }
}

/// Runs the zone. Returns after a signal once every listener has stopped accepting
/// and every request in flight (appends included) has been answered.
pub async fn run(cfg: GatewayConfig) -> anyhow::Result<()> {
    let zone = cfg.zone.clone();
    // The watchdog is pinged from the start: opening a large zone (rebuilding the
    // look-up from the stream) may take minutes, and the pings prove the runtime
    // lives through it and through the stop's grace period.
    if let Some(interval) = crate::systemd::watchdog_interval() {
        tracing::info!(zone = %zone, ?interval, "pinging the service manager's watchdog");
        tokio::spawn(crate::systemd::watchdog(interval));
    }
    crate::systemd::notify(&[sd_notify::NotifyState::Status("opening the zone's store")]);
    let store = cfg.sink.open().await.with_context(|| {
        format!(
            "zone {zone}: opening the zone's store at {}",
            cfg.sink.location()
        )
    })?;
    let engine = Boundary::new(store.fact_log(), store.object_store(), cfg.limits.clone());
    let api_metrics = Arc::new(admin::ApiMetrics::default());
    let api: Arc<dyn BoundaryApi> = Arc::new(bsfg_core::observe::Observed::new(
        Arc::new(engine.clone()),
        api_metrics.clone(),
    ));

    let policies = crate::policies::Policies::load(&cfg.policies)?;
    for (p, hooks) in &policies.all {
        let hooks: Vec<_> = hooks.iter().map(|h| h.as_str()).collect();
        tracing::info!(zone = %zone, policy = %p.config().name, sha256 = %p.sha256(), ?hooks, "policy in place");
    }
    let authz = Arc::new(Authorization::new(cfg.grants.clone()));
    let gate = Gate::new(api, authz.clone()).with_append_policies(
        policies.chain(Hook::Append),
        &zone,
        cfg.limits.clone(),
    );
    let intake_chain = policies.chain(Hook::Intake);
    let tls_stats = Arc::new(bsfg_tls::TlsStats::default());
    let mut tls_endpoints: Vec<Arc<dyn Reloadable>> = Vec::new();

    let (stop_tx, stop_rx) = watch::channel(false);
    // Readiness for the transports' health services: the store answers and the
    // gateway is not stopping, judged every 2 s.
    let (ready_tx, readiness) = Readiness::channel();
    {
        let (store, mut stop, zone) = (store.clone(), stop_rx.clone(), zone.clone());
        tokio::spawn(async move {
            loop {
                let now = match store.ready().await {
                    Ok(()) => true,
                    Err(e) => {
                        if *ready_tx.borrow() {
                            tracing::warn!(zone = %zone, error = %e, "not ready: the zone's store does not answer");
                        }
                        false
                    }
                };
                ready_tx.send_if_modified(|r| std::mem::replace(r, now) != now);
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            let _ = ready_tx.send(false);
            // Keep the sender until the listeners are gone, so they read "not
            // serving" rather than a closed channel.
            ready_tx.closed().await;
        });
    }

    // Links: each pulls from its source into this zone's engine, until stopped.
    let mut handles = Vec::new();
    let mut link_tasks = Vec::new();
    for l in &cfg.links {
        let name = &l.settings.name;
        let tls = match (l.scheme.security, &l.tls, &cfg.tls) {
            (Security::MutualTls { alpn }, Some(lt), Some(t)) => {
                let tls = ClientTls::new(
                    t.trusting_only(&lt.ca),
                    vec![alpn.to_vec()],
                    format!("link:{name}"),
                    tls_stats.clone(),
                )
                .with_context(|| format!("link {name}: TLS"))?;
                tls_endpoints.push(tls.clone());
                tracing::info!(zone = %zone, link = %name, source = %l.source, ca = %lt.ca, transport = l.scheme.name, "link pulls over mutual TLS");
                Some((TlsMaterial::new(tls), lt.server_name.clone()))
            }
            (Security::LocalCredentials { .. }, _, _) => {
                tracing::info!(zone = %zone, link = %name, source = %l.source, transport = l.scheme.name, "link pulls over a local socket (the source sees this process's credentials)");
                None
            }
            _ => {
                tracing::warn!(zone = %zone, link = %name, source = %l.source, "link pulls over PLAINTEXT without TLS or peer authentication (insecure = true)");
                None
            }
        };
        let source = l
            .dial
            .dial(&l.source, tls)
            .map_err(|e| anyhow::anyhow!("link {name}: source {}: {e}", l.source))?;
        // Who the source is, for intake policies: the name its certificate is checked
        // against (`server_name`, else the URL's host), or the URL when plaintext.
        let peer = l
            .tls
            .as_ref()
            .and_then(|t| t.server_name.clone())
            .unwrap_or_else(|| l.source.clone());
        let (link, handle) = Link::new(l.settings.clone(), source, Arc::new(engine.clone()));
        let mut link = link.with_intake(Intake {
            chain: intake_chain.clone(),
            zone: zone.clone(),
            peer,
        });
        // Several gateways of a zone may run the same link: one at a time, by lease.
        if let Some((lease, holder)) = store.leases() {
            link = link.with_lease(lease, holder);
        }
        handles.push(handle);
        // Every line the link logs carries the zone, the link, the source's consumer
        // and the peer it pulls from.
        let span = tracing::info_span!(
            "link",
            zone = %zone,
            link = %name,
            consumer = %l.settings.consumer,
            peer = %l.source
        );
        link_tasks.push(tokio::spawn(tracing::Instrument::instrument(
            link.run(stop_rx.clone()),
            span,
        )));
    }

    let mut servers = Vec::new();
    let mut listener_stats = Vec::new();
    for l in &cfg.listeners {
        let served = Arc::new(bsfg_core::ServeStats::default());
        listener_stats.push((l.url.clone(), served.clone()));
        let mut rx = stop_rx.clone();
        let stopped = async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let tls = match (l.scheme.security, &cfg.tls) {
            (Security::MutualTls { alpn }, Some(t)) => {
                let tls = ServerTls::new(
                    t.files.clone(),
                    vec![alpn.to_vec()],
                    l.url.clone(),
                    tls_stats.clone(),
                )
                .with_context(|| format!("listener {}: TLS", l.url))?;
                tls_endpoints.push(tls.clone());
                Some(TlsMaterial::new(tls))
            }
            _ => None,
        };
        let bound = l
            .listen
            .start(ServeContext {
                gate: gate.clone(),
                served,
                tls,
                stopped: stopped.boxed(),
                ready: readiness.clone(),
            })
            .await
            .with_context(|| format!("listener {}", l.url))?;
        match l.scheme.security {
            Security::Plaintext => {
                tracing::warn!(zone = %zone, url = %bound.url, "PLAINTEXT listener (insecure = true, loopback only): callers are not authenticated and have FULL ACCESS to this zone");
            }
            Security::MutualTls { .. } => {
                tracing::info!(zone = %zone, url = %bound.url, transport = %bound.summary, grants = cfg.grants.len(), "listening: peers need a certificate from a trust anchor and a grant");
            }
            Security::LocalCredentials { anchor } => {
                tracing::info!(zone = %zone, url = %bound.url, transport = %bound.summary, anchor, grants = cfg.grants.len(), "listening: callers are known by their operating-system credentials and need a grant");
            }
        }
        let serving = bound.serve;
        let url = l.url.clone();
        servers.push(tokio::spawn(async move {
            serving
                .await
                .map_err(|e| anyhow::Error::new(e).context(format!("listener {url}")))
        }));
    }
    if let Some(settings) = &cfg.admin {
        let addr = settings.listen;
        let listener = admin::bind(addr)
            .await
            .with_context(|| format!("admin endpoint {addr}"))?;
        match &settings.token {
            Some(t) => {
                tracing::info!(zone = %zone, %addr, token_file = %t.path.display(), "admin endpoint: /metrics, /status, /healthz, /readyz (loopback only); state-changing calls need the admin token")
            }
            None => {
                tracing::info!(zone = %zone, %addr, "admin endpoint: /metrics, /status, /healthz, /readyz (loopback only); state-changing calls are refused (no [admin] token_file)")
            }
        }
        let index: admin::IndexGauge = Arc::default();
        {
            // Refreshed in the background: reading the stream and /varz takes a round
            // trip, which a scrape should not wait for.
            let (index, store, mut stop) = (index.clone(), store.clone(), stop_rx.clone());
            tokio::spawn(async move {
                loop {
                    if let Ok(gauges) = store.gauges().await
                        && let Ok(mut slot) = index.lock()
                    {
                        *slot = gauges;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                        _ = stop.changed() => break,
                    }
                }
            });
        }
        let a = Arc::new(admin::Admin {
            index,
            store: store.clone(),
            stopping: stop_rx.clone(),
            ready: readiness.clone(),
            zone: zone.clone(),
            engine: engine.clone(),
            policies: policies.list(),
            links: handles.clone(),
            api: api_metrics.clone(),
            security: admin::Security {
                endpoints: tls_endpoints.clone(),
                tls: tls_stats.clone(),
                authz: authz.clone(),
                listeners: listener_stats.clone(),
            },
        });
        if let Some(maddr) = settings.metrics_listen {
            let listener = admin::bind(maddr)
                .await
                .with_context(|| format!("metrics listener {maddr}"))?;
            tracing::info!(zone = %zone, addr = %maddr, "metrics listener: /metrics, /healthz, /readyz (read-only)");
            let mut rx = stop_rx.clone();
            let a = a.clone();
            servers.push(tokio::spawn(async move {
                admin::serve_metrics(a, listener, async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
                .map_err(|e| anyhow::Error::new(e).context("metrics listener"))
            }));
        }
        let mut rx = stop_rx.clone();
        let token = settings.token.clone();
        servers.push(tokio::spawn(async move {
            admin::serve(a, listener, token, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await
            .map_err(|e| anyhow::Error::new(e).context("admin endpoint"))
        }));
    }
    tokio::spawn(crate::policies::watch(
        policies.clone(),
        listen_for_hangup(&zone),
        stop_rx.clone(),
    ));
    if let Some(t) = &cfg.tls {
        tokio::spawn(bsfg_tls::watch(
            tls_endpoints.clone(),
            t.reload_interval,
            stop_rx.clone(),
        ));
    }
    tokio::spawn(reload_on_hangup(
        zone.clone(),
        listen_for_hangup(&zone),
        tls_endpoints.clone(),
        stop_rx.clone(),
    ));
    let summary = format!(
        "zone {zone} ready ({} listener(s), {} link(s){})",
        cfg.listeners.len(),
        handles.len(),
        cfg.admin
            .as_ref()
            .map(|a| format!(", admin on http://{}", a.listen))
            .unwrap_or_default()
    );
    println!("bsfg: {summary}");
    crate::systemd::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&summary),
    ]);

    // Stop on a signal, or as soon as any listener fails (the others stop too).
    let mut running: futures::stream::FuturesUnordered<_> = servers.into_iter().collect();
    let failed = tokio::select! {
        _ = shutdown_signal() => None,
        Some(r) = running.next() => Some(r),
    };
    tracing::info!(zone = %zone, grace = ?cfg.stop_timeout, "stopping: no new requests; finishing those in flight");
    crate::systemd::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: finishing the work in flight"),
    ]);
    let _ = stop_tx.send(true);
    let mut outcome = match failed {
        Some(Ok(Ok(()))) => Err(anyhow::anyhow!("a listener stopped unexpectedly")),
        Some(Ok(Err(e))) => Err(e.context("listener failed")),
        Some(Err(e)) => Err(anyhow::Error::new(e).context("listener task")),
        None => Ok(()),
    };
    // Everything below is bounded by the grace period: a zone whose nats-server is
    // gone must still stop (what could not finish is named, and comes again: nothing
    // unconfirmed is lost).
    let links_left = std::sync::atomic::AtomicUsize::new(link_tasks.len());
    let listeners_left = std::sync::atomic::AtomicUsize::new(running.len());
    let store_closed = std::sync::atomic::AtomicBool::new(false);
    let finish = async {
        // Links stop between steps or drop a step in flight; neither confirms
        // anything that is not durably appended.
        for t in link_tasks {
            let _ = t.await;
            links_left.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        while let Some(r) = running.next().await {
            listeners_left.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = r.context("listener task").and_then(|r| r) {
                tracing::error!(zone = %zone, error = %e, "listener failed while stopping");
                if outcome.is_ok() {
                    outcome = Err(e);
                }
            }
        }
        // Every request was answered; make sure the last writes left the client.
        store.close().await;
        store_closed.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    if tokio::time::timeout(cfg.stop_timeout, finish)
        .await
        .is_err()
    {
        let load =
            |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
        let mut left = Vec::new();
        if load(&links_left) > 0 {
            left.push(format!("{} link(s) still stopping", load(&links_left)));
        }
        if load(&listeners_left) > 0 {
            left.push(format!(
                "{} listener(s) still answering requests in flight",
                load(&listeners_left)
            ));
        }
        if !store_closed.load(std::sync::atomic::Ordering::Relaxed) {
            left.push("the zone store's last writes not confirmed flushed".to_owned());
        }
        let what = left.join(", ");
        tracing::error!(zone = %zone, grace = ?cfg.stop_timeout, unfinished = %what, "stop timed out; exiting anyway (unanswered requests are retried by their callers; unconfirmed facts come again)");
        return Err(anyhow::anyhow!(
            "stop timed out after {}: {what}",
            humantime::format_duration(cfg.stop_timeout)
        ));
    }
    if outcome.is_ok() {
        tracing::info!(zone = %zone, "stopped cleanly");
    }
    outcome
}
