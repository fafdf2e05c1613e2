//! The sandbox against real components: the Rust examples and fixtures built by
//! `scripts/setup.sh`, and the hostile fixtures in component text.

use std::time::{Duration, Instant};

use bsfg_core::{ArtifactRef, Candidate, Hook, Message, PolicyContext, Verdict};
use bsfg_policy_wasm::{HostGrant, OnFault, PolicyConfig, PolicyError, Reload, WasmPolicy};
use bsfg_testkit::{fixtures::step_completed, plugins};

const APPEND: PolicyContext<'static> = PolicyContext {
    hook: Hook::Append,
    zone: "enterprise",
    peer: "mes-client",
    link: None,
    source_zone: None,
};

fn fact(id: &str, predicate: &str, site: Option<&str>) -> Message {
    let mut m = step_completed(id, 1);
    m.fact.predicate = predicate.into();
    if let Some(s) = site {
        m.envelope.labels.insert("site".into(), s.into());
    }
    m
}

fn decide(p: &WasmPolicy, ctx: &PolicyContext<'_>, ms: &[Message]) -> Vec<Verdict> {
    p.decide_blocking(ctx, &Candidate::local(ms))
}

fn reason(v: &Verdict) -> &str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny(d) | Verdict::Filter(d) => &d.reason,
    }
}

fn config(name: &str, module: std::path::PathBuf) -> PolicyConfig {
    let mut c = PolicyConfig::new(name, module);
    c.timeout = Duration::from_millis(50);
    c.memory_bytes = 8 << 20;
    c
}

fn fault_count(p: &WasmPolicy, kind: &str) -> u64 {
    p.stats()
        .faults
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(0, |(_, n)| *n)
}

fn load_err(c: PolicyConfig) -> PolicyError {
    match WasmPolicy::load(c) {
        Ok(_) => panic!("the module was accepted"),
        Err(e) => e,
    }
}

#[test]
fn an_infinite_loop_is_stopped_at_its_deadline_and_its_batch_denied() {
    let p = WasmPolicy::load(config("loop", plugins::hostile("infinite-loop"))).unwrap();
    let ms = [fact("a", "x", None), fact("b", "x", None)];
    let t = Instant::now();
    let v = decide(&p, &APPEND, &ms);
    let took = t.elapsed();
    assert_eq!(v.len(), 2);
    for v in &v {
        assert!(
            reason(v).starts_with("policy_fault: deadline of 50ms exceeded"),
            "{v:?}"
        );
    }
    assert!(took >= Duration::from_millis(50), "stopped early: {took:?}");
    assert!(took < Duration::from_millis(1000), "not stopped: {took:?}");
    assert_eq!(fault_count(&p, "deadline"), 1);
}

#[test]
fn a_memory_bomb_stays_under_its_memory_limit_and_its_batch_is_denied() {
    let p = WasmPolicy::load(config("bomb", plugins::hostile("memory-bomb"))).unwrap();
    let v = decide(&p, &APPEND, &[fact("a", "x", None)]);
    assert_eq!(
        reason(&v[0]),
        "policy_fault: memory limit of 8388608 bytes exceeded"
    );
    assert_eq!(fault_count(&p, "memory"), 1);
    // A Rust guest allocating without end hits the same wall.
    let p = WasmPolicy::load(config("hog", plugins::built("chaos"))).unwrap();
    let v = decide(&p, &APPEND, &[fact("a", "hog", None)]);
    assert!(reason(&v[0]).starts_with("policy_fault:"), "{v:?}");
    assert_eq!(fault_count(&p, "memory"), 1, "{:?}", p.stats());
}

#[test]
fn a_trap_fails_only_the_fact_that_caused_it_and_the_next_batch_gets_a_fresh_instance() {
    let p = WasmPolicy::load(config("trap", plugins::built("chaos"))).unwrap();
    let v = decide(
        &p,
        &APPEND,
        &[fact("a", "ok", None), fact("b", "panic", None)],
    );
    assert_eq!(v[0], Verdict::Allow, "its neighbour gets its own verdict");
    assert!(reason(&v[1]).starts_with("policy_fault: trap:"), "{v:?}");
    let Verdict::Deny(d) = &v[1] else {
        unreachable!()
    };
    assert_eq!(d.policy, "trap");
    assert_eq!(d.module_sha256, p.sha256());
    let v = decide(
        &p,
        &APPEND,
        &[fact("c", "ok", None), fact("d", "deny", None)],
    );
    assert_eq!(v[0], Verdict::Allow);
    assert_eq!(reason(&v[1]), "asked to deny");
    let s = p.stats();
    // The first, one for the half after the batch's trap, one after the fact's trap.
    assert_eq!(s.instantiations, 3, "{s:?}");
    assert_eq!(fault_count(&p, "trap"), 1, "one fault: the fact's");
    assert!(!s.broken);
}

#[test]
fn a_page_of_500_with_one_fact_over_the_memory_limit_gets_499_verdicts_and_one_fault() {
    let p = WasmPolicy::load(config("hog", plugins::built("chaos"))).unwrap();
    let ms: Vec<Message> = (0..500)
        .map(|i| {
            let predicate = match i {
                317 => "hog",
                i if i % 7 == 0 => "deny",
                _ => "ok",
            };
            fact(&format!("f{i}"), predicate, None)
        })
        .collect();
    let v = decide(&p, &APPEND, &ms);
    assert_eq!(v.len(), 500);
    for (i, v) in v.iter().enumerate() {
        match i {
            317 => assert!(reason(v).starts_with("policy_fault: memory limit"), "{v:?}"),
            i if i % 7 == 0 => assert_eq!(reason(v), "asked to deny", "fact {i}"),
            _ => assert_eq!(*v, Verdict::Allow, "fact {i}"),
        }
    }
    let s = p.stats();
    assert_eq!(fault_count(&p, "memory"), 1, "{s:?}");
    assert!(!s.broken, "a fact's fault does not break the policy: {s:?}");
    assert_eq!(s.denied, 72 + 1, "{s:?}");
}

#[test]
fn the_hostile_component_text_trap_fixture_fails_closed() {
    let p = WasmPolicy::load(config("t", plugins::hostile("trap"))).unwrap();
    let v = decide(&p, &APPEND, &[fact("a", "x", None)]);
    assert!(reason(&v[0]).starts_with("policy_fault: trap:"), "{v:?}");
}

#[test]
fn a_module_importing_an_interface_the_host_does_not_know_is_refused_at_load() {
    let e = load_err(config("http", plugins::hostile("imports-unknown")));
    let PolicyError::ForbiddenImport { policy, import, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(policy, "http");
    assert_eq!(import, "wasi:http/outgoing-handler@0.2.0", "{e}");
    assert!(e.to_string().contains("does not offer"), "{e}");
}

#[test]
fn a_component_text_importing_the_wall_clock_loads_without_a_grant() {
    WasmPolicy::load(config("clock", plugins::hostile("imports-clock"))).expect("WASI 0.2 clock");
}

/// What the probe got for each thing it reached for (see plugins/std/wasi-probe).
fn probe(p: &WasmPolicy, what: &[&str]) -> Vec<String> {
    let ms: Vec<Message> = what
        .iter()
        .map(|w| fact(&format!("p-{w}"), w, None))
        .collect();
    decide(p, &APPEND, &ms)
        .iter()
        .map(|v| reason(v).to_owned())
        .collect()
}

#[test]
fn an_ordinary_std_component_gets_wasi_with_nothing_behind_it_and_each_reach_is_counted() {
    let mut c = config("probe", plugins::built_std("wasi_probe"));
    c.timeout = Duration::from_secs(2);
    let p = WasmPolicy::load(c).expect("a std Rust component loads");
    let got = probe(
        &p,
        &[
            "file", "dir", "env", "args", "tcp", "udp", "dns", "clock", "print",
        ],
    );
    let expect_prefix = [
        "file: error:",
        "dir: error:",
        "env: HOME=None, 0 variables",
        "args: 0 arguments",
        "tcp: error: Permission denied",
        "udp: error: Permission denied",
        "dns: error: Permission denied",
        "clock: Ok(0)",
        "print: printed",
    ];
    for (g, e) in got.iter().zip(expect_prefix) {
        assert!(g.starts_with(e), "{g} (expected {e}...)");
    }
    let reach = p.stats().reach;
    let count = |what: &str| {
        reach
            .iter()
            .find(|(w, _)| *w == what)
            .map_or(0, |(_, n)| *n)
    };
    assert!(count("filesystem") >= 1, "{reach:?}");
    assert!(count("environment") >= 1, "{reach:?}");
    assert!(count("arguments") >= 1, "{reach:?}");
    assert_eq!(count("network"), 3, "tcp, udp and dns: {reach:?}");
    assert!(p.stats().faults.is_empty(), "{:?}", p.stats());
}

#[test]
fn the_clock_and_randomness_are_real_only_when_granted() {
    let load = |grants: Vec<HostGrant>| {
        let mut c = config("probe", plugins::built_std("wasi_probe"));
        c.timeout = Duration::from_secs(2);
        c.grants = grants;
        WasmPolicy::load(c).unwrap()
    };
    // Without grants: the epoch, and the same "random" seed for the same instance.
    let (a, b) = (load(vec![]), load(vec![]));
    let (ga, gb) = (
        probe(&a, &["clock", "random"]),
        probe(&b, &["clock", "random"]),
    );
    assert_eq!(ga[0], "clock: Ok(0)");
    assert_eq!(ga, gb, "deterministic per instance");
    // Granted: the host's clock and randomness.
    let (a, b) = (
        load(vec![HostGrant::Clock, HostGrant::Random]),
        load(vec![HostGrant::Clock, HostGrant::Random]),
    );
    let (ga, gb) = (
        probe(&a, &["clock", "random"]),
        probe(&b, &["clock", "random"]),
    );
    let secs: u64 = ga[0]
        .trim_start_matches("clock: Ok(")
        .trim_end_matches(')')
        .parse()
        .unwrap();
    assert!(secs > 1_700_000_000, "{ga:?}");
    assert_ne!(ga[1], gb[1], "real randomness differs between instances");
}

#[test]
fn a_std_rust_policy_built_from_the_wit_alone_with_serde_json_decides() {
    let mut c = config("rules", plugins::built_std("json_rules"));
    c.timeout = Duration::from_secs(2);
    c.settings = [
        ("require".to_owned(), "operator".to_owned()),
        ("max.step".to_owned(), "10".to_owned()),
    ]
    .into();
    let p = WasmPolicy::load(c).unwrap();
    let mut ok = fact("a", "step_completed", None);
    ok.fact.object_json = r#"{"operator":"jdoe","step":3}"#.into();
    let mut missing = fact("b", "step_completed", None);
    missing.fact.object_json = r#"{"step":3}"#.into();
    let mut high = fact("c", "step_completed", None);
    high.fact.object_json = r#"{"operator":"jdoe","step":30}"#.into();
    let v = decide(&p, &APPEND, &[ok, missing, high]);
    assert_eq!(v[0], Verdict::Allow);
    assert_eq!(reason(&v[1]), "object_json.operator: required");
    assert_eq!(reason(&v[2]), "object_json.step: 30 is above 10");
}

#[test]
fn wrong_exports_are_refused_at_load_naming_the_export() {
    let e = load_err(config("w", plugins::hostile("wrong-exports")));
    assert!(matches!(e, PolicyError::WrongExports { .. }), "{e}");
    assert!(
        e.to_string().contains("`decide` does not have the type"),
        "{e}"
    );
    let e = load_err(config("w", plugins::hostile("no-decide")));
    assert!(matches!(e, PolicyError::WrongExports { .. }), "{e}");
    assert!(
        e.to_string().contains("no function `decide`") && e.to_string().contains("evaluate"),
        "{e}"
    );
}

#[test]
fn a_file_that_is_not_a_component_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("junk.wasm");
    std::fs::write(&f, b"\0asm junk").unwrap();
    let e = load_err(config("junk", f));
    assert!(matches!(e, PolicyError::Compile { .. }), "{e}");
    let e = load_err(config("missing", dir.path().join("none.wasm")));
    assert!(matches!(e, PolicyError::Read { .. }), "{e}");
}

#[test]
fn a_wrong_number_of_verdicts_denies_the_whole_batch_when_no_part_of_it_decides() {
    let p = WasmPolicy::load(config("short", plugins::hostile("no-verdicts"))).unwrap();
    let v = decide(&p, &APPEND, &[fact("a", "x", None), fact("b", "x", None)]);
    assert!(
        v.iter()
            .all(|v| reason(v) == "policy_fault: 0 verdicts for 2 facts"),
        "{v:?}"
    );
}

#[test]
fn repeated_faults_break_the_policy_until_its_backoff_passes_then_it_recovers() {
    let mut c = config("fragile", plugins::built("chaos"));
    c.broken_after = 2;
    c.backoff_min = Duration::from_millis(300);
    let p = WasmPolicy::load(c).unwrap();
    decide(&p, &APPEND, &[fact("a", "panic", None)]);
    decide(&p, &APPEND, &[fact("b", "panic", None)]);
    assert!(p.stats().broken);
    // Broken: even a fact the module would allow is denied, without calling it.
    let before = p.stats().instantiations;
    let v = decide(&p, &APPEND, &[fact("c", "ok", None)]);
    assert!(
        reason(&v[0]).starts_with("policy_fault: broken after 2 consecutive faults"),
        "{v:?}"
    );
    assert_eq!(p.stats().instantiations, before, "the module was called");
    std::thread::sleep(Duration::from_millis(350));
    let v = decide(&p, &APPEND, &[fact("d", "ok", None)]);
    assert_eq!(v, [Verdict::Allow]);
    assert!(!p.stats().broken);
    assert_eq!(fault_count(&p, "broken"), 1);
}

#[test]
fn fail_open_only_by_config_allows_and_counts_every_time() {
    let mut c = config("lenient", plugins::built("chaos"));
    c.on_fault = OnFault::Allow;
    let p = WasmPolicy::load(c).unwrap();
    let v = decide(
        &p,
        &APPEND,
        &[fact("a", "ok", None), fact("b", "panic", None)],
    );
    assert_eq!(v, [Verdict::Allow, Verdict::Allow]);
    decide(&p, &APPEND, &[fact("c", "panic", None)]);
    let s = p.stats();
    // `a` was decided by the policy; `b` and `c` faulted and were let through.
    assert_eq!(s.fail_open, 2, "{s:?}");
    // A denial by the module itself still stands.
    let v = decide(&p, &APPEND, &[fact("d", "deny", None)]);
    assert_eq!(reason(&v[0]), "asked to deny");
}

#[test]
fn fuel_stops_a_spinning_guest_before_its_deadline() {
    let mut c = config("fuel", plugins::built("chaos"));
    c.fuel = Some(5_000_000);
    c.timeout = Duration::from_secs(20);
    let p = WasmPolicy::load(c).unwrap();
    let t = Instant::now();
    let v = decide(&p, &APPEND, &[fact("a", "spin", None)]);
    assert_eq!(reason(&v[0]), "policy_fault: fuel of 5000000 exhausted");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(
        decide(&p, &APPEND, &[fact("b", "ok", None)]),
        [Verdict::Allow]
    );
}

#[test]
fn an_init_that_refuses_its_settings_refuses_the_module() {
    let mut c = config("picky", plugins::built("chaos"));
    c.settings.insert("fail_init".into(), "yes".into());
    let e = load_err(c);
    assert!(matches!(e, PolicyError::Init { .. }), "{e}");
    assert!(e.to_string().contains("asked to fail init"), "{e}");
    let e = load_err(config("labels", plugins::built("allow_labels")));
    assert!(e.to_string().contains("setting `label` is required"), "{e}");
}

#[test]
fn the_guest_receives_the_context_and_every_envelope_field() {
    let p = WasmPolicy::load(config("echo", plugins::built("chaos"))).unwrap();
    let mut m = fact("id-1", "echo", Some("PlantA"));
    m.envelope.correlation_id = Some("corr".into());
    m.envelope.causation_id = Some("cause".into());
    m.envelope.object_media_type = Some("application/json".into());
    m.envelope.object_schema = Some("step/v1".into());
    m.fact.artifacts = vec![ArtifactRef {
        bucket: "batch-files".into(),
        key: "b1042.pdf".into(),
        digest: format!("sha256:{}", "a".repeat(64)),
        size: 42,
    }];
    let ctx = PolicyContext {
        hook: Hook::Intake,
        zone: "enterprise",
        peer: "idmz-bsfg",
        link: Some("from-idmz"),
        source_zone: Some("idmz"),
    };
    let cs = [Candidate {
        message: &m,
        source_offset: Some(77),
    }];
    let v = p.decide_blocking(&ctx, &cs);
    assert_eq!(
        reason(&v[0]),
        format!(
            "hook=intake zone=enterprise peer=idmz-bsfg link=Some(\"from-idmz\") source_zone=Some(\"idmz\") | id=id-1 from=plant-a to=enterprise at=1764000000000 corr=Some(\"corr\") caus=Some(\"cause\") labels=site=PlantA media=Some(\"application/json\") schema=Some(\"step/v1\") subject=batch:PlantA/B1042 predicate=echo object={{\"step\":1,\"operator\":\"jdoe\"}} artifacts=batch-files/b1042.pdf/sha256:{}/42 source_offset=Some(77)",
            "a".repeat(64)
        )
    );
}

#[test]
fn the_example_policies_decide_as_documented() {
    let mut c = config("labels", plugins::built("allow_labels"));
    c.settings = [("label", "site"), ("values", "PlantA, PlantB")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    let p = WasmPolicy::load(c).unwrap();
    let v = decide(
        &p,
        &APPEND,
        &[
            fact("a", "x", Some("PlantA")),
            fact("b", "x", Some("PlantC")),
            fact("c", "x", None),
        ],
    );
    assert_eq!(v[0], Verdict::Allow);
    assert_eq!(
        reason(&v[1]),
        "label `site` is `PlantC`, allowed: PlantA, PlantB"
    );
    assert_eq!(reason(&v[2]), "label `site` is missing");

    let mut c = config("preds", plugins::built("deny_predicates"));
    c.settings = [
        ("predicates", "recipe_changed"),
        ("subject_kinds", "operator"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into();
    let p = WasmPolicy::load(c).unwrap();
    let mut op = fact("c", "x", None);
    op.fact.subject = "operator:jdoe".into();
    let v = decide(
        &p,
        &APPEND,
        &[fact("a", "recipe_changed", None), fact("b", "x", None), op],
    );
    assert_eq!(reason(&v[0]), "predicate `recipe_changed` is denied");
    assert_eq!(v[1], Verdict::Allow);
    assert_eq!(reason(&v[2]), "subject kind `operator` is denied");

    let mut c = config("json", plugins::built("json_fields"));
    c.settings = [("require", "operator"), ("max.step", "10")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    let p = WasmPolicy::load(c).unwrap();
    let mut big = fact("b", "x", None);
    big.fact.object_json = r#"{"step":12,"operator":"jdoe"}"#.into();
    let mut anon = fact("c", "x", None);
    anon.fact.object_json = r#"{"step":1}"#.into();
    let v = decide(&p, &APPEND, &[fact("a", "x", None), big, anon]);
    assert_eq!(v[0], Verdict::Allow);
    assert_eq!(reason(&v[1]), "object_json.step: 12 above maximum 10");
    assert_eq!(reason(&v[2]), "object_json.operator: required");
}

#[test]
fn reload_swaps_a_changed_module_refuses_a_broken_one_and_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("policy.wasm");
    std::fs::copy(plugins::built("chaos"), &module).unwrap();
    let mut c = config("swap", module.clone());
    c.settings = [("predicates", "step_completed")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    let p = WasmPolicy::load(c).unwrap();
    let ms = [fact("a", "step_completed", None)];
    assert_eq!(decide(&p, &APPEND, &ms), [Verdict::Allow]);
    assert_eq!(p.reload().unwrap(), Reload::Unchanged);

    std::fs::write(&module, b"not a component").unwrap();
    let e = p.reload().unwrap_err();
    assert!(matches!(e, PolicyError::Compile { .. }), "{e}");
    assert_eq!(
        decide(&p, &APPEND, &ms),
        [Verdict::Allow],
        "old module kept"
    );

    let old = p.sha256();
    std::fs::copy(plugins::built("deny_predicates"), &module).unwrap();
    let Reload::Applied { from, to } = p.reload().unwrap() else {
        panic!("not applied")
    };
    assert_eq!(from, old);
    assert_eq!(to, p.sha256());
    assert_eq!(
        reason(&decide(&p, &APPEND, &ms)[0]),
        "predicate `step_completed` is denied"
    );
    let s = p.stats();
    assert_eq!(
        (s.reloads_applied, s.reloads_rejected, s.reloads_unchanged),
        (1, 1, 1)
    );
}

#[test]
fn batches_larger_than_the_guest_input_arena_and_many_batches_in_a_row_decide_correctly() {
    let mut c = config("labels", plugins::built("allow_labels"));
    c.settings = [("label", "site"), ("values", "PlantA")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    c.memory_bytes = 32 << 20;
    c.timeout = Duration::from_secs(5);
    let p = WasmPolicy::load(c).unwrap();
    // 1500 facts of ~2 KiB: several MiB of inputs, past the SDK's first arena.
    let big: Vec<Message> = (0..1500)
        .map(|i| {
            let mut m = fact(
                &format!("big-{i}"),
                "x",
                Some(if i % 3 == 0 { "PlantB" } else { "PlantA" }),
            );
            m.fact.object_json = format!(r#"{{"pad":"{}"}}"#, "y".repeat(2000));
            m
        })
        .collect();
    for round in 0..3 {
        let v = decide(&p, &APPEND, &big);
        let denied = v.iter().filter(|v| **v != Verdict::Allow).count();
        assert_eq!((v.len(), denied), (1500, 500), "round {round}");
        assert_eq!(reason(&v[0]), "label `site` is `PlantB`, allowed: PlantA");
    }
    // Many small batches: inputs do not accumulate in the guest's memory.
    let small: Vec<Message> = (0..100)
        .map(|i| fact(&format!("s-{i}"), "x", Some("PlantA")))
        .collect();
    for _ in 0..2000 {
        assert!(
            decide(&p, &APPEND, &small)
                .iter()
                .all(|v| *v == Verdict::Allow)
        );
    }
    assert!(p.stats().faults.is_empty(), "{:?}", p.stats());
}

#[test]
fn a_module_importing_the_host_interface_with_other_types_is_refused_at_load() {
    let e = load_err(config("old", plugins::hostile("wrong-host-types")));
    assert!(matches!(e, PolicyError::ImportTypes { .. }), "{e}");
    assert!(e.to_string().contains("bsfg:policy/host@0.1.0"), "{e}");
}

#[test]
fn a_component_of_the_current_contract_filters_and_one_of_0_1_0_still_decides() {
    let mut c = config("wanted", plugins::built("deny_predicates"));
    c.settings = [("filter_predicates".to_owned(), "heartbeat".to_owned())].into();
    let p = WasmPolicy::load(c).unwrap();
    let v = decide(
        &p,
        &APPEND,
        &[
            fact("a", "heartbeat", None),
            fact("b", "step_completed", None),
        ],
    );
    assert!(
        matches!(&v[0], Verdict::Filter(d) if d.reason == "predicate `heartbeat` is not wanted here"),
        "{v:?}"
    );
    assert_eq!(v[1], Verdict::Allow);
    let s = p.stats();
    assert_eq!(
        s.filtered,
        [("predicate `heartbeat` is not wanted here".to_owned(), 1)]
    );
    // The component-text fixtures are built against bsfg:policy@0.1.0 (no filter):
    // they load and are called as before.
    let old = WasmPolicy::load(config("old", plugins::hostile("trap"))).unwrap();
    let v = decide(&old, &APPEND, &[fact("a", "x", None)]);
    assert!(reason(&v[0]).starts_with("policy_fault: trap:"), "{v:?}");
}
