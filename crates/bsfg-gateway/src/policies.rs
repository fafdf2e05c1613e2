//! The zone's WASM policies: loaded from `[[policies]]`, arranged into one chain per
//! hook in file order, reloaded when a module file changes or on SIGHUP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use bsfg_core::{Hook, Policy, PolicyChain};
use bsfg_policy_wasm::WasmPolicy;
use tokio::sync::watch;

use crate::config::PolicyEntry;

/// How often module files are checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

/// Every policy of the zone with the hooks it serves.
#[derive(Clone, Default)]
pub struct Policies {
    /// In file order.
    pub all: Vec<(Arc<WasmPolicy>, Vec<Hook>)>,
}

impl Policies {
    /// Loads every policy (compile, load checks, `init`); the first that fails stops
    /// start-up with its error.
    pub fn load(entries: &[PolicyEntry]) -> anyhow::Result<Policies> {
        let mut all = Vec::new();
        for e in entries {
            let p = WasmPolicy::load(e.config.clone())
                .with_context(|| format!("policy `{}`", e.config.name))?;
            all.push((Arc::new(p), e.hooks.clone()));
        }
        Ok(Policies { all })
    }

    /// The chain of `hook`: its policies in file order.
    pub fn chain(&self, hook: Hook) -> PolicyChain {
        PolicyChain::new(
            self.all
                .iter()
                .filter(|(_, h)| h.contains(&hook))
                .map(|(p, _)| p.clone() as Arc<dyn Policy>)
                .collect(),
        )
    }

    /// The policies alone, for metrics.
    pub fn list(&self) -> Vec<Arc<WasmPolicy>> {
        self.all.iter().map(|(p, _)| p.clone()).collect()
    }
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

async fn reload(p: &Arc<WasmPolicy>, why: &'static str) {
    let p2 = p.clone();
    // Compiling a module is CPU work: off the async workers. Errors are logged and
    // counted by the policy itself; the old module stays.
    let r = tokio::task::spawn_blocking(move || p2.reload()).await;
    if let Err(e) = r {
        tracing::error!(policy = %p.config().name, trigger = why, error = %e, "policy reload task failed");
    }
}

/// Reloads a policy whose module file changed (checked every [`RELOAD_POLL`]), and
/// every policy on SIGHUP (`hup`, registered before the gateway said it was ready),
/// until `stop`.
pub async fn watch(policies: Policies, hup: crate::run::Hangup, mut stop: watch::Receiver<bool>) {
    if policies.all.is_empty() {
        return;
    }
    let list = policies.list();
    let mut stamps: Vec<_> = list.iter().map(|p| stamp(&p.config().module)).collect();
    #[cfg(unix)]
    let mut hup = hup;
    let mut tick = tokio::time::interval(RELOAD_POLL);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    return;
                }
            }
            _ = hangup => {
                tracing::info!("SIGHUP: reloading every policy");
                for p in &list {
                    reload(p, "sighup").await;
                }
                stamps = list.iter().map(|p| stamp(&p.config().module)).collect();
            }
            _ = tick.tick() => {
                for (p, seen) in list.iter().zip(stamps.iter_mut()) {
                    let now = stamp(&p.config().module);
                    if now != *seen {
                        *seen = now;
                        reload(p, "file changed").await;
                    }
                }
            }
        }
    }
}
