//! Denies facts by predicate or by subject kind, and filters facts the zone does not
//! want at all by predicate.
//!
//! Settings: `predicates = "recipe_changed,setpoint_forced"` (denied: quarantined at
//! intake), `subject_kinds = "operator,badge"` (denied), `filter_predicates =
//! "heartbeat"` (filtered: dropped at intake and recorded, not quarantined); at least
//! one of them.
#![no_std]

use bsfg_policy_sdk::{
    Context, Fact, Policy, Settings, String, Vec, Verdict, export_policy, format,
};

struct DenyPredicates {
    predicates: Vec<String>,
    subject_kinds: Vec<String>,
    filter_predicates: Vec<String>,
}

impl Policy for DenyPredicates {
    fn init(settings: &Settings) -> Result<Self, String> {
        let predicates = settings.list("predicates");
        let subject_kinds = settings.list("subject_kinds");
        let filter_predicates = settings.list("filter_predicates");
        if predicates.is_empty() && subject_kinds.is_empty() && filter_predicates.is_empty() {
            return Err(
                "set `predicates`, `subject_kinds` or `filter_predicates` (comma-separated)".into(),
            );
        }
        Ok(DenyPredicates {
            predicates,
            subject_kinds,
            filter_predicates,
        })
    }

    fn decide(&self, _ctx: &Context, fact: &Fact) -> Verdict {
        if self.filter_predicates.iter().any(|p| *p == fact.predicate) {
            return Verdict::filter(format!("predicate `{}` is not wanted here", fact.predicate));
        }
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
