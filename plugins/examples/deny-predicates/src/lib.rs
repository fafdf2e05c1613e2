//! Denies facts by predicate or by subject kind.
//!
//! Settings: `predicates = "recipe_changed,setpoint_forced"`,
//! `subject_kinds = "operator,badge"` (either may be empty, not both).
#![no_std]

use bsfg_policy_sdk::{
    Context, Fact, Policy, Settings, String, Vec, Verdict, export_policy, format,
};

struct DenyPredicates {
    predicates: Vec<String>,
    subject_kinds: Vec<String>,
}

impl Policy for DenyPredicates {
    fn init(settings: &Settings) -> Result<Self, String> {
        let predicates = settings.list("predicates");
        let subject_kinds = settings.list("subject_kinds");
        if predicates.is_empty() && subject_kinds.is_empty() {
            return Err("set `predicates` or `subject_kinds` (comma-separated)".into());
        }
        Ok(DenyPredicates {
            predicates,
            subject_kinds,
        })
    }

    fn decide(&self, _ctx: &Context, fact: &Fact) -> Verdict {
        if self.predicates.iter().any(|p| *p == fact.predicate) {
            return Verdict::deny(format!("predicate `{}` is denied", fact.predicate));
        }
        let kind = fact.subject_kind();
        if self.subject_kinds.iter().any(|k| k == kind) {
            return Verdict::deny(format!("subject kind `{kind}` is denied"));
        }
        Verdict::Allow
    }
}

export_policy!(DenyPredicates);
