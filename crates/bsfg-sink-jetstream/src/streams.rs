//! Creates or verifies the zone's streams. Existing streams with conflicting settings
//! are reported with [`SinkError::Conflict`], never changed.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config, DiscardPolicy, StorageType, Stream},
};

use crate::config::{JetStreamConfig, StreamClass};
use crate::error::SinkError;

/// Name of the stream of link checkpoints (one message per link).
pub const LINKS_STREAM: &str = "bsfg_links";
/// Subject prefix of link checkpoints (`bsfg.links.<link name>`).
pub const LINKS_PREFIX: &str = "bsfg.links";

pub(crate) fn links_stream_config(cfg: &JetStreamConfig) -> Config {
    Config {
        name: LINKS_STREAM.into(),
        description: Some(format!(
            "BSFG link checkpoints: the frontier each link's last confirm returned (zone {})",
            cfg.zone
        )),
        subjects: vec![format!("{LINKS_PREFIX}.*")],
        max_messages_per_subject: 1,
        storage: StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window.min(Duration::from_secs(120)),
        allow_direct: true,
        allow_atomic_publish: false,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

/// The stream of a class in the two-stream layout before the one-stream log (what
/// `bsfg index migrate` moves): for tools and tests that build such a zone.
pub fn class_stream_config(class: &StreamClass, cfg: &JetStreamConfig) -> Config {
    Config {
        name: class.stream_name(),
        description: Some(format!(
            "BSFG facts of class {} (zone {})",
            class.name, cfg.zone
        )),
        subjects: vec![format!("facts.{}.>", class.name)],
        max_age: class.max_age,
        storage: StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window,
        allow_direct: true,
        allow_atomic_publish: true,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

fn conflict(name: &str, field: &'static str, existing: String, wanted: String) -> SinkError {
    SinkError::conflict("stream", name, field, existing, wanted)
}

/// Compares the settings BSFG relies on; the first difference is an error.
pub(crate) fn verify(existing: &Config, wanted: &Config) -> Result<(), SinkError> {
    let n = &wanted.name;
    let mut have = existing.subjects.clone();
    have.sort();
    let mut want = wanted.subjects.clone();
    want.sort();
    if have != want {
        return Err(conflict(
            n,
            "subjects",
            format!("{have:?}"),
            format!("{want:?}"),
        ));
    }
    macro_rules! same {
        ($field:ident, $label:literal) => {
            if existing.$field != wanted.$field {
                return Err(conflict(
                    n,
                    $label,
                    format!("{:?}", existing.$field),
                    format!("{:?}", wanted.$field),
                ));
            }
        };
    }
    same!(max_age, "max_age");
    same!(storage, "storage");
    same!(num_replicas, "replicas");
    same!(duplicate_window, "duplicate_window");
    // The server stores "unlimited" as -1 whatever the client sent (0 or -1).
    let unlimited = |v: i64| if v <= 0 { -1 } else { v };
    if unlimited(existing.max_messages_per_subject) != unlimited(wanted.max_messages_per_subject) {
        return Err(conflict(
            n,
            "max_messages_per_subject",
            existing.max_messages_per_subject.to_string(),
            wanted.max_messages_per_subject.to_string(),
        ));
    }
    same!(allow_direct, "allow_direct");
    same!(allow_atomic_publish, "allow_atomic_publish");
    same!(allow_message_ttl, "allow_msg_ttl");
    same!(allow_rollup, "allow_rollup_hdrs");
    same!(discard, "discard");
    Ok(())
}

/// Whether the server answered that the stream does not exist (and nothing else).
pub(crate) fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(ref j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Returns the stream, creating it when absent and verifying it when present.
pub(crate) async fn ensure(js: &jetstream::Context, wanted: Config) -> Result<Stream, SinkError> {
    match js.get_stream(&wanted.name).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| SinkError::js("stream info", e))?;
            verify(&info.config, &wanted)?;
            Ok(stream)
        }
        Err(e) if is_not_found(&e) => {
            // "stream not found": create it. A concurrent creator with identical
            // settings makes create succeed idempotently on the server.
            js.create_stream(wanted.clone())
                .await
                .map_err(|e| SinkError::js("create stream", e))
        }
        Err(e) => Err(SinkError::js("get stream", e)),
    }
}
