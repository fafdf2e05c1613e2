//! Paths of the policy plugins tests load: the Rust examples and fixtures that
//! `scripts/setup.sh` builds for wasm32-wasip2, and the hostile fixtures in component
//! text. A missing build is a loud panic naming the command, never a skip.

use std::path::PathBuf;

/// The repository's `plugins/` folder.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../plugins")
}

/// `plugins/<folder>/<name>.wasm`, which `scripts/setup.sh` builds (`how` says with
/// what, for the panic).
fn component(folder: &str, name: &str, how: &str) -> PathBuf {
    let p = dir().join(format!("{folder}/{name}.wasm"));
    assert!(
        p.exists(),
        "policy plugin {} is not built: run scripts/setup.sh (it builds {how})",
        p.display()
    );
    p
}

/// A built Rust policy (`allow_labels`, `deny_predicates`, `json_fields`, `chaos`).
///
/// # Panics
/// When it was not built: run `scripts/setup.sh`.
pub fn built(name: &str) -> PathBuf {
    let how = "plugins/ for wasm32-wasip2";
    component("target/wasm32-wasip2/release", name, how)
}

/// A Python policy (`plugins/python/<name>/app.py`) built by `scripts/setup.sh` with
/// componentize-py, e.g. `site_filter`.
///
/// # Panics
/// When it was not built: run `scripts/setup.sh`.
pub fn built_python(name: &str) -> PathBuf {
    component(
        "python/target",
        name,
        "plugins/python/ with componentize-py",
    )
}

/// A component of the std-Rust workspace (`plugins/std/`) built by
/// `scripts/setup.sh`, e.g. `json_rules`, `wasi_probe`.
///
/// # Panics
/// When it was not built: run `scripts/setup.sh`.
pub fn built_std(name: &str) -> PathBuf {
    let how = "plugins/std/ for wasm32-wasip2";
    component("std/target/wasm32-wasip2/release", name, how)
}

/// A hostile fixture in component text (`infinite-loop`, `memory-bomb`, `trap`,
/// `no-verdicts`, `imports-unknown`, `imports-clock`, `wrong-exports`, `no-decide`,
/// `wrong-host-types`).
///
/// # Panics
/// When no such fixture exists.
pub fn hostile(name: &str) -> PathBuf {
    let p = dir().join(format!("fixtures/hostile/{name}.wat"));
    assert!(p.exists(), "no hostile fixture {}", p.display());
    p
}
