//! A throwaway zone CA and the certificates tests need for mutual TLS: written as PEM
//! files into a directory, exactly as a zone keeps them.

use std::path::{Path, PathBuf};

use bsfg_tls::{Anchor, IdentityFrom, TlsFiles};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("writing {0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// A zone CA whose certificate lives in `dir/<zone>-ca.pem`.
pub struct Pki {
    zone: String,
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

fn write(path: PathBuf, text: &str) -> Result<PathBuf, PkiError> {
    std::fs::write(&path, text).map_err(|e| PkiError::Io(path.clone(), e))?;
    Ok(path)
}

impl Pki {
    /// Makes the CA of `zone` and writes its certificate into `dir`.
    pub fn new(dir: &Path, zone: &str) -> Result<Pki, PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, format!("{zone} zone CA"));
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = p.self_signed(&key)?;
        write(dir.join(format!("{zone}-ca.pem")), &cert.pem())?;
        Ok(Pki {
            zone: zone.to_owned(),
            dir: dir.to_owned(),
            issuer: Issuer::new(p, key),
        })
    }

    /// The zone's name (the anchor name in [`Pki::files`]).
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Path of the CA certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.zone))
    }

    /// Issues a certificate for `name` (CN and DNS SAN; usable by a server and a
    /// client) and returns its certificate and key paths.
    pub fn issue(&self, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
        let cert = p.signed_by(&key, &self.issuer)?;
        let c = write(self.dir.join(format!("{name}.pem")), &cert.pem())?;
        let k = write(self.dir.join(format!("{name}.key")), &key.serialize_pem())?;
        Ok((c, k))
    }

    /// Issues `name` and returns its TLS files trusting the CAs of `trust` (each
    /// anchor named after its zone).
    pub fn files(&self, name: &str, trust: &[&Pki]) -> Result<TlsFiles, PkiError> {
        let (cert, key) = self.issue(name)?;
        Ok(TlsFiles {
            cert,
            key,
            trust: trust
                .iter()
                .map(|p| Anchor {
                    name: p.zone.clone(),
                    path: p.ca_path(),
                })
                .collect(),
            identity_from: IdentityFrom::San,
        })
    }
}
