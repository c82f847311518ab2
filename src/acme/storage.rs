//! What ACME keeps on disk, shared by every gangway instance that mounts the same storage.
//!
//! ```text
//! <storage>/acme/<directory>/account.json        account key and URL (0600)
//! <storage>/acme/<directory>/certs/<name>/certificate.pem   chain, then its key (0600)
//! <storage>/acme/<directory>/certs/<name>/status.json       schedule and last error
//! <storage>/acme/<directory>/certs/<name>/order.lock        lease: who is ordering now
//! <storage>/acme/challenges/http-01/<token>      key authorization being validated
//! <storage>/acme/challenges/tls-alpn-01/<name>   SHA-256 of it, hex
//! ```
//!
//! `<directory>` is derived from the directory URL, so switching from staging to production
//! starts a fresh account and fresh certificates. `<name>` is the first name of the site.
//! Every file is written whole to a temporary file and renamed into place, so a reader
//! (another instance) never sees half a certificate, and a certificate and its key change
//! together.

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `<storage>/acme`.
pub fn acme_root(storage: &Path) -> PathBuf {
    storage.join("acme")
}

/// A file-system-safe folder name for a directory URL: `acme-v02.api.letsencrypt.org-directory`.
pub fn directory_slug(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let mut out = String::with_capacity(rest.len());
    for ch in rest.trim_end_matches('/').chars() {
        match ch {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' => out.push(ch.to_ascii_lowercase()),
            _ => {
                if !out.ends_with('-') {
                    out.push('-')
                }
            }
        }
    }
    let out = out.trim_matches(['-', '.']).to_owned();
    if out.is_empty() {
        "directory".to_owned()
    } else {
        out
    }
}

/// Is `name` safe as one path component (a host name as validated, or a challenge token)?
pub fn safe_component(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Creates `dir` (and parents) readable by the owner only.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes a file atomically, 0600, creating its folder. The temporary file has a unique
/// name: instances sharing storage may write the same file at the same time.
pub fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let parent = path.parent().unwrap_or(Path::new("."));
    create_private_dir(parent)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".{name}.{}-{:016x}.tmp",
        std::process::id(),
        fastrand::u64(..)
    ));
    let written = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Where one certificate lives.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub dir: PathBuf,
}

impl CertPaths {
    pub fn new(storage: &Path, directory_url: &str, first_name: &str) -> CertPaths {
        CertPaths {
            dir: acme_root(storage)
                .join(directory_slug(directory_url))
                .join("certs")
                .join(first_name),
        }
    }

    pub fn certificate(&self) -> PathBuf {
        self.dir.join("certificate.pem")
    }

    pub fn status(&self) -> PathBuf {
        self.dir.join("status.json")
    }

    pub fn lock(&self) -> PathBuf {
        self.dir.join("order.lock")
    }
}

/// What gangway needs to know about a certificate without parsing it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names in the subject alternative names, lower case.
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number, hex (what CAs and `openssl x509 -serial` show).
    pub serial: String,
    /// The issuer's distinguished name, e.g. `CN=R11, O=Let's Encrypt, C=US`.
    pub issuer: String,
    /// The RFC 9773 certificate identifier (`base64url(AKI).base64url(serial)`), when the
    /// certificate has an authority key identifier.
    pub ari_id: Option<instant_acme::CertificateIdentifier<'static>>,
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("cannot parse the certificate: {e}"))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(n) = name {
                    names.push(n.to_ascii_lowercase());
                }
            }
        }
        let validity = cert.validity();
        let serial = cert
            .raw_serial()
            .iter()
            .skip_while(|b| **b == 0)
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let ari_id = instant_acme::CertificateIdentifier::try_from(der)
            .ok()
            .map(|id| id.into_owned());
        Ok(CertInfo {
            names,
            not_before: from_unix(validity.not_before.timestamp()),
            not_after: from_unix(validity.not_after.timestamp()),
            serial: if serial.is_empty() {
                "00".into()
            } else {
                serial
            },
            issuer: cert.issuer().to_string(),
            ari_id,
        })
    }

    /// Does the certificate name every one of `names`?
    pub fn covers(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.names.contains(n))
    }
}

/// A certificate as stored: chain and key, ready to serve.
#[derive(Clone)]
pub struct StoredCert {
    pub certified: Arc<CertifiedKey>,
    pub info: CertInfo,
}

impl std::fmt::Debug for StoredCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCert")
            .field("info", &self.info)
            .finish()
    }
}

/// Builds a servable certificate from a PEM chain (leaf first) and a PEM key, checking that
/// they belong together.
pub fn certified_from_pem(
    provider: &CryptoProvider,
    chain_pem: &str,
    key_pem: &str,
) -> Result<StoredCert, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e:?}"))?;
    let Some(leaf) = chain.first() else {
        return Err("no certificate in the PEM".into());
    };
    let info = CertInfo::parse(leaf)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("bad private key PEM: {e:?}"))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .map_err(|e| format!("the key does not match the certificate: {e}"))?;
    Ok(StoredCert {
        certified: Arc::new(certified),
        info,
    })
}

/// Reads `certificate.pem` (chain then key). `Ok(None)` when there is none yet.
pub fn load_cert(
    provider: &CryptoProvider,
    paths: &CertPaths,
) -> Result<Option<StoredCert>, String> {
    let path = paths.certificate();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    certified_from_pem(provider, &text, &text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Stores a new certificate and its key in one atomic write.
pub fn save_cert(paths: &CertPaths, chain_pem: &str, key_pem: &str) -> io::Result<()> {
    let mut data = String::with_capacity(chain_pem.len() + key_pem.len() + 1);
    data.push_str(chain_pem.trim_end());
    data.push('\n');
    data.push_str(key_pem);
    write_file(&paths.certificate(), data.as_bytes())
}

/// The manager's view of one certificate, for `gangway certs` (times are Unix seconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub names: Vec<String>,
    /// When the current certificate is due for renewal.
    #[serde(default)]
    pub next_renewal: Option<i64>,
    /// Whether that time comes from the CA's renewal information (ARI).
    #[serde(default)]
    pub ari: bool,
    #[serde(default)]
    pub last_attempt: Option<i64>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Failed attempts in a row.
    #[serde(default)]
    pub failures: u32,
    /// When the next attempt is allowed after failures.
    #[serde(default)]
    pub next_attempt: Option<i64>,
    /// Orders attempted for these names from this storage (all instances together), the
    /// ones the CA refused included.
    #[serde(default)]
    pub orders: u64,
}

pub fn load_status(paths: &CertPaths) -> Option<Status> {
    let text = std::fs::read(paths.status()).ok()?;
    serde_json::from_slice(&text).ok()
}

pub fn save_status(paths: &CertPaths, status: &Status) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(status).map_err(io::Error::other)?;
    write_file(&paths.status(), &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_slugs_are_single_safe_components() {
        assert_eq!(
            directory_slug("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org-directory"
        );
        assert_eq!(
            directory_slug("https://127.0.0.1:14000/dir"),
            "127.0.0.1-14000-dir"
        );
        assert_eq!(directory_slug("https://../../etc"), "etc");
        for slug in [directory_slug("https://a/b/../c"), directory_slug("")] {
            assert!(safe_component(&slug), "{slug}");
        }
    }

    #[test]
    fn unsafe_components_are_refused() {
        for bad in ["", "..", ".hidden", "a/b", "a\\b", "x y", "a%2f"] {
            assert!(!safe_component(bad), "{bad}");
        }
        assert!(safe_component("app.example.com"));
        assert!(safe_component(
            "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
        ));
    }

    #[test]
    fn status_round_trips_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CertPaths::new(dir.path(), "https://ca.example/dir", "a.example.com");
        let status = Status {
            names: vec!["a.example.com".into()],
            last_error: Some("refused".into()),
            failures: 2,
            ..Status::default()
        };
        save_status(&paths, &status).unwrap();
        assert_eq!(load_status(&paths), Some(status));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(paths.status())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(&paths.dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }
}
