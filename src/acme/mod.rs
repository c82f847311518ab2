//! Automatic certificates over ACME (RFC 8555) for `tls: acme` sites.
//!
//! Each acme site has one certificate for all its names, kept in an empty-at-first
//! [`CertSlot`] that the [`Manager`] fills from storage at start and swaps on renewal; open
//! connections keep the certificate they started with. The manager is one task that works
//! through the certificates in order of due time:
//!
//! 1. Load what storage has (another instance may have renewed it).
//! 2. Ask the CA when to renew (ARI, RFC 9773) when it offers that, else renew at two
//!    thirds of the lifetime ([`renew`]).
//! 3. When due, take the certificate's lease lock in storage ([`lock`]), look at storage
//!    again, and only then order ([`order`]): instances sharing storage place one order per
//!    certificate, and all pick up the result.
//! 4. Store the certificate and key (0600) before serving them; on failure record the error
//!    and back off ([`renew::backoff`]), in storage too, so a restart does not retry early.
//!
//! Challenge responses go through storage ([`challenge`]) so any instance can answer them:
//! HTTP-01 on the http listener (`proxy`), TLS-ALPN-01 on the https listener (`server`).

pub mod account;
pub mod challenge;
pub mod lock;
pub mod order;
pub mod renew;
pub mod storage;

pub use challenge::Challenges;

use crate::config::{AcmeChallenge, AcmeConfig, Config, TlsMode};
use crate::tls::CertSlot;
use account::CaClient;
use instant_acme::Account;
use rustls::crypto::CryptoProvider;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use storage::{CertPaths, Status, StoredCert, from_unix, unix};
use tokio_util::sync::CancellationToken;

/// How often a certificate whose lease another instance holds is looked at again.
const LEASE_POLL: Duration = Duration::from_secs(1);
/// When renewal information could not be fetched, ask again after this.
const ARI_RETRY: Duration = Duration::from_secs(3600);

/// One certificate to keep: a site's names and the slot its handshakes read.
pub struct Managed {
    pub names: Vec<String>,
    pub slot: CertSlot,
}

/// The names an acme site's certificate carries (config validation allows only exact names).
pub fn site_names(site: &crate::config::Site) -> Vec<String> {
    site.hosts
        .iter()
        .filter_map(|h| match h {
            crate::config::HostPattern::Exact(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

struct Entry {
    names: Vec<String>,
    slot: CertSlot,
    paths: CertPaths,
    current: Option<StoredCert>,
    status: Status,
    /// When the current certificate should be renewed.
    renew_at: SystemTime,
    /// When to ask the CA for renewal information again (`None`: the CA has no ARI, or
    /// there is no certificate to ask about).
    ari_check: Option<SystemTime>,
    /// When to look at this certificate next.
    due: SystemTime,
}

impl Entry {
    fn expired(&self) -> bool {
        self.current
            .as_ref()
            .is_none_or(|c| c.info.not_after <= SystemTime::now())
    }

    /// Adopts `cert` (from storage or fresh from the CA) and serves it.
    fn adopt(&mut self, cert: StoredCert) {
        self.slot.store(Some(Arc::clone(&cert.certified)));
        self.renew_at = renew::two_thirds(cert.info.not_before, cert.info.not_after);
        self.ari_check = cert.info.ari_id.as_ref().map(|_| SystemTime::now());
        self.status.ari = false;
        self.current = Some(cert);
    }

    fn needs_order(&self) -> bool {
        match &self.current {
            None => true,
            Some(c) => !c.info.covers(&self.names) || self.renew_at <= SystemTime::now(),
        }
    }

    fn reschedule(&mut self) {
        let now = SystemTime::now();
        let mut due = if self.current.is_none() {
            now
        } else {
            self.renew_at
        };
        if let Some(at) = self.status.next_attempt.map(from_unix) {
            due = due.max(at);
        }
        if let Some(at) = self.ari_check {
            due = due.min(at);
        }
        self.due = due;
        self.status.next_renewal = self.current.as_ref().map(|_| unix(self.renew_at));
    }

    fn save_status(&self) {
        if let Err(e) = storage::save_status(&self.paths, &self.status) {
            tracing::warn!(names = ?self.names, error = %e, "cannot write the ACME status file");
        }
    }
}

/// Keeps every acme site's certificate issued and renewed.
pub struct Manager {
    cfg: AcmeConfig,
    provider: Arc<CryptoProvider>,
    challenges: Arc<Challenges>,
    client: Option<CaClient>,
    account: Option<Account>,
    /// The CA has no renewal information endpoint (learnt on first use).
    no_ari: bool,
    owner: String,
    entries: Vec<Entry>,
}

impl Manager {
    /// Loads the stored certificates into their slots at once, so a restart serves them
    /// before anything talks to the CA.
    pub fn new(
        cfg: AcmeConfig,
        managed: Vec<Managed>,
        challenges: Arc<Challenges>,
        provider: Arc<CryptoProvider>,
    ) -> Manager {
        let entries = managed
            .into_iter()
            .filter(|m| !m.names.is_empty())
            .map(|m| {
                let paths = CertPaths::new(&cfg.storage, &cfg.directory, &m.names[0]);
                let status = storage::load_status(&paths).unwrap_or_default();
                let mut entry = Entry {
                    status: Status {
                        names: m.names.clone(),
                        ..status
                    },
                    names: m.names,
                    slot: m.slot,
                    paths,
                    current: None,
                    renew_at: SystemTime::now(),
                    ari_check: None,
                    due: SystemTime::now(),
                };
                match storage::load_cert(&provider, &entry.paths) {
                    Ok(Some(cert)) if cert.info.not_after > SystemTime::now() => {
                        tracing::info!(names = ?entry.names, expires = %httpdate::fmt_http_date(cert.info.not_after), "ACME certificate loaded from storage");
                        entry.adopt(cert);
                    }
                    Ok(Some(_)) => {
                        tracing::warn!(names = ?entry.names, "the stored certificate has expired")
                    }
                    Ok(None) => {
                        tracing::info!(names = ?entry.names, "no certificate yet; waiting for one from the CA")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot use the stored certificate"),
                }
                entry.reschedule();
                entry.save_status();
                entry
            })
            .collect();
        Manager {
            cfg,
            provider,
            challenges,
            client: None,
            account: None,
            no_ari: false,
            owner: lock::new_owner_id(),
            entries,
        }
    }

    /// Works until `stop`: each certificate when it is due.
    pub async fn run(mut self, stop: CancellationToken) {
        if self.entries.is_empty() {
            return;
        }
        loop {
            let Some(next) = self.entries.iter().map(|e| e.due).min() else {
                return;
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(renew::until(next)) => {}
            }
            for i in 0..self.entries.len() {
                if self.entries[i].due > SystemTime::now() {
                    continue;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.work(i) => {}
                }
            }
        }
    }

    fn client(&mut self) -> Result<CaClient, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = CaClient::new(&self.provider, self.cfg.directory_ca.as_deref())?;
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn account(&mut self) -> Result<Account, String> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let client = self.client()?;
        let a = account::load_or_create(&self.cfg, &client, &self.owner).await?;
        self.account = Some(a.clone());
        Ok(a)
    }

    async fn work(&mut self, i: usize) {
        let now = SystemTime::now();
        // Storage first: another instance may have renewed or failed meanwhile.
        self.refresh_from_storage(i);
        if self.entries[i].ari_check.is_some_and(|t| t <= now) {
            self.check_ari(i).await;
        }
        let entry = &mut self.entries[i];
        if !entry.needs_order()
            || entry
                .status
                .next_attempt
                .is_some_and(|t| from_unix(t) > now)
        {
            entry.reschedule();
            entry.save_status();
            return;
        }
        let mut lease = match lock::try_acquire(&entry.paths.lock(), &self.owner, lock::LEASE) {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                tracing::debug!(names = ?entry.names, "another instance is ordering this certificate");
                entry.due = now + LEASE_POLL;
                return;
            }
            Err(e) => {
                tracing::error!(names = ?entry.names, error = %e, "cannot take the order lock");
                entry.due = now + LEASE_POLL * 10;
                return;
            }
        };
        lease.keep_alive();
        // Under the lock, look once more: the previous holder may have just finished.
        self.refresh_from_storage(i);
        let entry = &mut self.entries[i];
        if !entry.needs_order()
            || entry
                .status
                .next_attempt
                .is_some_and(|t| from_unix(t) > now)
        {
            entry.reschedule();
            entry.save_status();
            return;
        }
        self.order(i).await;
        drop(lease);
    }

    /// Adopts a certificate another instance stored, and its failure record.
    fn refresh_from_storage(&mut self, i: usize) {
        let entry = &mut self.entries[i];
        if let Some(status) = storage::load_status(&entry.paths) {
            entry.status.failures = status.failures;
            entry.status.next_attempt = status.next_attempt;
            entry.status.last_error = status.last_error;
            entry.status.last_attempt = status.last_attempt;
            entry.status.orders = status.orders;
        }
        match storage::load_cert(&self.provider, &entry.paths) {
            Ok(Some(stored)) => {
                let newer = match &entry.current {
                    None => true,
                    Some(c) => {
                        stored.info.serial != c.info.serial
                            && stored.info.not_after > c.info.not_after
                    }
                };
                if newer && stored.info.not_after > SystemTime::now() {
                    tracing::info!(names = ?entry.names, serial = %stored.info.serial, "ACME certificate picked up from storage");
                    entry.adopt(stored);
                    entry.reschedule();
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the stored certificate"),
        }
    }

    /// Asks the CA when to renew (ARI). Without ARI at this CA, two thirds of the lifetime.
    async fn check_ari(&mut self, i: usize) {
        let now = SystemTime::now();
        if self.no_ari || !account::account_path(&self.cfg).exists() {
            // Never register an account only to ask about renewal.
            self.entries[i].ari_check = None;
            return;
        }
        let account = match self.account().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the CA for renewal information");
                self.entries[i].ari_check = Some(now + ARI_RETRY);
                return;
            }
        };
        let entry = &mut self.entries[i];
        let Some(id) = entry.current.as_ref().and_then(|c| c.info.ari_id.clone()) else {
            entry.ari_check = None;
            return;
        };
        match account.renewal_info(&id).await {
            Ok((info, retry)) => {
                let window = &info.suggested_window;
                let start = SystemTime::from(window.start);
                let end = SystemTime::from(window.end);
                // Keep the moment already drawn while the window stays the same.
                if !(entry.status.ari && entry.renew_at >= start && entry.renew_at <= end) {
                    entry.renew_at = renew::in_window(start, end);
                }
                entry.status.ari = true;
                entry.ari_check =
                    Some(now + retry.clamp(Duration::from_secs(60), Duration::from_secs(86400)));
                tracing::debug!(names = ?entry.names, renew_at = %httpdate::fmt_http_date(entry.renew_at), "renewal window from the CA");
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                tracing::info!(directory = %self.cfg.directory, "the CA offers no renewal information (ARI); renewing at two thirds of the lifetime");
                self.no_ari = true;
                entry.ari_check = None;
            }
            Err(e) => {
                tracing::warn!(names = ?entry.names, error = %e, "cannot fetch renewal information; trying again in an hour");
                entry.ari_check = Some(now + ARI_RETRY);
            }
        }
    }

    /// Orders a certificate (under the lease), stores it, serves it; or records the failure.
    async fn order(&mut self, i: usize) {
        let now = SystemTime::now();
        let result = self.try_order(i).await;
        let entry = &mut self.entries[i];
        entry.status.last_attempt = Some(unix(now));
        match result {
            Ok(cert) => {
                tracing::info!(names = ?entry.names, serial = %cert.info.serial, expires = %httpdate::fmt_http_date(cert.info.not_after), "ACME certificate issued");
                entry.adopt(cert);
                entry.status.failures = 0;
                entry.status.last_error = None;
                entry.status.next_attempt = None;
            }
            Err((message, retry_after)) => {
                entry.status.failures += 1;
                let wait = renew::backoff(entry.status.failures, retry_after);
                entry.status.last_error = Some(message.clone());
                entry.status.next_attempt = Some(unix(now + wait));
                let serving = if entry.expired() {
                    "handshakes for these names fail until one is issued"
                } else {
                    "still serving the current certificate"
                };
                tracing::error!(
                    names = ?entry.names,
                    error = %message,
                    failures = entry.status.failures,
                    retry_in = ?Duration::from_secs(wait.as_secs()),
                    "ACME order failed; {serving}"
                );
            }
        }
        entry.reschedule();
        entry.save_status();
    }

    async fn try_order(&mut self, i: usize) -> Result<StoredCert, (String, Option<Duration>)> {
        let client = self.client().map_err(|e| (e, None))?;
        let _ = client.take_retry_after();
        let fail = |e: String| (e, client.take_retry_after());
        let account = self.account().await.map_err(fail)?;
        let entry = &self.entries[i];
        let names = entry.names.clone();
        let paths = entry.paths.clone();
        let mut replaces = if self.no_ari {
            None
        } else {
            entry.current.as_ref().and_then(|c| c.info.ari_id.clone())
        };
        let first = self.cfg.challenge;
        let other = match first {
            AcmeChallenge::TlsAlpn01 => AcmeChallenge::Http01,
            AcmeChallenge::Http01 => AcmeChallenge::TlsAlpn01,
        };
        let mut challenge = first;
        let mut attempts = 0;
        let issued = loop {
            attempts += 1;
            self.entries[i].status.orders += 1;
            match order::issue(
                &account,
                &names,
                challenge,
                &self.challenges,
                replaces.clone(),
            )
            .await
            {
                Ok(issued) => break issued,
                Err(e) if e.replaces_refused && replaces.is_some() && attempts < 3 => {
                    tracing::info!(error = %e, "the CA refused `replaces`; ordering without it");
                    replaces = None;
                }
                Err(e) if e.challenge_failed && challenge == first && attempts < 3 => {
                    tracing::warn!(names = ?names, error = %e, "{} failed; trying {}", name_of(first), name_of(other));
                    challenge = other;
                }
                Err(e) => return Err(fail(e.message)),
            }
        };
        let cert = storage::certified_from_pem(&self.provider, &issued.chain_pem, &issued.key_pem)
            .map_err(|e| (format!("the CA sent an unusable certificate: {e}"), None))?;
        if !cert.info.covers(&names) {
            return Err((
                format!(
                    "the CA's certificate names {:?}, not all of {names:?}",
                    cert.info.names
                ),
                None,
            ));
        }
        // Stored before it is served: a crash now must not cost another order.
        storage::save_cert(&paths, &issued.chain_pem, &issued.key_pem)
            .map_err(|e| (format!("cannot store the certificate: {e}"), None))?;
        Ok(cert)
    }
}

fn name_of(c: AcmeChallenge) -> &'static str {
    match c {
        AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        AcmeChallenge::Http01 => "http-01",
    }
}

/// Starts the manager for `managed` (loading stored certificates now) and runs it until
/// `stop`.
pub fn spawn(
    cfg: AcmeConfig,
    managed: Vec<Managed>,
    challenges: Arc<Challenges>,
    provider: Arc<CryptoProvider>,
    stop: CancellationToken,
) {
    let manager = Manager::new(cfg, managed, challenges, provider);
    tokio::spawn(manager.run(stop));
}

/// One line of `gangway certs`.
#[derive(Debug, Clone)]
pub struct CertReport {
    pub names: Vec<String>,
    /// `valid`, `expired` or `waiting for certificate`.
    pub state: &'static str,
    pub issuer: Option<String>,
    pub serial: Option<String>,
    pub not_after: Option<SystemTime>,
    pub next_renewal: Option<SystemTime>,
    pub renewal_from_ari: bool,
    pub last_error: Option<String>,
    pub next_attempt: Option<SystemTime>,
}

/// What storage says about every acme site of `config` (read only; nothing is contacted).
pub fn report(config: &Config) -> Vec<CertReport> {
    let Some(cfg) = &config.acme else {
        return Vec::new();
    };
    let provider = crate::tls::provider();
    config
        .sites
        .iter()
        .filter(|s| matches!(s.tls, TlsMode::Acme))
        .map(site_names)
        .filter(|names| !names.is_empty())
        .map(|names| {
            let paths = CertPaths::new(&cfg.storage, &cfg.directory, &names[0]);
            let cert = storage::load_cert(&provider, &paths);
            let status = storage::load_status(&paths).unwrap_or_default();
            let (cert, read_error) = match cert {
                Ok(c) => (c, None),
                Err(e) => (None, Some(e)),
            };
            let state = match &cert {
                Some(c) if !c.info.covers(&names) => "waiting for certificate",
                Some(c) if c.info.not_after <= SystemTime::now() => "expired",
                Some(_) => "valid",
                None => "waiting for certificate",
            };
            let next_renewal = match &cert {
                Some(_) => status.next_renewal.map(from_unix),
                None => None,
            };
            CertReport {
                state,
                issuer: cert.as_ref().map(|c| c.info.issuer.clone()),
                serial: cert.as_ref().map(|c| c.info.serial.clone()),
                not_after: cert.as_ref().map(|c| c.info.not_after),
                next_renewal,
                renewal_from_ari: status.ari,
                last_error: read_error.or(status.last_error),
                next_attempt: status.next_attempt.map(from_unix),
                names,
            }
        })
        .collect()
}
