//! Who may do what at this zone's boundary. Default deny.
//!
//! Transports authenticate the caller (mTLS: an identity read from its certificate,
//! with the trust anchor that issued it) and hand the [`Caller`] to the [`Gate`],
//! which checks the zone's [`Grant`]s before any operation reaches the engine:
//!
//! - AppendFact: the envelope's `from_zone` must be one the identity may claim, and
//!   its `to_zone` one it may target;
//! - FetchFacts and ConfirmReceipt: the consumer must be granted (a consumer reads one
//!   stream, so this also decides which streams a peer reads); a fetched page whose
//!   facts reference artifacts in a bucket the identity may not read is refused;
//! - PutObject: the bucket must be granted for put, checked before a byte is stored or
//!   an existing key is revealed;
//! - GetObject and HeadObject: the bucket must be one the identity may read, checked
//!   before anything of the object is revealed.
//!
//! A grant belongs to an identity *and* the CA that must have issued it: a
//! certificate naming `idmz-bsfg` issued by the plant's CA gets nothing. An identity
//! without a grant gets nothing. [`Caller::Local`] is the plaintext loopback listener,
//! which the gateway only allows with `insecure = true` and announces loudly: it has
//! full access, like anyone who can reach the zone's files.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::policy::{Candidate, Hook, PolicyChain, PolicyContext, Verdict};
use crate::ports::ApiResult;
use crate::{
    AppendOutcome, BoundaryApi, BoundaryError, ByteStream, FactPage, FetchRequest, Frontier,
    Limits, Message, ObjectInfo, ObjectRead,
};

/// Who is calling, as the transport established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A plaintext loopback listener (`insecure = true`): not authenticated, full
    /// access.
    Local,
    /// A peer authenticated by its certificate.
    Peer {
        /// Identity from the certificate, e.g. `idmz-bsfg`.
        identity: String,
        /// Name of the trust anchor that issued the certificate, if any did directly.
        anchor: Option<String>,
    },
}

impl Caller {
    /// Who receives a page and may confirm it: `local` for [`Caller::Local`], else
    /// `identity@anchor` (the same name from another CA is another receiver).
    pub fn receiver(&self) -> String {
        match self {
            Caller::Local => crate::engine::LOCAL_RECEIVER.to_owned(),
            Caller::Peer { identity, anchor } => {
                format!("{identity}@{}", anchor.as_deref().unwrap_or("-"))
            }
        }
    }

    /// The identity for logs and metrics (`local` for [`Caller::Local`]).
    pub fn label(&self) -> &str {
        match self {
            Caller::Local => "local",
            Caller::Peer { identity, .. } => identity,
        }
    }
}

/// One boundary operation, as authorization and its metric name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// AppendFact.
    Append,
    /// FetchFacts.
    Fetch,
    /// ConfirmReceipt.
    Confirm,
    /// PutObject.
    PutObject,
    /// GetObject and HeadObject (reading an artifact).
    GetObject,
}

impl Op {
    /// The label value (`append`, `fetch`, `confirm`, `put_object`, `get_object`).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Append => "append",
            Op::Fetch => "fetch",
            Op::Confirm => "confirm",
            Op::PutObject => "put_object",
            Op::GetObject => "get_object",
        }
    }
}

/// What one identity may do. Every list is exact names; `"*"` allows any value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// The identity from the peer's certificate.
    pub identity: String,
    /// The trust anchor that must have issued the certificate.
    pub ca: String,
    /// `from_zone` values it may claim when appending.
    pub claim_from_zones: Vec<String>,
    /// `to_zone` values it may target when appending.
    pub to_zones: Vec<String>,
    /// Consumers it may fetch from and confirm.
    pub consumers: Vec<String>,
    /// Buckets it may put objects into.
    pub put_buckets: Vec<String>,
    /// Buckets whose artifacts fetched facts may reference and GetObject/HeadObject
    /// may read.
    pub read_buckets: Vec<String>,
}

fn allows(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

/// The zone's grants, and a count of every denial by identity and operation.
#[derive(Debug, Default)]
pub struct Authorization {
    grants: HashMap<String, Grant>,
    denials: Mutex<BTreeMap<(String, Op), u64>>,
}

impl Authorization {
    /// Grants by identity (a later grant for the same identity replaces an earlier
    /// one; the gateway's config refuses duplicates before this point).
    pub fn new(grants: Vec<Grant>) -> Self {
        Authorization {
            grants: grants
                .into_iter()
                .map(|g| (g.identity.clone(), g))
                .collect(),
            denials: Mutex::default(),
        }
    }

    /// Denials so far, by (identity, operation).
    pub fn denials(&self) -> BTreeMap<(String, Op), u64> {
        self.denials.lock().map(|d| d.clone()).unwrap_or_default()
    }

    fn deny(&self, caller: &Caller, op: Op, rule: String) -> BoundaryError {
        if let Ok(mut d) = self.denials.lock() {
            *d.entry((caller.label().to_owned(), op)).or_default() += 1;
        }
        tracing::warn!(peer = %caller.label(), operation = op.as_str(), reason = %rule, "request denied");
        BoundaryError::PermissionDenied(rule)
    }

    /// The grant that applies, `Ok(None)` for local callers, or the denial.
    fn grant(&self, caller: &Caller, op: Op) -> Result<Option<&Grant>, BoundaryError> {
        let (identity, anchor) = match caller {
            Caller::Local => return Ok(None),
            Caller::Peer { identity, anchor } => (identity, anchor),
        };
        let Some(g) = self.grants.get(identity) else {
            return Err(self.deny(
                caller,
                op,
                format!("identity `{identity}` has no grant in this zone"),
            ));
        };
        if anchor.as_deref() != Some(g.ca.as_str()) {
            return Err(self.deny(
                caller,
                op,
                format!(
                    "identity `{identity}` is granted only with a certificate issued by CA `{}`",
                    g.ca
                ),
            ));
        }
        Ok(Some(g))
    }

    /// May `caller` append `m`? Checks `from_zone` (claim) and `to_zone` (target).
    pub fn check_append(&self, caller: &Caller, m: &Message) -> Result<(), BoundaryError> {
        let Some(g) = self.grant(caller, Op::Append)? else {
            return Ok(());
        };
        let e = &m.envelope;
        if !allows(&g.claim_from_zones, &e.from_zone) {
            return Err(self.deny(
                caller,
                Op::Append,
                format!(
                    "envelope.from_zone: `{}` may not claim zone `{}`",
                    g.identity, e.from_zone
                ),
            ));
        }
        if !allows(&g.to_zones, &e.to_zone) {
            return Err(self.deny(
                caller,
                Op::Append,
                format!(
                    "envelope.to_zone: `{}` may not target zone `{}`",
                    g.identity, e.to_zone
                ),
            ));
        }
        Ok(())
    }

    /// May `caller` fetch from or confirm `consumer`?
    pub fn check_consumer(
        &self,
        caller: &Caller,
        op: Op,
        consumer: &str,
    ) -> Result<(), BoundaryError> {
        let Some(g) = self.grant(caller, op)? else {
            return Ok(());
        };
        if !allows(&g.consumers, consumer) {
            return Err(self.deny(
                caller,
                op,
                format!(
                    "consumer_name: `{}` may not use consumer `{consumer}`",
                    g.identity
                ),
            ));
        }
        Ok(())
    }

    /// May `caller` receive `page`? Every artifact its facts reference must be in a
    /// bucket the identity may read.
    pub fn check_page(&self, caller: &Caller, page: &FactPage) -> Result<(), BoundaryError> {
        let Some(g) = self.grant(caller, Op::Fetch)? else {
            return Ok(());
        };
        for f in &page.facts {
            if let Some(a) = f
                .message
                .fact
                .artifacts
                .iter()
                .find(|a| !allows(&g.read_buckets, &a.bucket))
            {
                return Err(self.deny(
                    caller,
                    Op::Fetch,
                    format!(
                        "bucket: `{}` may not read bucket `{}` (the fact at offset {} references it)",
                        g.identity, a.bucket, f.offset
                    ),
                ));
            }
        }
        Ok(())
    }

    /// May `caller` read objects of `bucket` (GetObject, HeadObject)?
    pub fn check_read(&self, caller: &Caller, bucket: &str) -> Result<(), BoundaryError> {
        let Some(g) = self.grant(caller, Op::GetObject)? else {
            return Ok(());
        };
        if !allows(&g.read_buckets, bucket) {
            return Err(self.deny(
                caller,
                Op::GetObject,
                format!("bucket: `{}` may not read bucket `{bucket}`", g.identity),
            ));
        }
        Ok(())
    }

    /// May `caller` put objects into `bucket`?
    pub fn check_put(&self, caller: &Caller, bucket: &str) -> Result<(), BoundaryError> {
        let Some(g) = self.grant(caller, Op::PutObject)? else {
            return Ok(());
        };
        if !allows(&g.put_buckets, bucket) {
            return Err(self.deny(
                caller,
                Op::PutObject,
                format!(
                    "bucket: `{}` may not put into bucket `{bucket}`",
                    g.identity
                ),
            ));
        }
        Ok(())
    }
}

/// The zone's boundary as transports serve it: every call carries its [`Caller`], is
/// authorized, and only then reaches the API behind (the engine). Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    api: Arc<dyn BoundaryApi>,
    authz: Arc<Authorization>,
    append_policies: Option<Arc<AppendPolicies>>,
}

/// The append hook of a zone: its chain, its name, and the limits facts are
/// validated with before a policy sees them.
struct AppendPolicies {
    chain: PolicyChain,
    zone: String,
    limits: Limits,
}

impl AppendPolicies {
    /// Validates `message`, then asks the chain; returns the validated message (its
    /// object_json canonical, as a policy saw it and as it will be stored).
    async fn check(&self, caller: &Caller, message: Message) -> Result<Message, BoundaryError> {
        let message = self.limits.validate(message)?.into_message();
        let ctx = PolicyContext {
            hook: Hook::Append,
            zone: &self.zone,
            peer: caller.label(),
            link: None,
            source_zone: None,
        };
        let verdict = self
            .chain
            .decide(&ctx, &Candidate::local(std::slice::from_ref(&message)))
            .await;
        if let Some(Verdict::Deny(d) | Verdict::Filter(d)) = verdict.into_iter().next() {
            tracing::info!(
                peer = caller.label(),
                message_id = %message.envelope.message_id,
                policy = %d.policy,
                reason = %d.reason,
                "append denied by policy"
            );
            return Err(BoundaryError::PermissionDenied(format!(
                "policy `{}` denied message_id `{}`: {}",
                d.policy, message.envelope.message_id, d.reason
            )));
        }
        Ok(message)
    }
}

impl Gate {
    /// `api` behind `authz`.
    pub fn new(api: Arc<dyn BoundaryApi>, authz: Arc<Authorization>) -> Self {
        Gate {
            api,
            authz,
            append_policies: None,
        }
    }

    /// Asks `chain` (hook `append`, zone `zone`) about every AppendFact after
    /// authorization. Facts are validated with `limits` first, so a policy sees only
    /// well-formed facts and bad input still gets `invalid_argument`.
    pub fn with_append_policies(mut self, chain: PolicyChain, zone: &str, limits: Limits) -> Self {
        self.append_policies = (!chain.is_empty()).then(|| {
            Arc::new(AppendPolicies {
                chain,
                zone: zone.to_owned(),
                limits,
            })
        });
        self
    }

    /// `api` with no grants: local callers have full access, every peer is denied.
    pub fn local_only(api: Arc<dyn BoundaryApi>) -> Self {
        Gate::new(api, Arc::new(Authorization::default()))
    }

    /// The grants and their denial counts.
    pub fn authorization(&self) -> &Arc<Authorization> {
        &self.authz
    }

    /// AppendFact as `caller`.
    pub async fn append_fact(&self, caller: &Caller, message: Message) -> ApiResult<AppendOutcome> {
        self.authz.check_append(caller, &message)?;
        let message = match &self.append_policies {
            None => message,
            Some(p) => p.check(caller, message).await?,
        };
        self.api.append_fact(message).await
    }

    /// AppendFacts as `caller`: each fact authorized, judged by the append policies
    /// and appended as [`Gate::append_fact`] would, concurrently (so the zone commits
    /// them together), answered in order. More than [`crate::MAX_APPEND_FACTS`] is
    /// `invalid_argument` on `messages` and nothing is appended.
    pub async fn append_facts(
        &self,
        caller: &Caller,
        messages: Vec<Message>,
    ) -> ApiResult<Vec<ApiResult<AppendOutcome>>> {
        if messages.len() > crate::MAX_APPEND_FACTS {
            return Err(BoundaryError::invalid(
                "messages",
                format!(
                    "at most {} per call, got {}",
                    crate::MAX_APPEND_FACTS,
                    messages.len()
                ),
            ));
        }
        Ok(
            futures::future::join_all(messages.into_iter().map(|m| self.append_fact(caller, m)))
                .await,
        )
    }

    /// FetchFacts as `caller`. A page refused for an artifact's bucket is not
    /// confirmed, so it is redelivered once the grant is fixed: nothing is lost.
    pub async fn fetch_facts(&self, caller: &Caller, request: FetchRequest) -> ApiResult<FactPage> {
        self.authz
            .check_consumer(caller, Op::Fetch, &request.consumer)?;
        let page = self.api.fetch_facts_as(&caller.receiver(), request).await?;
        self.authz.check_page(caller, &page)?;
        Ok(page)
    }

    /// ConfirmReceipt as `caller`.
    pub async fn confirm_receipt(
        &self,
        caller: &Caller,
        consumer: &str,
        offset: u64,
    ) -> ApiResult<Frontier> {
        self.authz.check_consumer(caller, Op::Confirm, consumer)?;
        self.api
            .confirm_receipt_as(&caller.receiver(), consumer, offset)
            .await
    }

    /// PutObject as `caller`; the body is not read when the bucket is not granted.
    pub async fn put_object(
        &self,
        caller: &Caller,
        bucket: &str,
        key: &str,
        body: ByteStream,
    ) -> ApiResult<ObjectInfo> {
        self.authz.check_put(caller, bucket)?;
        self.api.put_object(bucket, key, body).await
    }

    /// HeadObject as `caller` (the bucket must be readable).
    pub async fn head_object(
        &self,
        caller: &Caller,
        bucket: &str,
        key: &str,
    ) -> ApiResult<ObjectInfo> {
        self.authz.check_read(caller, bucket)?;
        self.api.head_object(bucket, key).await
    }

    /// GetObject as `caller` (the bucket must be readable); nothing is read when it
    /// is not.
    pub async fn get_object(
        &self,
        caller: &Caller,
        bucket: &str,
        key: &str,
        offset: u64,
    ) -> ApiResult<ObjectRead> {
        self.authz.check_read(caller, bucket)?;
        self.api.get_object(bucket, key, offset).await
    }
}

/// Refused requests of one listener, by peer and code, for the
/// `bsfg_requests_refused_total` metric. Transports fill it: gRPC with its status
/// code names, QUIC with the stable reasons.
#[derive(Debug, Default)]
pub struct ServeStats {
    errors: std::sync::Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
}

impl ServeStats {
    /// Counts one refused request of `peer`.
    pub fn refused(&self, peer: &str, code: &'static str) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry((peer.to_owned(), code)).or_default() += 1;
        }
    }

    /// Requests refused so far, by (peer, code): malformed messages, oversized
    /// messages, denials, ...
    pub fn errors(&self) -> std::collections::BTreeMap<(String, &'static str), u64> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, Fact};

    fn message(from: &str, to: &str) -> Message {
        Message {
            envelope: Envelope {
                message_id: "m-1".into(),
                from_zone: from.into(),
                to_zone: to.into(),
                produced_at_unix_ms: 1,
                ..Envelope::default()
            },
            fact: Fact {
                subject: "batch:1".into(),
                predicate: "started".into(),
                object_json: "{}".into(),
                artifacts: vec![],
            },
        }
    }

    fn idmz() -> Authorization {
        Authorization::new(vec![Grant {
            identity: "idmz-bsfg".into(),
            ca: "idmz".into(),
            claim_from_zones: vec!["idmz".into()],
            to_zones: vec!["*".into()],
            consumers: vec!["to-idmz".into()],
            put_buckets: vec!["batch-files".into()],
            read_buckets: vec![],
        }])
    }

    fn peer(identity: &str, anchor: &str) -> Caller {
        Caller::Peer {
            identity: identity.into(),
            anchor: Some(anchor.into()),
        }
    }

    #[test]
    fn a_peer_may_claim_only_its_granted_from_zone() {
        let a = idmz();
        let me = peer("idmz-bsfg", "idmz");
        assert!(a.check_append(&me, &message("idmz", "plant")).is_ok());
        let e = a
            .check_append(&me, &message("plant", "idmz"))
            .expect_err("claiming another zone must be denied");
        assert!(
            matches!(&e, BoundaryError::PermissionDenied(m) if m.contains("envelope.from_zone") && m.contains("`plant`")),
            "{e}"
        );
        assert_eq!(a.denials()[&("idmz-bsfg".to_owned(), Op::Append)], 1);
    }

    #[test]
    fn an_identity_from_the_wrong_ca_gets_nothing() {
        let a = idmz();
        let forged = peer("idmz-bsfg", "plant");
        let e = a
            .check_consumer(&forged, Op::Fetch, "to-idmz")
            .expect_err("an identity is believed only from its own CA");
        assert!(e.to_string().contains("issued by CA `idmz`"), "{e}");
        let no_anchor = Caller::Peer {
            identity: "idmz-bsfg".into(),
            anchor: None,
        };
        assert!(a.check_put(&no_anchor, "batch-files").is_err());
    }

    #[test]
    fn an_identity_without_a_grant_is_denied_everything_and_local_callers_are_not() {
        let a = idmz();
        let stranger = peer("enterprise-bsfg", "idmz");
        assert!(
            a.check_append(&stranger, &message("idmz", "plant"))
                .is_err()
        );
        assert!(a.check_consumer(&stranger, Op::Confirm, "to-idmz").is_err());
        assert!(a.check_put(&stranger, "batch-files").is_err());
        assert!(a.check_append(&Caller::Local, &message("x", "y")).is_ok());
        assert!(a.check_put(&Caller::Local, "anything").is_ok());
    }

    #[test]
    fn consumers_and_buckets_are_exact_names() {
        let a = idmz();
        let me = peer("idmz-bsfg", "idmz");
        assert!(a.check_consumer(&me, Op::Fetch, "to-idmz").is_ok());
        assert!(a.check_consumer(&me, Op::Confirm, "to-enterprise").is_err());
        assert!(a.check_consumer(&me, Op::Fetch, "to-idmz-2").is_err());
        assert!(a.check_put(&me, "batch-files").is_ok());
        assert!(a.check_put(&me, "recipes").is_err());
    }
}
