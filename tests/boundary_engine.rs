//! Two zones, each with its own nats-server and JetStream domain, exchanging facts
//! only through the four boundary operations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use bsfg_core::BoundaryApi;
use bsfg_core::link::{GapAcceptance, Operation, PullError};
use bsfg_e2e::Zone;

#[tokio::test]
async fn receiver_pull_moves_every_fact_once_and_absorbs_replays() {
    let plant = Zone::start("plant-a", &[("to-enterprise", "operational")])
        .await
        .unwrap();
    let enterprise = Zone::start("enterprise", &[("reporting", "operational")])
        .await
        .unwrap();
    let o = plant
        .append_steps("enterprise", "B1042", 1..=25)
        .await
        .unwrap();
    // First page is appended in the destination, then its confirm is "lost":
    // the receiver crashed after appending and before confirming.
    let page = plant
        .fetch("to-enterprise", 10, Duration::ZERO)
        .await
        .unwrap();
    for f in &page.facts {
        enterprise.api.append_fact(f.message.clone()).await.unwrap();
    }
    // The receiver restarts and pulls until drained; the unconfirmed page comes again.
    let mut duplicates = 0;
    loop {
        let r = enterprise
            .pull_from(&plant, "to-enterprise", 10, Duration::from_secs(3), None)
            .await
            .unwrap();
        if r.fetched == 0 {
            break;
        }
        duplicates += r.duplicates;
    }
    assert_eq!(
        duplicates, 10,
        "the replayed page is absorbed, not stored again"
    );

    // The destination holds each message_id exactly once, ids unchanged.
    let mut ids = HashSet::new();
    loop {
        let p = enterprise
            .fetch("reporting", 100, Duration::ZERO)
            .await
            .unwrap();
        let Some(last) = p.facts.last().map(|f| f.offset) else {
            break;
        };
        for f in &p.facts {
            assert!(ids.insert(f.message.envelope.message_id.clone()));
        }
        enterprise
            .api
            .confirm_receipt("reporting", last)
            .await
            .unwrap();
    }
    let expected: HashSet<String> = (1..=25)
        .map(|s| format!("plant-a:batch:B1042:step:{s}"))
        .collect();
    assert_eq!(ids, expected);
    // And the source's frontier covers everything.
    let p = plant
        .fetch("to-enterprise", 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!((p.frontier, p.last_offset), (o[24], o[24]));
}

#[tokio::test]
async fn a_gap_stops_the_pull_until_an_operator_accepts_it_and_the_acceptance_is_a_fact() {
    // Long enough for steps 6..8 to outlive the rest of the test.
    let (plant, enterprise) = Zone::pair_with_retention(Duration::from_secs(6))
        .await
        .unwrap();
    let o = plant.append_steps("enterprise", "B1", 1..=5).await.unwrap();
    let r = enterprise
        .pull_from(&plant, "to-enterprise", 2, Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!((r.stored, r.frontier), (2, o[1]));
    // Steps 3..5 expire in plant-a before enterprise confirmed them.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let later = plant.append_steps("enterprise", "B1", 6..=8).await.unwrap();
    let (from, to) = (o[1] + 1, o[4]);
    let e = enterprise
        .pull_from(&plant, "to-enterprise", 10, Duration::ZERO, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, PullError::Gap { consumer, missing_from, missing_to, .. } if consumer == "to-enterprise" && (*missing_from, *missing_to) == (from, to)),
        "{e:?}"
    );
    // Nothing moved: the gap is not buried by a confirm, nothing was appended.
    let again = enterprise
        .pull_from(&plant, "to-enterprise", 10, Duration::from_secs(3), None)
        .await;
    assert!(matches!(again, Err(PullError::Gap { .. })), "{again:?}");

    let acceptance = GapAcceptance {
        local_zone: "enterprise".into(),
        accepted_by: "operator jdoe".into(),
        at_unix_ms: 1_764_000_000_000,
        range: None,
    };
    let mut stored = 0;
    loop {
        let r = enterprise
            .pull_from(
                &plant,
                "to-enterprise",
                10,
                Duration::from_secs(3),
                Some(&acceptance),
            )
            .await
            .unwrap();
        if r.fetched == 0 {
            assert_eq!(r.frontier, later[2]);
            break;
        }
        stored += r.stored;
    }
    assert_eq!(stored, 3, "steps 6..8 crossed once the gap was accepted");
    // The acceptance is an audit fact in the enterprise zone.
    let audit = enterprise
        .fetch("audit-reader", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(audit.facts.len(), 1);
    let f = &audit.facts[0].message;
    assert_eq!(
        (f.fact.subject.as_str(), f.fact.predicate.as_str()),
        ("link:to-enterprise", "gap_accepted")
    );
    assert!(
        f.fact
            .object_json
            .contains(&format!(r#""missing_from":{from}"#))
            && f.fact
                .object_json
                .contains(&format!(r#""missing_to":{to}"#))
    );
}

#[tokio::test]
async fn replicated_facts_carry_their_source_zone_and_offset_beside_an_unchanged_fact() {
    let plant = Zone::start("plant-a", &[("to-enterprise", "operational")])
        .await
        .unwrap();
    let enterprise = Zone::start("enterprise", &[("reporting", "operational")])
        .await
        .unwrap();
    plant.append_steps("enterprise", "B7", 1..=3).await.unwrap();
    let original = plant
        .fetch("to-enterprise", 10, Duration::ZERO)
        .await
        .unwrap();
    // The link reads through its own consumer after this peek comes back.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = enterprise
        .pull_from(&plant, "to-enterprise", 10, Duration::from_secs(3), None)
        .await
        .unwrap();
    assert_eq!(r.stored, 3);
    let copy = enterprise
        .fetch("reporting", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(copy.facts.len(), 3);
    for (o, c) in original.facts.iter().zip(&copy.facts) {
        assert_eq!(o.message, c.message, "fact and envelope unchanged");
        assert_eq!(o.provenance, None, "a local append has no provenance");
        let p = c.provenance.as_ref().expect("provenance recorded");
        assert_eq!(
            (
                p.zone.as_str(),
                p.stream.as_str(),
                p.offset,
                p.link.as_str()
            ),
            ("plant-a", "facts_operational", o.offset, "to-enterprise")
        );
    }
}

#[tokio::test]
async fn the_link_checkpoint_catches_a_gap_that_left_the_source_stream_empty() {
    // JetStream moves the ack floor to the end when every delivered-but-unconfirmed
    // fact expires (pinned in the sink's known_limit test); the link's own
    // checkpoint still shows the gap.
    let (plant, enterprise) = Zone::pair_with_retention(Duration::from_secs(2))
        .await
        .unwrap();
    let o = plant.append_steps("enterprise", "B1", 1..=5).await.unwrap();
    let r = enterprise
        .pull_from(&plant, "to-enterprise", 2, Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!((r.stored, r.frontier), (2, o[1]));
    let (from, to) = (o[1] + 1, o[4]);
    // A receiver takes steps 3..5 and crashes before appending them.
    let lost = plant
        .fetch("to-enterprise", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(lost.facts.len(), 3);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Everything expired: the stream is empty and its consumer's floor jumped to 5.
    let e = enterprise
        .pull_from(&plant, "to-enterprise", 10, Duration::ZERO, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, PullError::Gap { consumer, missing_from, missing_to, .. } if consumer == "to-enterprise" && (*missing_from, *missing_to) == (from, to)),
        "{e:?}"
    );
    // A new fact does not hide it either.
    plant.append_steps("enterprise", "B1", 6..=6).await.unwrap();
    let e = enterprise
        .pull_from(&plant, "to-enterprise", 10, Duration::ZERO, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            PullError::Gap {
                missing_from,
                ..
            } if missing_from == from
        ),
        "{e:?}"
    );
}

/// A source zone that lies about its zone name and, when `stream` is set, sends a
/// stream name which is not a name (with a header injection attempt in it).
struct LyingSource(bsfg_core::Boundary, Option<&'static str>);

#[async_trait::async_trait]
impl BoundaryApi for LyingSource {
    async fn append_fact(
        &self,
        m: bsfg_core::Message,
    ) -> Result<bsfg_core::AppendOutcome, bsfg_core::BoundaryError> {
        self.0.append_fact(m).await
    }
    async fn fetch_facts(
        &self,
        r: bsfg_core::FetchRequest,
    ) -> Result<bsfg_core::FactPage, bsfg_core::BoundaryError> {
        let mut page = self.0.fetch_facts(r).await?;
        page.zone = "enterprise\r\nNats-Expected-Stream: other".into();
        if let Some(s) = self.1 {
            page.stream = s.into();
        }
        Ok(page)
    }
    async fn confirm_receipt(
        &self,
        c: &str,
        o: u64,
    ) -> Result<bsfg_core::Frontier, bsfg_core::BoundaryError> {
        self.0.confirm_receipt(c, o).await
    }
    async fn put_object(
        &self,
        b: &str,
        k: &str,
        body: bsfg_core::ByteStream,
    ) -> Result<bsfg_core::ObjectInfo, bsfg_core::BoundaryError> {
        self.0.put_object(b, k, body).await
    }
    async fn head_object(&self, b: &str, k: &str) -> bsfg_core::ApiResult<bsfg_core::ObjectInfo> {
        self.0.head_object(b, k).await
    }
    async fn get_object(
        &self,
        b: &str,
        k: &str,
        offset: u64,
    ) -> bsfg_core::ApiResult<bsfg_core::ObjectRead> {
        self.0.get_object(b, k, offset).await
    }
}

/// plant-a with two facts for `to-enterprise`, an empty enterprise, and one pull step
/// from a source that lies about its zone (and, with `stream`, sends that stream name).
async fn pull_from_a_liar(
    stream: Option<&'static str>,
) -> (Zone, Zone, Result<bsfg_e2e::PullReport, PullError>) {
    let plant = Zone::start("plant-a", &[("to-enterprise", "operational")])
        .await
        .unwrap();
    let enterprise = Zone::start("enterprise", &[("reporting", "operational")])
        .await
        .unwrap();
    plant.append_steps("enterprise", "B9", 1..=2).await.unwrap();
    let step = bsfg_e2e::pull_step("from-plant", "to-enterprise", "plant-a", 10);
    let r = bsfg_e2e::pull_page(
        &LyingSource(plant.api.clone(), stream),
        &enterprise.api,
        &step,
        None,
    )
    .await;
    (plant, enterprise, r)
}

#[tokio::test]
async fn provenance_names_the_configured_source_zone_whatever_the_page_claims() {
    let (_plant, enterprise, r) = pull_from_a_liar(None).await;
    let r = r.unwrap();
    assert_eq!((r.stored, r.source_zone.as_str()), (2, "plant-a"));
    let p = enterprise
        .fetch("reporting", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(p.facts.len(), 2);
    for f in &p.facts {
        let prov = f.provenance.as_ref().expect("provenance");
        assert_eq!(
            (prov.zone.as_str(), prov.link.as_str()),
            ("plant-a", "from-plant")
        );
    }
}

#[tokio::test]
async fn a_source_that_sends_a_malformed_stream_name_gets_a_clear_error_and_stores_nothing() {
    let (plant, enterprise, r) =
        pull_from_a_liar(Some("facts_operational\r\nNats-Expected-Stream: other")).await;
    let e = r.unwrap_err();
    assert!(
        matches!(&e, PullError::Boundary { op: Operation::Fetch, error: bsfg_core::BoundaryError::InvalidArgument { field, .. } } if field == "stream"),
        "{e:?}"
    );
    // Nothing was stored or confirmed, and the zone log still takes appends.
    let p = enterprise
        .fetch("reporting", 10, Duration::ZERO)
        .await
        .unwrap();
    assert!(p.facts.is_empty());
    enterprise
        .append_steps("enterprise", "B9", 1..=1)
        .await
        .unwrap();
    assert_eq!(
        plant
            .fetch("to-enterprise", 10, Duration::ZERO)
            .await
            .unwrap()
            .frontier,
        0
    );
}
