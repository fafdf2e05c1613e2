//! # bsfg-transport-unix
//!
//! `unix:///path/to/zone.sock`: the four operations over a Unix domain socket, for
//! zones (or producers) that share a host. The same gRPC service and client as
//! `grpc://` run over the socket; what differs is who the caller is. There is no TLS:
//! the kernel tells the listener the connecting process's user ([`SO_PEERCRED`]), and
//! every call is made as `uid:<n>@unix`, a peer like any other, default deny: a
//! `[[peers]]` grant with `identity = "uid:1000"` and `ca = "unix"` says what that
//! user may do. The socket file is created with the listener's `mode` (default
//! `0660`: the gateway's user and group), so the file system decides who may connect
//! at all, and the grant decides what they may do.
//!
//! Written against [`bsfg_core::component::Transport`] only: the gateway registers
//! [`UnixTransport`] and changes nothing else.
//!
//! [`SO_PEERCRED`]: https://man7.org/linux/man-pages/man7/unix.7.html

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bsfg_core::component::{
    ComponentError, Dial, Listen, Scheme, Security, ServeContext, ServeLimits, Serving, Setup,
    Spanned, TlsMaterial, Transport,
};
use bsfg_core::{BoundaryApi, BoundaryError, Caller};
use bsfg_transport_grpc::{ClientConfig, GrpcClient, Incoming, PeerConn, PeerInfo};
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::net::{UnixListener, UnixStream};

/// The anchor name of callers on a Unix socket: grants name it as `ca = "unix"`.
pub const ANCHOR: &str = "unix";

/// Registers `unix://`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnixTransport;

const SCHEMES: &[Scheme] = &[Scheme {
    name: "unix",
    security: Security::LocalCredentials { anchor: ANCHOR },
    example: "unix:///run/bsfg/zone.sock",
}];

/// A listener's own keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    /// Permissions of the socket file, octal (`"0660"`).
    mode: Option<Spanned<String>>,
}

/// A link's own keys: none.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

/// The socket path of a `unix://` URL: absolute, or the problem.
fn socket_path(at: &mut Setup<'_, '_>) -> Option<PathBuf> {
    let path = Path::new(at.address);
    if path.is_absolute() && path.file_name().is_some() {
        Some(path.to_path_buf())
    } else {
        let address = at.address;
        at.url_problem(format!(
            "`{address}` is not an absolute socket path; write e.g. unix:///run/bsfg/zone.sock"
        ));
        None
    }
}

impl Transport for UnixTransport {
    fn schemes(&self) -> &'static [Scheme] {
        SCHEMES
    }

    fn listener(&self, mut at: Setup<'_, '_>, limits: &ServeLimits) -> Option<Arc<dyn Listen>> {
        let key = format!("{}.mode", at.entry_key());
        let raw: Option<RawListener> = at.read();
        let path = socket_path(&mut at)?;
        let mode = match raw?.mode {
            None => 0o660,
            Some(m) => match u32::from_str_radix(m.get_ref(), 8) {
                Ok(v) if v <= 0o777 && v & 0o600 == 0o600 => v,
                _ => {
                    at.checks().at(
                        m.span(),
                        key,
                        format!(
                            "`{}` is not a file mode for the socket: octal, at most 0777, and the gateway's user needs read and write (e.g. \"0660\")",
                            m.get_ref()
                        ),
                    );
                    return None;
                }
            },
        };
        Some(Arc::new(UnixListen {
            path,
            mode,
            config: bsfg_transport_grpc::component::server_config(limits),
        }))
    }

    fn dialer(&self, mut at: Setup<'_, '_>, request_timeout: Duration) -> Option<Arc<dyn Dial>> {
        let keys = at.read::<NoKeys>();
        let path = socket_path(&mut at)?;
        keys?;
        Some(Arc::new(UnixDial {
            path,
            config: ClientConfig {
                request_timeout,
                ..ClientConfig::default()
            },
        }))
    }
}

/// A listener on a socket file.
#[derive(Debug)]
struct UnixListen {
    path: PathBuf,
    mode: u32,
    config: bsfg_transport_grpc::ServerConfig,
}

/// Who is at the other end of `stream`, as the kernel says.
fn peer(stream: &UnixStream) -> std::io::Result<PeerInfo> {
    let cred = stream.peer_cred()?;
    let remote = match cred.pid() {
        Some(pid) => format!("pid {pid} uid {} gid {}", cred.uid(), cred.gid()),
        None => format!("uid {} gid {}", cred.uid(), cred.gid()),
    };
    Ok(PeerInfo {
        caller: Caller::Peer {
            identity: format!("uid:{}", cred.uid()),
            anchor: Some(ANCHOR.to_owned()),
        },
        remote,
    })
}

/// Binds `path`, replacing a socket file nobody listens on any more (a gateway that
/// was killed leaves its file behind); a file that is not a socket, or a socket
/// another process still serves, is refused.
async fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process serves this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

impl Listen for UnixListen {
    fn socket(&self) -> String {
        format!("unix {}", self.path.display())
    }

    fn is_local(&self) -> bool {
        true
    }

    fn start(&self, ctx: ServeContext) -> BoxFuture<'_, Result<Serving, ComponentError>> {
        async move {
            let listener = bind(&self.path, self.mode)
                .await
                .map_err(|e| ComponentError::new(format!("binding {}", self.path.display()), e))?;
            let conns = futures::stream::unfold(listener, |l| async move {
                let conn = match l.accept().await {
                    Ok((stream, _)) => peer(&stream).map(|info| PeerConn {
                        io: Box::new(stream),
                        info,
                    }),
                    Err(e) => {
                        // Out of file descriptors and the like: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Err(e)
                    }
                };
                Some((conn, l))
            })
            // A connection whose credentials cannot be read is dropped, not served
            // as anyone.
            .filter_map(|c| async move {
                match c {
                    Ok(c) => Some(Ok(c)),
                    Err(e) => {
                        tracing::warn!(error = %e, "unix socket connection refused");
                        None
                    }
                }
            })
            .boxed();
            let path = self.path.clone();
            let config = self.config.clone();
            let serve = async move {
                let r = bsfg_transport_grpc::serve(
                    ctx.gate,
                    config,
                    Incoming::Peers(conns),
                    ctx.served,
                    ctx.ready,
                    ctx.stopped,
                )
                .await
                .map_err(|e| ComponentError::new("serving on a unix socket", e));
                let _ = std::fs::remove_file(&path);
                r
            }
            .boxed();
            Ok(Serving {
                url: format!("unix://{}", self.path.display()),
                summary: format!(
                    "gRPC over a Unix socket (mode {:04o}), callers uid:<n>@{ANCHOR}",
                    self.mode
                ),
                serve,
            })
        }
        .boxed()
    }
}

/// A client of a socket file.
#[derive(Debug)]
struct UnixDial {
    path: PathBuf,
    config: ClientConfig,
}

impl Dial for UnixDial {
    fn dial(
        &self,
        _url: &str,
        _tls: Option<(TlsMaterial, Option<String>)>,
    ) -> Result<Arc<dyn BoundaryApi>, BoundaryError> {
        let path = self.path.clone();
        let client = GrpcClient::connect_lazy_with(self.config.clone(), move || {
            let path = path.clone();
            async move {
                let s = UnixStream::connect(&path).await?;
                Ok(Box::new(s) as Box<dyn bsfg_transport_grpc::Io>)
            }
            .boxed()
        })?;
        Ok(Arc::new(client))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use bsfg_core::component::{Checks, DeTable, Table};

    fn listener(url: &str, keys: &str) -> (Option<Arc<dyn Listen>>, Vec<String>) {
        let doc = DeTable::parse(keys).unwrap();
        let span = doc.span();
        let table = Table::new("listeners[0]", span, doc.into_inner());
        let mut checks = Checks::default();
        let at = Setup::new(
            &SCHEMES[0],
            url.trim_start_matches("unix://"),
            ("listeners[0].url", 0..0),
            table,
            &mut checks,
        );
        let l = UnixTransport.listener(at, &ServeLimits::default());
        let problems = checks
            .problems
            .into_iter()
            .map(|p| format!("{}: {}", p.key, p.rule))
            .collect();
        (l, problems)
    }

    #[test]
    fn a_relative_path_or_a_mode_without_owner_access_is_refused_naming_the_key() {
        let (l, p) = listener("unix://zone.sock", "");
        assert!(
            l.is_none() && p[0].contains("not an absolute socket path"),
            "{p:?}"
        );
        let (l, p) = listener("unix:///run/z.sock", "mode = \"0066\"");
        assert!(
            l.is_none() && p[0].starts_with("listeners[0].mode:"),
            "{p:?}"
        );
        let (l, p) = listener("unix:///run/z.sock", "mode = \"rw\"");
        assert!(
            l.is_none() && p[0].starts_with("listeners[0].mode:"),
            "{p:?}"
        );
        let (l, p) = listener("unix:///run/z.sock", "mod = \"0660\"");
        assert!(
            l.is_none() && p[0].starts_with("listeners[0].mod:"),
            "{p:?}"
        );
        let (l, _) = listener("unix:///run/z.sock", "mode = \"0660\"");
        let l = l.unwrap();
        assert_eq!(l.socket(), "unix /run/z.sock");
        assert!(l.is_local());
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_or_another_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.sock");
        let first = bind(&path, 0o660).await.unwrap();
        // Served: refused.
        assert_eq!(
            bind(&path, 0o660).await.unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        // Left behind by a listener that is gone: replaced.
        drop(first);
        let second = bind(&path, 0o600).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(second);
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"data").unwrap();
        assert_eq!(
            bind(&file, 0o660).await.unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"data", "never removed");
    }
}
