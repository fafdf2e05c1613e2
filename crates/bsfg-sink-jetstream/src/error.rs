//! Start-up errors of the sink. Runtime errors of the four operations are
//! [`bsfg_core::BoundaryError`]s.

/// Why a zone log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The configuration breaks a rule.
    #[error("sink config: {0}")]
    Config(String),
    /// The NATS server could not be reached.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// URL tried.
        url: String,
        /// Cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A stream or consumer exists with settings other than the configured ones. It is
    /// reported, never silently changed.
    #[error(
        "{kind} `{name}` exists with {field} = {existing}, but the config wants {wanted}; change the config or migrate the {kind} by hand"
    )]
    Conflict {
        /// `stream` or `consumer`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The differing setting.
        field: &'static str,
        /// What the server has.
        existing: String,
        /// What the config wants.
        wanted: String,
    },
    /// The on-disk look-up of the idempotency index could not be read or written.
    #[error("idempotency look-up store: {0}")]
    Lookup(String),
    /// The zone was created with an index layout this version does not run; nothing
    /// was changed. The message says what to run.
    #[error("{0}")]
    Layout(String),
    /// A JetStream API call failed.
    #[error("JetStream {op}: {message}")]
    JetStream {
        /// What was being done.
        op: &'static str,
        /// The server's or client's message.
        message: String,
    },
}

impl SinkError {
    pub(crate) fn conflict(
        kind: &'static str,
        name: &str,
        field: &'static str,
        existing: String,
        wanted: String,
    ) -> Self {
        SinkError::Conflict {
            kind,
            name: name.into(),
            field,
            existing,
            wanted,
        }
    }

    pub(crate) fn js(op: &'static str, e: impl std::fmt::Display) -> Self {
        SinkError::JetStream {
            op,
            message: e.to_string(),
        }
    }
}

/// A store call failed in a way a retry may fix.
pub(crate) fn unavailable(what: &str, e: impl std::fmt::Display) -> bsfg_core::BoundaryError {
    bsfg_core::BoundaryError::Unavailable(format!("{what}: {e}"))
}
