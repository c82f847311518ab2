//! Certificates from PEM files: loading, checking, and noticing when they change on disk.

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// Loads a PEM chain (leaf first) and its key (PKCS#8, SEC1 or PKCS#1), checks that they
/// belong together and that the leaf covers every name in `names`. The error names the file
/// and says what is wrong.
pub fn load(
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
    names: &[String],
) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| format!("{}: {}", cert_path.display(), pem_error(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {}", cert_path.display(), pem_error(e)))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE block found (expected a PEM certificate chain, leaf first)",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("{}: {}", key_path.display(), pem_error(e)))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unusable private key: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(format!(
                "{}: this key does not belong to the certificate in {}",
                key_path.display(),
                cert_path.display()
            ));
        }
        Err(e) => {
            return Err(format!(
                "{}: cannot check the key against the certificate: {e}",
                cert_path.display()
            ));
        }
    }
    let leaf = webpki::EndEntityCert::try_from(&certified.cert[0]).map_err(|e| {
        format!(
            "{}: cannot parse the leaf certificate: {e}",
            cert_path.display()
        )
    })?;
    for name in names {
        if !covers(&leaf, name) {
            return Err(format!(
                "{}: the certificate does not cover the site's host {name}",
                cert_path.display()
            ));
        }
    }
    Ok(Arc::new(certified))
}

/// Does the leaf certificate cover this site host (an exact name, an IP, or `*.suffix`)?
fn covers(leaf: &webpki::EndEntityCert<'_>, host: &str) -> bool {
    // For a wildcard site, a name one label below the suffix must be covered.
    let probe = match host.strip_prefix("*.") {
        Some(suffix) => format!("gangway-probe.{suffix}"),
        None => host.to_owned(),
    };
    match ServerName::try_from(probe.as_str()) {
        Ok(name) => leaf.verify_is_valid_for_subject_name(&name).is_ok(),
        Err(_) => false,
    }
}

fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read: {io}"),
        Error::NoItemsFound => "no PEM block of the expected kind found".to_owned(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// What identifies a file's content without reading it: size, modification time and inode.
/// An atomic rename (how Kubernetes and most tools replace files) changes the inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Option<(u64, SystemTime, u64)>);

impl Stamp {
    pub fn of(path: &Path) -> Stamp {
        Stamp(std::fs::metadata(path).ok().map(|m| {
            #[cfg(unix)]
            let ino = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let ino = 0;
            (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH), ino)
        }))
    }
}
