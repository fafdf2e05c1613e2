//! The wasmtime host for BSFG policy components (`plugins/wit/policy.wit`,
//! `bsfg:policy@0.1.0`).
//!
//! A [`WasmPolicy`] is one component from a zone's config, compiled once and kept as
//! an `InstancePre` with warm instances reused across batches (pooling allocator).
//! Guarantees:
//! - **Sandboxed**: the component gets `bsfg:policy/host.log` and nothing else unless
//!   its config grants it (only `clock`); any other import refuses the module at load.
//! - **Bounded**: every call (`init`, `decide`) runs under the config's memory limit
//!   (growing past it traps), wall-time deadline (epoch interruption) and optional
//!   fuel.
//! - **Fail closed**: a trap, an exceeded limit or a wrong number of verdicts denies
//!   the whole batch with `policy_fault: ...`, drops the instance (the next batch gets
//!   a fresh one) and is counted. After `broken_after` consecutive faults the policy is
//!   broken: batches fail without calling it until a backoff (doubling up to
//!   `backoff_max`) passes, then one batch tries again. `on_fault = "allow"` lets
//!   facts through instead, logged and counted each time.
//! - **Hot reload**: [`WasmPolicy::reload`] swaps in a changed module (by sha256)
//!   between batches; a module that fails any load check is refused and the old one
//!   stays.
#![forbid(unsafe_code)]

mod abi;
pub mod config;
pub mod error;
mod policy;
mod sandbox;
mod wasi;

pub use abi::{HOST_INTERFACE, PACKAGE};
pub use config::{HostGrant, OnFault, PolicyConfig};
pub use error::PolicyError;
pub use policy::{PolicyStats, Reload, WasmPolicy};
pub use sandbox::Fault;
pub use wasi::Reach;
