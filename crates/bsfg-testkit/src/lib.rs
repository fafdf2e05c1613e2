//! # bsfg-testkit
//!
//! A real nats-server for tests: JetStream on a free loopback port, a temporary store
//! directory, an optional domain, and `sync_interval: always` by default so that an
//! acknowledged write is on disk. It can be stopped, killed with SIGKILL and restarted
//! on the same port and store; it is killed when dropped.
//!
//! The binary is found, in order, at `$BSFG_NATS_SERVER`, at `.tools/bin/nats-server`
//! in the workspace (installed by `scripts/setup.sh`), or as `nats-server` on `PATH`.
//! When none exists, [`NatsServer::start`] fails loudly: tests never skip silently.

pub mod fixtures;
pub mod fuzz;
pub mod netem;
pub mod pki;
pub mod plugins;
pub mod udp_relay;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a test server could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// No nats-server binary was found.
    #[error(
        "nats-server not found: run scripts/setup.sh (installs nats-server 2.15 into .tools/), or set BSFG_NATS_SERVER"
    )]
    BinaryNotFound,
    /// An I/O error while preparing or spawning the server.
    #[error("nats-server {0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// The server did not become ready in time.
    #[error("nats-server did not become ready within {0:?}; its log:\n{1}")]
    NotReady(Duration, String),
}

/// Options for a test server.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// JetStream domain of the zone, if any.
    pub domain: Option<String>,
    /// `sync_interval: always` (durable acks). Default true.
    pub sync_always: bool,
    /// Extra nats-server configuration appended verbatim (for example a `leafnodes`
    /// block). Default empty.
    pub extra_config: String,
    /// Address the client port listens on, e.g. the side channel of a
    /// [`netem::EmulatedLink`] so that processes in its namespace reach the server.
    /// Default 127.0.0.1.
    pub listen_host: Option<std::net::IpAddr>,
    /// The server's `max_payload` in bytes (the largest message it accepts).
    /// Default 8 MiB.
    pub max_payload: usize,
    /// How long a start or restart may take before it counts as failed (restoring a
    /// store of millions of subjects takes a while). Default 20 s.
    pub ready_timeout: Duration,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            domain: None,
            sync_always: true,
            extra_config: String::new(),
            listen_host: None,
            max_payload: 8 * 1024 * 1024,
            ready_timeout: Duration::from_secs(20),
        }
    }
}

/// A running (or stopped) nats-server owned by a test.
pub struct NatsServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    monitor_port: u16,
    options: NatsOptions,
    child: Option<Child>,
}

/// A loopback TCP port that was free a moment ago, never one this process handed
/// out before: tests running at once (nats-servers, gateways) never race for the
/// same port between its choice and its bind.
pub fn free_port() -> Result<u16, TestkitError> {
    static HANDED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    // Listeners held until a fresh port turns up, so the OS does not offer the same
    // one again meanwhile.
    let mut held = Vec::new();
    loop {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| TestkitError::Io("bind", e))?;
        let port = l
            .local_addr()
            .map_err(|e| TestkitError::Io("bind", e))?
            .port();
        let mut handed = HANDED.lock().unwrap_or_else(|p| p.into_inner());
        if !handed.contains(&port) {
            handed.push(port);
            return Ok(port);
        }
        held.push(l);
    }
}

/// Locates the nats-server binary (see the crate docs for the order).
pub fn nats_server_binary() -> Result<PathBuf, TestkitError> {
    if let Some(p) = std::env::var_os("BSFG_NATS_SERVER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    let mut dir: Option<&Path> = Some(Path::new(env!("CARGO_MANIFEST_DIR")));
    while let Some(d) = dir {
        let candidate = d.join(".tools/bin/nats-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let candidate = d.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(TestkitError::BinaryNotFound)
}

/// Starts `n` nats-servers routed to each other as JetStream cluster `bsfg` (each
/// with its own store; server names `bsfg_test_<client port>`), with `options` for
/// each. The cluster elects its meta leader shortly after the last one starts.
pub fn start_cluster(n: usize, options: NatsOptions) -> Result<Vec<NatsServer>, TestkitError> {
    let routes: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
    let list = routes
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    routes
        .iter()
        .map(|port| {
            NatsServer::start_with(NatsOptions {
                extra_config: format!(
                    "{}\ncluster {{\n  name: bsfg\n  listen: 127.0.0.1:{port}\n  routes: [{list}]\n}}",
                    options.extra_config
                ),
                ..options.clone()
            })
        })
        .collect()
}

impl NatsServer {
    /// The server's name in a cluster (`bsfg_test_<client port>`).
    pub fn server_name(&self) -> String {
        format!("bsfg_test_{}", self.port)
    }

    /// Starts a server with default options (no domain, `sync_interval: always`).
    pub fn start() -> Result<Self, TestkitError> {
        Self::start_with(NatsOptions::default())
    }

    /// Starts a server with the given options and waits until JetStream is ready.
    pub fn start_with(options: NatsOptions) -> Result<Self, TestkitError> {
        let bin = nats_server_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("bsfg-nats-")
            .tempdir()
            .map_err(|e| TestkitError::Io("tempdir", e))?;
        let mut server = NatsServer {
            bin,
            dir,
            port: free_port()?,
            monitor_port: free_port()?,
            options,
            child: None,
        };
        // A port found free can be taken by someone else before nats-server binds
        // it (tests run in parallel); a server that exits at start gets new ports.
        let mut attempts = 0;
        loop {
            server.write_config()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(_) if attempts < 3 && !server.is_running() => {
                    attempts += 1;
                    server.port = free_port()?;
                    server.monitor_port = free_port()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// The store directory (JetStream data lives below it).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn write_config(&self) -> Result<(), TestkitError> {
        let mut js = format!("  store_dir: {:?}\n", self.store_dir());
        if let Some(d) = &self.options.domain {
            js.push_str(&format!("  domain: {d}\n"));
        }
        if self.options.sync_always {
            js.push_str("  sync_interval: always\n");
        }
        let conf = format!(
            "listen: {}:{}\nhttp: 127.0.0.1:{}\nserver_name: bsfg_test_{}\nmax_payload: {}\njetstream {{\n{js}}}\n{}\n",
            self.host(),
            self.port,
            self.monitor_port,
            self.port,
            self.options.max_payload,
            self.options.extra_config
        );
        std::fs::write(self.config_path(), conf).map_err(|e| TestkitError::Io("config", e))
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| TestkitError::Io("log", e))?;
        let log2 = log.try_clone().map_err(|e| TestkitError::Io("log", e))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| TestkitError::Io("spawn", e))?;
        self.child = Some(child);
        self.wait_ready(self.options.ready_timeout)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), TestkitError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                break;
            }
            if http_get(self.monitor_port, "/healthz?js-enabled-only=true")
                .is_some_and(|(code, _)| code == 200)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TestkitError::NotReady(limit, self.log()))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn host(&self) -> std::net::IpAddr {
        self.options
            .listen_host
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
    }

    /// Client URL, `nats://127.0.0.1:PORT` (or the `listen_host`).
    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host(), self.port)
    }

    /// Monitoring URL, `http://127.0.0.1:PORT`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The JetStream domain, if any.
    pub fn domain(&self) -> Option<&str> {
        self.options.domain.as_deref()
    }

    /// Graceful stop (SIGTERM), waiting for the process to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Abrupt stop (SIGKILL): no flush, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store directory.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.spawn()
    }

    /// Kills with SIGKILL, then starts again on the same port and store directory.
    pub fn kill_and_restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        self.spawn()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Memory of a process from `/proc/<pid>/status` (`pid` = `"self"` for this one):
/// (resident, peak resident) in bytes; 0 for a field the kernel does not report.
/// For the tests and benchmarks that bound what a gateway holds.
pub fn memory_bytes(pid: &str) -> std::io::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Minimal HTTP/1.0 GET against 127.0.0.1; returns the status code and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// Polls `probe` until it returns `Ok`, every 50 ms for up to `within`: the one
/// polling loop of the tests. `Err` carries the state seen, which the panic shows
/// when time runs out (`timed out after 30s waiting for <what>: <last state>`).
pub async fn eventually<T, F: std::future::Future<Output = Result<T, String>>>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => assert!(
                std::time::Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`eventually`] for a blocking test (sleeps the thread between probes).
pub fn eventually_blocking<T>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => assert!(
                std::time::Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_starts_restarts_on_same_port_and_dies_with_its_handle() {
        let mut s = NatsServer::start().expect("nats-server must start");
        let url = s.url();
        assert!(s.is_running());
        s.kill_and_restart().expect("restart");
        assert_eq!(s.url(), url);
        assert!(s.is_running());
        let (code, body) = http_get(s.monitor_port, "/varz").expect("varz");
        assert_eq!(code, 200);
        assert!(body.contains("\"sync_always\": true"), "{body}");
        let port = s.port;
        drop(s);
        std::thread::sleep(Duration::from_millis(200));
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
