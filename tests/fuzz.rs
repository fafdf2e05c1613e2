//! Bounded fuzzing (a fixed time budget per target, `BSFG_FUZZ_MS`, default 3 s):
//! bytes off the wire decoded into the domain types, and object_json canonicalized.
//! Every input either converts or is refused with an error; nothing panics; what is
//! accepted is canonical, stays canonical, and its stored form reads back unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bsfg_core::model::canonicalize_json;
use bsfg_core::{FactPage, FetchedFact, Limits, Message, Provenance};
use bsfg_proto::v1;
use bsfg_testkit::{fixtures, fuzz};
use prost::Message as _;

fn valid_append() -> Vec<u8> {
    let mut m = fixtures::step_completed("fuzz-1", 7);
    m.envelope
        .labels
        .insert("class".into(), "operational".into());
    m.envelope.correlation_id = Some("corr".into());
    v1::AppendFactRequest {
        message: Some(m.into()),
    }
    .encode_to_vec()
}

fn valid_page() -> Vec<u8> {
    let page = FactPage {
        zone: "plant-a".into(),
        stream: "facts_operational".into(),
        facts: vec![FetchedFact {
            offset: 3,
            appended_at_unix_ms: 1_764_000_000_000,
            delivery_count: 1,
            message: fixtures::step_completed("fuzz-2", 2),
            provenance: Some(Provenance {
                zone: "plant-a".into(),
                stream: "facts_operational".into(),
                offset: 3,
                link: "from-plant".into(),
            }),
        }],
        first_offset: 1,
        last_offset: 3,
        frontier: 2,
        pending: 1,
    };
    v1::FetchFactsResponse::from(page).encode_to_vec()
}

/// What a server does with an AppendFact body, and a receiver with a fetched page:
/// decode, convert, validate (with provenance). Errors are fine; panics are not.
fn decode_all(bytes: &[u8]) {
    if let Ok(req) = v1::AppendFactRequest::decode(bytes)
        && let Some(m) = req.message
        && let Ok(message) = Message::try_from(m)
        && let Ok(v) = Limits::default().validate(message)
    {
        stored_form_reads_back(&v);
    }
    if let Ok(resp) = v1::FetchFactsResponse::decode(bytes)
        && let Ok(page) = FactPage::try_from(resp)
    {
        for f in page.facts {
            if let Ok(v) = Limits::default().validate(f.message)
                && let Some(p) = f.provenance
            {
                let _ = v.with_provenance(p);
            }
        }
    }
    let _ = v1::ConfirmReceiptRequest::decode(bytes);
    let _ = v1::PutObjectRequest::decode(bytes);
}

/// What a zone stores for a validated message reads back as exactly that message.
fn stored_form_reads_back(v: &bsfg_core::ValidatedMessage) {
    let back =
        bsfg_core::model::decode_stored(v.stored_form()).expect("a stored form always decodes");
    assert_eq!(
        &back,
        v.message(),
        "the stored form reads back byte for byte"
    );
}

#[test]
fn fuzz_protobuf_decoding_into_domain_types_never_panics() {
    let seeds = [valid_append(), valid_page()];
    // The seeds themselves convert: the fuzzer starts from inputs that go deep.
    let page = FactPage::try_from(v1::FetchFactsResponse::decode(&seeds[1][..]).unwrap());
    assert_eq!(page.unwrap().facts.len(), 1);
    fuzz::run("protobuf", |u| {
        let bytes = if u.ratio(1, 5)? {
            u.arbitrary::<Vec<u8>>()?
        } else {
            let seed = &seeds[u.choose_index(seeds.len())?];
            fuzz::mutate(u, seed)?
        };
        decode_all(&bytes);
        Ok(())
    });
}

#[test]
fn fuzz_canonical_json_never_panics_and_is_a_fixed_point() {
    let seeds: [&[u8]; 4] = [
        br#"{"step":7,"operator":"jdoe","temps":[71.5,1e21,-0.0,5e-324],"ok":true}"#,
        br#"{"\u00e9":"\ud83d\ude00","a":{"z":null,"b":[{},[]]},"n":123456789012345678901234}"#,
        br#"[1,"two",{"3":4}]"#,
        br#""just a string with \"escapes\" \n""#,
    ];
    fuzz::run("canonical_json", |u| {
        let bytes = if u.ratio(1, 5)? {
            u.arbitrary::<Vec<u8>>()?
        } else {
            let seed = seeds[u.choose_index(seeds.len())?];
            fuzz::mutate(u, seed)?
        };
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(c) = canonicalize_json("fact.object_json", &text) {
            let again = canonicalize_json("fact.object_json", &c)
                .expect("canonical output must itself be valid JSON");
            assert_eq!(again, c, "canonicalizing twice changes nothing");
            let mut m = fixtures::step_completed("fuzz-3", 3);
            m.fact.object_json = text.into_owned();
            if let Ok(v) = Limits::default().validate(m) {
                assert_eq!(v.message().fact.object_json, c);
                stored_form_reads_back(&v);
            }
        }
        Ok(())
    });
}
