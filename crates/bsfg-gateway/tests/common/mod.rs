//! Shared by the binary-level tests: the real `bsfg` gateway as a child process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bsfg_testkit::NatsServer;

pub const BSFG: &str = env!("CARGO_BIN_EXE_bsfg");

/// A loopback port that was free a moment ago and that no other test of this
/// process (gateway or nats-server) was handed (bsfg-testkit keeps the list).
pub fn free_port() -> u16 {
    bsfg_testkit::free_port().unwrap()
}

/// `n` distinct loopback ports (see [`free_port`]).
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

pub struct Gateway {
    pub child: Child,
    pub url: String,
    pub config: PathBuf,
    /// The network namespace it runs in (the far site of an emulated link).
    pub netns: Option<String>,
}

impl Gateway {
    pub fn start(dir: &Path, nats: &NatsServer) -> Gateway {
        let port = free_port();
        let config = ZoneFile::new("plant-a", nats)
            .consumer("reporting", "operational")
            .plaintext(port)
            .write(&dir.join("zone.toml"));
        Self::spawn(config, format!("grpc://127.0.0.1:{port}"))
    }

    pub fn spawn(config: PathBuf, url: String) -> Gateway {
        Self::spawn_in(None, config, url)
    }

    /// Starts the gateway with these environment variables set (e.g.
    /// `BSFG_LOG_FORMAT=json`); its log is the config's path with `.log`.
    #[allow(dead_code)]
    pub fn spawn_env(config: PathBuf, url: String, env: &[(&str, &str)]) -> Gateway {
        Self::spawn_in_env(None, config, url, env)
    }

    /// Starts the gateway inside the network namespace `netns`, if any.
    pub fn spawn_in(netns: Option<String>, config: PathBuf, url: String) -> Gateway {
        Self::spawn_in_env(netns, config, url, &[])
    }

    fn spawn_in_env(
        netns: Option<String>,
        config: PathBuf,
        url: String,
        env: &[(&str, &str)],
    ) -> Gateway {
        // The gateway's log goes beside its config, to explain a failed start.
        let log = config.with_extension("log");
        let mut cmd = match &netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BSFG]);
                c
            }
            None => Command::new(BSFG),
        };
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next().and_then(Result::ok).unwrap_or_else(|| {
            let _ = child.wait();
            panic!(
                "gateway did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        assert!(ready.contains("ready"), "{ready}");
        Gateway {
            child,
            url,
            config,
            netns,
        }
    }

    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Self::spawn_in(self.netns.clone(), self.config.clone(), self.url.clone());
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `bsfg --url <this gateway> <args>`, with this zone's admin token file (when
    /// its config has one) in `BSFG_ADMIN_TOKEN_FILE`.
    pub fn bsfg(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BSFG);
        let token = admin_token_file(&self.config);
        if token.exists() {
            cmd.env("BSFG_ADMIN_TOKEN_FILE", token);
        }
        cmd.arg("--url").arg(&self.url).args(args).output().unwrap()
    }

    /// The admin token file of this gateway's zone ([`ZoneFile::admin`]).
    pub fn admin_token_file(&self) -> PathBuf {
        admin_token_file(&self.config)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Gateway {
    /// SIGKILL, no chance to finish anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same config (after kill9 or sigterm).
    pub fn respawn(&mut self) {
        *self = Self::spawn_in(self.netns.clone(), self.config.clone(), self.url.clone());
    }
}

/// Step `i` of plant batch `{series}{i / 100}`, from `plant` to `enterprise`: one
/// distinct fact per `(series, i)`, the same fact every time it is built.
pub fn plant_fact(series: &str, i: u32) -> bsfg_core::Message {
    bsfg_core::Message {
        envelope: bsfg_core::Envelope {
            message_id: format!("plant:batch:{series}{}:step:{i}", i / 100),
            from_zone: "plant".into(),
            to_zone: "enterprise".into(),
            produced_at_unix_ms: 1_764_000_000_000 + i64::from(i),
            ..Default::default()
        },
        fact: bsfg_core::Fact {
            subject: format!("batch:Plant/{series}{}", i / 100),
            predicate: "step_completed".into(),
            object_json: format!(r#"{{"step":{i}}}"#),
            artifacts: vec![],
        },
    }
}

/// Reads `reader` until `expected` is complete; every message_id must come once.
/// Returns the provenance zones seen.
pub async fn drain_exactly(
    api: &dyn bsfg_core::BoundaryApi,
    reader: &str,
    expected: &std::collections::HashSet<String>,
    timeout: Duration,
) -> std::collections::HashSet<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = std::collections::HashSet::new();
    let mut via = std::collections::HashSet::new();
    while seen.len() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} facts arrived",
            seen.len(),
            expected.len()
        );
        let Ok(page) = api
            .fetch_facts(bsfg_core::FetchRequest {
                consumer: reader.into(),
                limit: 500,
                wait: Duration::from_secs(1),
            })
            .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for f in &page.facts {
            let id = f.message.envelope.message_id.clone();
            assert!(expected.contains(&id), "unexpected fact {id}");
            assert!(seen.insert(id.clone()), "{id} stored twice");
            via.insert(
                f.provenance
                    .as_ref()
                    .map(|p| p.zone.clone())
                    .unwrap_or_default(),
            );
        }
        if let Some(last) = page.facts.last() {
            api.confirm_receipt(reader, last.offset).await.unwrap();
        }
    }
    via
}

/// `bsfg --json status` of the gateway whose admin endpoint is on `port`.
pub fn admin_status(port: u16) -> serde_json::Value {
    let out = Command::new(BSFG)
        .args(["--json", "status", "--admin"])
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_str(text(&out.stdout).trim()).unwrap()
}

/// A nats-server for zone `domain`, with its JetStream domain.
pub fn nats_for(domain: &str) -> NatsServer {
    NatsServer::start_with(bsfg_testkit::NatsOptions {
        domain: Some(domain.to_owned()),
        ..Default::default()
    })
    .unwrap()
}

/// The admin token every test zone with an admin endpoint has.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123456789";

/// Where [`ZoneFile::write`] puts the admin token of the zone file `config`.
pub fn admin_token_file(config: &Path) -> PathBuf {
    config.with_file_name("admin.token")
}

/// A zone's TOML file, section by section: the one template of the binary tests.
/// Starts with `[zone]` and a JetStream `[sink]` on `nats` (its domain, if it has
/// one, and its monitoring endpoint).
pub struct ZoneFile {
    head: String,
    sink: String,
    rest: String,
}

impl ZoneFile {
    pub fn new(zone: &str, nats: &NatsServer) -> ZoneFile {
        let mut sink = format!(
            "[sink]\ntype = \"jetstream\"\nurl = \"{}\"\nmonitor_url = \"{}\"\n",
            nats.url(),
            nats.monitor_url()
        );
        if let Some(d) = nats.domain() {
            sink += &format!("domain = \"{d}\"\n");
        }
        ZoneFile {
            head: format!("[zone]\nname = \"{zone}\"\n"),
            sink,
            rest: String::new(),
        }
    }

    /// More `[sink]` keys (`classes = [...]`, `duplicate_window = "1s"`).
    pub fn sink_keys(mut self, keys: &str) -> ZoneFile {
        self.sink += keys;
        self.sink.push('\n');
        self
    }

    /// `[[consumers]]` `name` of `class`, redelivering after 2 s.
    pub fn consumer(self, name: &str, class: &str) -> ZoneFile {
        self.section(&format!(
            "[[consumers]]\nname = \"{name}\"\nclass = \"{class}\"\nack_wait = \"2s\""
        ))
    }

    /// A plaintext loopback listener on `port`.
    pub fn plaintext(self, port: u16) -> ZoneFile {
        self.section(&format!(
            "[[listeners]]\nurl = \"grpc://127.0.0.1:{port}\"\ninsecure = true"
        ))
    }

    /// The admin endpoint on loopback `port`, its token ([`ADMIN_TOKEN`]) in
    /// `admin.token` beside the file.
    pub fn admin(self, port: u16) -> ZoneFile {
        self.admin_keys(port, "token_file = \"admin.token\"")
    }

    /// The admin endpoint on loopback `port` with these other keys.
    pub fn admin_keys(self, port: u16, keys: &str) -> ZoneFile {
        self.section(&format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n{keys}"))
    }

    /// A link `name` pulling `consumer` from `source`, retrying within 50 ms..1 s,
    /// with `keys`.
    pub fn link(self, name: &str, source: &str, consumer: &str, keys: &str) -> ZoneFile {
        self.section(&format!(
            "[[links]]\nname = \"{name}\"\nsource = \"{source}\"\nconsumer = \"{consumer}\"\nbackoff_min = \"50ms\"\nbackoff_max = \"1s\"\n{keys}"
        ))
    }

    /// Any other section, verbatim.
    pub fn section(mut self, text: &str) -> ZoneFile {
        self.rest.push('\n');
        self.rest += text.trim_end();
        self.rest.push('\n');
        self
    }

    /// The file's text.
    pub fn text(&self) -> String {
        format!("{}\n{}{}", self.head, self.sink, self.rest)
    }

    /// Writes it to `path` and returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        let text = self.text();
        if text.contains("token_file = \"admin.token\"") {
            let token = admin_token_file(path);
            std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        std::fs::write(path, text).unwrap();
        path.to_path_buf()
    }
}
