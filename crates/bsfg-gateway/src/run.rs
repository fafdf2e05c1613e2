//! `bsfg run`: starts a zone from its checked config and serves until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context as _;
use bsfg_core::{Boundary, BoundaryApi};
use bsfg_sink_jetstream::{Durability, JetStreamZone};
use futures::StreamExt;
use tokio::sync::watch;

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

/// Runs the zone. Returns after a signal once every listener has stopped accepting
/// and every request in flight (appends included) has been answered.
pub async fn run(cfg: GatewayConfig) -> anyhow::Result<()> {
    let zone = cfg.zone.clone();
    let log = JetStreamZone::connect(cfg.sink.clone())
        .await
        .with_context(|| format!("zone {zone}: opening the JetStream zone log"))?;
    if log.durability() == Durability::Lazy {
        tracing::warn!(zone = %zone, "this zone's confirmations are not durable until nats-server runs with sync_interval: always");
    }
    let log = Arc::new(log);
    let api: Arc<dyn BoundaryApi> =
        Arc::new(Boundary::new(log.clone(), log.clone(), cfg.limits.clone()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for l in &cfg.listeners {
        // Only one transport so far; the scheme was checked against the registry.
        let (listener, addr) = bsfg_transport_grpc::bind(l.addr)
            .await
            .with_context(|| format!("listener {}", l.url))?;
        tracing::warn!(zone = %zone, url = %l.url, "plaintext listener without TLS or peer authentication (insecure = true, loopback only)");
        tracing::info!(zone = %zone, url = %format!("{}://{addr}", l.scheme), "listening");
        let mut rx = stop_rx.clone();
        let api = api.clone();
        let server = l.server.clone();
        servers.push(tokio::spawn(async move {
            bsfg_transport_grpc::serve(api, server, listener, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await
        }));
    }
    println!("bsfg: zone {zone} ready ({} listener(s))", servers.len());

    // Stop on a signal, or as soon as any listener fails (the others stop too).
    let mut running: futures::stream::FuturesUnordered<_> = servers.into_iter().collect();
    let failed = tokio::select! {
        _ = shutdown_signal() => None,
        Some(r) = running.next() => Some(r),
    };
    tracing::info!(zone = %zone, "stopping: no new requests; finishing those in flight");
    let _ = stop_tx.send(true);
    let mut outcome = match failed {
        Some(Ok(Ok(()))) => Err(anyhow::anyhow!("a listener stopped unexpectedly")),
        Some(Ok(Err(e))) => Err(anyhow::Error::new(e).context("listener failed")),
        Some(Err(e)) => Err(anyhow::Error::new(e).context("listener task")),
        None => Ok(()),
    };
    while let Some(r) = running.next().await {
        if let Err(e) = r
            .context("listener task")
            .and_then(|r| r.map_err(anyhow::Error::new))
        {
            tracing::error!(zone = %zone, error = %e, "listener failed while stopping");
            if outcome.is_ok() {
                outcome = Err(e);
            }
        }
    }
    // Every request was answered; make sure the last writes left the client.
    let _ = log.client().flush().await;
    if outcome.is_ok() {
        tracing::info!(zone = %zone, "stopped cleanly");
    }
    outcome
}
