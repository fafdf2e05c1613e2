//! Allows only facts whose label `label` has one of the listed `values`.
//!
//! Settings: `label = "site"`, `values = "PlantA,PlantB"`.
#![no_std]

use bsfg_policy_sdk::{
    Context, Fact, Policy, Settings, String, Vec, Verdict, export_policy, format,
};

struct AllowLabels {
    label: String,
    values: Vec<String>,
}

impl Policy for AllowLabels {
    fn init(settings: &Settings) -> Result<Self, String> {
        let label = settings.require("label")?.into();
        let values = settings.list("values");
        if values.is_empty() {
            return Err("setting `values` must list at least one allowed value".into());
        }
        Ok(AllowLabels { label, values })
    }

    fn decide(&self, _ctx: &Context, fact: &Fact) -> Verdict {
        match fact.label(&self.label) {
            Some(v) if self.values.iter().any(|a| a == v) => Verdict::Allow,
            Some(v) => Verdict::deny(format!(
                "label `{}` is `{v}`, allowed: {}",
                self.label,
                self.values.join(", ")
            )),
            None => Verdict::deny(format!("label `{}` is missing", self.label)),
        }
    }
}

export_policy!(AllowLabels);
