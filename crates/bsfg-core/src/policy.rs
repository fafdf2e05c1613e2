//! Policy hooks: chains of policies that decide facts before they are appended.
//!
//! Two hooks, each with its own chain in config order (first deny wins):
//! - [`Hook::Append`]: AppendFact from a producer calling this zone, checked by the
//!   [`crate::Gate`] after authorization; a denial is `permission_denied` naming the
//!   policy and its reason, and nothing is stored;
//! - [`Hook::Intake`]: facts a link fetched from another zone, validated under this
//!   zone's rules and checked by the link's state machine ([`crate::link::machine::Machine`]) before anything of the
//!   page is appended; denied facts go to the zone's quarantine (see
//!   [`QuarantineEntry`]) and the page is confirmed once every fact is either appended
//!   or quarantined, so nothing is lost and nothing blocks the link.
//!
//! The sandbox (wasmtime) lives in an adapter; this module only knows the [`Policy`]
//! trait.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::{Message, Provenance};

/// Where a batch is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// Before AppendFact from a producer.
    Append,
    /// At link intake.
    Intake,
}

impl Hook {
    /// `append` or `intake` (config and metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Append => "append",
            Hook::Intake => "intake",
        }
    }
}

/// Who and where, the same for every fact of a batch.
#[derive(Debug, Clone, Copy)]
pub struct PolicyContext<'a> {
    /// Which hook.
    pub hook: Hook,
    /// The deciding zone.
    pub zone: &'a str,
    /// The authenticated peer: the producer for `append` (`local` on a plaintext
    /// loopback listener), the source gateway for `intake`.
    pub peer: &'a str,
    /// The link, for `intake`.
    pub link: Option<&'a str>,
    /// The zone the facts came from, for `intake`.
    pub source_zone: Option<&'a str>,
}

/// One fact to decide, with its offset in the source zone for `intake`.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The fact with its envelope.
    pub message: &'a Message,
    /// Offset in the source stream (intake only).
    pub source_offset: Option<u64>,
}

impl<'a> Candidate<'a> {
    /// Candidates for facts appended here (no source offset), in order.
    pub fn local(messages: &'a [Message]) -> Vec<Candidate<'a>> {
        messages
            .iter()
            .map(|message| Candidate {
                message,
                source_offset: None,
            })
            .collect()
    }
}

/// What a policy decides for one fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Stop it: at intake the fact goes to the quarantine; at append the producer is
    /// refused.
    Deny(Denial),
    /// The zone does not want it: at intake the fact is dropped (not an error, not
    /// quarantined), counted, and recorded in one audit fact per page; at append the
    /// producer is refused like a denial (a producer is never told an unstored fact
    /// was stored).
    Filter(Denial),
}

/// Why a fact was stopped, and by what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// The policy's name in config.
    pub policy: String,
    /// The policy's reason (`policy_fault: ...` when the policy itself failed).
    pub reason: String,
    /// `sha256:<hex>` of the module that decided (empty for built-in policies).
    pub module_sha256: String,
}

/// A policy: decides a whole batch, one verdict per fact in order. Implementations
/// must fail closed: a policy that cannot decide denies (with a reason saying so)
/// unless its own config says otherwise.
#[async_trait]
pub trait Policy: Send + Sync {
    /// The policy's name in config.
    fn name(&self) -> &str;
    /// One verdict per candidate, in order. A different count is treated as a fault
    /// and denies the whole batch.
    async fn decide(&self, ctx: &PolicyContext<'_>, facts: &[Candidate<'_>]) -> Vec<Verdict>;
}

/// The policies of one hook, in config order. An empty chain allows everything.
#[derive(Clone, Default)]
pub struct PolicyChain {
    policies: Vec<Arc<dyn Policy>>,
}

impl PolicyChain {
    /// A chain of `policies`, asked in this order.
    pub fn new(policies: Vec<Arc<dyn Policy>>) -> Self {
        PolicyChain { policies }
    }

    /// True when the chain has no policy (everything is allowed without a call).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.policies.iter().map(|p| p.name()).collect()
    }

    /// One verdict per candidate. Each policy sees only the facts every earlier one
    /// allowed; the first denial of a fact is its verdict.
    pub async fn decide(&self, ctx: &PolicyContext<'_>, facts: &[Candidate<'_>]) -> Vec<Verdict> {
        let mut verdicts = vec![Verdict::Allow; facts.len()];
        for policy in &self.policies {
            let open: Vec<usize> = (0..facts.len())
                .filter(|&i| verdicts[i] == Verdict::Allow)
                .collect();
            if open.is_empty() {
                break;
            }
            let batch: Vec<Candidate<'_>> = open.iter().map(|&i| facts[i]).collect();
            let got = policy.decide(ctx, &batch).await;
            if got.len() != batch.len() {
                let denial = Denial {
                    policy: policy.name().to_owned(),
                    reason: format!(
                        "policy_fault: {} verdicts for {} facts",
                        got.len(),
                        batch.len()
                    ),
                    module_sha256: String::new(),
                };
                for &i in &open {
                    verdicts[i] = Verdict::Deny(denial.clone());
                }
                break;
            }
            for (&i, v) in open.iter().zip(got) {
                verdicts[i] = v;
            }
            // Filtered facts, like denied ones, go no further down the chain.
        }
        verdicts
    }
}

/// Why a fetched fact was set aside instead of appended.
pub const CAUSE_POLICY: &str = "policy_denied";

/// A fact a link could not append, kept in the zone's quarantine until an operator
/// releases (appends it, after fixing the cause) or drops it. Two kinds of cause:
/// an intake policy denied it (`cause = "policy_denied"`, `denial` names the policy),
/// or this zone refused it (`cause` is the stable reason: `invalid_argument` under
/// this zone's limits or classes, `conflicting_duplicate`; `denial.reason` is the
/// error, `field` the offending field). Entries are kept per (message_id, payload):
/// two different facts under one message_id are two entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The fact as fetched from the source: exactly as it came when this zone
    /// refused it, its canonical form (what a policy judged) when a policy denied it.
    pub message: Message,
    /// SHA-256 (hex) of the fact as kept ([`crate::model::payload_digest`] over its
    /// fields as they came); with the message_id it identifies the entry.
    pub payload_digest: String,
    /// `policy_denied`, or the stable reason this zone refused the fact with.
    pub cause: String,
    /// The policy, its module and its reason; for a refusal the policy is empty and
    /// the reason is the error.
    pub denial: Denial,
    /// The field a refusal named (`fact.object_json.ts_ns`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The link that fetched it.
    pub link: String,
    /// The zone it came from, as the link's configuration names it.
    pub source_zone: String,
    /// The source stream.
    pub source_stream: String,
    /// Its offset in the source stream.
    pub source_offset: u64,
    /// When it was quarantined (Unix ms).
    pub quarantined_at_unix_ms: i64,
    /// Set when the fact was too large for this zone's store to keep beside the entry:
    /// its size in bytes. `message.fact.object_json` is then empty; the entry can be
    /// dropped, not released (the fact is still at `source_offset` in the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_omitted_bytes: Option<u64>,
}

impl QuarantineEntry {
    /// The entry of `message` as fetched, from where `from` says, set aside at
    /// `at_unix_ms`, with `cause` and `denial` set by the caller.
    pub fn new(
        message: Message,
        cause: &str,
        denial: Denial,
        from: Provenance,
        at_unix_ms: i64,
    ) -> Self {
        QuarantineEntry {
            payload_digest: crate::model::payload_digest(&message.fact).to_hex(),
            message,
            cause: cause.to_owned(),
            denial,
            field: None,
            link: from.link,
            source_zone: from.zone,
            source_stream: from.stream,
            source_offset: from.offset,
            quarantined_at_unix_ms: at_unix_ms,
            payload_omitted_bytes: None,
        }
    }

    /// An entry for a fact this zone refused with `error` (see [`QuarantineEntry`]).
    pub fn refused(
        message: Message,
        error: &crate::BoundaryError,
        from: Provenance,
        at_unix_ms: i64,
    ) -> Self {
        let mut e = QuarantineEntry::new(
            message,
            error.reason().as_str(),
            Denial {
                policy: String::new(),
                reason: error.to_string(),
                module_sha256: String::new(),
            },
            from,
            at_unix_ms,
        );
        e.field = error.field().map(str::to_owned);
        e
    }

    /// Where the fact came from, as a release appends it.
    pub fn provenance(&self) -> Provenance {
        Provenance {
            zone: self.source_zone.clone(),
            stream: self.source_stream.clone(),
            offset: self.source_offset,
            link: self.link.clone(),
        }
    }

    /// The message_id.
    pub fn message_id(&self) -> &str {
        &self.message.envelope.message_id
    }

    /// Short form of the payload digest (16 hex digits) operators pick entries by.
    pub fn payload_short(&self) -> &str {
        self.payload_digest
            .get(..16)
            .unwrap_or(self.payload_digest.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Envelope, Fact};

    struct DenyPredicate(&'static str, &'static str);

    #[async_trait]
    impl Policy for DenyPredicate {
        fn name(&self) -> &str {
            self.0
        }
        async fn decide(&self, _: &PolicyContext<'_>, facts: &[Candidate<'_>]) -> Vec<Verdict> {
            facts
                .iter()
                .map(|c| {
                    if c.message.fact.predicate == self.1 {
                        Verdict::Deny(Denial {
                            policy: self.0.into(),
                            reason: format!("no {}", self.1),
                            module_sha256: String::new(),
                        })
                    } else {
                        Verdict::Allow
                    }
                })
                .collect()
        }
    }

    struct Short;

    #[async_trait]
    impl Policy for Short {
        fn name(&self) -> &str {
            "short"
        }
        async fn decide(&self, _: &PolicyContext<'_>, _: &[Candidate<'_>]) -> Vec<Verdict> {
            vec![Verdict::Allow]
        }
    }

    fn msg(predicate: &str) -> Message {
        Message {
            envelope: Envelope::default(),
            fact: Fact {
                predicate: predicate.into(),
                ..Default::default()
            },
        }
    }

    const CTX: PolicyContext<'static> = PolicyContext {
        hook: Hook::Append,
        zone: "z",
        peer: "p",
        link: None,
        source_zone: None,
    };

    fn denied_by(v: &Verdict) -> Option<&str> {
        match v {
            Verdict::Allow => None,
            Verdict::Deny(d) | Verdict::Filter(d) => Some(&d.policy),
        }
    }

    #[tokio::test]
    async fn first_deny_in_config_order_wins_and_later_policies_see_only_allowed_facts() {
        let chain = PolicyChain::new(vec![
            Arc::new(DenyPredicate("first", "a")),
            Arc::new(DenyPredicate("second", "b")),
            Arc::new(DenyPredicate("third", "a")),
        ]);
        let ms = [msg("a"), msg("b"), msg("c")];
        let cs = Candidate::local(&ms);
        let v = chain.decide(&CTX, &cs).await;
        assert_eq!(
            v.iter().map(denied_by).collect::<Vec<_>>(),
            [Some("first"), Some("second"), None]
        );
    }

    #[tokio::test]
    async fn a_policy_returning_the_wrong_count_denies_the_whole_batch() {
        let chain = PolicyChain::new(vec![Arc::new(Short)]);
        let ms = [msg("a"), msg("b")];
        let cs = Candidate::local(&ms);
        let v = chain.decide(&CTX, &cs).await;
        assert!(v.iter().all(|v| denied_by(v) == Some("short")), "{v:?}");
        let Verdict::Deny(d) = &v[0] else {
            unreachable!()
        };
        assert!(d.reason.starts_with("policy_fault:"), "{}", d.reason);
    }

    #[tokio::test]
    async fn an_empty_chain_allows_everything() {
        let ms = [msg("a")];
        let cs = Candidate::local(&ms);
        assert_eq!(
            PolicyChain::default().decide(&CTX, &cs).await,
            [Verdict::Allow]
        );
    }
}
