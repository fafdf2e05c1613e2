//! A policy the way a security team writes one: ordinary std Rust, the bindings
//! generated from `plugins/wit/policy.wit` by wit-bindgen, JSON parsed by serde_json.
//!
//! Settings (all optional, at least one):
//! - `require = "operator,step"`: fields object_json must have (not null);
//! - `max.<field> = "150"`, `min.<field> = "-40"`: numeric bounds;
//! - `predicates = "step_completed,reading"`: only these predicates are checked.
use std::collections::HashMap;
use std::sync::OnceLock;

wit_bindgen::generate!({ path: "../../wit", world: "policy" });

use bsfg::policy::host::{Level, log};

#[derive(Default)]
struct Rules {
    require: Vec<String>,
    bounds: HashMap<String, (Option<f64>, Option<f64>)>,
    predicates: Vec<String>,
}

static RULES: OnceLock<Rules> = OnceLock::new();

fn list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

impl Rules {
    fn from(settings: Vec<(String, String)>) -> Result<Rules, String> {
        let mut r = Rules::default();
        for (k, v) in settings {
            let bound = |v: &str| {
                v.trim().parse::<f64>().map_err(|_| format!("setting `{k}` must be a number, got `{v}`"))
            };
            if let Some(field) = k.strip_prefix("max.") {
                r.bounds.entry(field.to_owned()).or_default().1 = Some(bound(&v)?);
            } else if let Some(field) = k.strip_prefix("min.") {
                r.bounds.entry(field.to_owned()).or_default().0 = Some(bound(&v)?);
            } else if k == "require" {
                r.require = list(&v);
            } else if k == "predicates" {
                r.predicates = list(&v);
            } else {
                return Err(format!("unknown setting `{k}`"));
            }
        }
        if r.require.is_empty() && r.bounds.is_empty() {
            return Err("set `require` or a `min.<field>` / `max.<field>` bound".into());
        }
        Ok(r)
    }

    fn judge(&self, fact: &Fact) -> Verdict {
        if !self.predicates.is_empty() && !self.predicates.contains(&fact.predicate) {
            return Verdict::Allow;
        }
        let object: serde_json::Value = match serde_json::from_str(&fact.object_json) {
            Ok(v) => v,
            Err(e) => return Verdict::Deny(format!("object_json is not JSON: {e}")),
        };
        for field in &self.require {
            if object.get(field).is_none_or(serde_json::Value::is_null) {
                return Verdict::Deny(format!("object_json.{field}: required"));
            }
        }
        for (field, (min, max)) in &self.bounds {
            let Some(v) = object.get(field) else { continue };
            let Some(n) = v.as_f64() else {
                return Verdict::Deny(format!("object_json.{field}: must be a number"));
            };
            if let Some(m) = min.filter(|m| n < *m) {
                return Verdict::Deny(format!("object_json.{field}: {n} is below {m}"));
            }
            if let Some(m) = max.filter(|m| n > *m) {
                return Verdict::Deny(format!("object_json.{field}: {n} is above {m}"));
            }
        }
        Verdict::Allow
    }
}

struct JsonRules;

impl Guest for JsonRules {
    fn init(settings: Vec<(String, String)>) -> Result<(), String> {
        let rules = Rules::from(settings)?;
        log(Level::Info, &format!("json-rules: {} required, {} bounded", rules.require.len(), rules.bounds.len()));
        let _ = RULES.set(rules);
        Ok(())
    }

    fn decide(_ctx: Context, facts: Vec<Fact>) -> Vec<Verdict> {
        let Some(rules) = RULES.get() else {
            return facts.iter().map(|_| Verdict::Deny("not initialised".into())).collect();
        };
        facts.iter().map(|f| rules.judge(f)).collect()
    }
}

export!(JsonRules);
