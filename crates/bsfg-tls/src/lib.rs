//! Mutual TLS for BSFG transports.
//!
//! A zone's gateway has one identity (a certificate and key issued by its zone CA)
//! and trusts named anchors (zone CAs, its own and its peers'). This crate turns those
//! files into rustls configurations that guarantee:
//!
//! - TLS 1.3 only, with the `ring` provider; a server *requires* a client certificate
//!   that chains to one of its anchors (there is no anonymous TLS);
//! - the peer's identity is read from its certificate (first DNS subject alternative
//!   name, or the common name where config says so) together with the name of the
//!   anchor that issued it, so an identity is only ever believed from the CA it
//!   belongs to ([`PeerIdentity`]);
//! - files are reloaded when their contents change ([`Reloadable::reload_if_changed`],
//!   driven by [`watch`]); a set of files that does not load is rejected and the
//!   previous configuration stays; every reload and failure is logged and counted;
//! - each certificate's expiry is exposed ([`Expiry`]) for a metric.
//!
//! - every connection is registered with its endpoint ([`Tls::admit`]) with the chain
//!   its peer presented; after each reload the chains are checked again against the
//!   new anchors and the connections whose peer is no longer trusted are closed
//!   (revocation takes effect within the reload interval, not at the next
//!   reconnect); a listener caps the connections of each peer identity.
//!
//! Transports use [`ServerTls`] / [`ClientTls`]; for TCP, [`accept`] runs handshakes
//! concurrently, each under a deadline, and classifies every failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

mod accept;
mod live;
pub use accept::{Accepted, accept, alert_reason, failure_reason};
pub use live::{Closer, LiveGuard, Presented, TooManyConnections, Tracked, tcp_closer};

/// ALPN protocol of gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file's contents are not what its role needs.
    #[error("{path}: {rule}")]
    Material {
        /// The file.
        path: PathBuf,
        /// What was expected.
        rule: String,
    },
    /// rustls refused the combination (for example a key that does not match the
    /// certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("TLS client verification: {0}")]
    Verifier(String),
    /// A name to dial is not a DNS name or IP address.
    #[error("`{0}` is not a valid server name")]
    ServerName(String),
}

/// Where the peer's identity is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdentityFrom {
    /// The first DNS subject alternative name (default).
    #[default]
    San,
    /// The subject's common name.
    Cn,
}

/// A trust anchor: a zone CA under a name the authorization config refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// Name of the anchor, e.g. the zone (`idmz`).
    pub name: String,
    /// PEM file with the CA certificate.
    pub path: PathBuf,
}

/// The files of one TLS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain of this gateway, leaf first.
    pub cert: PathBuf,
    /// PEM private key of this gateway (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// Anchors trusted for the peer's certificate.
    pub trust: Vec<Anchor>,
    /// Where peers' identities are read from.
    pub identity_from: IdentityFrom,
}

/// When a certificate stops being valid, for the expiry metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// `cert` (this gateway's own) or `ca` (a trust anchor).
    pub role: &'static str,
    /// The anchor's name, or the own certificate's identity.
    pub name: String,
    /// Seconds since the Unix epoch of `notAfter`.
    pub not_after_unix: i64,
}

/// A peer authenticated by its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The identity (DNS SAN or CN), e.g. `idmz-bsfg`.
    pub identity: String,
    /// The trust anchor that issued the peer's certificate. `None` when the leaf was
    /// not issued directly by one of the anchors (an intermediate): such a peer is
    /// authenticated but belongs to no configured CA, so authorization denies it.
    pub anchor: Option<String>,
}

/// Counters shared by every TLS endpoint of a gateway.
#[derive(Debug, Default)]
pub struct TlsStats {
    handshake_failures: Mutex<BTreeMap<(String, &'static str), u64>>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    revoked: Mutex<BTreeMap<String, u64>>,
}

impl TlsStats {
    /// Counts a failed handshake on `endpoint` for `reason`.
    pub fn handshake_failed(&self, endpoint: &str, reason: &'static str) {
        if let Ok(mut m) = self.handshake_failures.lock() {
            *m.entry((endpoint.to_owned(), reason)).or_default() += 1;
        }
    }
    /// Failed handshakes so far, by (endpoint, reason).
    pub fn handshake_failures(&self) -> BTreeMap<(String, &'static str), u64> {
        self.handshake_failures
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }
    /// Successful reloads after a change of files.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }
    /// Changed files that could not be loaded (the previous config stayed).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }
    /// Open connections closed because a reload left their peer untrusted, by
    /// endpoint.
    pub fn revoked(&self) -> BTreeMap<String, u64> {
        self.revoked.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Material {
            path: path.to_path_buf(),
            rule: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Material {
            path: path.to_path_buf(),
            rule: "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

fn not_after(path: &Path, der: &[u8]) -> Result<i64, TlsError> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Material {
        path: path.to_path_buf(),
        rule: format!("not an X.509 certificate: {e}"),
    })?;
    Ok(c.validity().not_after.timestamp())
}

/// Reads the identity from a DER certificate, as `from` says.
pub fn identity_of(der: &[u8], from: IdentityFrom) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    match from {
        IdentityFrom::Cn => c
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        IdentityFrom::San => {
            let san = c.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
        }
    }
}

/// The name of the anchor that issued `leaf` directly (issuer matches the anchor's
/// subject and the anchor's key verifies the signature).
fn issuing_anchor(leaf: &[u8], anchors: &[(String, CertificateDer<'static>)]) -> Option<String> {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf).ok()?;
    anchors.iter().find_map(|(name, ca)| {
        let (_, ca) = x509_parser::parse_x509_certificate(ca).ok()?;
        (leaf.issuer() == ca.subject() && leaf.verify_signature(Some(ca.public_key())).is_ok())
            .then(|| name.clone())
    })
}

/// Everything read from one set of files, with the fingerprint of their bytes.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    anchors: Vec<(String, CertificateDer<'static>)>,
    roots: Arc<RootCertStore>,
    fingerprint: [u8; 32],
    expiries: Vec<Expiry>,
}

impl Material {
    /// Loads the files. Every anchor file may be empty only where `allow_no_anchor`
    /// (a client then refuses every server); otherwise at least one must hold a CA.
    fn load(files: &TlsFiles, allow_no_anchor: bool) -> Result<Material, TlsError> {
        let mut h = Sha256::new();
        let cert_bytes = read(&files.cert)?;
        let key_bytes = read(&files.key)?;
        h.update(&cert_bytes);
        h.update(&key_bytes);
        let chain = certs(&files.cert, &cert_bytes)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Material {
            path: files.key.clone(),
            rule: format!("not a PEM private key: {e}"),
        })?;
        let own = identity_of(&chain[0], files.identity_from).unwrap_or_else(|| "gateway".into());
        let mut expiries = vec![Expiry {
            role: "cert",
            name: own,
            not_after_unix: not_after(&files.cert, &chain[0])?,
        }];
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        if files.trust.is_empty() {
            return Err(TlsError::Material {
                path: files.cert.clone(),
                rule: "no trust anchor: a peer could not be verified".into(),
            });
        }
        for a in &files.trust {
            let bytes = read(&a.path)?;
            h.update(&bytes);
            if bytes.iter().all(u8::is_ascii_whitespace) {
                // Emptied on purpose: the anchor is withdrawn until its file holds a
                // certificate again (its peers are refused, open connections closed).
                tracing::warn!(anchor = %a.name, path = %a.path.display(), "trust anchor file is empty: the anchor is withdrawn and its peers are refused");
                continue;
            }
            for ca in certs(&a.path, &bytes)? {
                roots.add(ca.clone()).map_err(|e| TlsError::Material {
                    path: a.path.clone(),
                    rule: format!("not usable as a trust anchor: {e}"),
                })?;
                expiries.push(Expiry {
                    role: "ca",
                    name: a.name.clone(),
                    not_after_unix: not_after(&a.path, &ca)?,
                });
                anchors.push((a.name.clone(), ca));
            }
        }
        if anchors.is_empty() && !allow_no_anchor {
            return Err(TlsError::Material {
                path: files.trust[0].path.clone(),
                rule: "every trust anchor file is empty: no peer could be verified".into(),
            });
        }
        Ok(Material {
            chain,
            key,
            anchors,
            roots: Arc::new(roots),
            fingerprint: h.finalize().into(),
            expiries,
        })
    }

    fn fingerprint_now(files: &TlsFiles) -> Result<[u8; 32], TlsError> {
        let mut h = Sha256::new();
        h.update(read(&files.cert)?);
        h.update(read(&files.key)?);
        for a in &files.trust {
            h.update(read(&a.path)?);
        }
        Ok(h.finalize().into())
    }
}

/// Loads `files` once and builds a server configuration from them, as a listener
/// would: a missing file, a non-PEM file, a key that does not match its certificate or
/// a CA that cannot anchor anything is an error naming the file. Returns the expiry of
/// every certificate.
pub fn check(files: &TlsFiles) -> Result<Vec<Expiry>, TlsError> {
    Ok(build_server(files, &[], "check")?.expiries)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Logs the identity a rejected client certificate claimed, then passes the verdict
/// of the wrapped webpki verifier through unchanged.
#[derive(Debug)]
struct LoggingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    from: IdentityFrom,
    endpoint: String,
}

impl ClientCertVerifier for LoggingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                // Not verified, so attacker-chosen: printable and short before it is logged.
                let who: String = identity_of(end_entity, self.from)
                    .unwrap_or_else(|| "<none>".into())
                    .chars()
                    .take(128)
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect();
                tracing::warn!(endpoint = %self.endpoint, presented_identity = %who, error = %e, "client certificate rejected");
            })
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks again what a connection's peer presented, against one loaded configuration.
type Recheck = Box<dyn Fn(&Presented) -> Result<(), rustls::Error> + Send + Sync>;

/// The verifier of a client whose every trust anchor is withdrawn: it trusts no
/// server (`unknown_ca`).
#[derive(Debug)]
struct RefuseAll;

impl rustls::client::danger::ServerCertVerifier for RefuseAll {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ))
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ))
    }
    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ))
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

struct Loaded<C> {
    config: Arc<C>,
    anchors: Vec<(String, CertificateDer<'static>)>,
    fingerprint: [u8; 32],
    expiries: Vec<Expiry>,
    recheck: Recheck,
}

/// Something whose files can change under it.
pub trait Reloadable: Send + Sync {
    /// Reloads when the files' contents changed. `Ok(true)`: a new configuration is in
    /// use; `Ok(false)`: nothing changed; `Err`: the new files were rejected and the
    /// previous configuration stays.
    fn reload_if_changed(&self) -> Result<bool, TlsError>;
    /// Which endpoint this is, for logs.
    fn endpoint(&self) -> &str;
    /// Expiry of every certificate in use.
    fn expiries(&self) -> Vec<Expiry>;
}

type Build<C> = fn(&TlsFiles, &[Vec<u8>], &str) -> Result<Loaded<C>, TlsError>;

/// One TLS endpoint: its files, the configuration built from them (swapped whole on
/// reload) and the counters it reports to. See [`ServerTls`] and [`ClientTls`].
pub struct Tls<C> {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    endpoint: String,
    stats: Arc<TlsStats>,
    build: Build<C>,
    current: RwLock<Arc<Loaded<C>>>,
    /// Fingerprint of the last set of files that failed to load: not retried (nor
    /// logged again) until they change once more.
    rejected: Mutex<Option<[u8; 32]>>,
    /// Connections open through this endpoint.
    live: Arc<live::Registry>,
}

/// The TLS side of a listener: requires and verifies client certificates.
pub type ServerTls = Tls<rustls::ServerConfig>;
/// The TLS side of a client (a link or the CLI): presents this gateway's certificate
/// and verifies the server against the given anchors and the name it dials.
pub type ClientTls = Tls<rustls::ClientConfig>;

impl<C> Tls<C> {
    fn load(
        files: TlsFiles,
        alpn: Vec<Vec<u8>>,
        endpoint: String,
        stats: Arc<TlsStats>,
        build: Build<C>,
    ) -> Result<Arc<Self>, TlsError> {
        let loaded = build(&files, &alpn, &endpoint)?;
        Ok(Arc::new(Tls {
            files,
            alpn,
            endpoint,
            stats,
            build,
            current: RwLock::new(Arc::new(loaded)),
            rejected: Mutex::new(None),
            live: Arc::default(),
        }))
    }

    /// Registers an open connection with what its peer presented and how to close it,
    /// unless the peer's identity already holds `max_per_identity` connections here.
    /// The connection stays registered while the guard lives; after every reload it
    /// is checked again and closed if its peer is no longer trusted.
    pub fn admit(
        &self,
        presented: Presented,
        close: Closer,
        max_per_identity: Option<usize>,
    ) -> Result<LiveGuard, TooManyConnections> {
        self.live.admit(presented, close, max_per_identity)
    }

    /// Connections registered now.
    pub fn open_connections(&self) -> usize {
        self.live.len()
    }

    /// Closes every open connection whose peer `loaded` no longer trusts; counted and
    /// logged.
    fn revoke_untrusted(&self, loaded: &Loaded<C>) {
        for (who, why) in self.live.revoke(&loaded.recheck) {
            if let Ok(mut m) = self.stats.revoked.lock() {
                *m.entry(self.endpoint.clone()).or_default() += 1;
            }
            tracing::warn!(endpoint = %self.endpoint, peer = %who, error = %why, "connection closed: its peer is no longer trusted after the reload");
        }
    }

    fn loaded(&self) -> Arc<Loaded<C>> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The configuration new connections use now.
    pub fn config(&self) -> Arc<C> {
        self.loaded().config.clone()
    }

    /// The counters this endpoint reports to.
    pub fn stats(&self) -> &Arc<TlsStats> {
        &self.stats
    }

    /// A 32-byte secret for `purpose`, derived from this endpoint's private key file
    /// (SHA-256 over a label, the purpose and the key): the same for as long as the key
    /// is, across restarts, and useless without the key. `None` when the key file
    /// cannot be read now.
    pub fn derived_secret(&self, purpose: &str) -> Option<[u8; 32]> {
        let key = std::fs::read(&self.files.key).ok()?;
        let mut h = Sha256::new();
        h.update(b"bsfg derived secret\0");
        h.update(purpose.as_bytes());
        h.update(b"\0");
        h.update(&key);
        Some(h.finalize().into())
    }
}

impl<C: Send + Sync> Reloadable for Tls<C> {
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let old = self.loaded().fingerprint;
        let endpoint = self.endpoint.as_str();
        let result = Material::fingerprint_now(&self.files).and_then(|now| {
            let seen = self.rejected.lock().ok().and_then(|r| *r);
            if now == old || seen == Some(now) {
                return Ok(None);
            }
            (self.build)(&self.files, &self.alpn, endpoint)
                .map(Some)
                .inspect_err(|_| {
                    if let Ok(mut r) = self.rejected.lock() {
                        *r = Some(now);
                    }
                })
        });
        match result {
            Ok(None) => Ok(false),
            Ok(Some(loaded)) => {
                let expiry = loaded.expiries.first().map(|e| e.not_after_unix);
                let loaded = Arc::new(loaded);
                match self.current.write() {
                    Ok(mut g) => *g = loaded.clone(),
                    Err(p) => *p.into_inner() = loaded.clone(),
                }
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(endpoint, cert_not_after_unix = ?expiry, "TLS certificates reloaded; new connections use them");
                self.revoke_untrusted(&loaded);
                Ok(true)
            }
            Err(e) => {
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(endpoint, error = %e, "changed TLS files rejected; the previous certificates stay in use");
                Err(e)
            }
        }
    }
    fn endpoint(&self) -> &str {
        &self.endpoint
    }
    fn expiries(&self) -> Vec<Expiry> {
        self.loaded().expiries.clone()
    }
}

fn build_server(
    files: &TlsFiles,
    alpn: &[Vec<u8>],
    endpoint: &str,
) -> Result<Loaded<rustls::ServerConfig>, TlsError> {
    let m = Material::load(files, false)?;
    let webpki = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(LoggingVerifier {
        inner: webpki.clone(),
        from: files.identity_from,
        endpoint: endpoint.to_owned(),
    });
    let recheck: Recheck = Box::new(move |p: &Presented| {
        let (leaf, rest) = p
            .chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        webpki
            .verify_client_cert(leaf, rest, UnixTime::now())
            .map(|_| ())
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain, m.key)?;
    config.alpn_protocols = alpn.to_vec();
    // 0-RTT stays off: early data could be replayed.
    config.max_early_data_size = 0;
    Ok(Loaded {
        config: Arc::new(config),
        anchors: m.anchors,
        fingerprint: m.fingerprint,
        expiries: m.expiries,
        recheck,
    })
}

fn build_client(
    files: &TlsFiles,
    alpn: &[Vec<u8>],
    _endpoint: &str,
) -> Result<Loaded<rustls::ClientConfig>, TlsError> {
    let m = Material::load(files, true)?;
    // Every anchor withdrawn: no server is trusted until one comes back.
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = if m.roots.is_empty() {
        Arc::new(RefuseAll)
    } else {
        rustls::client::WebPkiServerVerifier::builder_with_provider(m.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?
    };
    let webpki = verifier.clone();
    let recheck: Recheck = Box::new(move |p: &Presented| {
        let (leaf, rest) = p
            .chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let name = p
            .server_name
            .as_ref()
            .ok_or(rustls::Error::General("no server name".into()))?;
        webpki
            .verify_server_cert(leaf, rest, name, &[], UnixTime::now())
            .map(|_| ())
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(m.chain, m.key)?;
    config.alpn_protocols = alpn.to_vec();
    config.enable_early_data = false;
    Ok(Loaded {
        config: Arc::new(config),
        anchors: m.anchors,
        fingerprint: m.fingerprint,
        expiries: m.expiries,
        recheck,
    })
}

impl Tls<rustls::ServerConfig> {
    /// Loads `files` for the listener `endpoint`, offering `alpn`.
    pub fn new(
        files: TlsFiles,
        alpn: Vec<Vec<u8>>,
        endpoint: impl Into<String>,
        stats: Arc<TlsStats>,
    ) -> Result<Arc<ServerTls>, TlsError> {
        Self::load(files, alpn, endpoint.into(), stats, build_server)
    }

    /// The authenticated identity of a completed handshake's peer.
    pub fn identify(&self, peer_certs: Option<&[CertificateDer<'_>]>) -> Option<PeerIdentity> {
        let leaf = peer_certs?.first()?;
        let identity = identity_of(leaf, self.files.identity_from)?;
        let anchor = issuing_anchor(leaf, &self.loaded().anchors);
        Some(PeerIdentity { identity, anchor })
    }
}

impl Tls<rustls::ClientConfig> {
    /// Loads `files` for the client `endpoint` (e.g. the link's name).
    pub fn new(
        files: TlsFiles,
        alpn: Vec<Vec<u8>>,
        endpoint: impl Into<String>,
        stats: Arc<TlsStats>,
    ) -> Result<Arc<ClientTls>, TlsError> {
        Self::load(files, alpn, endpoint.into(), stats, build_client)
    }

    /// Dials `addr` over TCP (no Nagle delay) and completes a TLS 1.3 handshake that
    /// verifies the server as `server_name` (a DNS name or an IP address). The
    /// connection is registered with this endpoint while the stream lives, and closed
    /// when a reload leaves the server untrusted.
    pub async fn connect(
        &self,
        addr: &str,
        server_name: &str,
    ) -> std::io::Result<Tracked<tokio_rustls::client::TlsStream<TcpStream>>> {
        let name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                TlsError::ServerName(server_name.to_owned()),
            )
        })?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let closer = tcp_closer(&tcp);
        let r = tokio_rustls::TlsConnector::from(self.config())
            .connect(name.clone(), tcp)
            .await;
        let stream = match r {
            Ok(s) => s,
            Err(e) => {
                let reason = failure_reason(&e);
                self.stats.handshake_failed(&self.endpoint, reason);
                tracing::warn!(endpoint = %self.endpoint, %addr, server_name, reason, error = %e, "TLS handshake with the server failed");
                return Err(e);
            }
        };
        let guard = closer.and_then(|close| {
            let chain = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let presented = Presented {
                chain,
                server_name: Some(name),
                identity: None,
            };
            self.admit(presented, close, None).ok()
        });
        Ok(Tracked::new(stream, guard))
    }
}

/// The `host:port` a transport URL (`scheme://host:port`) dials, and the host alone
/// (IPv6 brackets removed): the name a server's certificate must carry unless a
/// link says otherwise. `None` when the URL has no port.
pub fn dial_target(url: &str) -> Option<(String, String)> {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .trim_end_matches('/');
    let (host, _) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((rest.to_owned(), host.to_owned()))
}

/// Checks every endpoint's files every `interval` until `stop` turns true. A rejected
/// change is logged and counted by the endpoint and retried on the next tick (when the
/// operator finishes replacing the files, it loads).
pub async fn watch(
    endpoints: Vec<Arc<dyn Reloadable>>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for e in &endpoints {
            let _ = e.reload_if_changed();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca(zone: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, format!("{zone} zone CA"));
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    fn leaf(ca: &Ca, cn: &str, dns: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = vec![SanType::DnsName(dns.try_into().unwrap())];
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn identity_comes_from_the_first_dns_name_or_the_common_name_and_its_issuing_anchor() {
        let plant = ca("plant");
        let idmz = ca("idmz");
        let (pem, _) = leaf(&idmz, "idmz common name", "idmz-bsfg");
        let cert = der(&pem);
        assert_eq!(
            identity_of(&cert, IdentityFrom::San).as_deref(),
            Some("idmz-bsfg")
        );
        assert_eq!(
            identity_of(&cert, IdentityFrom::Cn).as_deref(),
            Some("idmz common name")
        );
        let anchors = vec![
            ("plant".to_owned(), der(&plant.pem)),
            ("idmz".to_owned(), der(&idmz.pem)),
        ];
        assert_eq!(issuing_anchor(&cert, &anchors).as_deref(), Some("idmz"));
        assert_eq!(issuing_anchor(&cert, &anchors[..1]), None);
    }

    #[test]
    fn a_rejected_reload_keeps_the_old_certificates_and_a_good_one_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let zone = ca("plant");
        let (cert, key) = leaf(&zone, "plant-bsfg", "plant-bsfg");
        let files = TlsFiles {
            cert: dir.path().join("gw.pem"),
            key: dir.path().join("gw.key"),
            trust: vec![Anchor {
                name: "plant".into(),
                path: dir.path().join("ca.pem"),
            }],
            identity_from: IdentityFrom::San,
        };
        std::fs::write(&files.cert, &cert).unwrap();
        std::fs::write(&files.key, &key).unwrap();
        std::fs::write(&files.trust[0].path, &zone.pem).unwrap();
        let stats = Arc::new(TlsStats::default());
        let tls = ServerTls::new(files.clone(), vec![], "test", stats.clone()).unwrap();
        let before = tls.config();
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed");

        // Half-way through a rotation: a new certificate beside the old key.
        let (cert2, key2) = leaf(&zone, "plant-bsfg", "plant-bsfg");
        std::fs::write(&files.cert, &cert2).unwrap();
        assert!(matches!(tls.reload_if_changed(), Err(TlsError::Config(_))));
        assert!(Arc::ptr_eq(&before, &tls.config()), "the old config stays");
        assert_eq!(stats.reload_failures(), 1);
        assert!(
            !tls.reload_if_changed().unwrap(),
            "the same bad files are not retried"
        );
        assert_eq!(stats.reload_failures(), 1);

        // The key arrives: the pair loads.
        std::fs::write(&files.key, &key2).unwrap();
        assert!(tls.reload_if_changed().unwrap());
        assert!(!Arc::ptr_eq(&before, &tls.config()));
        assert_eq!(stats.reloads(), 1);
        assert_eq!(tls.expiries().len(), 2);
    }

    /// Files of an endpoint with identity `name` from `own`, trusting `anchors`.
    fn files_in(dir: &Path, own: &Ca, name: &str, anchors: &[(&str, &Ca)]) -> TlsFiles {
        let (cert, key) = leaf(own, name, name);
        let files = TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            trust: anchors
                .iter()
                .map(|(a, _)| Anchor {
                    name: (*a).into(),
                    path: dir.join(format!("{name}-trusts-{a}.pem")),
                })
                .collect(),
            identity_from: IdentityFrom::San,
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        for (t, (_, ca)) in files.trust.iter().zip(anchors) {
            std::fs::write(&t.path, &ca.pem).unwrap();
        }
        files
    }

    /// Reads until the connection ends; true when it ended within 5 s.
    async fn ends(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> bool {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn a_reload_that_withdraws_an_anchor_closes_the_open_connections_of_its_peers() {
        let dir = tempfile::tempdir().unwrap();
        let (plant, idmz) = (ca("plant"), ca("idmz"));
        let server_files = files_in(
            dir.path(),
            &plant,
            "plant-bsfg",
            &[("plant", &plant), ("idmz", &idmz)],
        );
        let client_files = files_in(
            dir.path(),
            &idmz,
            "idmz-bsfg",
            &[("plant", &plant), ("idmz", &idmz)],
        );
        let stats = Arc::new(TlsStats::default());
        let server =
            ServerTls::new(server_files.clone(), vec![], "listener", stats.clone()).unwrap();
        let client = ClientTls::new(client_files.clone(), vec![], "link", stats.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut accepted = accept(listener, server.clone(), Duration::from_secs(5), 4, 2);

        // Server side: the idmz anchor is withdrawn; idmz's open connection closes.
        let mut c1 = client.connect(&addr, "plant-bsfg").await.unwrap();
        let a1 = accepted.recv().await.unwrap();
        assert_eq!(a1.peer.identity, "idmz-bsfg");
        assert_eq!(server.open_connections(), 1);
        std::fs::write(&server_files.trust[1].path, "").unwrap();
        assert!(server.reload_if_changed().unwrap());
        assert!(
            ends(&mut c1).await,
            "the server closed the revoked peer's connection"
        );
        assert_eq!(stats.revoked().get("listener"), Some(&1));
        drop(a1);
        assert_eq!(
            server.open_connections(),
            0,
            "a closed connection is forgotten"
        );
        // A new handshake from that CA is refused.
        let mut refused = client.connect(&addr, "plant-bsfg").await.unwrap();
        assert!(
            ends(&mut refused).await,
            "the handshake fails on the server"
        );
        // Put back: served again.
        std::fs::write(&server_files.trust[1].path, &idmz.pem).unwrap();
        assert!(server.reload_if_changed().unwrap());
        let _c2 = client.connect(&addr, "plant-bsfg").await.unwrap();
        let a2 = accepted.recv().await.unwrap();

        // The cap: two connections per identity, a third is refused.
        let _c3 = client.connect(&addr, "plant-bsfg").await.unwrap();
        let _a3 = accepted.recv().await.unwrap();
        let mut c4 = client.connect(&addr, "plant-bsfg").await.unwrap();
        assert!(
            ends(&mut c4).await,
            "a third connection of one identity is refused"
        );
        assert!(
            stats
                .handshake_failures()
                .contains_key(&("listener".to_owned(), "too_many_connections"))
        );

        // Client side: the link withdraws the plant anchor; its connections close.
        drop((c1, refused, c4));
        assert_eq!(
            client.open_connections(),
            2,
            "the client's live connections"
        );
        std::fs::write(&client_files.trust[0].path, "\n").unwrap();
        assert!(client.reload_if_changed().unwrap());
        let mut a2 = a2.stream;
        assert!(
            ends(&mut a2).await,
            "the client closed its connection to the revoked server"
        );
        assert_eq!(stats.revoked().get("link"), Some(&2));
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("gw.pem"),
            key: dir.path().join("gw.key"),
            trust: vec![Anchor {
                name: "plant".into(),
                path: dir.path().join("ca.pem"),
            }],
            identity_from: IdentityFrom::San,
        };
        let e = check(&files).unwrap_err();
        assert!(
            matches!(&e, TlsError::Read { path, .. } if path.ends_with("gw.pem")),
            "{e}"
        );
        std::fs::write(&files.cert, "not a certificate").unwrap();
        std::fs::write(&files.key, "nor a key").unwrap();
        let e = check(&files).unwrap_err();
        assert!(e.to_string().contains("gw.pem"), "{e}");
    }

    #[test]
    fn handshake_failures_have_stable_reasons() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            failure_reason(&io(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))),
            "unknown_ca"
        );
        assert_eq!(
            failure_reason(&io(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
            ))),
            "expired_certificate"
        );
        assert_eq!(
            failure_reason(&io(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))),
            "not_tls"
        );
        assert_eq!(
            failure_reason(&std::io::Error::new(std::io::ErrorKind::TimedOut, "slow")),
            "handshake_timeout"
        );
    }
}
