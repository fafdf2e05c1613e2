//! Sample facts for tests and benchmarks: one plant fact, built in one place.

use bsfg_core::{Envelope, Fact, Message};

/// `batch:PlantA/B1042 step_completed {"step":<step>,"operator":"jdoe"}` from plant-a
/// to enterprise under `message_id`. Same id and step: same payload.
pub fn step_completed(message_id: &str, step: i64) -> Message {
    Message {
        envelope: Envelope {
            message_id: message_id.into(),
            from_zone: "plant-a".into(),
            to_zone: "enterprise".into(),
            produced_at_unix_ms: 1_764_000_000_000,
            ..Default::default()
        },
        fact: Fact {
            subject: "batch:PlantA/B1042".into(),
            predicate: "step_completed".into(),
            object_json: format!(r#"{{"step":{step},"operator":"jdoe"}}"#),
            artifacts: vec![],
        },
    }
}

/// The benchmark workload: the sample fact with canonical object_json of exactly
/// `object_len` bytes (at least 64), distinct per `seq`.
pub fn padded_fact(message_id: &str, seq: usize, object_len: usize) -> Message {
    let prefix = format!(r#"{{"operator":"jdoe","seq":{seq},"pad":""#);
    let pad = "x".repeat(object_len.max(64).saturating_sub(prefix.len() + 2));
    let mut m = step_completed(message_id, 0);
    m.fact.object_json = format!("{prefix}{pad}\"}}");
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_fact_has_the_requested_canonical_size() {
        let v = bsfg_core::Limits::default()
            .validate(padded_fact("id", 12345, 256))
            .expect("valid");
        assert_eq!(v.message().fact.object_json.len(), 256);
    }
}
