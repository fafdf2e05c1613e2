//! `bsfg bench soak`: what an operator runs before go-live. Three zones, each a real
//! nats-server and a real `bsfg run` (this binary): plant -> idmz over QUIC through a
//! seeded UDP relay with loss, idmz -> enterprise over gRPC. A producer appends N
//! facts into the plant while a seeded schedule SIGKILLs gateways and nats-servers
//! (and restarts them) and blackholes the lossy hop. At the end every zone's facts are
//! read back from its stream and compared with what was appended: lost and duplicated
//! ids are counted, with the count of each disruption.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bsfg_core::{BoundaryApi, FetchRequest};
use bsfg_testkit::pki::Pki;
use bsfg_testkit::udp_relay::{Profile, UdpRelay};
use bsfg_testkit::{NatsOptions, NatsServer, free_port};
use bsfg_transport_grpc::{ClientConfig, GrpcClient};
use rand::{Rng, SeedableRng};

/// Options of `bsfg bench soak`.
#[derive(Debug, clap::Args)]
pub struct SoakBench {
    /// Facts appended into the plant zone.
    #[arg(long, default_value_t = 1_000_000)]
    facts: usize,
    /// Seed of the disruption schedule and of the lossy hop.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Mean time between disruptions.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Loss on the plant -> idmz hop (QUIC), in percent, both ways.
    #[arg(long, default_value_t = 10.0)]
    loss_pct: f64,
    /// Size of each fact's canonical object_json.
    #[arg(long, default_value_t = 256)]
    object_bytes: usize,
    /// Give up (and report) after this long.
    #[arg(long, default_value = "3h", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// One zone: its nats-server and its gateway process.
struct Zone {
    name: &'static str,
    nats: NatsServer,
    config: PathBuf,
    log: PathBuf,
    gateway: Option<Child>,
    /// Its plaintext gRPC listener (local producers and the soak's reader).
    url: String,
}

impl Zone {
    fn start_gateway(&mut self) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the {} gateway", self.name))?;
        let out = child.stdout.take().context("gateway stdout")?;
        let ready = std::io::BufReader::new(out).lines().next();
        if !ready.is_some_and(|l| l.is_ok_and(|l| l.contains("ready"))) {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "the {} gateway did not start (its store may still be recovering):\n{}",
                self.name,
                tail(&self.log)
            );
        }
        self.gateway = Some(child);
        Ok(())
    }

    /// SIGKILL, then start again (retried while its nats-server recovers).
    fn kill_gateway(&mut self) {
        if let Some(mut c) = self.gateway.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart_gateway(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self.start_gateway() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(zone = self.name, error = %e, "gateway not up yet");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Zone {
    fn drop(&mut self) {
        self.kill_gateway();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn zone_config(name: &str, nats: &NatsServer, port: u16, extra: &str) -> String {
    format!(
        r#"[zone]
name = "{name}"

[limits]
max_fetch_limit = 1000

[sink]
type = "jetstream"
url = "{url}"
domain = "{name}"
lease_ttl = "3s"

[[consumers]]
name = "soak-check"
class = "operational"
ack_wait = "60s"

[[listeners]]
url = "grpc://127.0.0.1:{port}"
insecure = true
{extra}"#,
        url = nats.url(),
    )
}

/// Every message_id a zone's stream holds, read through its gateway (a consumer of
/// its own, so a fact stored twice is read twice).
async fn read_ids(url: &str) -> anyhow::Result<Vec<String>> {
    let api = GrpcClient::connect_lazy(url, ClientConfig::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ids = Vec::new();
    let mut empty = 0;
    while empty < 3 {
        let page = match api
            .fetch_facts(FetchRequest {
                consumer: "soak-check".into(),
                limit: 1000,
                wait: Duration::from_millis(500),
            })
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%url, error = %e, "reading back; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Some(last) = page.facts.last().map(|f| f.offset) else {
            empty += 1;
            continue;
        };
        empty = 0;
        ids.extend(
            page.facts
                .into_iter()
                .map(|f| f.message.envelope.message_id),
        );
        api.confirm_receipt("soak-check", last)
            .await
            .map_err(|e| anyhow::anyhow!("confirm while reading back: {e}"))?;
    }
    Ok(ids)
}

/// `bsfg bench soak`.
pub async fn soak(opts: SoakBench) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    println!(
        "# bsfg bench soak: {} facts plant -> idmz (QUIC, {} % loss) -> enterprise (gRPC); a disruption every ~{} (seed {})",
        opts.facts,
        opts.loss_pct,
        humantime::format_duration(opts.every),
        opts.seed
    );
    // PKI for the QUIC hop.
    let plant_pki = Pki::new(d, "plant")?;
    let idmz_pki = Pki::new(d, "idmz")?;
    plant_pki.issue("plant-bsfg")?;
    idmz_pki.issue("idmz-bsfg")?;

    let nats = |domain: &str| {
        NatsServer::start_with(NatsOptions {
            domain: Some(domain.into()),
            ready_timeout: Duration::from_secs(120),
            ..Default::default()
        })
        .context("starting nats-server (run scripts/setup.sh)")
    };
    let (plant_nats, idmz_nats, enterprise_nats) =
        (nats("plant")?, nats("idmz")?, nats("enterprise")?);
    let [plant_port, idmz_port, enterprise_port, quic_port] =
        [free_port()?, free_port()?, free_port()?, free_port()?];
    let quic_addr: std::net::SocketAddr = format!("127.0.0.1:{quic_port}").parse()?;
    let loss = Profile {
        loss: opts.loss_pct / 100.0,
        ..Default::default()
    };
    let relay = UdpRelay::start(quic_addr, loss, loss, opts.seed).await?;

    let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
        let p = d.join(format!("{name}.toml"));
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let plant_cfg = write(
        "plant",
        zone_config(
            "plant",
            &plant_nats,
            plant_port,
            &format!(
                r#"
[[consumers]]
name = "to-idmz"
class = "operational"
ack_wait = "30s"

[[listeners]]
url = "quic://127.0.0.1:{quic_port}"

[tls]
cert = "plant-bsfg.pem"
key = "plant-bsfg.key"
reload_interval = "10s"
trust = {{ idmz = "idmz-ca.pem" }}

[[peers]]
identity = "idmz-bsfg"
ca = "idmz"
consumers = ["to-idmz"]
"#
            ),
        ),
    )?;
    let idmz_cfg = write(
        "idmz",
        zone_config(
            "idmz",
            &idmz_nats,
            idmz_port,
            &format!(
                r#"
[[consumers]]
name = "to-enterprise"
class = "operational"
ack_wait = "30s"

[[links]]
name = "from-plant"
source = "quic://{relay}"
server_name = "plant-bsfg"
ca = "plant"
consumer = "to-idmz"
page_size = 500
wait = "1s"
backoff_max = "5s"
request_timeout = "10s"

[tls]
cert = "idmz-bsfg.pem"
key = "idmz-bsfg.key"
trust = {{ plant = "plant-ca.pem" }}
"#,
                relay = relay.addr()
            ),
        ),
    )?;
    let enterprise_cfg = write(
        "enterprise",
        zone_config(
            "enterprise",
            &enterprise_nats,
            enterprise_port,
            &format!(
                r#"
[[links]]
name = "from-idmz"
source = "grpc://127.0.0.1:{idmz_port}"
insecure = true
source_zone = "idmz"
consumer = "to-enterprise"
page_size = 500
wait = "1s"
backoff_max = "5s"
"#
            ),
        ),
    )?;
    let zone = |name, nats, config: PathBuf, port: u16| Zone {
        name,
        nats,
        log: config.with_extension("log"),
        config,
        gateway: None,
        url: format!("grpc://127.0.0.1:{port}"),
    };
    let mut zones = [
        zone("plant", plant_nats, plant_cfg, plant_port),
        zone("idmz", idmz_nats, idmz_cfg, idmz_port),
        zone(
            "enterprise",
            enterprise_nats,
            enterprise_cfg,
            enterprise_port,
        ),
    ];
    for z in &mut zones {
        z.start_gateway()?;
    }

    // The producer: AppendFacts batches into the plant, each retried until it
    // answers (idempotent by message_id).
    let started = Instant::now();
    let producer = {
        let url = zones[0].url.clone();
        let (n, object_bytes) = (opts.facts, opts.object_bytes);
        tokio::spawn(async move {
            let api = GrpcClient::connect_lazy(&url, ClientConfig::default())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut retries = 0u64;
            for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
                let batch: Vec<_> = chunk
                    .iter()
                    .map(|&i| {
                        bsfg_testkit::fixtures::padded_fact(&format!("soak-{i}"), i, object_bytes)
                    })
                    .collect();
                loop {
                    let answers = api.append_facts(batch.clone()).await;
                    match answers {
                        Ok(a) if a.iter().all(Result::is_ok) => break,
                        _ => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
            anyhow::Ok(retries)
        })
    };

    // The disruptions, from a seeded schedule, until the enterprise holds every fact.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(opts.seed);
    let mut counts: [(&str, u64); 4] = [
        ("gateway SIGKILLs", 0),
        ("nats-server SIGKILLs", 0),
        ("blackholes of the lossy hop", 0),
        ("producer retries", 0),
    ];
    let deadline = started + opts.timeout;
    let mut producer = Some(producer);
    loop {
        let pause = opts.every.mul_f64(rng.gen_range(0.5..1.5));
        tokio::time::sleep(pause).await;
        if let Some(p) = producer.as_ref()
            && p.is_finished()
            && let Some(p) = producer.take()
        {
            counts[3].1 = p.await??;
            println!(
                "appended {} facts in {:.0} s",
                opts.facts,
                started.elapsed().as_secs_f64()
            );
        }
        // Done when the producer is and the enterprise's log holds as many facts.
        if producer.is_none()
            && stored_facts(&zones[2].nats, "enterprise").await >= opts.facts as u64
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "gave up after {}",
            humantime::format_duration(opts.timeout)
        );
        match rng.gen_range(0..3) {
            0 => {
                let z = rng.gen_range(0..3);
                println!(
                    "[{:>5.0} s] SIGKILL the {} gateway, restart",
                    started.elapsed().as_secs_f64(),
                    zones[z].name
                );
                zones[z].kill_gateway();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..3000))).await;
                tokio::task::block_in_place(|| zones[z].restart_gateway())?;
                counts[0].1 += 1;
            }
            1 => {
                let z = rng.gen_range(0..3);
                println!(
                    "[{:>5.0} s] SIGKILL the {} nats-server, restart",
                    started.elapsed().as_secs_f64(),
                    zones[z].name
                );
                zones[z].nats.kill();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..3000))).await;
                tokio::task::block_in_place(|| zones[z].nats.restart())?;
                counts[1].1 += 1;
            }
            _ => {
                let secs = rng.gen_range(2..15);
                println!(
                    "[{:>5.0} s] blackhole plant -> idmz for {secs} s",
                    started.elapsed().as_secs_f64()
                );
                relay.blackhole(Duration::from_secs(secs));
                counts[2].1 += 1;
            }
        }
    }
    let elapsed = started.elapsed();

    // Read every zone's stream back and compare with what was appended.
    let expected: HashSet<String> = (0..opts.facts).map(|i| format!("soak-{i}")).collect();
    println!();
    println!("| zone | facts read | unique | lost | duplicated |");
    println!("|---|---|---|---|---|");
    let mut bad = false;
    for z in &zones {
        let ids = read_ids(&z.url).await?;
        let unique: HashSet<&String> = ids.iter().collect();
        let lost = expected.iter().filter(|i| !unique.contains(i)).count();
        let duplicated = ids.len() - unique.len();
        let foreign = unique.iter().filter(|i| !expected.contains(**i)).count();
        bad |= lost > 0 || duplicated > 0 || foreign > 0;
        println!(
            "| {} | {} | {} | {lost} | {duplicated} |",
            z.name,
            ids.len(),
            unique.len()
        );
    }
    println!();
    for (what, n) in counts {
        println!("{what}: {n}");
    }
    println!(
        "datagrams dropped by the lossy hop: {}",
        relay
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    println!(
        "end to end: {:.0} s ({:.0} facts/s through both hops)",
        elapsed.as_secs_f64(),
        opts.facts as f64 / elapsed.as_secs_f64()
    );
    anyhow::ensure!(!bad, "facts were lost or duplicated: see the table above");
    Ok(())
}

/// Facts of class `operational` in a zone's log, read from its nats-server (0 when
/// it does not answer).
async fn stored_facts(nats: &NatsServer, domain: &str) -> u64 {
    bsfg_sink_jetstream::baseline::class_facts(&nats.url(), Some(domain), "operational")
        .await
        .unwrap_or(0)
}
