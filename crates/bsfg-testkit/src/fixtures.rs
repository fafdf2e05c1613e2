//! Sample facts for tests: one plant fact, built in one place.

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
