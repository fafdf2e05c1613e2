//! The `bsfg:policy@0.2.0` types (and 0.1.0's verdict) as the host lowers and lifts
//! them. Facts are
//! lowered from borrowed strings: nothing is copied on the host side on the way in.

use bsfg_core::{Candidate, Hook, PolicyContext};
use wasmtime::component::{ComponentType, Lift, Lower};

/// The WIT package and version this host serves (and 0.1.0, which has no `filter`).
pub const PACKAGE: &str = "bsfg:policy@0.2.0";
/// The interface of the types (no functions); guests may import it.
pub const TYPES_INTERFACE: &str = "bsfg:policy/types@0.2.0";
/// The host interface every policy may import.
pub const HOST_INTERFACE: &str = "bsfg:policy/host@0.2.0";
/// The earlier versions' interfaces, still served.
pub(crate) const OLDER: [(&str, &str); 1] = [("bsfg:policy/types@0.1.0", "bsfg:policy/host@0.1.0")];

#[derive(ComponentType, Lower, Clone, Copy)]
#[component(enum)]
#[repr(u8)]
pub(crate) enum WHook {
    #[component(name = "append")]
    Append,
    #[component(name = "intake")]
    Intake,
}

#[derive(ComponentType, Lower, Clone, Copy)]
#[component(record)]
pub(crate) struct WContext<'a> {
    hook: WHook,
    zone: &'a str,
    peer: &'a str,
    link: Option<&'a str>,
    #[component(name = "source-zone")]
    source_zone: Option<&'a str>,
}

impl<'a> From<&PolicyContext<'a>> for WContext<'a> {
    fn from(c: &PolicyContext<'a>) -> Self {
        WContext {
            hook: match c.hook {
                Hook::Append => WHook::Append,
                Hook::Intake => WHook::Intake,
            },
            zone: c.zone,
            peer: c.peer,
            link: c.link,
            source_zone: c.source_zone,
        }
    }
}

#[derive(ComponentType, Lower)]
#[component(record)]
pub(crate) struct WArtifact<'a> {
    bucket: &'a str,
    key: &'a str,
    digest: &'a str,
    size: u64,
}

#[derive(ComponentType, Lower)]
#[component(record)]
pub(crate) struct WFact<'a> {
    #[component(name = "message-id")]
    message_id: &'a str,
    #[component(name = "from-zone")]
    from_zone: &'a str,
    #[component(name = "to-zone")]
    to_zone: &'a str,
    #[component(name = "produced-at-unix-ms")]
    produced_at_unix_ms: i64,
    #[component(name = "correlation-id")]
    correlation_id: Option<&'a str>,
    #[component(name = "causation-id")]
    causation_id: Option<&'a str>,
    labels: &'a [(&'a str, &'a str)],
    #[component(name = "object-media-type")]
    object_media_type: Option<&'a str>,
    #[component(name = "object-schema")]
    object_schema: Option<&'a str>,
    subject: &'a str,
    predicate: &'a str,
    #[component(name = "object-json")]
    object_json: &'a str,
    artifacts: &'a [WArtifact<'a>],
    #[component(name = "source-offset")]
    source_offset: Option<u64>,
}

/// A batch lowered from borrowed facts: the labels and artifacts of every fact live
/// in two shared vectors, so building a batch allocates three vectors, not two per fact.
pub(crate) struct Batch<'a> {
    labels: Vec<(&'a str, &'a str)>,
    artifacts: Vec<WArtifact<'a>>,
}

impl<'a> Batch<'a> {
    pub fn new(facts: &[Candidate<'a>]) -> Batch<'a> {
        Batch {
            labels: facts
                .iter()
                .flat_map(|c| c.message.envelope.labels.iter())
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            artifacts: facts
                .iter()
                .flat_map(|c| c.message.fact.artifacts.iter())
                .map(|a| WArtifact {
                    bucket: &a.bucket,
                    key: &a.key,
                    digest: &a.digest,
                    size: a.size,
                })
                .collect(),
        }
    }

    /// The facts, borrowing from this batch.
    pub fn facts<'b>(&'b self, facts: &[Candidate<'a>]) -> Vec<WFact<'b>>
    where
        'a: 'b,
    {
        let (mut l, mut a) = (0, 0);
        facts
            .iter()
            .map(|c| {
                let e = &c.message.envelope;
                let f = &c.message.fact;
                let labels = &self.labels[l..l + e.labels.len()];
                let artifacts = &self.artifacts[a..a + f.artifacts.len()];
                l += e.labels.len();
                a += f.artifacts.len();
                WFact {
                    message_id: &e.message_id,
                    from_zone: &e.from_zone,
                    to_zone: &e.to_zone,
                    produced_at_unix_ms: e.produced_at_unix_ms,
                    correlation_id: e.correlation_id.as_deref(),
                    causation_id: e.causation_id.as_deref(),
                    labels,
                    object_media_type: e.object_media_type.as_deref(),
                    object_schema: e.object_schema.as_deref(),
                    subject: &f.subject,
                    predicate: &f.predicate,
                    object_json: &f.object_json,
                    artifacts,
                    source_offset: c.source_offset,
                }
            })
            .collect()
    }
}

#[derive(ComponentType, Lift, Debug)]
#[component(variant)]
pub(crate) enum WVerdict {
    #[component(name = "allow")]
    Allow,
    #[component(name = "deny")]
    Deny(String),
    #[component(name = "filter")]
    Filter(String),
}

/// The verdict of `bsfg:policy@0.1.0` (no `filter`).
#[derive(ComponentType, Lift, Debug)]
#[component(variant)]
pub(crate) enum WVerdictV1 {
    #[component(name = "allow")]
    Allow,
    #[component(name = "deny")]
    Deny(String),
}

impl From<WVerdictV1> for WVerdict {
    fn from(v: WVerdictV1) -> WVerdict {
        match v {
            WVerdictV1::Allow => WVerdict::Allow,
            WVerdictV1::Deny(r) => WVerdict::Deny(r),
        }
    }
}

#[derive(ComponentType, Lift, Clone, Copy, Debug)]
#[component(enum)]
#[repr(u8)]
#[allow(dead_code)] // constructed by lifting from the guest
pub(crate) enum WLevel {
    #[component(name = "debug")]
    Debug,
    #[component(name = "info")]
    Info,
    #[component(name = "warn")]
    Warn,
    #[component(name = "error")]
    Error,
}
