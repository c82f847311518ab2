//! TLS termination: which certificate answers a handshake, and keeping certificates fresh.
//!
//! Each TLS site has a [`CertSlot`]: the certificate it currently serves, swapped in place
//! when its files change on disk or its internal certificate is re-issued, so connections
//! are never interrupted. A [`CertStore`] maps names to slots (exact, then wildcard, then a
//! catch-all) and is built once per config.

pub mod files;
pub mod internal;

use crate::config::{Config, HostPattern, TlsMode};
use arc_swap::ArcSwapOption;
use internal::LocalCa;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The certificate one site serves now (empty while it has none yet).
pub type CertSlot = Arc<ArcSwapOption<CertifiedKey>>;

/// The crypto provider: aws-lc-rs, TLS 1.2 and 1.3, AES-128-GCM preferred (as fast as
/// AES-256 to negotiate but cheaper per byte). The server config makes this order win over
/// the client's.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        !name.contains("AES_128_GCM")
    });
    Arc::new(p)
}

/// Names to slots, built from a config.
#[derive(Default)]
pub struct CertStore {
    exact: HashMap<String, CertSlot>,
    /// `(".example.com", slot)`, longest first.
    suffix: Vec<(String, CertSlot)>,
    any: Option<CertSlot>,
}

impl CertStore {
    /// The certificate for a handshake: by SNI, or, for clients that send none (IP
    /// addresses), by the local address they connected to; then the catch-all site's.
    pub fn lookup(&self, sni: Option<&str>, local_ip: IpAddr) -> Option<Arc<CertifiedKey>> {
        let slot = match sni {
            Some(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                self.exact.get(&name).or_else(|| {
                    self.suffix
                        .iter()
                        .find(|(s, _)| name.ends_with(s.as_str()))
                        .map(|(_, slot)| slot)
                })
            }
            None => self
                .exact
                .get(&crate::config::canonical_ip(local_ip).to_string()),
        };
        slot.or(self.any.as_ref()).and_then(|s| s.load_full())
    }

    /// Is `name` served over TLS at all (used to explain a failed handshake)?
    pub fn knows(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.exact.contains_key(&name)
            || self.suffix.iter().any(|(s, _)| name.ends_with(s.as_str()))
            || self.any.is_some()
    }

    /// Every configured name with the expiry (unix seconds) of the certificate it serves
    /// now; `None` while it has none (an ACME site waiting for its certificate).
    pub fn certificates(&self) -> Vec<(String, Option<i64>)> {
        let expiry = |slot: &CertSlot| {
            slot.load_full().and_then(|ck| {
                let leaf = ck.cert.first()?;
                let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
                Some(cert.validity().not_after.timestamp())
            })
        };
        let mut out: Vec<(String, Option<i64>)> = self
            .exact
            .iter()
            .map(|(name, slot)| (name.clone(), expiry(slot)))
            .chain(
                self.suffix
                    .iter()
                    .map(|(suffix, slot)| (format!("*{suffix}"), expiry(slot))),
            )
            .chain(self.any.iter().map(|slot| ("*".to_owned(), expiry(slot))))
            .collect();
        out.sort();
        out
    }
}

/// A resolver that always answers with one certificate, for handshakes without SNI.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// A resolver over the store by SNI (the shared config's; no-SNI handshakes use [`Fixed`]).
struct BySni(Arc<CertStore>);

impl std::fmt::Debug for BySni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BySni")
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?;
        self.0.lookup(Some(sni), IpAddr::from([0, 0, 0, 0]))
    }
}

/// Everything the https listener needs.
pub struct Tls {
    pub store: Arc<CertStore>,
    pub config: Arc<ServerConfig>,
    watched: Vec<Watched>,
    /// ACME sites' (empty at first) slots, for the ACME manager.
    acme: Vec<crate::acme::Managed>,
    /// TLS-ALPN-01 responses, when the config has an `acme:` block.
    acme_challenges: Option<Arc<crate::acme::Challenges>>,
    /// The config for TLS-ALPN-01 validation handshakes (ALPN `acme-tls/1` only).
    acme_config: Arc<ServerConfig>,
}

enum Watched {
    Files {
        slot: CertSlot,
        cert: PathBuf,
        key: PathBuf,
        names: Vec<String>,
        stamps: (files::Stamp, files::Stamp),
    },
    Internal {
        slot: CertSlot,
        names: Vec<String>,
        issued: Instant,
    },
}

/// The names a certificate for `hosts` must carry (`*` has none).
fn cert_names(hosts: &[HostPattern]) -> Vec<String> {
    hosts
        .iter()
        .filter_map(|h| match h {
            HostPattern::Exact(n) => Some(n.clone()),
            HostPattern::Suffix(s) => Some(format!("*{s}")),
            HostPattern::Any => None,
        })
        .collect()
}

impl Tls {
    /// Builds the store for every TLS site of `config`: file certificates as loaded by
    /// config validation, internal ones issued now from the local CA.
    pub fn new(config: &Config, provider: &Arc<CryptoProvider>) -> io::Result<Tls> {
        let mut store = CertStore::default();
        let mut watched = Vec::new();
        let mut acme = Vec::new();
        let mut ca: Option<LocalCa> = None;
        for site in &config.sites {
            let names = cert_names(&site.hosts);
            let slot: CertSlot = Arc::new(ArcSwapOption::empty());
            match &site.tls {
                TlsMode::None => continue,
                TlsMode::Files { cert, key, loaded } => {
                    slot.store(Some(Arc::clone(loaded)));
                    watched.push(Watched::Files {
                        slot: Arc::clone(&slot),
                        cert: cert.clone(),
                        key: key.clone(),
                        names: names.clone(),
                        stamps: (files::Stamp::of(cert), files::Stamp::of(key)),
                    });
                }
                TlsMode::Internal => {
                    if ca.is_none() {
                        ca = Some(LocalCa::load_or_create(&config.storage)?);
                    }
                    if let Some(ca) = &ca {
                        slot.store(Some(ca.issue(provider, &names)?));
                    }
                    watched.push(Watched::Internal {
                        slot: Arc::clone(&slot),
                        names: names.clone(),
                        issued: Instant::now(),
                    });
                }
                // Empty until the ACME manager loads or obtains the certificate.
                TlsMode::Acme => acme.push(crate::acme::Managed {
                    names: crate::acme::site_names(site),
                    slot: Arc::clone(&slot),
                }),
            }
            for host in &site.hosts {
                match host {
                    HostPattern::Exact(n) => {
                        store.exact.insert(n.clone(), Arc::clone(&slot));
                    }
                    HostPattern::Suffix(s) => store.suffix.push((s.clone(), Arc::clone(&slot))),
                    HostPattern::Any => store.any = Some(Arc::clone(&slot)),
                }
            }
        }
        store
            .suffix
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let store = Arc::new(store);
        let acme_challenges = config.acme.as_ref().map(|a| {
            Arc::new(crate::acme::Challenges::new(
                &a.storage,
                Arc::clone(provider),
            ))
        });
        let config = server_config(provider, Arc::new(BySni(Arc::clone(&store))))?;
        let mut acme_config = (*config).clone();
        acme_config.alpn_protocols = vec![crate::acme::challenge::ALPN.to_vec()];
        Ok(Tls {
            store,
            config,
            watched,
            acme,
            acme_challenges,
            acme_config: Arc::new(acme_config),
        })
    }

    /// Moves the ACME sites' slots out, for the ACME manager.
    pub fn take_acme(&mut self) -> Vec<crate::acme::Managed> {
        std::mem::take(&mut self.acme)
    }

    /// Where TLS-ALPN-01 responses are read (and written by the ACME manager).
    pub fn acme_challenges(&self) -> Option<Arc<crate::acme::Challenges>> {
        self.acme_challenges.clone()
    }

    /// The config for a TLS-ALPN-01 validation handshake for `name` (RFC 8737): `None` when
    /// no validation for it is under way.
    pub async fn acme_challenge_config(&self, name: &str) -> Option<Arc<ServerConfig>> {
        let cert = self.acme_challenges.as_ref()?.alpn_cert(name).await?;
        let mut cfg = (*self.acme_config).clone();
        cfg.cert_resolver = Arc::new(Fixed(cert));
        Some(Arc::new(cfg))
    }

    /// The config for one handshake: the shared one when the client sent SNI, else one that
    /// answers with `cert` (looked up by the local address).
    pub fn config_for(&self, sni: bool, cert: Arc<CertifiedKey>) -> Arc<ServerConfig> {
        if sni {
            return Arc::clone(&self.config);
        }
        let mut cfg = (*self.config).clone();
        cfg.cert_resolver = Arc::new(Fixed(cert));
        Arc::new(cfg)
    }

    /// Moves the watch list out, for the maintenance task.
    pub fn take_watched(&mut self) -> Vec<WatchedHandle> {
        std::mem::take(&mut self.watched)
            .into_iter()
            .map(WatchedHandle)
            .collect()
    }
}

/// One certificate the maintenance task keeps fresh.
pub struct WatchedHandle(Watched);

/// How often certificate files are checked for changes.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Keeps certificates fresh: reloads changed files (keeping the old certificate when the new
/// files are bad) and re-issues internal certificates at half their lifetime.
pub async fn maintain(
    mut watched: Vec<WatchedHandle>,
    storage: PathBuf,
    provider: Arc<CryptoProvider>,
    stop: CancellationToken,
) {
    if watched.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for WatchedHandle(w) in watched.iter_mut() {
            match w {
                Watched::Files {
                    slot,
                    cert,
                    key,
                    names,
                    stamps,
                } => {
                    let now = (files::Stamp::of(cert), files::Stamp::of(key));
                    if now == *stamps {
                        continue;
                    }
                    *stamps = now;
                    match files::load(&provider, cert, key, names) {
                        Ok(c) => {
                            slot.store(Some(c));
                            tracing::info!(cert = %cert.display(), "certificate reloaded");
                        }
                        Err(e) => tracing::error!(
                            error = %e,
                            "changed certificate files are not usable; still serving the previous certificate"
                        ),
                    }
                }
                Watched::Internal {
                    slot,
                    names,
                    issued,
                } => {
                    if issued.elapsed() < internal::LEAF_LIFETIME / 2 {
                        continue;
                    }
                    match LocalCa::load_or_create(&storage)
                        .and_then(|ca| ca.issue(&provider, names))
                    {
                        Ok(c) => {
                            slot.store(Some(c));
                            *issued = Instant::now();
                            tracing::info!(names = ?names, "internal certificate re-issued");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot re-issue an internal certificate")
                        }
                    }
                }
            }
        }
    }
}

/// The shared server config: ALPN h2 and http/1.1, session tickets and a session cache.
pub fn server_config(
    provider: &Arc<CryptoProvider>,
    resolver: Arc<dyn ResolvesServerCert>,
) -> io::Result<Arc<ServerConfig>> {
    let mut cfg = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Our order (AES-128-GCM first), not the client's: OpenSSL-based clients and rustls
    // list AES-256-GCM first, which costs more per byte and buys nothing over AES-128.
    cfg.ignore_client_order = true;
    cfg.ticketer =
        rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| io::Error::other(e.to_string()))?;
    cfg.session_storage = ServerSessionMemoryCache::new(16 * 1024);
    Ok(Arc::new(cfg))
}

/// A fatal `unrecognized_name` alert (RFC 6066 §3), sent in place of a wrong certificate.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];
