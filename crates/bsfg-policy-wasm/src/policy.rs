//! [`WasmPolicy`]: a sandboxed policy component behind the core [`Policy`] trait, with
//! fault containment, the broken state, fail-open by config only, and hot reload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bsfg_core::{Candidate, Denial, Policy, PolicyContext, Verdict};

use crate::abi::{Batch, WContext, WFact, WVerdict};
use crate::config::{OnFault, PolicyConfig};
use crate::error::PolicyError;
use crate::sandbox::{Fault, Module, Sandbox, Warm};

/// Counters of one policy, for `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
    fail_open: AtomicU64,
    instantiations: AtomicU64,
    reloads_applied: AtomicU64,
    reloads_rejected: AtomicU64,
    reloads_unchanged: AtomicU64,
    faults: Mutex<Vec<(&'static str, u64)>>,
    /// Facts filtered, by reason (at most [`FILTER_REASONS`] reasons; the rest as
    /// `other`).
    filtered: Mutex<Vec<(String, u64)>>,
}

/// Distinct filter reasons counted apart (a label each in /metrics).
const FILTER_REASONS: usize = 32;

/// A snapshot of a policy's counters and state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Batches decided (including those failed by a fault).
    pub batches: u64,
    /// Facts allowed (fail-open ones included).
    pub allowed: u64,
    /// Facts denied (fault denials included).
    pub denied: u64,
    /// Facts allowed because the policy faulted and its config says `on_fault = "allow"`.
    pub fail_open: u64,
    /// Instances made (the first, and one after every fault).
    pub instantiations: u64,
    /// Faults by kind (`deadline`, `memory`, `fuel`, `trap`, `count`, `other`, `broken`).
    pub faults: Vec<(&'static str, u64)>,
    /// Reloads that swapped in a new module.
    pub reloads_applied: u64,
    /// Reloads refused (the module did not load; the old one stays).
    pub reloads_rejected: u64,
    /// Reloads that found the same module (same sha256).
    pub reloads_unchanged: u64,
    /// True while the policy is broken.
    pub broken: bool,
    /// `sha256:<hex>` of the module deciding now.
    pub sha256: String,
    /// What its instances reached for in WASI and did not get (filesystem,
    /// environment, arguments, network), counted per attempt.
    pub reach: Vec<(&'static str, u64)>,
    /// Facts it filtered, by reason (the first 32 reasons apart, then `other`).
    pub filtered: Vec<(String, u64)>,
}

#[derive(Debug, Default)]
struct Health {
    consecutive: u32,
    backoff: Duration,
    broken_until: Option<Instant>,
    last: String,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The file holds the module already deciding.
    Unchanged,
    /// A new module decides from the next batch on.
    Applied {
        /// The module replaced.
        from: String,
        /// The module now deciding.
        to: String,
    },
}

struct Loaded {
    module: Module,
    warm: Mutex<Vec<Warm>>,
}

/// A policy component in its sandbox. Decides batches on the calling thread under
/// the config's limits; never panics and never lets a fact through on a fault unless
/// its config says `on_fault = "allow"`.
pub struct WasmPolicy {
    name: Arc<str>,
    config: PolicyConfig,
    sandbox: Sandbox,
    current: RwLock<Arc<Loaded>>,
    health: Mutex<Health>,
    counters: Counters,
    permits: tokio::sync::Semaphore,
    /// What instances reached for and did not get.
    reach: Arc<crate::wasi::Reach>,
    /// Instances made so far: each one's deterministic randomness differs.
    seeds: AtomicU64,
}

impl std::fmt::Debug for WasmPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmPolicy")
            .field("name", &self.name)
            .field("sha256", &self.sha256())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WasmPolicy {
    /// Loads `config.module`: compiles it, checks its imports and exports, makes the
    /// first instance and runs `init` with the settings. Any failure refuses the
    /// policy with an error naming it, the module's sha256 and the cause.
    pub fn load(config: PolicyConfig) -> Result<WasmPolicy, PolicyError> {
        let sandbox = Sandbox::new(&config)?;
        let name: Arc<str> = config.name.as_str().into();
        let bytes = read(&config)?;
        let reach = Arc::new(crate::wasi::Reach::default());
        let loaded = load_module(&sandbox, &config, &name, &bytes, &reach, 0)?;
        tracing::info!(policy = %name, sha256 = %loaded.module.sha256, "policy loaded");
        let permits = tokio::sync::Semaphore::new(config.instances.max(1) as usize);
        let p = WasmPolicy {
            name,
            config,
            sandbox,
            current: RwLock::new(Arc::new(loaded)),
            health: Mutex::new(Health::default()),
            counters: Counters::default(),
            permits,
            reach,
            seeds: AtomicU64::new(1),
        };
        p.counters.instantiations.fetch_add(1, Ordering::Relaxed);
        Ok(p)
    }

    /// The config it was loaded with.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// `sha256:<hex>` of the module deciding now.
    pub fn sha256(&self) -> String {
        self.loaded().module.sha256.clone()
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the module file again; when its sha256 differs, loads it fully (compile,
    /// checks, first instance, `init`) and swaps it in atomically: a batch is decided
    /// entirely by the old module or entirely by the new one. A module that fails to
    /// load is refused and the old one keeps deciding. Logged and counted either way.
    pub fn reload(&self) -> Result<Reload, PolicyError> {
        let result = read(&self.config).and_then(|bytes| {
            let old = self.sha256();
            use sha2::Digest;
            let sha = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
            if sha == old {
                return Ok(Reload::Unchanged);
            }
            let seed = self.seeds.fetch_add(1, Ordering::Relaxed);
            let loaded = load_module(
                &self.sandbox,
                &self.config,
                &self.name,
                &bytes,
                &self.reach,
                seed,
            )?;
            *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
            *lock(&self.health) = Health::default();
            self.counters.instantiations.fetch_add(1, Ordering::Relaxed);
            Ok(Reload::Applied { from: old, to: sha })
        });
        let c = &self.counters;
        match &result {
            Ok(Reload::Unchanged) => {
                c.reloads_unchanged.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(policy = %self.name, "policy reload: module unchanged");
            }
            Ok(Reload::Applied { from, to }) => {
                c.reloads_applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(policy = %self.name, %from, %to, "policy reloaded");
            }
            Err(e) => {
                c.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(policy = %self.name, error = %e, "policy reload refused; the previous module stays");
            }
        }
        result
    }

    /// The counters and state now.
    pub fn stats(&self) -> PolicyStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PolicyStats {
            batches: g(&c.batches),
            allowed: g(&c.allowed),
            denied: g(&c.denied),
            fail_open: g(&c.fail_open),
            instantiations: g(&c.instantiations),
            faults: lock(&c.faults).clone(),
            reloads_applied: g(&c.reloads_applied),
            reloads_rejected: g(&c.reloads_rejected),
            reloads_unchanged: g(&c.reloads_unchanged),
            broken: lock(&self.health)
                .broken_until
                .is_some_and(|t| Instant::now() < t),
            sha256: self.sha256(),
            reach: self.reach.counts().to_vec(),
            filtered: lock(&c.filtered).clone(),
        }
    }

    /// Decides one batch on this thread (blocking for at most the config's timeout
    /// per call, plus one instantiation after a fault). At most `instances` callers
    /// should call at once; [`Policy::decide`] enforces that.
    pub fn decide_blocking(
        &self,
        ctx: &PolicyContext<'_>,
        facts: &[Candidate<'_>],
    ) -> Vec<Verdict> {
        self.decide_here(ctx, facts, true)
    }

    /// [`WasmPolicy::decide_blocking`]; `hop`: this thread may be running a tokio
    /// runtime (not inside `block_in_place`), so a WASI guest is called on a thread
    /// of its own.
    fn decide_here(
        &self,
        ctx: &PolicyContext<'_>,
        facts: &[Candidate<'_>],
        hop: bool,
    ) -> Vec<Verdict> {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        let loaded = self.loaded();
        let sha = &loaded.module.sha256;
        if let Some(fault) = self.still_broken() {
            return self.fail(sha, fault, facts.len());
        }
        let batch = Batch::new(facts);
        let wfacts: Vec<WFact<'_>> = batch.facts(facts);
        let n = wfacts.len();
        // Per-fact isolation: a call that faults is split in halves and each half
        // decided again, so the facts that did not cause the fault get their own
        // verdicts; a fault that still happens on one fact is that fact's. Bounded:
        // at most `budget` calls per batch (a fault on every fact costs a few calls,
        // not one per fact); what the budget does not reach fails as before.
        let mut budget = 4 * (usize::BITS - n.leading_zeros()) as usize + 4;
        let mut out: Vec<Option<Verdict>> = vec![None; n];
        let mut faults: Vec<(usize, usize, Fault)> = Vec::new();
        let mut decided_any = false;
        // The fault of the whole batch's call, reported when no part escapes it.
        let mut first: Option<Fault> = None;
        let mut ranges = vec![(0, n)];
        while let Some((lo, hi)) = ranges.pop() {
            budget = budget.saturating_sub(1);
            match self.call(&loaded, ctx, &wfacts[lo..hi], hop) {
                Ok(vs) => {
                    decided_any = true;
                    for (slot, v) in out[lo..hi].iter_mut().zip(vs) {
                        *slot = Some(self.verdict(v, sha));
                    }
                }
                Err(f) if hi - lo > 1 && budget >= 2 => {
                    tracing::debug!(policy = %self.name, facts = hi - lo, fault = %f, "policy fault; deciding the halves apart");
                    first.get_or_insert(f);
                    let mid = lo + (hi - lo) / 2;
                    ranges.push((mid, hi));
                    ranges.push((lo, mid));
                }
                Err(f) => faults.push((lo, hi, f)),
            }
        }
        if faults.is_empty() || decided_any {
            // The policy decides: whatever faulted was caused by those facts.
            self.recovered();
            for (lo, hi, f) in faults {
                tracing::warn!(policy = %self.name, sha256 = %sha, kind = f.kind(), fault = %f, facts = hi - lo, "policy fault on these facts alone; the rest of the batch was decided");
                for (slot, v) in out[lo..hi]
                    .iter_mut()
                    .zip(self.fail(sha, f.clone(), hi - lo))
                {
                    *slot = Some(v);
                }
            }
        } else {
            // Nothing decided at all: the policy itself is at fault (the whole
            // batch's fault is the one reported).
            let f = first.unwrap_or_else(|| faults.swap_remove(0).2);
            return self.faulted(sha, f, n);
        }
        out.into_iter()
            .map(|v| {
                v.unwrap_or_else(|| {
                    Verdict::Deny(Denial {
                        policy: self.name.to_string(),
                        reason: "policy_fault: no verdict".into(),
                        module_sha256: sha.clone(),
                    })
                })
            })
            .collect()
    }

    /// A guest's verdict as the core's, counted.
    fn verdict(&self, v: WVerdict, sha: &str) -> Verdict {
        let denial = |reason| Denial {
            policy: self.name.to_string(),
            reason,
            module_sha256: sha.to_owned(),
        };
        match v {
            WVerdict::Allow => {
                self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                Verdict::Allow
            }
            WVerdict::Deny(reason) => {
                self.counters.denied.fetch_add(1, Ordering::Relaxed);
                Verdict::Deny(denial(reason))
            }
            WVerdict::Filter(reason) => {
                self.filtered(&reason);
                Verdict::Filter(denial(reason))
            }
        }
    }

    /// One call of `decide` on a warm instance (made first when none is left),
    /// which goes back to the pool when the call succeeded and is dropped when it
    /// faulted (its memory may be anywhere).
    fn call(
        &self,
        loaded: &Loaded,
        ctx: &PolicyContext<'_>,
        wfacts: &[WFact<'_>],
        hop: bool,
    ) -> Result<Vec<WVerdict>, Fault> {
        let warm = lock(&loaded.warm).pop();
        let seed = self.seeds.fetch_add(1, Ordering::Relaxed);
        let wctx = WContext::from(ctx);
        // (an instance was made, the call's outcome)
        let (made, called) = crate::sandbox::guest(loaded.module.uses_wasi, hop, || {
            let (made, mut warm) = match warm {
                Some(w) => (false, w),
                None => match Warm::new(
                    &self.sandbox,
                    &loaded.module,
                    &self.config,
                    &self.name,
                    &self.reach,
                    seed,
                ) {
                    Ok(w) => (true, w),
                    Err(f) => return (false, Err(f)),
                },
            };
            let verdicts = warm.decide(&self.sandbox, &self.config, wctx, wfacts);
            (made, verdicts.map(|v| (warm, v)))
        })
        .unwrap_or_else(|| {
            let panicked = Fault::Other("the policy's call thread panicked".into());
            (false, Err(panicked))
        });
        if made {
            self.counters.instantiations.fetch_add(1, Ordering::Relaxed);
        }
        called.map(|(warm, verdicts)| {
            lock(&loaded.warm).push(warm);
            verdicts
        })
    }

    fn filtered(&self, reason: &str) {
        let mut f = lock(&self.counters.filtered);
        if let Some((_, n)) = f.iter_mut().find(|(r, _)| r == reason) {
            *n += 1;
        } else if f.len() < FILTER_REASONS {
            f.push((reason.to_owned(), 1));
        } else if let Some((_, n)) = f.iter_mut().find(|(r, _)| r == "other") {
            *n += 1;
        } else {
            f.push(("other".to_owned(), 1));
        }
    }

    fn still_broken(&self) -> Option<Fault> {
        let h = lock(&self.health);
        let until = h.broken_until?;
        let now = Instant::now();
        (now < until).then(|| Fault::Broken {
            faults: h.consecutive,
            retry_in: until - now,
            last: h.last.clone(),
        })
    }

    fn recovered(&self) {
        let mut h = lock(&self.health);
        if h.broken_until.is_some() {
            tracing::info!(policy = %self.name, "policy recovered");
        }
        *h = Health::default();
    }

    fn faulted(&self, sha: &str, fault: Fault, n: usize) -> Vec<Verdict> {
        {
            let mut h = lock(&self.health);
            h.consecutive += 1;
            h.last = fault.to_string();
            if h.consecutive >= self.config.broken_after.max(1) {
                h.backoff = if h.broken_until.is_some() {
                    (h.backoff * 2).min(self.config.backoff_max)
                } else {
                    self.config.backoff_min
                };
                h.broken_until = Some(Instant::now() + h.backoff);
                tracing::error!(
                    policy = %self.name,
                    faults = h.consecutive,
                    backoff_ms = h.backoff.as_millis() as u64,
                    last = %h.last,
                    "policy broken: failing batches without calling it until the backoff passes"
                );
            }
        }
        tracing::warn!(policy = %self.name, sha256 = %sha, kind = fault.kind(), fault = %fault, facts = n, "policy fault");
        self.fail(sha, fault, n)
    }

    fn fail(&self, sha: &str, fault: Fault, n: usize) -> Vec<Verdict> {
        {
            let mut faults = lock(&self.counters.faults);
            match faults.iter_mut().find(|(k, _)| *k == fault.kind()) {
                Some((_, c)) => *c += 1,
                None => faults.push((fault.kind(), 1)),
            }
        }
        match self.config.on_fault {
            OnFault::Allow => {
                self.counters
                    .fail_open
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.counters.allowed.fetch_add(n as u64, Ordering::Relaxed);
                tracing::warn!(policy = %self.name, sha256 = %sha, facts = n, fault = %fault, "policy failed open: facts allowed without a decision (on_fault = \"allow\")");
                vec![Verdict::Allow; n]
            }
            OnFault::Deny => {
                self.counters.denied.fetch_add(n as u64, Ordering::Relaxed);
                let d = Denial {
                    policy: self.name.to_string(),
                    reason: format!("policy_fault: {fault}"),
                    module_sha256: sha.to_owned(),
                };
                vec![Verdict::Deny(d); n]
            }
        }
    }
}

fn read(config: &PolicyConfig) -> Result<Vec<u8>, PolicyError> {
    std::fs::read(&config.module).map_err(|e| PolicyError::Read {
        policy: config.name.clone(),
        path: config.module.display().to_string(),
        error: e.to_string(),
    })
}

fn load_module(
    sandbox: &Sandbox,
    config: &PolicyConfig,
    name: &Arc<str>,
    bytes: &[u8],
    reach: &Arc<crate::wasi::Reach>,
    seed: u64,
) -> Result<Loaded, PolicyError> {
    let module = Module::compile(sandbox, config, bytes)?;
    let first = crate::sandbox::guest(module.uses_wasi, true, || {
        Warm::new(sandbox, &module, config, name, reach, seed)
    })
    .unwrap_or_else(|| Err(Fault::Other("the policy's call thread panicked".into())))
    .map_err(|f| {
        let sha256 = module.sha256.clone();
        match f {
            Fault::Other(e) if e.contains("does not have the type") => PolicyError::WrongExports {
                policy: config.name.clone(),
                sha256,
                error: e,
            },
            f => PolicyError::Init {
                policy: config.name.clone(),
                sha256,
                error: f.to_string(),
            },
        }
    })?;
    Ok(Loaded {
        module,
        warm: Mutex::new(vec![first]),
    })
}

#[async_trait]
impl Policy for WasmPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    /// Waits for one of `instances` permits, then decides on this task's thread:
    /// moved off the async workers with `block_in_place` on a multi-threaded runtime,
    /// so a slow policy (bounded by its timeout) does not stall other connections.
    async fn decide(&self, ctx: &PolicyContext<'_>, facts: &[Candidate<'_>]) -> Vec<Verdict> {
        let _permit = self.permits.acquire().await;
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi {
            tokio::task::block_in_place(|| self.decide_here(ctx, facts, false))
        } else {
            self.decide_here(ctx, facts, true)
        }
    }
}
