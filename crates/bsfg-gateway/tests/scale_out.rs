//! Several gateways per zone: two gateways of the receiving zone carry the same link,
//! exactly one pulls at a time (a lease in the zone's JetStream), the other takes over
//! within the lease time when the holder is SIGKILLed mid-stream, and every fact is
//! stored once; a confirm that reaches another gateway of the source zone than the
//! one that served the page is refused with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bsfg_core::{BoundaryApi, BoundaryError, FetchRequest};
use bsfg_testkit::{NatsServer, eventually_blocking};
use bsfg_transport_grpc::{ClientConfig, GrpcClient};
use common::{Gateway, ZoneFile, free_ports};

const N: u32 = 2000;

struct Receiver {
    gw: Gateway,
    admin: u16,
    _dir: tempfile::TempDir,
}

fn plant_gateway(nats: &NatsServer) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let [port] = free_ports();
    let cfg = ZoneFile::new("plant", nats)
        .consumer("to-idmz", "operational")
        .plaintext(port)
        .write(&dir.path().join("plant.toml"));
    (Gateway::spawn(cfg, format!("grpc://127.0.0.1:{port}")), dir)
}

fn idmz_gateway(nats: &NatsServer, source: &str) -> Receiver {
    let dir = tempfile::tempdir().unwrap();
    let [port, admin] = free_ports();
    let cfg = ZoneFile::new("idmz", nats)
        .sink_keys("lease_ttl = \"3s\"")
        .consumer("check", "operational")
        .plaintext(port)
        .admin(admin)
        .link(
            "from-plant",
            source,
            "to-idmz",
            "source_zone = \"plant\"\ninsecure = true\nwait = \"500ms\"\nrequest_timeout = \"3s\"",
        )
        .write(&dir.path().join("idmz.toml"));
    Receiver {
        gw: Gateway::spawn(cfg, format!("grpc://127.0.0.1:{port}")),
        admin,
        _dir: dir,
    }
}

/// (state, holder, facts stored, fetch requests) of the gateway's link.
fn link(r: &Receiver) -> (String, String, u64, u64) {
    let s = common::admin_status(r.admin);
    let l = &s["links"][0];
    (
        l["state"].as_str().unwrap_or_default().to_owned(),
        l["holder"].as_str().unwrap_or_default().to_owned(),
        l["facts_stored"].as_u64().unwrap_or(0),
        l["fetch_requests"].as_u64().unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_of_a_zone_run_a_link_one_at_a_time_and_the_other_takes_over_a_killed_holder()
{
    let plant_nats = common::nats_for("plant");
    let (plant, _pd) = plant_gateway(&plant_nats);
    let idmz_nats = common::nats_for("idmz");
    let mut gws = [
        idmz_gateway(&idmz_nats, &plant.url),
        idmz_gateway(&idmz_nats, &plant.url),
    ];

    let producer = {
        let url = plant.url.clone();
        tokio::spawn(async move {
            let api = GrpcClient::connect_lazy(&url, ClientConfig::default()).unwrap();
            for i in 0..N {
                api.append_fact(common::plant_fact("S", i)).await.unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            }
        })
    };

    // Exactly one runs the link; the other stands by and names the holder.
    let (h, s) = eventually_blocking("one holder", Duration::from_secs(20), || {
        let (la, lb) = (link(&gws[0]), link(&gws[1]));
        match (la.0.as_str(), lb.0.as_str()) {
            ("running", "standby") if la.2 > 0 => Ok((0, 1)),
            ("standby", "running") if lb.2 > 0 => Ok((1, 0)),
            _ => Err(format!("{la:?} {lb:?}")),
        }
    });
    let (_, held_by, _, _) = link(&gws[h]);
    let (_, seen_by, _, standby_fetches) = link(&gws[s]);
    assert!(!held_by.is_empty());
    assert_eq!(seen_by, held_by, "the standby names the holder");
    assert_eq!(standby_fetches, 0, "the standby never pulled");
    let (_, metrics) = bsfg_testkit::http_get(gws[s].admin, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("holder=\"{held_by}\"")),
        "{metrics}"
    );

    // SIGKILL the holder mid-stream: the other takes over within the lease time.
    let before = link(&gws[s]).2;
    gws[h].gw.child.kill().unwrap();
    let killed = Instant::now();
    eventually_blocking("takeover", Duration::from_secs(20), || {
        let l = link(&gws[s]);
        (l.0 == "running" && l.2 > before)
            .then_some(())
            .ok_or(format!("{l:?}"))
    });
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(3 * 2 + 3),
        "took over after {took:?} (lease 3 s)"
    );
    producer.await.unwrap();

    // Every fact stored once in the receiving zone.
    let reader = GrpcClient::connect_lazy(&gws[s].gw.url, ClientConfig::default()).unwrap();
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids.len() < N as usize && Instant::now() < deadline {
        let page = reader
            .fetch_facts(FetchRequest {
                consumer: "check".into(),
                limit: 1000,
                wait: Duration::from_millis(1000),
            })
            .await
            .unwrap();
        if let Some(last) = page.facts.last().map(|f| f.offset) {
            ids.extend(
                page.facts
                    .iter()
                    .map(|f| f.message.envelope.message_id.clone()),
            );
            reader.confirm_receipt("check", last).await.unwrap();
        }
    }
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (N as usize, N as usize));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_reaching_another_gateway_of_the_source_zone_is_refused_with_a_reason() {
    let nats = common::nats_for("plant");
    let (one, _d1) = plant_gateway(&nats);
    let (two, _d2) = plant_gateway(&nats);
    let api1 = GrpcClient::connect_lazy(&one.url, ClientConfig::default()).unwrap();
    let api2 = GrpcClient::connect_lazy(&two.url, ClientConfig::default()).unwrap();
    for i in 0..5 {
        api1.append_fact(common::plant_fact("C", i)).await.unwrap();
    }
    let page = api1
        .fetch_facts(FetchRequest {
            consumer: "to-idmz".into(),
            limit: 10,
            wait: Duration::from_millis(500),
        })
        .await
        .unwrap();
    let last = page.facts.last().unwrap().offset;
    match api2.confirm_receipt("to-idmz", last).await {
        Err(BoundaryError::FailedPrecondition(why)) => {
            assert!(
                why.contains("not delivered to this caller by this gateway"),
                "{why}"
            )
        }
        other => panic!("a confirm to the other gateway must be refused: {other:?}"),
    }
    // The gateway that served the page confirms it.
    let f = api1.confirm_receipt("to-idmz", last).await.unwrap();
    assert!(f.offset >= last);
}
