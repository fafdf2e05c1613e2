//! Nothing silently changed, nothing stuck: real plant data through the whole path.
//!
//! - a corpus of what plants produce (64-bit and nanosecond integers, big decimals,
//!   deep nesting, every JSON escape, non-ASCII, near-limit sizes with heavy escaping,
//!   duplicate keys): each fact is either fetched back in a second zone byte for byte
//!   as its canonical form, or refused with the JSON path and the rule;
//! - a page with one fact of each poison kind among good ones: the good ones are
//!   stored once, each poison fact is in the receiver's quarantine with its reason,
//!   the link keeps running and its frontier reaches the page's end;
//! - two identities granted one consumer cannot confirm each other's pages;
//! - an intake policy judges the canonical form: `\u0073ecret` is `secret` to it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::link::{Destination, pull_page};
use bsfg_core::{
    BoundaryApi, BoundaryError, Caller, FactLog, FactPage, FetchRequest, Gate, Grant, Limits,
    Message, QuarantineAction, Reason,
};
use bsfg_e2e::{Zone, pull_step, step_completed};
use bsfg_testkit::NatsOptions;

/// The default `max_payload` of a nats-server (1 MiB), as plants run it.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

enum Expect {
    /// Stored; fetched back exactly as this canonical text.
    Stored(String),
    /// Refused as `invalid_argument` on this field.
    Refused(&'static str),
    /// Refused as `invalid_argument` on a field under this path.
    RefusedUnder(&'static str),
}
use Expect::{Refused, RefusedUnder, Stored};

fn stored(s: &str) -> Expect {
    Stored(s.to_owned())
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// What plants send, and what must become of it.
fn corpus() -> Vec<(&'static str, String, Expect)> {
    let quotes = |n: usize| format!("{{\"note\":\"{}\"}}", "\\\"".repeat(n));
    vec![
        (
            "nanosecond timestamp",
            r#"{"ts_ns": 1764000000123456789, "id": 1}"#.into(),
            Refused("fact.object_json.ts_ns"),
        ),
        (
            "64-bit id one past 2^53",
            r#"{"id": 9007199254740993}"#.into(),
            Refused("fact.object_json.id"),
        ),
        (
            "OPC UA ticks in a list",
            r#"{"samples": [{"source_ts": 133768416001234567, "v": 1}]}"#.into(),
            Refused("fact.object_json.samples[0].source_ts"),
        ),
        (
            "integers a double holds",
            r#"{"id": 9007199254740992, "count": -9007199254740991, "zero": 0}"#.into(),
            stored(r#"{"count":-9007199254740991,"id":9007199254740992,"zero":0}"#),
        ),
        (
            "64-bit values sent as strings",
            r#"{"ts_ns": "1764000000123456789", "id": "9007199254740993"}"#.into(),
            stored(r#"{"id":"9007199254740993","ts_ns":"1764000000123456789"}"#),
        ),
        (
            "big decimal",
            r#"{"amount": 12345678901234567890.123}"#.into(),
            Refused("fact.object_json.amount"),
        ),
        (
            "decimal with more digits than a double",
            r#"{"pi": 3.14159265358979323846}"#.into(),
            Refused("fact.object_json.pi"),
        ),
        (
            "out of range",
            r#"{"e": 1e400}"#.into(),
            Refused("fact.object_json.e"),
        ),
        (
            "decimals a double holds, in canonical spelling",
            r#"{"setpoint": 72.50, "ratio": 0.1, "tiny": 1E-7, "big": 1e21, "step": 3.0, "k": 1e3, "neg": -0.0}"#.into(),
            stored(
                r#"{"big":1e+21,"k":1000,"neg":0,"ratio":0.1,"setpoint":72.5,"step":3,"tiny":1e-7}"#,
            ),
        ),
        (
            "deep but legal nesting",
            format!("{{\"tree\":{}}}", nested(100)),
            Stored(format!("{{\"tree\":{}}}", nested(100))),
        ),
        (
            "nesting past the limit",
            format!("{{\"tree\":{}}}", nested(300)),
            RefusedUnder("fact.object_json.tree[0][0]"),
        ),
        (
            "every JSON escape",
            r#"{"s": "\"\\\/\b\f\n\r\t\u0001\u001f\u00e9\u20ac\ud83d\ude00"}"#.into(),
            Stored(
                "{\"s\":\"\\\"\\\\/\\b\\f\\n\\r\\t\\u0001\\u001f\u{e9}\u{20ac}\u{1f600}\"}".into(),
            ),
        ),
        (
            "non-ASCII text and keys, sorted by UTF-16 code units",
            r#"{"operator": "Jürgen Müller", "site": "工厂", "é": 1, "b": 2, "😀": 3, "ﬀ": 4}"#
                .into(),
            stored(r#"{"b":2,"operator":"Jürgen Müller","site":"工厂","é":1,"😀":3,"ﬀ":4}"#),
        ),
        (
            "duplicate key",
            r#"{"x": 1, "x": 2}"#.into(),
            Refused("fact.object_json.x"),
        ),
        (
            "duplicate key spelled with an escape",
            r#"{"cfg": {"mode": "a", "\u006dode": "b"}}"#.into(),
            Refused("fact.object_json.cfg.mode"),
        ),
        (
            "lone surrogate",
            r#"{"s": "\ud800"}"#.into(),
            Refused("fact.object_json.s"),
        ),
        (
            "raw control character",
            "{\"s\": \"a\u{1}b\"}".into(),
            Refused("fact.object_json"),
        ),
        (
            "800 KB of quote characters (escaped once when stored)",
            quotes(400_000),
            Stored(format!("{{\"note\":\"{}\"}}", "\\\"".repeat(400_000))),
        ),
        (
            "within max_fact_bytes as sent, over it as stored with its envelope",
            quotes(499_950),
            Refused("fact"),
        ),
    ]
}

fn fact(i: usize, object_json: String) -> Message {
    let mut m = step_completed("plant-a", "enterprise", "CORPUS", i as u32 + 1);
    m.fact.object_json = object_json;
    m
}

/// plant-a (consumer `to-enterprise`) and enterprise (reader `reporting`).
async fn plant_and_enterprise() -> (Zone, Zone) {
    let (plant, enterprise) = tokio::join!(
        Zone::start("plant-a", &[("to-enterprise", "operational")]),
        Zone::start("enterprise", &[("reporting", "operational")]),
    );
    (plant.unwrap(), enterprise.unwrap())
}

/// Pulls everything the consumer holds from `source` into `destination` (link `link`).
async fn drain(source: &Zone, destination: &dyn Destination, consumer: &str, link: &str) {
    let step = pull_step(link, consumer, &source.name, 100);
    loop {
        let r = pull_page(&source.api, destination, &step, None)
            .await
            .unwrap_or_else(|e| panic!("pull: {e}"));
        if r.fetched == 0 {
            return;
        }
    }
}

/// Every fact a zone's reader holds, by message_id, read and confirmed.
async fn read_all(zone: &Zone, reader: &str) -> BTreeMap<String, Message> {
    let mut out = BTreeMap::new();
    loop {
        let p = zone.fetch(reader, 100, Duration::ZERO).await.unwrap();
        let Some(last) = p.facts.last().map(|f| f.offset) else {
            return out;
        };
        for f in p.facts {
            let id = f.message.envelope.message_id.clone();
            assert!(out.insert(id.clone(), f.message).is_none(), "{id} twice");
        }
        zone.api.confirm_receipt(reader, last).await.unwrap();
    }
}

fn default_payload() -> NatsOptions {
    NatsOptions {
        max_payload: DEFAULT_MAX_PAYLOAD,
        ..Default::default()
    }
}

#[tokio::test]
async fn every_plant_fact_is_fetched_back_byte_identical_in_a_second_zone_or_refused_with_its_path()
{
    let plant = Zone::start_custom(
        "plant-a",
        &[("to-enterprise", "operational")],
        default_payload(),
        Limits::default(),
        |_| {},
    );
    let enterprise = Zone::start_custom(
        "enterprise",
        &[("reporting", "operational")],
        default_payload(),
        Limits::default(),
        |_| {},
    );
    let (plant, enterprise) = tokio::join!(plant, enterprise);
    let (plant, enterprise) = (plant.unwrap(), enterprise.unwrap());
    let corpus = corpus();
    let mut expected = BTreeMap::new();
    for (i, (what, json, expect)) in corpus.into_iter().enumerate() {
        let m = fact(i, json);
        let id = m.envelope.message_id.clone();
        let r = plant.api.append_fact(m).await;
        match expect {
            Stored(canonical) => {
                let o = r.unwrap_or_else(|e| panic!("{what}: must be stored, got {e}"));
                assert!(!o.duplicate, "{what}");
                expected.insert(id, canonical);
            }
            Refused(field) => match r {
                Err(BoundaryError::InvalidArgument { field: f, rule }) => {
                    assert_eq!(f, field, "{what}: {rule}");
                    assert!(!rule.is_empty(), "{what}");
                }
                other => panic!("{what}: must be refused on {field}, got {other:?}"),
            },
            RefusedUnder(prefix) => match r {
                Err(BoundaryError::InvalidArgument { field, .. }) => {
                    assert!(field.starts_with(prefix), "{what}: {field}");
                }
                other => panic!("{what}: must be refused under {prefix}, got {other:?}"),
            },
        }
    }
    drain(&plant, &enterprise.api, "to-enterprise", "from-plant").await;
    let got = read_all(&enterprise, "reporting").await;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "exactly the accepted facts crossed"
    );
    for (id, canonical) in &expected {
        let f = &got[id];
        assert!(
            f.fact.object_json == *canonical,
            "{id}: stored {} bytes, expected {} bytes: {:.200}",
            f.fact.object_json.len(),
            canonical.len(),
            f.fact.object_json
        );
    }
    // Nothing the plant refused is in its own log either.
    assert_eq!(
        read_all(&plant, "to-enterprise").await.len(),
        0,
        "the link confirmed everything"
    );
}

/// A source that serves its real pages, but with one fact doctored the way another
/// implementation might send it (a duplicate key): the receiver must judge it by its
/// own rules.
struct Doctored {
    inner: bsfg_core::Boundary,
    id: String,
    /// The object_json it sends for that id instead of the stored one.
    object_json: &'static str,
}

#[async_trait::async_trait]
impl BoundaryApi for Doctored {
    async fn append_fact(&self, m: Message) -> Result<bsfg_core::AppendOutcome, BoundaryError> {
        self.inner.append_fact(m).await
    }
    async fn fetch_facts(&self, r: FetchRequest) -> Result<FactPage, BoundaryError> {
        let mut page = self.inner.fetch_facts(r).await?;
        for f in &mut page.facts {
            if f.message.envelope.message_id == self.id {
                f.message.fact.object_json = self.object_json.into();
            }
        }
        Ok(page)
    }
    async fn confirm_receipt(&self, c: &str, o: u64) -> Result<bsfg_core::Frontier, BoundaryError> {
        self.inner.confirm_receipt(c, o).await
    }
    async fn put_object(
        &self,
        b: &str,
        k: &str,
        body: bsfg_core::ByteStream,
    ) -> Result<bsfg_core::ObjectInfo, BoundaryError> {
        self.inner.put_object(b, k, body).await
    }
    async fn head_object(&self, b: &str, k: &str) -> bsfg_core::ApiResult<bsfg_core::ObjectInfo> {
        self.inner.head_object(b, k).await
    }
    async fn get_object(
        &self,
        b: &str,
        k: &str,
        offset: u64,
    ) -> bsfg_core::ApiResult<bsfg_core::ObjectRead> {
        self.inner.get_object(b, k, offset).await
    }
}

#[tokio::test]
async fn one_page_of_poison_among_good_facts_stores_the_good_quarantines_each_poison_and_moves_on()
{
    // The receiver: fewer labels allowed, classes `main` (default) and `audit` only,
    // and a server that holds at most 64 KiB per message while its engine would take
    // a 1 MB fact.
    let plant = Zone::start("plant-a", &[("to-enterprise", "operational")]);
    let enterprise = Zone::start_custom(
        "enterprise",
        &[("reporting", "main"), ("audit-reader", "audit")],
        NatsOptions {
            max_payload: 64 * 1024,
            ..Default::default()
        },
        Limits {
            max_labels: 3,
            ..Limits::default()
        },
        |c| {
            c.classes = vec![
                bsfg_sink_jetstream::StreamClass::new("main", Duration::from_secs(3600)),
                bsfg_sink_jetstream::StreamClass::new("audit", Duration::from_secs(3600)),
            ];
            c.default_class = "main".into();
        },
    );
    let (plant, enterprise) = tokio::join!(plant, enterprise);
    let (plant, enterprise) = (plant.unwrap(), enterprise.unwrap());

    let good = |i: u32| step_completed("plant-a", "enterprise", "P1", i);
    let mut page = vec![good(1)];
    // 1. valid at the source, too many labels here.
    let mut labels = good(2);
    labels.envelope.message_id = "poison:labels".into();
    for k in ["a", "b", "c", "d"] {
        labels.envelope.labels.insert(k.into(), "v".into());
    }
    page.push(labels);
    page.push(good(3));
    // 2. a message_id the receiver already holds with another payload.
    let mut conflict = good(4);
    conflict.envelope.message_id = "poison:conflict".into();
    page.push(conflict.clone());
    // 3. a class the receiver does not have.
    let mut class = good(5);
    class.envelope.message_id = "poison:class".into();
    class
        .envelope
        .labels
        .insert("class".into(), "operational".into());
    page.push(class);
    // 4. larger than the receiver's server accepts.
    let mut big = good(6);
    big.envelope.message_id = "poison:big".into();
    big.fact.object_json = format!("{{\"blob\":\"{}\"}}", "x".repeat(100_000));
    page.push(big);
    // 5. a duplicate key, as a non-strict source would send it.
    let mut dup = good(7);
    dup.envelope.message_id = "poison:duplicate-key".into();
    page.push(dup);
    page.push(good(8));
    let mut offsets = Vec::new();
    for m in &page {
        offsets.push(plant.api.append_fact(m.clone()).await.unwrap().offset);
    }
    let last = offsets.last().copied().unwrap_or(0);
    let mut local = conflict;
    local.fact.object_json = r#"{"step":4,"operator":"someone else"}"#.into();
    enterprise.api.append_fact(local).await.unwrap();

    let source = Doctored {
        inner: plant.api.clone(),
        id: "poison:duplicate-key".into(),
        object_json: r#"{"x":1,"x":2}"#,
    };
    let settings = bsfg_core::link::LinkSettings {
        name: "from-plant".into(),
        local_zone: "enterprise".into(),
        source_zone: "plant-a".into(),
        consumer: "to-enterprise".into(),
        page_size: 100,
        pages_in_flight: bsfg_core::link::PAGES_IN_FLIGHT,
        wait: Duration::from_millis(200),
        streams: vec![],
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        request_timeout: Duration::from_secs(5),
    };
    let (link, handle) =
        bsfg_core::link::Link::new(settings, Arc::new(source), Arc::new(enterprise.api.clone()));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(link.run(rx));
    let status =
        bsfg_testkit::eventually("the page confirmed", Duration::from_secs(30), || async {
            let s = handle.status();
            if s.frontier == last {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        })
        .await;
    assert_eq!(status.state.name(), "running", "{status:?}");
    assert_eq!(
        (status.facts_stored, status.quarantined, status.refused),
        (3, 5, 5),
        "{status:?}"
    );
    stop.send_replace(true);
    task.await.unwrap();

    // The good facts, once each (plus the receiver's own conflicting fact).
    let got = read_all(&enterprise, "reporting").await;
    let mut want: Vec<String> = [1, 3, 8]
        .iter()
        .map(|i| good(*i).envelope.message_id)
        .collect();
    want.push("poison:conflict".into());
    want.sort();
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), want);
    assert!(
        got["poison:conflict"]
            .fact
            .object_json
            .contains("someone else")
    );

    // Each poison fact in the quarantine, with its reason and provenance.
    let q = enterprise.api.quarantined(100).await.unwrap();
    let by_id: BTreeMap<&str, &bsfg_core::QuarantineEntry> =
        q.iter().map(|e| (e.message_id(), e)).collect();
    assert_eq!(by_id.len(), 5, "{q:#?}");
    let cause = |id: &str| {
        let e = by_id[id];
        (e.cause.as_str(), e.field.as_deref().unwrap_or(""))
    };
    assert_eq!(
        cause("poison:labels"),
        ("invalid_argument", "envelope.labels")
    );
    assert_eq!(cause("poison:conflict"), ("conflicting_duplicate", ""));
    assert_eq!(
        cause("poison:class"),
        ("invalid_argument", "envelope.labels.class")
    );
    assert_eq!(cause("poison:big"), ("invalid_argument", "fact"));
    assert!(
        by_id["poison:big"].denial.reason.contains("max_payload"),
        "{}",
        by_id["poison:big"].denial.reason
    );
    assert_eq!(
        cause("poison:duplicate-key"),
        ("invalid_argument", "fact.object_json.x")
    );
    for e in &q {
        assert_eq!(
            (e.link.as_str(), e.source_zone.as_str()),
            ("from-plant", "plant-a")
        );
        assert!(offsets.contains(&e.source_offset), "{}", e.source_offset);
    }
    // The too-large fact did not fit beside its entry either: the entry says so.
    assert_eq!(
        by_id["poison:big"]
            .payload_omitted_bytes
            .map(|b| b > 100_000),
        Some(true)
    );
    assert_eq!(
        by_id["poison:labels"].message,
        Limits::default()
            .validate(page[1].clone())
            .unwrap()
            .into_message(),
        "kept exactly as fetched (the source's canonical form)"
    );

    // The operator fixes what can be fixed and releases it; drops the rest.
    let relaxed = bsfg_core::Boundary::new(
        enterprise.log.clone(),
        enterprise.log.clone(),
        Limits::default(),
    );
    let settle = |id: &'static str, action| {
        relaxed.settle_quarantined(id, None, action, "enterprise", "jdoe", 1)
    };
    let released = settle("poison:labels", QuarantineAction::Release)
        .await
        .unwrap();
    assert!(!released.released.unwrap().duplicate);
    // A release that still fails keeps the entry.
    let e = settle("poison:conflict", QuarantineAction::Release)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::ConflictingDuplicate);
    let e = settle("poison:big", QuarantineAction::Release)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{e}");
    for id in [
        "poison:conflict",
        "poison:class",
        "poison:big",
        "poison:duplicate-key",
    ] {
        settle(id, QuarantineAction::Drop)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    assert!(enterprise.api.quarantined(100).await.unwrap().is_empty());
    let got = read_all(&enterprise, "reporting").await;
    assert_eq!(got.keys().collect::<Vec<_>>(), ["poison:labels"]);
    let audit = read_all(&enterprise, "audit-reader").await;
    assert_eq!(audit.len(), 5, "one record per decision: {audit:?}");
}

#[tokio::test]
async fn the_quarantine_keeps_every_distinct_payload_of_one_message_id() {
    let (plant, enterprise) = plant_and_enterprise().await;
    // The receiver holds the id with payload A; the source sends B, later C.
    let base = step_completed("plant-a", "enterprise", "Q", 1);
    enterprise.api.append_fact(base.clone()).await.unwrap();
    let mut b = base.clone();
    b.fact.object_json = r#"{"v":"B"}"#.into();
    let mut c = base.clone();
    c.fact.object_json = r#"{"v":"C"}"#.into();
    // The same id cannot be stored twice in one zone: two source zones send them.
    let other = Zone::start("plant-b", &[("to-enterprise", "operational")])
        .await
        .unwrap();
    plant.api.append_fact(b).await.unwrap();
    other.api.append_fact(c).await.unwrap();
    drain(&plant, &enterprise.api, "to-enterprise", "from-plant-a").await;
    drain(&other, &enterprise.api, "to-enterprise", "from-plant-b").await;
    let q = enterprise
        .api
        .quarantined_entries(&base.envelope.message_id)
        .await
        .unwrap();
    assert_eq!(q.len(), 2, "{q:#?}");
    assert_ne!(q[0].payload_digest, q[1].payload_digest);
    // Keeping an entry again (a replayed page) stores nothing new.
    Destination::quarantine(&enterprise.api, q[0].clone())
        .await
        .unwrap();
    assert_eq!(enterprise.api.quarantined(10).await.unwrap().len(), 2);
    // Several entries under one id: the operator must name one.
    let e = enterprise
        .api
        .quarantined_entry(&base.envelope.message_id, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BoundaryError::InvalidArgument { field, .. } if field == "payload"),
        "{e}"
    );
    let one = q[1].payload_short().to_owned();
    enterprise
        .api
        .settle_quarantined(
            &base.envelope.message_id,
            Some(&one),
            QuarantineAction::Drop,
            "enterprise",
            "jdoe",
            1,
        )
        .await
        .unwrap();
    let left = enterprise
        .api
        .quarantined_entries(&base.envelope.message_id)
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].payload_digest, q[0].payload_digest);
}

fn gate_for_two_readers(zone: &Zone) -> Gate {
    let grant = |identity: &str| Grant {
        identity: identity.into(),
        ca: "enterprise".into(),
        claim_from_zones: vec![],
        to_zones: vec![],
        consumers: vec!["to-enterprise".into()],
        put_buckets: vec![],
        read_buckets: vec![],
    };
    Gate::new(
        Arc::new(zone.api.clone()),
        Arc::new(bsfg_core::Authorization::new(vec![
            grant("reader-a"),
            grant("reader-b"),
        ])),
    )
}

fn peer(identity: &str) -> Caller {
    Caller::Peer {
        identity: identity.into(),
        anchor: Some("enterprise".into()),
    }
}

#[tokio::test]
async fn two_identities_granted_one_consumer_cannot_confirm_what_the_other_fetched() {
    // A long ack wait: no redelivery can interleave with the test's own steps.
    let plant = Zone::start_with("plant-a", &[], |c| {
        c.consumers = vec![
            bsfg_sink_jetstream::ConsumerConfig::new("to-enterprise", "operational")
                .with_ack_wait(Duration::from_secs(120)),
        ];
    })
    .await
    .unwrap();
    let o = plant.append_steps("enterprise", "B1", 1..=4).await.unwrap();
    let gate = gate_for_two_readers(&plant);
    let (a, b) = (peer("reader-a"), peer("reader-b"));
    let req = |limit| FetchRequest {
        consumer: "to-enterprise".into(),
        limit,
        wait: Duration::ZERO,
    };
    let page_a = gate.fetch_facts(&a, req(2)).await.unwrap();
    assert_eq!(page_a.facts.len(), 2);
    let page_b = gate.fetch_facts(&b, req(2)).await.unwrap();
    assert_eq!(
        page_b.facts.iter().map(|f| f.offset).collect::<Vec<_>>(),
        o[2..]
    );
    // B confirms what A fetched: refused, naming the consumer and offset; nothing moves.
    let e = gate
        .confirm_receipt(&b, "to-enterprise", o[1])
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{e}");
    assert!(
        e.to_string().contains(&format!("offset {}", o[1]))
            && e.to_string().contains("to-enterprise"),
        "{e}"
    );
    // A cannot confirm B's page either (it would bury 1..2 too).
    let e = gate
        .confirm_receipt(&a, "to-enterprise", o[3])
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::FailedPrecondition, "{e}");
    assert_eq!(
        plant
            .log
            .fetch(&req(1), "nobody")
            .await
            .map(|p| p.frontier)
            .unwrap(),
        0,
        "the frontier did not move"
    );
    // Each confirms its own: the frontier moves, and a repeated confirm is answered.
    // The frontier covers A's page: it may stand on a later position of the log
    // that is no fact (JetStream's ack floor), never on or after B's open page.
    for _ in 0..2 {
        let f = gate
            .confirm_receipt(&a, "to-enterprise", o[1])
            .await
            .unwrap()
            .offset;
        assert!((o[1]..o[2]).contains(&f), "{f} within {o:?}");
    }
    assert_eq!(
        gate.confirm_receipt(&b, "to-enterprise", o[3])
            .await
            .unwrap()
            .offset,
        o[3]
    );
    // The same identity from another CA is another receiver.
    plant.append_steps("enterprise", "B1", 5..=5).await.unwrap();
    let page = gate.fetch_facts(&a, req(1)).await.unwrap();
    let forged = Caller::Peer {
        identity: "reader-a".into(),
        anchor: Some("plant".into()),
    };
    assert!(
        gate.confirm_receipt(&forged, "to-enterprise", page.facts[0].offset)
            .await
            .is_err()
    );
}

/// Denies every fact whose object mentions `secret`, as a security team would write it:
/// a plain substring match on the object's text.
struct NoSecrets;

#[async_trait::async_trait]
impl bsfg_core::Policy for NoSecrets {
    fn name(&self) -> &str {
        "no-secrets"
    }
    async fn decide(
        &self,
        _: &bsfg_core::PolicyContext<'_>,
        facts: &[bsfg_core::Candidate<'_>],
    ) -> Vec<bsfg_core::Verdict> {
        facts
            .iter()
            .map(|c| {
                if c.message.fact.object_json.contains("secret") {
                    bsfg_core::Verdict::Deny(bsfg_core::Denial {
                        policy: "no-secrets".into(),
                        reason: "mentions a secret".into(),
                        module_sha256: String::new(),
                    })
                } else {
                    bsfg_core::Verdict::Allow
                }
            })
            .collect()
    }
}

#[tokio::test]
async fn an_intake_policy_judges_the_canonical_form_so_an_escaped_word_does_not_slip_past() {
    let (plant, enterprise) = plant_and_enterprise().await;
    let sneaky = step_completed("plant-a", "enterprise", "S", 1);
    plant.api.append_fact(sneaky.clone()).await.unwrap();
    plant
        .api
        .append_fact(step_completed("plant-a", "enterprise", "S", 2))
        .await
        .unwrap();
    // The source spells the word with an escape the policy's text match would miss.
    let source = Doctored {
        inner: plant.api.clone(),
        id: sneaky.envelope.message_id.clone(),
        object_json: r#"{"note":"\u0073ecret recipe"}"#,
    };
    let intake = bsfg_core::link::Intake {
        chain: bsfg_core::PolicyChain::new(vec![Arc::new(NoSecrets)]),
        zone: "enterprise".into(),
        peer: "plant-a-bsfg".into(),
    };
    let step = pull_step("from-plant", "to-enterprise", "plant-a", 10);
    let checkpoint = Destination::checkpoint(&enterprise.api, "from-plant")
        .await
        .unwrap();
    let page = bsfg_core::link::fetch_page(&source, &step).await.unwrap();
    let r = bsfg_core::link::apply_page(
        &source,
        &enterprise.api,
        &intake,
        &step,
        page,
        checkpoint,
        None,
    )
    .await
    .unwrap();
    assert_eq!((r.stored, r.quarantined, r.refused), (1, 1, 0), "{r:?}");
    let q = enterprise.api.quarantined(10).await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(
        (q[0].cause.as_str(), q[0].denial.policy.as_str()),
        ("policy_denied", "no-secrets")
    );
    // The policy saw, and the entry keeps, the canonical form.
    assert_eq!(q[0].message.fact.object_json, r#"{"note":"secret recipe"}"#);
    let stored = read_all(&enterprise, "reporting").await;
    assert!(!stored.contains_key(&sneaky.envelope.message_id));
}
