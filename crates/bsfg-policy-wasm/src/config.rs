//! A policy's configuration, as composed from a zone's config file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// What a policy does with a batch it could not decide (trap, exceeded limit, broken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFault {
    /// Deny every fact of the batch with `policy_fault: ...` (the default).
    #[default]
    Deny,
    /// Allow every fact of the batch. Logged (warn) and counted in
    /// `bsfg_policy_fail_open_total` every time it happens.
    Allow,
}

/// What a policy's config may make real behind WASI (nothing else is ever granted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostGrant {
    /// The host's wall and monotonic clocks (`wasi:clocks/*`); without it a policy
    /// reads 1970-01-01 and a clock that stands still.
    Clock,
    /// The host's randomness (`wasi:random/*`); without it a policy draws a
    /// deterministic stream per instance.
    Random,
}

impl HostGrant {
    /// The config name (`clock`, `random`).
    pub fn as_str(self) -> &'static str {
        match self {
            HostGrant::Clock => "clock",
            HostGrant::Random => "random",
        }
    }

    /// Parses a config name.
    pub fn parse(s: &str) -> Option<HostGrant> {
        match s {
            "clock" => Some(HostGrant::Clock),
            "random" => Some(HostGrant::Random),
            _ => None,
        }
    }
}

/// One policy: a component file, its settings and its sandbox limits.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// Name in config, in logs, metrics and every denial.
    pub name: String,
    /// The component file (`.wasm`, or component text `.wat`).
    pub module: PathBuf,
    /// Passed to the component's `init`, sorted by key.
    pub settings: BTreeMap<String, String>,
    /// Linear memory an instance may grow to; growing past it traps the call.
    pub memory_bytes: usize,
    /// Wall time one call (`init` or `decide` of one batch) may take (epoch deadline).
    pub timeout: Duration,
    /// Instructions one call may execute (wasmtime fuel); `None` disables metering.
    pub fuel: Option<u64>,
    /// What a batch that could not be decided gets.
    pub on_fault: OnFault,
    /// Host interfaces granted beyond the log.
    pub grants: Vec<HostGrant>,
    /// Instances kept warm, and how many batches may be decided at once.
    pub instances: u32,
    /// Consecutive faults after which the policy is broken (fails every batch without
    /// calling the module until the backoff passes).
    pub broken_after: u32,
    /// First broken period; doubles each time a retry faults again.
    pub backoff_min: Duration,
    /// Longest broken period.
    pub backoff_max: Duration,
}

impl PolicyConfig {
    /// A policy `name` running `module` with the default limits: 16 MiB of memory,
    /// 100 ms per call, no fuel, fail closed, nothing granted, 2 instances, broken
    /// after 3 consecutive faults with a 1 s..60 s backoff.
    pub fn new(name: impl Into<String>, module: impl Into<PathBuf>) -> Self {
        PolicyConfig {
            name: name.into(),
            module: module.into(),
            settings: BTreeMap::new(),
            memory_bytes: 16 << 20,
            timeout: Duration::from_millis(100),
            fuel: None,
            on_fault: OnFault::Deny,
            grants: Vec::new(),
            instances: 2,
            broken_after: 3,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}
