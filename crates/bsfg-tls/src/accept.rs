//! TLS over TCP for listeners: accepts connections, runs each handshake in its own
//! task under a deadline (a slow or silent client holds up nobody), and hands out only
//! connections whose peer presented a certificate chaining to a trust anchor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::{AlertDescription, CertificateError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::{PeerIdentity, ServerTls};

/// A connection whose TLS handshake completed and whose peer is authenticated.
pub struct Accepted {
    /// The encrypted stream.
    pub stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// Who the peer is, from its certificate.
    pub peer: PeerIdentity,
    /// The peer's address.
    pub remote: SocketAddr,
    /// Keeps the connection registered with its endpoint (closed when a reload leaves
    /// its peer untrusted; counted against the peer's cap); drop it with the stream.
    pub guard: Option<crate::LiveGuard>,
}

/// A stable name for why a handshake failed, for logs and the metric label.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "handshake_timeout";
    }
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => "closed_during_handshake",
            _ => "io_error",
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "expired_certificate"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate_not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "wrong_server_name"
            }
            _ => "invalid_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidMessage(_) => "not_tls",
        rustls::Error::PeerIncompatible(_) => "incompatible_peer",
        rustls::Error::NoApplicationProtocol => "no_common_alpn",
        rustls::Error::AlertReceived(a) => match a {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown => "peer_rejected_our_certificate",
            _ => "alert_received",
        },
        _ => "tls_error",
    }
}

/// The same stable names for a handshake that failed with TLS alert `code`, for
/// transports that see only the alert (QUIC carries it as a CRYPTO_ERROR). `detail`
/// is the error text, which names the certificate problem when this end raised it;
/// `sent` says whether this end sent the alert (it rejected the peer) or received it
/// (the peer rejected us).
pub fn alert_reason(code: u8, detail: &str, sent: bool) -> &'static str {
    let a = AlertDescription::from(code);
    if !sent {
        return match a {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired => "peer_rejected_our_certificate",
            AlertDescription::NoApplicationProtocol => "no_common_alpn",
            _ => "alert_received",
        };
    }
    let d = detail.to_ascii_lowercase();
    if d.contains("unknownissuer") || d.contains("unknown issuer") {
        return "unknown_ca";
    }
    if d.contains("expired") {
        return "expired_certificate";
    }
    if d.contains("notvalidforname") || d.contains("not valid for name") {
        return "wrong_server_name";
    }
    match a {
        AlertDescription::UnknownCA => "unknown_ca",
        AlertDescription::CertificateExpired => "expired_certificate",
        AlertDescription::CertificateRequired => "no_client_certificate",
        AlertDescription::NoApplicationProtocol => "no_common_alpn",
        AlertDescription::BadCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::UnsupportedCertificate => "invalid_certificate",
        _ => "tls_error",
    }
}

/// Accepts TCP connections on `listener` and completes TLS handshakes concurrently
/// (at most `max_handshakes` at once, each within `handshake_timeout`). Authenticated
/// connections come out of the returned channel, each registered with the endpoint
/// (a peer identity holding `max_per_peer` connections already is refused:
/// `too_many_connections`); every failure is logged with the peer's address and
/// counted by reason in the endpoint's [`crate::TlsStats`]. The accept task ends when
/// the receiver is dropped.
pub fn accept(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    handshake_timeout: Duration,
    max_handshakes: usize,
    max_per_peer: usize,
) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel(16);
    let permits = Arc::new(Semaphore::new(max_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => return,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: pause, do not spin.
                        tracing::warn!(endpoint = %tls.endpoint, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let tls = tls.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // Without TCP_NODELAY small replies wait for delayed ACKs (~40 ms).
                let _ = tcp.set_nodelay(true);
                let closer = crate::tcp_closer(&tcp);
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                let r = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no TLS handshake within {handshake_timeout:?}"),
                    )),
                };
                let stream = match r {
                    Ok(s) => s,
                    Err(e) => {
                        let reason = failure_reason(&e);
                        tls.stats.handshake_failed(&tls.endpoint, reason);
                        tracing::warn!(endpoint = %tls.endpoint, %remote, reason, error = %e, "TLS handshake refused");
                        return;
                    }
                };
                let Some(peer) = tls.identify(stream.get_ref().1.peer_certificates()) else {
                    tls.stats.handshake_failed(&tls.endpoint, "no_identity");
                    tracing::warn!(endpoint = %tls.endpoint, %remote, reason = "no_identity", "peer certificate carries no identity (no DNS name or common name)");
                    return;
                };
                let guard = match closer {
                    Some(close) => {
                        let chain = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                            .unwrap_or_default();
                        let presented = crate::Presented {
                            chain,
                            server_name: None,
                            identity: Some(peer.identity.clone()),
                        };
                        match tls.admit(presented, close, Some(max_per_peer)) {
                            Ok(g) => Some(g),
                            Err(e) => {
                                tls.stats
                                    .handshake_failed(&tls.endpoint, "too_many_connections");
                                tracing::warn!(endpoint = %tls.endpoint, %remote, peer = %peer.identity, reason = "too_many_connections", error = %e, "connection refused");
                                return;
                            }
                        }
                    }
                    None => None,
                };
                tracing::debug!(endpoint = %tls.endpoint, %remote, peer = %peer.identity, anchor = ?peer.anchor, "peer authenticated");
                let _ = tx
                    .send(Accepted {
                        stream,
                        peer,
                        remote,
                        guard,
                    })
                    .await;
            });
        }
    });
    rx
}
