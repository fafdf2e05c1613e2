//! Why a policy could not be loaded (at start-up, `bsfg validate`, or a reload).

/// A module refused at load. Every variant names the policy and the module's sha256.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The module file could not be read.
    #[error("policy `{policy}`: cannot read module `{path}`: {error}")]
    Read {
        /// Policy name.
        policy: String,
        /// The file.
        path: String,
        /// What the OS said.
        error: String,
    },
    /// Not a valid WebAssembly component.
    #[error("policy `{policy}`: module {sha256} is not a valid component: {error}")]
    Compile {
        /// Policy name.
        policy: String,
        /// `sha256:<hex>` of the file.
        sha256: String,
        /// What the compiler said.
        error: String,
    },
    /// Imports something the host does not offer this policy.
    #[error(
        "policy `{policy}`: module {sha256} imports `{import}`, which this host does not offer (a policy gets `bsfg:policy/host` and WASI 0.2 with nothing behind it: wasi:cli, wasi:clocks, wasi:filesystem, wasi:io, wasi:random, wasi:sockets)"
    )]
    ForbiddenImport {
        /// Policy name.
        policy: String,
        /// `sha256:<hex>` of the file.
        sha256: String,
        /// The refused import.
        import: String,
    },
    /// Imports an offered interface with types this host does not have (a guest built
    /// against another version of the WIT package).
    #[error(
        "policy `{policy}`: module {sha256} imports what this host offers with other types (built for another version of the WIT package?): {error}"
    )]
    ImportTypes {
        /// Policy name.
        policy: String,
        /// `sha256:<hex>` of the file.
        sha256: String,
        /// What wasmtime said.
        error: String,
    },
    /// Does not export the world's functions with their types.
    #[error("policy `{policy}`: module {sha256} has the wrong exports: {error}")]
    WrongExports {
        /// Policy name.
        policy: String,
        /// `sha256:<hex>` of the file.
        sha256: String,
        /// Which export and why.
        error: String,
    },
    /// Instantiating or `init` failed (including a trap or an exceeded limit).
    #[error("policy `{policy}`: module {sha256} failed to start: {error}")]
    Init {
        /// Policy name.
        policy: String,
        /// `sha256:<hex>` of the file.
        sha256: String,
        /// The failure.
        error: String,
    },
    /// The wasmtime engine could not be configured.
    #[error("policy engine: {0}")]
    Engine(String),
}
