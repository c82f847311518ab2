//! Challenge responses, published through storage so that every instance sharing it can
//! answer a validation, whichever instance placed the order.
//!
//! - HTTP-01 (RFC 8555 §8.3): `GET /.well-known/acme-challenge/<token>` on the http listener
//!   answers the key authorization.
//! - TLS-ALPN-01 (RFC 8737): a handshake offering only ALPN `acme-tls/1` for a name gets a
//!   self-signed certificate for that name carrying the SHA-256 of the key authorization in
//!   the critical `id-pe-acmeIdentifier` extension.

use super::storage::{acme_root, safe_component, write_file};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair, SanType};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The path prefix of HTTP-01 challenges.
pub const HTTP_PREFIX: &str = "/.well-known/acme-challenge/";
/// The ALPN protocol of TLS-ALPN-01 validation handshakes.
pub const ALPN: &[u8] = b"acme-tls/1";

/// Reads (and, for the manager, writes) challenge responses in `<storage>/acme/challenges/`.
pub struct Challenges {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    /// name → (digest hex, certificate): a validation may take several handshakes.
    alpn_certs: Mutex<HashMap<String, (String, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("dir", &self.dir)
            .finish()
    }
}

impl Challenges {
    pub fn new(storage: &Path, provider: Arc<CryptoProvider>) -> Challenges {
        Challenges {
            dir: acme_root(storage).join("challenges"),
            provider,
            alpn_certs: Mutex::new(HashMap::new()),
        }
    }

    fn http_path(&self, token: &str) -> Option<PathBuf> {
        safe_component(token).then(|| self.dir.join("http-01").join(token))
    }

    fn alpn_path(&self, name: &str) -> Option<PathBuf> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        safe_component(&name).then(|| self.dir.join("tls-alpn-01").join(name))
    }

    pub fn publish_http(&self, token: &str, key_authorization: &str) -> io::Result<()> {
        let path = self
            .http_path(token)
            .ok_or_else(|| io::Error::other(format!("unusable challenge token {token:?}")))?;
        write_file(&path, key_authorization.as_bytes())
    }

    pub fn remove_http(&self, token: &str) {
        if let Some(path) = self.http_path(token) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Publishes the TLS-ALPN-01 response for `name`: the SHA-256 digest of the key
    /// authorization.
    pub fn publish_alpn(&self, name: &str, digest: &[u8]) -> io::Result<()> {
        let path = self
            .alpn_path(name)
            .ok_or_else(|| io::Error::other(format!("unusable name {name:?}")))?;
        write_file(&path, hex(digest).as_bytes())
    }

    pub fn remove_alpn(&self, name: &str) {
        if let Some(path) = self.alpn_path(name) {
            let _ = std::fs::remove_file(path);
        }
        if let Ok(mut cache) = self.alpn_certs.lock() {
            cache.remove(&name.to_ascii_lowercase());
        }
    }

    /// The key authorization for an HTTP-01 token, if a validation for it is under way.
    pub async fn http_response(&self, token: &str) -> Option<String> {
        let path = self.http_path(token)?;
        tokio::fs::read_to_string(path).await.ok()
    }

    /// The RFC 8737 certificate for `name`, if a TLS-ALPN-01 validation for it is under way.
    pub async fn alpn_cert(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let path = self.alpn_path(name)?;
        let digest_hex = tokio::fs::read_to_string(path).await.ok()?;
        let digest_hex = digest_hex.trim();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(cache) = self.alpn_certs.lock()
            && let Some((d, cert)) = cache.get(&name)
            && d == digest_hex
        {
            return Some(Arc::clone(cert));
        }
        let digest = unhex(digest_hex)?;
        match alpn_certificate(&self.provider, &name, &digest) {
            Ok(cert) => {
                if let Ok(mut cache) = self.alpn_certs.lock() {
                    cache.insert(name, (digest_hex.to_owned(), Arc::clone(&cert)));
                }
                Some(cert)
            }
            Err(e) => {
                tracing::error!(name = %name, error = %e, "cannot make the TLS-ALPN-01 certificate");
                None
            }
        }
    }
}

/// A self-signed certificate for `name` with the acmeIdentifier extension (RFC 8737 §3).
pub fn alpn_certificate(
    provider: &CryptoProvider,
    name: &str,
    digest: &[u8],
) -> Result<Arc<CertifiedKey>, String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::DnsName(
        name.to_owned()
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?,
    )];
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn responses_are_shared_through_storage() {
        let dir = tempfile::tempdir().unwrap();
        let provider = crate::tls::provider();
        let writer = Challenges::new(dir.path(), Arc::clone(&provider));
        // Another instance on the same storage.
        let reader = Challenges::new(dir.path(), provider);
        writer.publish_http("tok_en-1", "tok_en-1.thumb").unwrap();
        assert_eq!(
            reader.http_response("tok_en-1").await.as_deref(),
            Some("tok_en-1.thumb")
        );
        assert_eq!(reader.http_response("../../etc/passwd").await, None);
        assert_eq!(reader.http_response("unknown").await, None);
        writer.remove_http("tok_en-1");
        assert_eq!(reader.http_response("tok_en-1").await, None);

        let digest = [7u8; 32];
        writer.publish_alpn("A.example.com", &digest).unwrap();
        let cert = reader.alpn_cert("a.example.com").await.expect("cert");
        let again = reader.alpn_cert("a.example.com.").await.expect("cached");
        assert!(Arc::ptr_eq(&cert, &again));
        assert!(reader.alpn_cert("b.example.com").await.is_none());
        // The certificate names the host and carries the digest in a critical extension.
        let (_, x509) = x509_parser::parse_x509_certificate(cert.cert[0].as_ref()).unwrap();
        let ext = x509
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        assert_eq!(&ext.value[2..], &digest);
        writer.remove_alpn("a.example.com");
        assert!(reader.alpn_cert("a.example.com").await.is_none());
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
