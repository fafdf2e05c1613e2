//! The wasmtime side: one engine per policy (pooling allocator, epoch interruption,
//! optional fuel), the linker with the host interface, loading a component with every
//! check a security reviewer expects, and one call under the policy's limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::types::{ComponentExtern, ComponentItem};
use wasmtime::component::{Component, Func, InstancePre, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    StoreContextMut, Trap,
};

use crate::abi::{self, WContext, WFact, WLevel, WVerdict, WVerdictV1};
use crate::config::PolicyConfig;
use crate::error::PolicyError;

/// Log lines one call may write; the rest are dropped (and counted as one line).
const LOG_LINES_PER_CALL: u32 = 32;
/// Longest log line kept, in bytes.
const LOG_LINE_BYTES: usize = 1024;

/// What a store carries: the policy's name for its logs, the limits' bookkeeping
/// and the (empty) WASI context.
pub(crate) struct HostState {
    policy: Arc<str>,
    memory_limit: usize,
    memory_hit: bool,
    /// Log lines left in this call, shared by `host.log`, stdout and stderr.
    logs_left: Arc<std::sync::atomic::AtomicU32>,
    pub(crate) wasi: crate::wasi::WasiState,
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_hit = true;
            wasmtime::bail!("memory limit of {} bytes exceeded", self.memory_limit);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Why a call did not produce verdicts. `reason()` is what a denial says after
/// `policy_fault: `; `kind()` labels the fault metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The wall-time deadline passed.
    Deadline(Duration),
    /// Linear memory would have grown past the limit.
    Memory(usize),
    /// The fuel ran out.
    Fuel(u64),
    /// The guest trapped (a panic in a Rust guest, `unreachable`, out of bounds...).
    Trap(String),
    /// A different number of verdicts than facts.
    Count {
        /// Verdicts returned.
        got: usize,
        /// Facts sent.
        sent: usize,
    },
    /// Anything else the call failed with (a malformed answer, a failed instantiation).
    Other(String),
    /// The policy is broken: too many consecutive faults, waiting out its backoff.
    Broken {
        /// Consecutive faults so far.
        faults: u32,
        /// Until the next try.
        retry_in: Duration,
        /// The last fault's reason.
        last: String,
    },
}

impl Fault {
    /// Every [`Fault::kind`], so a metric can show each at 0 before the first fault.
    pub const KINDS: [&'static str; 7] = [
        "deadline", "memory", "fuel", "trap", "count", "other", "broken",
    ];

    /// Metric label: `deadline`, `memory`, `fuel`, `trap`, `count`, `other`, `broken`.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Deadline(_) => "deadline",
            Fault::Memory(_) => "memory",
            Fault::Fuel(_) => "fuel",
            Fault::Trap(_) => "trap",
            Fault::Count { .. } => "count",
            Fault::Other(_) => "other",
            Fault::Broken { .. } => "broken",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Deadline(d) => write!(f, "deadline of {d:?} exceeded"),
            Fault::Memory(m) => write!(f, "memory limit of {m} bytes exceeded"),
            Fault::Fuel(n) => write!(f, "fuel of {n} exhausted"),
            Fault::Trap(t) => write!(f, "trap: {t}"),
            Fault::Count { got, sent } => write!(f, "{got} verdicts for {sent} facts"),
            Fault::Other(e) => f.write_str(e),
            Fault::Broken {
                faults,
                retry_in,
                last,
            } => write!(
                f,
                "broken after {faults} consecutive faults, next try in {:.1}s (last: {last})",
                retry_in.as_secs_f64()
            ),
        }
    }
}

/// An engine and its epoch ticker (stopped when the sandbox is dropped).
pub(crate) struct Sandbox {
    pub engine: Engine,
    pub linker: Linker<HostState>,
    pub tick: Duration,
    stop: Arc<AtomicBool>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Sandbox {
    /// An engine sized for `cfg` (instances twice over, so a reload can load the new
    /// module while the old one still decides) with the host interface linked.
    pub fn new(cfg: &PolicyConfig) -> Result<Sandbox, PolicyError> {
        let slots = cfg.instances.max(1) * 2 + 2;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(slots)
            .total_core_instances(slots * 16)
            .max_core_instances_per_component(16)
            // One linear memory per component (what wit-bindgen guests have). Each
            // slot reserves wasmtime's default 4 GiB of address space (not memory):
            // bounding the reservation to the memory limit measured ~10 % slower per
            // fact (explicit bounds checks), so the address space is spent instead.
            .total_memories(slots)
            .max_memories_per_component(1)
            .total_tables(slots * 8)
            .max_tables_per_component(8)
            .max_memory_size(cfg.memory_bytes);
        let mut c = Config::new();
        c.epoch_interruption(true)
            .consume_fuel(cfg.fuel.is_some())
            .wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&c).map_err(|e| PolicyError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        link_host(&mut linker).map_err(|e| PolicyError::Engine(e.to_string()))?;
        let tick = (cfg.timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(10));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("policy-epoch-{}", cfg.name))
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    e.increment_epoch();
                }
            })
            .map_err(|e| PolicyError::Engine(format!("epoch ticker: {e}")))?;
        Ok(Sandbox {
            engine,
            linker,
            tick,
            stop,
        })
    }

    /// Epoch ticks that cover `timeout`.
    pub fn deadline_ticks(&self, timeout: Duration) -> u64 {
        // One more than the ticks in `timeout`: the current tick is already partly over,
        // so the call never stops before its timeout, and at most one tick after it.
        timeout.as_nanos().div_ceil(self.tick.as_nanos().max(1)) as u64 + 1
    }
}

/// `host.log`: one line to the gateway's log under the policy's name, at most
/// [`LOG_LINES_PER_CALL`] per call (shared with stdout and stderr), each cut at
/// [`LOG_LINE_BYTES`].
fn log(
    mut store: StoreContextMut<'_, HostState>,
    (level, message): (WLevel, String),
) -> wasmtime::Result<()> {
    let st = store.data_mut();
    let left = st.logs_left.load(Ordering::Relaxed);
    if left == 0 {
        return Ok(());
    }
    st.logs_left.store(left - 1, Ordering::Relaxed);
    let mut message = message;
    if message.len() > LOG_LINE_BYTES {
        let mut cut = LOG_LINE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    if left == 1 {
        message.push_str(" (further lines of this call dropped)");
    }
    let policy = &*st.policy;
    match level {
        WLevel::Debug => tracing::debug!(policy, "{message}"),
        WLevel::Info => tracing::info!(policy, "{message}"),
        WLevel::Warn => tracing::warn!(policy, "{message}"),
        WLevel::Error => tracing::error!(policy, "{message}"),
    }
    Ok(())
}

/// Links `host.log` for every contract version served, and WASI 0.2 (whose clock and
/// randomness grants apply per instance, in its context).
fn link_host(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let versions = std::iter::once((abi::TYPES_INTERFACE, abi::HOST_INTERFACE)).chain(abi::OLDER);
    for (types, host) in versions {
        // Types only: guests built with wit-bindgen import it for the record definitions.
        linker.instance(types)?;
        linker.instance(host)?.func_wrap("log", log)?;
    }
    crate::wasi::link(linker)?;
    Ok(())
}

/// A compiled, checked component, ready to instantiate.
pub(crate) struct Module {
    pub sha256: String,
    pub pre: InstancePre<HostState>,
    pub has_init: bool,
    /// It imports WASI: its calls must run where wasmtime-wasi may block on its own
    /// runtime (see [`guest`]).
    pub uses_wasi: bool,
}

/// Runs a call into a guest. wasmtime-wasi's synchronous bindings drive their futures
/// with `block_on`, which a thread that is running a tokio runtime may not do: for a
/// component that imports WASI, called from such a thread (`hop`), the call runs on a
/// scoped thread of its own (the policy's work is bounded by its deadline either
/// way). A component without WASI imports, or a caller already outside the runtime
/// (`block_in_place`), runs here.
pub(crate) fn guest<R: Send>(
    uses_wasi: bool,
    hop: bool,
    f: impl FnOnce() -> R + Send,
) -> Option<R> {
    if uses_wasi && hop && tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(f).join().ok())
    } else {
        Some(f())
    }
}

impl Module {
    /// Compiles `bytes` and checks, in order: that it is a component; that it imports
    /// nothing but `bsfg:policy/host` (and `types`) and the interfaces `cfg` grants;
    /// that the host can satisfy those imports with their types; that it exports
    /// `decide` (and
    /// `init` when settings are given). Types of the exports are checked when the
    /// first instance is made.
    pub fn compile(
        sandbox: &Sandbox,
        cfg: &PolicyConfig,
        bytes: &[u8],
    ) -> Result<Module, PolicyError> {
        use sha2::Digest;
        let sha256 = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        let name = &cfg.name;
        let component =
            Component::new(&sandbox.engine, bytes).map_err(|e| PolicyError::Compile {
                policy: name.clone(),
                sha256: sha256.clone(),
                error: format!("{e:#}"),
            })?;
        let ty = component.component_type();
        for (import, _) in ty.imports(&sandbox.engine) {
            let wasi_02 = crate::wasi::PACKAGES
                .iter()
                .any(|p| import.starts_with(p) && import.contains("@0.2."));
            let ours = std::iter::once((abi::TYPES_INTERFACE, abi::HOST_INTERFACE))
                .chain(abi::OLDER)
                .any(|(t, h)| import == t || import == h);
            let allowed = ours || wasi_02;
            if !allowed {
                return Err(PolicyError::ForbiddenImport {
                    policy: name.clone(),
                    sha256,
                    import: import.to_owned(),
                });
            }
        }
        let uses_wasi = ty
            .imports(&sandbox.engine)
            .any(|(import, _)| crate::wasi::PACKAGES.iter().any(|p| import.starts_with(p)));
        let pre =
            sandbox
                .linker
                .instantiate_pre(&component)
                .map_err(|e| PolicyError::ImportTypes {
                    policy: name.clone(),
                    sha256: sha256.clone(),
                    error: format!("{e:#}"),
                })?;
        let exports: Vec<String> = ty
            .exports(&sandbox.engine)
            .map(|(n, item)| {
                let kind = match item.ty {
                    ComponentItem::ComponentFunc(_) => "func",
                    ComponentItem::ComponentInstance(_) => "instance",
                    _ => "item",
                };
                format!("{n} ({kind})")
            })
            .collect();
        let is_func = |n: &str| {
            matches!(
                ty.get_export(&sandbox.engine, n),
                Some(ComponentExtern {
                    ty: ComponentItem::ComponentFunc(_),
                    ..
                })
            )
        };
        if !is_func("decide") {
            return Err(PolicyError::WrongExports {
                policy: name.clone(),
                sha256,
                error: format!(
                    "no function `decide` exported (world `policy` of {}); it exports: [{}]",
                    abi::PACKAGE,
                    exports.join(", ")
                ),
            });
        }
        let has_init = is_func("init");
        if !has_init && !cfg.settings.is_empty() {
            return Err(PolicyError::WrongExports {
                policy: name.clone(),
                sha256,
                error: "settings are configured but the module exports no `init` to take them"
                    .into(),
            });
        }
        Ok(Module {
            sha256,
            pre,
            has_init,
            uses_wasi,
        })
    }
}

/// One instance, reused across batches until it faults.
pub(crate) struct Warm {
    store: Store<HostState>,
    decide: Func,
    /// Built against `bsfg:policy@0.1.0`: its verdicts have no `filter`.
    v1: bool,
}

/// Runs `f` with the call limits set, and turns an error into a [`Fault`].
fn limited<R>(
    store: &mut Store<HostState>,
    sandbox: &Sandbox,
    cfg: &PolicyConfig,
    f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
) -> Result<R, Fault> {
    store.set_epoch_deadline(sandbox.deadline_ticks(cfg.timeout));
    if let Some(fuel) = cfg.fuel {
        store
            .set_fuel(fuel)
            .map_err(|e| Fault::Other(format!("setting fuel: {e}")))?;
    }
    {
        let st = store.data_mut();
        st.memory_hit = false;
        st.logs_left.store(LOG_LINES_PER_CALL, Ordering::Relaxed);
    }
    f(store).map_err(|e| classify(store, cfg, &e))
}

fn classify(store: &Store<HostState>, cfg: &PolicyConfig, e: &wasmtime::Error) -> Fault {
    if store.data().memory_hit {
        return Fault::Memory(cfg.memory_bytes);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Fault::Deadline(cfg.timeout),
        Some(Trap::OutOfFuel) => Fault::Fuel(cfg.fuel.unwrap_or(0)),
        Some(t) => Fault::Trap(t.to_string()),
        None => Fault::Other(format!("{e:#}")),
    }
}

impl Warm {
    /// A new instance of `module`, initialised with `cfg`'s settings under the limits.
    pub fn new(
        sandbox: &Sandbox,
        module: &Module,
        cfg: &PolicyConfig,
        policy: &Arc<str>,
        reach: &Arc<crate::wasi::Reach>,
        seed: u64,
    ) -> Result<Warm, Fault> {
        let logs_left = Arc::new(std::sync::atomic::AtomicU32::new(LOG_LINES_PER_CALL));
        let ctx = crate::wasi::context(policy, &cfg.grants, &logs_left, seed);
        let mut store = Store::new(
            &sandbox.engine,
            HostState {
                policy: policy.clone(),
                memory_limit: cfg.memory_bytes,
                memory_hit: false,
                logs_left,
                wasi: crate::wasi::WasiState {
                    ctx,
                    table: wasmtime::component::ResourceTable::new(),
                    reach: reach.clone(),
                },
            },
        );
        store.limiter(|s| s);
        let instance = limited(&mut store, sandbox, cfg, |s| module.pre.instantiate(s))?;
        let decide = instance
            .get_func(&mut store, "decide")
            .ok_or_else(|| Fault::Other("no `decide` export".into()))?;
        let v1 = match decide.typed::<(WContext<'_>, &[WFact<'_>]), (Vec<WVerdict>,)>(&store) {
            Ok(_) => false,
            Err(e) => {
                decide
                    .typed::<(WContext<'_>, &[WFact<'_>]), (Vec<WVerdictV1>,)>(&store)
                    .map_err(|_| {
                        Fault::Other(format!(
                            "`decide` does not have the type of world `policy` of {}: {e:#}",
                            abi::PACKAGE
                        ))
                    })?;
                true
            }
        };
        if module.has_init {
            let init = instance
                .get_typed_func::<(&[(&str, &str)],), (Result<(), String>,)>(&mut store, "init")
                .map_err(|e| {
                    Fault::Other(format!(
                        "`init` does not have the type of world `policy` of {}: {e:#}",
                        abi::PACKAGE
                    ))
                })?;
            let settings: Vec<(&str, &str)> = cfg
                .settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let (r,) = limited(&mut store, sandbox, cfg, |s| init.call(s, (&settings,)))?;
            r.map_err(|e| Fault::Other(format!("init refused the settings: {e}")))?;
        }
        Ok(Warm { store, decide, v1 })
    }

    /// Decides one batch under the limits. A fault leaves this instance unusable:
    /// the caller drops it.
    pub fn decide(
        &mut self,
        sandbox: &Sandbox,
        cfg: &PolicyConfig,
        ctx: WContext<'_>,
        facts: &[WFact<'_>],
    ) -> Result<Vec<WVerdict>, Fault> {
        let decide = self.decide;
        let v1 = self.v1;
        let (verdicts,) = limited(&mut self.store, sandbox, cfg, |s| {
            if v1 {
                let (vs,) = decide
                    .typed::<(WContext<'_>, &[WFact<'_>]), (Vec<WVerdictV1>,)>(&*s)?
                    .call(s, (ctx, facts))?;
                Ok((vs.into_iter().map(WVerdict::from).collect(),))
            } else {
                decide
                    .typed::<(WContext<'_>, &[WFact<'_>]), (Vec<WVerdict>,)>(&*s)?
                    .call(s, (ctx, facts))
            }
        })?;
        if verdicts.len() != facts.len() {
            return Err(Fault::Count {
                got: verdicts.len(),
                sent: facts.len(),
            });
        }
        Ok(verdicts)
    }
}
