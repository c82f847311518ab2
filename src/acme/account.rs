//! Talking to the CA: the HTTPS client instant-acme uses, and the one account per directory.

use super::lock;
use super::storage::{acme_root, directory_slug, write_file};
use crate::config::AcmeConfig;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, BodyWrapper, BytesResponse, ExternalAccountKey, HttpClient,
    NewAccount,
};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The longest one request to the CA may take, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTPS to the CA: Mozilla's roots (built in, so it works in a FROM-scratch image) plus
/// `directory_ca`, a time limit per request, and the last `Retry-After` the CA sent with an
/// error, which instant-acme does not report.
#[derive(Clone)]
pub struct CaClient {
    client: HyperClient<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl CaClient {
    pub fn new(
        provider: &Arc<CryptoProvider>,
        extra_root: Option<&Path>,
    ) -> Result<CaClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_root {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e:?}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e:?}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::clone(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        Ok(CaClient {
            client: HyperClient::builder(TokioExecutor::new()).build(connector),
            retry_after: Arc::new(Mutex::new(None)),
        })
    }

    /// The `Retry-After` of the latest error response, cleared by reading it.
    pub fn take_retry_after(&self) -> Option<Duration> {
        let at = self.retry_after.lock().ok()?.take()?;
        Some(
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }
}

fn parse_retry_after(value: &http::HeaderValue) -> Option<SystemTime> {
    let text = value.to_str().ok()?.trim();
    match text.parse::<u64>() {
        Ok(secs) => Some(SystemTime::now() + Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(text).ok(),
    }
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let sent = self.client.request(req);
        let slot = Arc::clone(&self.retry_after);
        Box::pin(async move {
            let whole = async {
                let resp = sent
                    .await
                    .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
                let (parts, body) = resp.into_parts();
                let body = body
                    .collect()
                    .await
                    .map_err(|e| instant_acme::Error::Other(Box::new(e)))?
                    .to_bytes();
                Ok::<_, instant_acme::Error>(http::Response::from_parts(parts, Full::new(body)))
            };
            let resp = tokio::time::timeout(REQUEST_TIMEOUT, whole)
                .await
                .map_err(|_| {
                    instant_acme::Error::Other("the CA did not answer within 30 s".into())
                })??;
            if !resp.status().is_success()
                && let Some(at) = resp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(parse_retry_after)
                && let Ok(mut slot) = slot.lock()
            {
                *slot = Some(at);
            }
            Ok(BytesResponse::from(resp))
        })
    }
}

/// `<storage>/acme/<directory>/account.json`.
pub fn account_path(cfg: &AcmeConfig) -> PathBuf {
    acme_root(&cfg.storage)
        .join(directory_slug(&cfg.directory))
        .join("account.json")
}

/// The account for the configured directory: the stored one, or a new one registered and
/// stored (0600) before it is used. Instances starting together register only one, under
/// a lease lock.
pub async fn load_or_create(
    cfg: &AcmeConfig,
    client: &CaClient,
    owner: &str,
) -> Result<Account, String> {
    let path = account_path(cfg);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let _lease = loop {
        if let Some(account) = load(&path, client).await? {
            return Ok(account);
        }
        match lock::try_acquire(&path.with_extension("lock"), owner, lock::LEASE) {
            Ok(Some(lease)) => break lease,
            Ok(None) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(None) => return Err("another instance is registering the account".into()),
            Err(e) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
    };
    // Registered by another instance while we waited for the lock?
    if let Some(account) = load(&path, client).await? {
        return Ok(account);
    }
    let contact = cfg.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let eab = cfg
        .eab
        .as_ref()
        .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key));
    let (account, credentials) = Account::builder_with_http(Box::new(client.clone()))
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            eab.as_ref(),
        )
        .await
        .map_err(|e| format!("cannot register an account at {}: {e}", cfg.directory))?;
    let json = serde_json::to_vec_pretty(&credentials).map_err(|e| e.to_string())?;
    write_file(&path, &json).map_err(|e| format!("cannot store {}: {e}", path.display()))?;
    tracing::info!(directory = %cfg.directory, account = %account.id(), "ACME account registered");
    Ok(account)
}

async fn load(path: &Path, client: &CaClient) -> Result<Option<Account>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let credentials: AccountCredentials = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not an ACME account file: {e}", path.display()))?;
    let account = Account::builder_with_http(Box::new(client.clone()))
        .from_credentials(credentials)
        .await
        .map_err(|e| format!("cannot reach the ACME directory: {e}"))?;
    Ok(Some(account))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::now();
        let t = parse_retry_after(&http::HeaderValue::from_static("120")).unwrap();
        let d = t.duration_since(now).unwrap();
        assert!(d >= Duration::from_secs(119) && d <= Duration::from_secs(121));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(3600));
        let t = parse_retry_after(&http::HeaderValue::from_str(&date).unwrap()).unwrap();
        assert!(t.duration_since(now).unwrap() > Duration::from_secs(3500));
        assert!(parse_retry_after(&http::HeaderValue::from_static("soon")).is_none());
    }
}
