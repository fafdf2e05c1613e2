//! `bsfg status --check`: a zone judged against the runbook's thresholds, with the
//! exit codes of Nagios-style monitoring (0 ok, 1 warning, 2 critical).
//!
//! The `Threshold` constants are the one table of limits: `docs/operations.md` explains each, and
//! the alerting rules in `examples/prometheus/bsfg-rules.yml` use the same numbers (a
//! test reads the rules file and compares; alerts that need a rate over time, such
//! as backpressure, are only in the rules). The check reads what Prometheus would
//! scrape (`/metrics`) plus `/status`, `/readyz` and the quarantine of the same admin
//! endpoint, so a zone judged here and by the alerts is judged alike.

use std::fmt;

use bsfg_core::link::{LinkState, LinkStatus};

/// A finding's severity; its number is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Nothing to do.
    Ok = 0,
    /// Needs a look soon; data still flows.
    Warning = 1,
    /// Needs action now: data stopped or will be refused.
    Critical = 2,
}

impl Level {
    /// `OK`, `WARNING`, `CRITICAL`, as monitoring systems print them.
    pub fn word(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
        }
    }
}

/// One runbook threshold: the alert it belongs to (a section of
/// `docs/operations.md` and an alert of the rules file) and its limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// The alert's name in the rules file and the runbook (`BsfgReplicationLag`).
    pub alert: &'static str,
    /// Past this: warning (`None`: the alert has no warning level).
    pub warning: Option<f64>,
    /// Past this: critical (`None`: the alert has no critical level).
    pub critical: Option<f64>,
}

/// A link gapped (facts lost at the source before this zone fetched them): critical.
pub const LINK_GAPPED: Threshold = Threshold {
    alert: "BsfgLinkGapped",
    warning: None,
    critical: Some(0.0),
};
/// Seconds since a running link's last successful step (an idle link completes a
/// step every long-poll `wait`): no confirmation for over a minute warns.
pub const LINK_STALLED: Threshold = Threshold {
    alert: "BsfgLinkStalled",
    warning: Some(60.0),
    critical: Some(900.0),
};
/// Replication lag in seconds (healthy below 0.1 s; the contract alerts past 1 s).
pub const REPLICATION_LAG: Threshold = Threshold {
    alert: "BsfgReplicationLag",
    warning: Some(1.0),
    critical: Some(300.0),
};
/// Facts the source holds for a link that it has not confirmed.
pub const REPLICATION_BACKLOG: Threshold = Threshold {
    alert: "BsfgReplicationBacklog",
    warning: Some(10_000.0),
    critical: Some(1_000_000.0),
};
/// Facts held in the zone's quarantine (each needs a release or a drop).
pub const QUARANTINE: Threshold = Threshold {
    alert: "BsfgQuarantineGrowing",
    warning: Some(0.0),
    critical: None,
};
/// Days until a certificate in use (the gateway's own or a trust anchor) expires.
pub const CERTIFICATE_EXPIRY: Threshold = Threshold {
    alert: "BsfgCertificateExpiring",
    warning: Some(14.0),
    critical: Some(3.0),
};
/// A policy broken (failing its batches closed without being called).
pub const POLICY_BROKEN: Threshold = Threshold {
    alert: "BsfgPolicyBroken",
    warning: None,
    critical: Some(0.0),
};
/// The gateway does not answer at all (Prometheus: `up == 0`; the check: its admin
/// endpoint does not answer).
pub const GATEWAY_DOWN: Threshold = Threshold {
    alert: "BsfgGatewayDown",
    warning: None,
    critical: Some(0.0),
};
/// The gateway is not ready (its store does not answer, or it is stopping):
/// critical when `bsfg_ready` is 0.
pub const NOT_READY: Threshold = Threshold {
    alert: "BsfgGatewayNotReady",
    warning: None,
    critical: Some(0.0),
};

/// The limits a check applies where a site may set its own (`bsfg status --check
/// --lag-warning 5 ...`, as it would edit the alerting rules): the runbook's by
/// default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// [`LINK_STALLED`], seconds.
    pub stalled: Threshold,
    /// [`REPLICATION_LAG`], seconds.
    pub lag: Threshold,
    /// [`REPLICATION_BACKLOG`], facts.
    pub backlog: Threshold,
    /// [`CERTIFICATE_EXPIRY`], days left.
    pub certificate_days: Threshold,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            stalled: LINK_STALLED,
            lag: REPLICATION_LAG,
            backlog: REPLICATION_BACKLOG,
            certificate_days: CERTIFICATE_EXPIRY,
        }
    }
}

/// One thing the check found.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Its severity.
    pub level: Level,
    /// The alert (and runbook section) it belongs to.
    pub alert: &'static str,
    /// What was seen, with the numbers.
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.level.word(), self.alert, self.text)
    }
}

/// What the check reads from one admin endpoint.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The zone's name.
    pub zone: String,
    /// `/readyz` answered 200.
    pub ready: bool,
    /// `/status` links.
    pub links: Vec<LinkStatus>,
    /// Facts held in quarantine (counted up to the listing's limit).
    pub quarantined: usize,
    /// The `/metrics` text.
    pub metrics: String,
    /// Now, Unix seconds.
    pub now_unix_s: f64,
    /// What to judge against.
    pub limits: Limits,
}

/// Samples of one metric in Prometheus text: (the labels part, value).
fn samples<'a>(metrics: &'a str, name: &str) -> impl Iterator<Item = (&'a str, f64)> {
    metrics.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
            let (labels, v) = r.split_once('}')?;
            (labels, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            return None;
        };
        let value = value.split_whitespace().next()?.parse().ok()?;
        Some((labels, value))
    })
}

fn label<'a>(labels: &'a str, key: &str) -> &'a str {
    labels
        .split("\",")
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\""))
        .map_or("", |v| v.trim_end_matches('"'))
}

/// The level of `value` against `t`, where higher is worse.
fn above(t: &Threshold, value: f64) -> Level {
    if t.critical.is_some_and(|c| value > c) {
        Level::Critical
    } else if t.warning.is_some_and(|w| value > w) {
        Level::Warning
    } else {
        Level::Ok
    }
}

/// The level of `value` against `t`, where lower is worse (days left).
fn below(t: &Threshold, value: f64) -> Level {
    if t.critical.is_some_and(|c| value < c) {
        Level::Critical
    } else if t.warning.is_some_and(|w| value < w) {
        Level::Warning
    } else {
        Level::Ok
    }
}

/// Judges a zone: every finding at warning or critical, worst first.
pub fn judge(o: &Observed) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |level: Level, t: &Threshold, text: String| {
        if level > Level::Ok {
            out.push(Finding {
                level,
                alert: t.alert,
                text,
            });
        }
    };
    if !o.ready {
        push(
            Level::Critical,
            &NOT_READY,
            "not ready (/readyz): its store does not answer, or it is stopping".into(),
        );
    }
    for l in &o.links {
        let name = format!("link {} <- {}/{}", l.name, l.source_zone, l.consumer);
        match &l.state {
            LinkState::Gapped {
                missing_from,
                missing_to,
            } => push(
                Level::Critical,
                &LINK_GAPPED,
                format!(
                    "{name} gapped at offsets {missing_from}..={missing_to} (bsfg link accept-gap --link {} --from {missing_from} --to {missing_to}, after confirming the facts are gone)",
                    l.name
                ),
            ),
            LinkState::Standby | LinkState::Stopped => continue,
            _ => {}
        }
        let idle_s = l
            .last_success_unix_ms
            .map(|t| (o.now_unix_s - t as f64 / 1000.0).max(0.0));
        let stalled = match (idle_s, &l.state) {
            (Some(s), _) => above(&o.limits.stalled, s),
            // Never succeeded since start: judged once it has been failing a while.
            (None, LinkState::BackingOff { .. }) => Level::Warning,
            (None, _) => Level::Ok,
        };
        let why = match &l.state {
            LinkState::BackingOff { op, error, .. } => format!("; {op} failing: {error}"),
            _ => String::new(),
        };
        push(
            stalled,
            &LINK_STALLED,
            match idle_s {
                Some(s) => format!("{name}: no successful step for {s:.0} s{why}"),
                None => format!("{name}: no successful step since the gateway started{why}"),
            },
        );
        push(
            above(&o.limits.lag, l.lag_seconds),
            &REPLICATION_LAG,
            format!("{name}: lag {:.3} s", l.lag_seconds),
        );
        push(
            above(&o.limits.backlog, l.lag_facts as f64),
            &REPLICATION_BACKLOG,
            format!(
                "{name}: {} fact(s) not yet confirmed at the source",
                l.lag_facts
            ),
        );
    }
    push(
        above(&QUARANTINE, o.quarantined as f64),
        &QUARANTINE,
        format!(
            "{} fact(s) held in quarantine (bsfg quarantine list)",
            o.quarantined
        ),
    );
    for (labels, v) in samples(&o.metrics, "bsfg_policy_broken") {
        push(
            above(&POLICY_BROKEN, v),
            &POLICY_BROKEN,
            format!(
                "policy {} is broken (its hook fails closed)",
                label(labels, "policy")
            ),
        );
    }
    for (labels, not_after) in samples(&o.metrics, "bsfg_certificate_expiry_timestamp_seconds") {
        let days = (not_after - o.now_unix_s) / 86_400.0;
        push(
            below(&o.limits.certificate_days, days),
            &CERTIFICATE_EXPIRY,
            format!(
                "{} certificate {} of {} expires in {days:.1} day(s)",
                label(labels, "role"),
                label(labels, "name"),
                label(labels, "endpoint")
            ),
        );
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.level));
    out
}

/// The worst level of `findings` (ok when there are none).
pub fn worst(findings: &[Finding]) -> Level {
    findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok)
}

/// The check's report: one summary line (`BSFG CRITICAL - zone z: ...`), then
/// each finding on a line of its own.
pub fn report(o: &Observed, findings: &[Finding]) -> String {
    let level = worst(findings);
    let mut s = match findings.first() {
        None => format!(
            "BSFG OK - zone {}: ready, {} link(s) within limits\n",
            o.zone,
            o.links.len()
        ),
        Some(f) => format!(
            "BSFG {} - zone {}: {} ({} finding(s))\n",
            level.word(),
            o.zone,
            f.text,
            findings.len()
        ),
    };
    for f in findings {
        s.push_str(&format!("{f}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use bsfg_core::link::Operation;

    const NOW: f64 = 1_764_000_000.0;

    /// Every threshold the check applies, in the runbook's order.
    const THRESHOLDS: [Threshold; 9] = [
        GATEWAY_DOWN,
        NOT_READY,
        LINK_GAPPED,
        LINK_STALLED,
        REPLICATION_LAG,
        REPLICATION_BACKLOG,
        QUARANTINE,
        POLICY_BROKEN,
        CERTIFICATE_EXPIRY,
    ];

    fn link(state: LinkState) -> LinkStatus {
        let mut l: LinkStatus = serde_json::from_value(serde_json::json!({
            "name": "from-plant", "consumer": "to-ent", "source_zone": "plant",
            "state": "running", "frontier": 10, "source_last_offset": 10,
            "lag_facts": 0, "lag_seconds": 0.0,
            "last_success_unix_ms": (NOW * 1000.0) as i64 - 2000,
            "fetch_requests": 5, "fetch_failures": 0, "append_requests": 10,
            "append_failures": 0, "confirm_requests": 5, "confirm_failures": 0,
            "facts_stored": 10, "facts_duplicate": 0, "gaps_accepted": 0,
        }))
        .expect("a link status");
        l.state = state;
        l
    }

    fn zone(links: Vec<LinkStatus>) -> Observed {
        Observed {
            zone: "enterprise".into(),
            ready: true,
            links,
            quarantined: 0,
            metrics: format!(
                "bsfg_certificate_expiry_timestamp_seconds{{zone=\"enterprise\",endpoint=\"tls\",role=\"cert\",name=\"ent-bsfg\"}} {}\nbsfg_policy_broken{{zone=\"enterprise\",policy=\"deny\"}} 0\n",
                NOW + 300.0 * 86_400.0
            ),
            now_unix_s: NOW,
            limits: Limits::default(),
        }
    }

    fn levels(o: &Observed) -> Vec<(Level, &'static str)> {
        judge(o).iter().map(|f| (f.level, f.alert)).collect()
    }

    #[test]
    fn a_healthy_zone_is_ok_with_exit_code_zero() {
        let o = zone(vec![link(LinkState::Running)]);
        assert_eq!(judge(&o), vec![]);
        assert_eq!(worst(&judge(&o)) as i32, 0);
        assert!(report(&o, &judge(&o)).starts_with("BSFG OK - zone enterprise"));
    }

    #[test]
    fn a_gapped_link_is_critical_and_says_how_to_accept_it() {
        let o = zone(vec![link(LinkState::Gapped {
            missing_from: 4,
            missing_to: 9,
        })]);
        let f = judge(&o);
        assert_eq!(worst(&f) as i32, 2);
        assert_eq!(f[0].alert, "BsfgLinkGapped");
        assert!(f[0].text.contains("--from 4 --to 9"), "{}", f[0].text);
        assert!(report(&o, &f).starts_with("BSFG CRITICAL - zone enterprise: link from-plant"));
    }

    #[test]
    fn each_threshold_moves_the_level_at_its_limit() {
        let mut l = link(LinkState::Running);
        l.lag_seconds = 1.5;
        assert_eq!(
            levels(&zone(vec![l.clone()])),
            [(Level::Warning, "BsfgReplicationLag")]
        );
        l.lag_seconds = 301.0;
        l.lag_facts = 10_001;
        assert_eq!(
            levels(&zone(vec![l.clone()])),
            [
                (Level::Critical, "BsfgReplicationLag"),
                (Level::Warning, "BsfgReplicationBacklog")
            ]
        );
        let mut l = link(LinkState::BackingOff {
            attempt: 3,
            retry_in_ms: 1000,
            op: Operation::Fetch,
            error: "unreachable".into(),
        });
        l.last_success_unix_ms = Some(((NOW - 61.0) * 1000.0) as i64);
        assert_eq!(
            levels(&zone(vec![l.clone()])),
            [(Level::Warning, "BsfgLinkStalled")]
        );
        l.last_success_unix_ms = Some(((NOW - 901.0) * 1000.0) as i64);
        assert_eq!(worst(&judge(&zone(vec![l]))), Level::Critical);
        // A standby link is another gateway's to judge.
        let mut l = link(LinkState::Standby);
        l.last_success_unix_ms = None;
        l.lag_facts = 5_000_000;
        assert_eq!(levels(&zone(vec![l])), []);

        let mut o = zone(vec![]);
        o.quarantined = 1;
        assert_eq!(levels(&o), [(Level::Warning, "BsfgQuarantineGrowing")]);
        let mut o = zone(vec![]);
        o.ready = false;
        assert_eq!(levels(&o), [(Level::Critical, "BsfgGatewayNotReady")]);
        let mut o = zone(vec![]);
        o.metrics = o
            .metrics
            .replace("policy=\"deny\"} 0", "policy=\"deny\"} 1");
        let f = judge(&o);
        assert_eq!(
            (f[0].level, f[0].alert),
            (Level::Critical, "BsfgPolicyBroken")
        );
        assert!(f[0].text.contains("policy deny"), "{}", f[0].text);
        for (days, want) in [
            (13.0, Level::Warning),
            (2.0, Level::Critical),
            (15.0, Level::Ok),
        ] {
            let mut o = zone(vec![]);
            o.metrics = format!(
                "bsfg_certificate_expiry_timestamp_seconds{{zone=\"e\",endpoint=\"grpcs://x\",role=\"ca\",name=\"plant\"}} {}\n",
                NOW + days * 86_400.0
            );
            assert_eq!(worst(&judge(&o)), want, "{days} days");
        }
    }

    #[test]
    fn a_site_may_set_its_own_limits() {
        let mut l = link(LinkState::Running);
        l.lag_seconds = 3.0;
        let mut o = zone(vec![l]);
        assert_eq!(levels(&o), [(Level::Warning, "BsfgReplicationLag")]);
        o.limits.lag.warning = Some(5.0);
        assert_eq!(levels(&o), []);
        o.limits.lag.critical = Some(2.0);
        assert_eq!(levels(&o), [(Level::Critical, "BsfgReplicationLag")]);
    }

    /// The alerting rules use the same numbers as the check: each alert of
    /// `THRESHOLDS` is in the rules file, at each of its levels, with its limit
    /// in the expression.
    #[test]
    fn the_alerting_rules_use_the_checks_thresholds() {
        let rules = include_str!("../../../examples/prometheus/bsfg-rules.yml");
        let docs = include_str!("../../../docs/operations.md");
        for t in THRESHOLDS {
            for (level, limit) in [("warning", t.warning), ("critical", t.critical)] {
                let Some(limit) = limit else { continue };
                let rule = rules
                    .split("- alert: ")
                    .skip(1)
                    .find(|r| {
                        r.starts_with(t.alert)
                            && r[t.alert.len()..].starts_with(|c: char| c.is_whitespace())
                            && r.contains(&format!("severity: {level}"))
                    })
                    .unwrap_or_else(|| panic!("no {level} rule {} in bsfg-rules.yml", t.alert));
                let expr = rule
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("expr: "))
                    .unwrap_or_else(|| panic!("{} has no expr", t.alert));
                let limit = format!("{limit}");
                assert!(
                    expr.split(|c: char| !(c.is_ascii_digit() || c == '.'))
                        .any(|tok| tok == limit),
                    "{} {level}: limit {limit} not in `{expr}`",
                    t.alert
                );
            }
        }
        for alert in rules.split("- alert: ").skip(1) {
            let name = alert.split_whitespace().next().unwrap_or_default();
            assert!(
                docs.contains(&format!("## {name}")),
                "docs/operations.md has no section for {name}"
            );
        }
    }
}
