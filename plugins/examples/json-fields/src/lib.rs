//! Checks fields of `object_json`: required fields, numeric bounds.
//!
//! Settings: `require = "temperature,unit"`, `min.temperature = "-40"`,
//! `max.temperature = "150"`. Only facts whose predicate is listed in `predicates`
//! are checked when that setting is present.
#![no_std]

use bsfg_policy_sdk::{
    Context, Fact, Policy, Settings, String, ToString, Vec, Verdict, export_policy, format,
};

struct JsonFields {
    predicates: Vec<String>,
    require: Vec<String>,
    bounds: Vec<(String, Option<f64>, Option<f64>)>,
}

fn number(key: &str, v: &str) -> Result<f64, String> {
    v.trim()
        .parse::<f64>()
        .map_err(|_| format!("setting `{key}` must be a number, got `{v}`"))
}

impl Policy for JsonFields {
    fn init(settings: &Settings) -> Result<Self, String> {
        let mut bounds: Vec<(String, Option<f64>, Option<f64>)> = Vec::new();
        for (k, v) in settings.iter() {
            let (min, field) = if let Some(f) = k.strip_prefix("min.") {
                (true, f)
            } else if let Some(f) = k.strip_prefix("max.") {
                (false, f)
            } else {
                continue;
            };
            let n = number(k, v)?;
            let i = match bounds.iter().position(|b| b.0 == field) {
                Some(i) => i,
                None => {
                    bounds.push((field.to_string(), None, None));
                    bounds.len() - 1
                }
            };
            if min {
                bounds[i].1 = Some(n);
            } else {
                bounds[i].2 = Some(n);
            }
        }
        let require = settings.list("require");
        if require.is_empty() && bounds.is_empty() {
            return Err("set `require` or a `min.<field>` / `max.<field>` bound".into());
        }
        Ok(JsonFields {
            predicates: settings.list("predicates"),
            require,
            bounds,
        })
    }

    fn decide(&self, _ctx: &Context, fact: &Fact) -> Verdict {
        if !self.predicates.is_empty() && !self.predicates.iter().any(|p| *p == fact.predicate) {
            return Verdict::Allow;
        }
        let object: serde_json::Value = match serde_json::from_str(&fact.object_json) {
            Ok(v) => v,
            Err(e) => return Verdict::deny(format!("object_json is not JSON: {e}")),
        };
        for field in &self.require {
            if object.get(field.as_str()).is_none_or(|v| v.is_null()) {
                return Verdict::deny(format!("object_json.{field}: required"));
            }
        }
        for (field, min, max) in &self.bounds {
            let Some(v) = object.get(field.as_str()) else {
                continue;
            };
            let Some(n) = v.as_f64() else {
                return Verdict::deny(format!("object_json.{field}: must be a number"));
            };
            if let Some(min) = min.filter(|m| n < *m) {
                return Verdict::deny(format!("object_json.{field}: {n} below minimum {min}"));
            }
            if let Some(max) = max.filter(|m| n > *m) {
                return Verdict::deny(format!("object_json.{field}: {n} above maximum {max}"));
            }
        }
        Verdict::Allow
    }
}

export_policy!(JsonFields);
