//! WASI 0.2 for ordinary guests, with nothing behind it.
//!
//! Every mainstream component toolchain (std Rust, TinyGo, componentize-py, jco)
//! imports WASI interfaces even when the code never touches a file. The host links
//! them all (wasmtime-wasi's p2 bindings) and gives each policy instance a context
//! with nothing in it:
//! - no preopened directories (a file cannot be opened), no environment variables,
//!   no arguments, no working directory, an empty stdin;
//! - no sockets: TCP and UDP sockets cannot be created, names are not resolved;
//! - stdout and stderr go to the gateway log under the policy's name, a bounded
//!   number of lines per call;
//! - the wall clock reads 1970-01-01 and the monotonic clock stands still unless the
//!   policy's config grants `clock`; timers fire at once, so no guest ever blocks the
//!   host in a sleep (the epoch deadline cannot interrupt a host call);
//! - randomness is a deterministic stream per instance unless the config grants
//!   `random` (std guests seed their hash maps from it at start).
//!
//! What a guest reached for and did not get is counted per policy
//! ([`Reach`]): `filesystem` (it asked for preopened directories), `environment`,
//! `arguments`, `network` (it tried to create a socket or resolve a name).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddressFamily, Network};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder};

use crate::config::HostGrant;
use crate::sandbox::HostState;

/// The WASI 0.2 release whose interfaces the host links (a guest built against any
/// 0.2.x resolves to them).
const WASI: &str = "0.2.12";

/// The WASI packages a guest may import (any interface of them, any 0.2 version).
pub(crate) const PACKAGES: [&str; 6] = [
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:io/",
    "wasi:random/",
    "wasi:sockets/",
];

/// What guests of one policy reached for and did not get.
#[derive(Debug, Default)]
pub struct Reach {
    /// Asked for preopened directories (to open a file).
    pub filesystem: AtomicU64,
    /// Read the environment.
    pub environment: AtomicU64,
    /// Read the arguments.
    pub arguments: AtomicU64,
    /// Tried to create a socket or resolve a name.
    pub network: AtomicU64,
}

impl Reach {
    /// `(what, count)` for the metrics: filesystem, environment, arguments, network.
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("filesystem", get(&self.filesystem)),
            ("environment", get(&self.environment)),
            ("arguments", get(&self.arguments)),
            ("network", get(&self.network)),
        ]
    }
}

/// The WASI side of one instance's store.
pub(crate) struct WasiState {
    pub ctx: WasiCtx,
    pub table: ResourceTable,
    pub reach: Arc<Reach>,
}

/// A wall clock at the Unix epoch and a monotonic clock that stands still: time
/// for a policy that was not granted the clock.
struct Stopped;

impl HostWallClock for Stopped {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    fn now(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl HostMonotonicClock for Stopped {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// stdout or stderr of a guest: lines to the gateway log under the policy's name,
/// at most `lines` per call (shared with `host.log`), each cut at 1 KiB.
#[derive(Clone)]
pub(crate) struct LogStream {
    policy: Arc<str>,
    which: &'static str,
    lines: Arc<AtomicU32>,
    partial: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl LogStream {
    fn emit(&self, line: &[u8]) {
        let left = self.lines.load(Ordering::Relaxed);
        if left == 0 {
            return;
        }
        self.lines.store(left - 1, Ordering::Relaxed);
        let cut = &line[..line.len().min(1024)];
        let text = String::from_utf8_lossy(cut);
        let text = text.trim_end_matches('\r');
        let policy = &*self.policy;
        if self.which == "stderr" {
            tracing::warn!(policy, stream = self.which, "{text}");
        } else {
            tracing::info!(policy, stream = self.which, "{text}");
        }
    }

    fn take(&self, bytes: &[u8]) {
        let Ok(mut partial) = self.partial.lock() else {
            return;
        };
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut *partial);
                self.emit(&line);
            } else if partial.len() < 4096 {
                partial.push(b);
            }
        }
    }
}

impl wasmtime_wasi::cli::IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.take(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.take(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The WASI context of one instance of `policy`: empty (see the module
/// documentation), with the clock and randomness its grants allow; `seed` makes
/// the deterministic randomness differ between instances.
pub(crate) fn context(
    policy: &Arc<str>,
    grants: &[HostGrant],
    lines: &Arc<AtomicU32>,
    seed: u64,
) -> WasiCtx {
    let mut b = WasiCtxBuilder::new();
    let log = |which| LogStream {
        policy: policy.clone(),
        which,
        lines: lines.clone(),
        partial: Arc::default(),
    };
    b.stdout(log("stdout"))
        .stderr(log("stderr"))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    if !grants.contains(&HostGrant::Clock) {
        b.wall_clock(Stopped).monotonic_clock(Stopped);
    }
    if !grants.contains(&HostGrant::Random) {
        use sha2::Digest as _;
        let bytes = sha2::Sha256::new()
            .chain_update(policy.as_bytes())
            .chain_update(seed.to_be_bytes())
            .finalize()
            .to_vec();
        b.secure_random(wasmtime_wasi::Deterministic::new(bytes.clone()))
            .insecure_random(wasmtime_wasi::Deterministic::new(bytes))
            .insecure_random_seed(u128::from(seed));
    }
    b.build()
}

impl wasmtime_wasi::WasiView for HostState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// A pollable that is always ready: the timers of a policy fire at once.
struct Now;

#[async_trait::async_trait]
impl Pollable for Now {
    async fn ready(&mut self) {}
}

/// Links WASI 0.2 into `linker`, then replaces what must be counted or must never
/// block: the environment, arguments and preopens (empty, counted), socket creation
/// and name resolution (refused with `access-denied`, counted), and the monotonic
/// clock's timers (ready at once).
pub(crate) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    let count = |store: &mut StoreContextMut<'_, HostState>, pick: fn(&Reach) -> &AtomicU64| {
        pick(&store.data().wasi.reach).fetch_add(1, Ordering::Relaxed);
    };
    let mut env = linker.instance(&format!("wasi:cli/environment@{WASI}"))?;
    env.func_wrap(
        "get-environment",
        move |mut s: StoreContextMut<'_, HostState>, (): ()| {
            count(&mut s, |r| &r.environment);
            Ok((Vec::<(String, String)>::new(),))
        },
    )?;
    env.func_wrap(
        "get-arguments",
        move |mut s: StoreContextMut<'_, HostState>, (): ()| {
            count(&mut s, |r| &r.arguments);
            Ok((Vec::<String>::new(),))
        },
    )?;
    linker
        .instance(&format!("wasi:filesystem/preopens@{WASI}"))?
        .func_wrap(
            "get-directories",
            move |mut s: StoreContextMut<'_, HostState>, (): ()| {
                count(&mut s, |r| &r.filesystem);
                Ok((Vec::<(
                    Resource<wasmtime_wasi::filesystem::Descriptor>,
                    String,
                )>::new(),))
            },
        )?;
    linker
        .instance(&format!("wasi:sockets/tcp-create-socket@{WASI}"))?
        .func_wrap(
            "create-tcp-socket",
            move |mut s: StoreContextMut<'_, HostState>, (_,): (IpAddressFamily,)| {
                count(&mut s, |r| &r.network);
                Ok((Err::<Resource<wasmtime_wasi::p2::TcpSocket>, _>(
                    ErrorCode::AccessDenied,
                ),))
            },
        )?;
    linker
        .instance(&format!("wasi:sockets/udp-create-socket@{WASI}"))?
        .func_wrap(
            "create-udp-socket",
            move |mut s: StoreContextMut<'_, HostState>, (_,): (IpAddressFamily,)| {
                count(&mut s, |r| &r.network);
                Ok((Err::<Resource<wasmtime_wasi::p2::UdpSocket>, _>(
                    ErrorCode::AccessDenied,
                ),))
            },
        )?;
    linker
        .instance(&format!("wasi:sockets/ip-name-lookup@{WASI}"))?
        .func_wrap(
            "resolve-addresses",
            move |mut s: StoreContextMut<'_, HostState>, (_, _): (Resource<Network>, String)| {
                count(&mut s, |r| &r.network);
                Ok((Err::<
                    Resource<
                        wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::ResolveAddressStream,
                    >,
                    _,
                >(ErrorCode::AccessDenied),))
            },
        )?;
    let mut clock = linker.instance(&format!("wasi:clocks/monotonic-clock@{WASI}"))?;
    for timer in ["subscribe-instant", "subscribe-duration"] {
        clock.func_wrap(
            timer,
            |mut s: StoreContextMut<'_, HostState>, (_,): (u64,)| {
                let table = &mut s.data_mut().wasi.table;
                let now = table.push(Now)?;
                Ok((wasmtime_wasi::p2::subscribe(table, now)?,))
            },
        )?;
    }
    linker.allow_shadowing(false);
    Ok(())
}
