//! `bsfg certs`: a zone's certificate authority and the certificates it issues to
//! gateways and clients, so examples and demos can run with mutual TLS.
//!
//! - `bsfg certs init --zone Z --dir D` makes `D/ca.pem` and `D/ca.key` (ECDSA P-256,
//!   CA:true, path length 0, key usages certSign and cRLSign).
//! - `bsfg certs issue --dir D --name N [--server] [--client] [--dns H] [--ip A]`
//!   makes `D/N.pem` and `D/N.key`, signed by the zone CA. The identity `N` (for
//!   example `plant-a-bsfg`) is the certificate's common name and its first DNS
//!   subject alternative name; servers add the names clients dial.
//!
//! Private keys are written with mode 0600; nothing is overwritten without `--force`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Options of `bsfg certs init`.
#[derive(Debug, clap::Args)]
pub struct Init {
    /// The zone whose CA this is.
    #[arg(long)]
    pub zone: String,
    /// Directory for `ca.pem` and `ca.key`.
    #[arg(long, default_value = "certs")]
    pub dir: PathBuf,
    /// Validity of the CA certificate.
    #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
    pub valid_for: Duration,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

/// Options of `bsfg certs issue`.
#[derive(Debug, clap::Args)]
pub struct Issue {
    /// Directory holding the zone CA (`ca.pem`, `ca.key`); the new files go there too.
    #[arg(long, default_value = "certs")]
    pub dir: PathBuf,
    /// The identity, e.g. `plant-a-bsfg`: common name and first DNS name.
    #[arg(long)]
    pub name: String,
    /// For a gateway's listener (extended key usage serverAuth).
    #[arg(long)]
    pub server: bool,
    /// For a client or a peer gateway's link (extended key usage clientAuth).
    #[arg(long)]
    pub client: bool,
    /// Further DNS names clients dial (servers).
    #[arg(long)]
    pub dns: Vec<String>,
    /// IP addresses clients dial (servers).
    #[arg(long)]
    pub ip: Vec<IpAddr>,
    /// Validity.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub valid_for: Duration,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

/// `bsfg certs admin-token`: a new admin credential.
#[derive(clap::Args, Debug)]
pub struct AdminTokenArgs {
    /// The file to write (mode 0600); name it in `[admin] token_file`.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

/// `bsfg certs admin-token`: 32 bytes of the operating system's randomness, as 64 hex
/// digits, in a file only its owner can read.
pub fn admin_token(o: &AdminTokenArgs) -> anyhow::Result<Vec<PathBuf>> {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .context("reading the operating system's randomness")?;
    if let Some(dir) = o.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write(&o.out, &format!("{}\n", hex::encode(bytes)), true, o.force)?;
    Ok(vec![o.out.clone()])
}

fn write(path: &Path, contents: &str, private: bool, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        anyhow::bail!("{} exists; pass --force to replace it", path.display());
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    use std::io::Write as _;
    opts.open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

fn validity(params: &mut CertificateParams, valid_for: Duration) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    // A minute of slack for clocks that differ a little between zones.
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::try_from(valid_for).context("validity is too long")?;
    Ok(())
}

fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    bsfg_core::names::validate_zone(what, name).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `bsfg certs init`.
pub fn init(o: &Init) -> anyhow::Result<Vec<PathBuf>> {
    check_name("zone", &o.zone)?;
    std::fs::create_dir_all(&o.dir).with_context(|| format!("creating {}", o.dir.display()))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{} zone CA", o.zone));
    params
        .distinguished_name
        .push(DnType::OrganizationName, format!("BSFG zone {}", o.zone));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, o.valid_for)?;
    let cert = params.self_signed(&key)?;
    let (cert_path, key_path) = (o.dir.join("ca.pem"), o.dir.join("ca.key"));
    write(&key_path, &key.serialize_pem(), true, o.force)?;
    write(&cert_path, &cert.pem(), false, o.force)?;
    Ok(vec![cert_path, key_path])
}

/// `bsfg certs issue`.
pub fn issue(o: &Issue) -> anyhow::Result<Vec<PathBuf>> {
    check_name("name", &o.name)?;
    anyhow::ensure!(
        o.server || o.client,
        "say what the certificate is for: --server, --client or both"
    );
    let read = |f: &str| {
        let p = o.dir.join(f);
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (make the zone CA first: bsfg certs init)",
                p.display()
            )
        })
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?).context("ca.key is not a private key")?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key)
        .context("ca.pem is not a certificate")?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, o.name.clone());
    let mut sans = vec![SanType::DnsName(o.name.clone().try_into()?)];
    for d in &o.dns {
        sans.push(SanType::DnsName(
            d.clone()
                .try_into()
                .with_context(|| format!("--dns {d} is not a DNS name"))?,
        ));
    }
    sans.extend(o.ip.iter().copied().map(SanType::IpAddress));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if o.server {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if o.client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    validity(&mut params, o.valid_for)?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (
        o.dir.join(format!("{}.pem", o.name)),
        o.dir.join(format!("{}.key", o.name)),
    );
    write(&key_path, &key.serialize_pem(), true, o.force)?;
    write(&cert_path, &cert.pem(), false, o.force)?;
    Ok(vec![cert_path, key_path])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue_opts(dir: &Path, name: &str) -> Issue {
        Issue {
            dir: dir.to_path_buf(),
            name: name.into(),
            server: true,
            client: true,
            dns: vec!["gw.plant-a.example".into()],
            ip: vec!["127.0.0.1".parse().expect("ip")],
            valid_for: Duration::from_secs(86_400),
            force: false,
        }
    }

    #[test]
    fn init_then_issue_makes_a_ca_and_a_leaf_with_the_identity_and_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let init_opts = Init {
            zone: "plant-a".into(),
            dir: dir.path().to_path_buf(),
            valid_for: Duration::from_secs(3650 * 86_400),
            force: false,
        };
        init(&init_opts).expect("init");
        issue(&issue_opts(dir.path(), "plant-a-bsfg")).expect("issue");

        let ca_pem = std::fs::read(dir.path().join("ca.pem")).expect("ca.pem");
        let leaf_pem = std::fs::read(dir.path().join("plant-a-bsfg.pem")).expect("leaf");
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(&ca_pem).expect("pem");
        let ca = ca_pem.parse_x509().expect("ca cert");
        let (_, leaf_pem) = x509_parser::pem::parse_x509_pem(&leaf_pem).expect("pem");
        let leaf = leaf_pem.parse_x509().expect("leaf cert");
        assert!(ca.is_ca());
        assert!(!leaf.is_ca());
        // The leaf is signed by the zone CA, and the CA by itself.
        leaf.verify_signature(Some(ca.public_key()))
            .expect("signed by the CA");
        ca.verify_signature(None).expect("self-signed");
        assert_eq!(leaf.issuer(), ca.subject());
        let cn: Vec<_> = leaf
            .subject()
            .iter_common_name()
            .filter_map(|c| c.as_str().ok())
            .collect();
        assert_eq!(cn, ["plant-a-bsfg"]);
        let sans = leaf
            .subject_alternative_name()
            .expect("san")
            .expect("present")
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect::<Vec<_>>();
        assert_eq!(sans.len(), 3, "{sans:?}");
        assert!(
            sans[0].contains("plant-a-bsfg") && sans[1].contains("gw.plant-a.example"),
            "{sans:?}"
        );
        let eku = leaf
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(leaf.validity().is_valid());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for k in ["ca.key", "plant-a-bsfg.key"] {
                let mode = std::fs::metadata(dir.path().join(k))
                    .expect("key")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{k}");
            }
        }
        // Nothing is overwritten silently.
        let again = init(&init_opts).expect_err("must refuse");
        assert!(again.to_string().contains("--force"), "{again}");
        let again = issue(&issue_opts(dir.path(), "plant-a-bsfg")).expect_err("must refuse");
        assert!(again.to_string().contains("--force"), "{again}");
    }

    #[test]
    fn issue_without_a_ca_or_a_purpose_says_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = issue(&issue_opts(dir.path(), "x-bsfg")).expect_err("no CA");
        assert!(format!("{e:#}").contains("bsfg certs init"), "{e:#}");
        let mut o = issue_opts(dir.path(), "x-bsfg");
        (o.server, o.client) = (false, false);
        let e = issue(&o).expect_err("no purpose");
        assert!(e.to_string().contains("--server, --client"), "{e}");
    }
}
