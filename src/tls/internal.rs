//! gangway's own local certificate authority, for `tls: internal` (like Caddy's `tls internal`).
//!
//! The root (ECDSA P-256, ten years) is created once in `<storage>/ca/` and reused across
//! restarts; its key file is 0600. Leaf certificates (ECDSA P-256) are issued in memory for
//! each site's names at start and re-issued well before they expire. Users trust the root
//! printed by `gangway ca-cert`.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Lifetime of a leaf certificate; re-issued at half of it.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "gangway");
    dn.push(DnType::CommonName, "gangway local root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn rc(e: rcgen::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Writes `data` to `path` atomically, readable by the owner only.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        // A file that existed with wider permissions keeps them through open(): fix them.
        #[cfg(unix)]
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

impl LocalCa {
    pub fn dir(storage: &Path) -> PathBuf {
        storage.join("ca")
    }

    /// Loads the root from `<storage>/ca/`, creating it on first use.
    pub fn load_or_create(storage: &Path) -> io::Result<LocalCa> {
        let dir = Self::dir(storage);
        let cert_path = dir.join("root.crt");
        let key_path = dir.join("root.key");
        if cert_path.exists() && key_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path)?;
            let root_pem = std::fs::read_to_string(&cert_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(rc)?;
            let root_der = CertificateDer::from_pem_slice(root_pem.as_bytes())
                .map_err(|e| io::Error::other(format!("{}: {e:?}", cert_path.display())))?;
            // The issuer needs only the root's subject and key, both reproducible.
            let issuer = Issuer::new(ca_params(), key);
            return Ok(LocalCa {
                issuer,
                root_der,
                root_pem,
            });
        }
        std::fs::create_dir_all(&dir)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let mut params = ca_params();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let root = params.self_signed(&key).map_err(rc)?;
        let root_pem = root.pem();
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, root_pem.as_bytes())?;
        tracing::info!(path = %cert_path.display(), "created the local root CA (trust it with `gangway ca-cert`)");
        Ok(LocalCa {
            issuer: Issuer::new(ca_params(), key),
            root_der: root.der().clone(),
            root_pem,
        })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issues a leaf for `names` (DNS names, `*.wildcards` or IP addresses); the chain sent
    /// to clients is leaf + root.
    pub fn issue(
        &self,
        provider: &CryptoProvider,
        names: &[String],
    ) -> io::Result<Arc<CertifiedKey>> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("gangway"),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.trim_matches(['[', ']']).parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(rc),
            })
            .collect::<io::Result<_>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::seconds(LEAF_LIFETIME.as_secs() as i64);
        let cert = params.signed_by(&key, &self.issuer).map_err(rc)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.root_der.clone()],
            signing_key,
        )))
    }
}

use rustls_pki_types::pem::PemObject;
