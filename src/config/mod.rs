//! Configuration: YAML text → [`raw::RawConfig`] → validated [`Config`].
//!
//! Every problem found is collected, with file:line:col and the key path, so a user fixes a
//! config in one round instead of one error per restart.

mod locate;
mod raw;
mod validate;

pub use locate::Pos;
pub use validate::parse_duration;

use ipnet::IpNet;
use rustls::sign::CertifiedKey;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A validated configuration. Everything the proxy needs is parsed and defaulted here.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub trusted_proxies: TrustedProxies,
    pub timeouts: Timeouts,
    /// How often upstream names are re-resolved.
    pub resolve_every: Duration,
    pub access_log: AccessLog,
    /// Send `X-Gangway-Replica: <address>` with each proxied response (debugging).
    pub replica_header: bool,
    /// Where gangway keeps state: the local CA, (later) ACME accounts and certificates.
    pub storage: PathBuf,
    /// `Strict-Transport-Security` value for HTTPS responses, when configured.
    pub hsts: Option<http::HeaderValue>,
    /// Automatic certificates, when the config has an `acme:` block.
    pub acme: Option<AcmeConfig>,
    pub sites: Vec<Site>,
}

/// The `acme:` block: where and how `tls: acme` sites get their certificates.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// Contact address given to the CA (optional for most CAs).
    pub email: Option<String>,
    /// The directory URL (`letsencrypt` and friends already expanded).
    pub directory: String,
    /// The challenge tried first; the other one is tried when it fails.
    pub challenge: AcmeChallenge,
    /// Account, certificates, locks and challenge responses live in `<storage>/acme/`.
    pub storage: PathBuf,
    /// An extra root trusted for the directory's own HTTPS (private CA, pebble).
    pub directory_ca: Option<PathBuf>,
    pub eab: Option<AcmeEab>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// RFC 8737, answered on the https listener.
    TlsAlpn01,
    /// RFC 8555 §8.3, answered on the http listener.
    Http01,
}

/// External account binding (RFC 8555 §7.3.4).
#[derive(Clone)]
pub struct AcmeEab {
    pub kid: String,
    /// The decoded MAC key.
    pub hmac_key: Vec<u8>,
}

impl fmt::Debug for AcmeEab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "eab(kid {}, key hidden)", self.kid)
    }
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    /// Metrics, status, health and the dashboard (`None`: `admin: off`).
    pub admin: Option<SocketAddr>,
}

/// Where a site's certificate comes from.
#[derive(Clone)]
pub enum TlsMode {
    /// Plain HTTP only.
    None,
    /// Issued by gangway's local CA.
    Internal,
    /// PEM files, re-read when they change.
    Files {
        cert: PathBuf,
        key: PathBuf,
        /// As loaded and checked at validation.
        loaded: Arc<CertifiedKey>,
    },
    /// Obtained and renewed over ACME (see the `acme:` block).
    Acme,
}

impl fmt::Debug for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsMode::None => f.write_str("none"),
            TlsMode::Internal => f.write_str("internal"),
            TlsMode::Files { cert, key, .. } => {
                write!(f, "files({}, {})", cert.display(), key.display())
            }
            TlsMode::Acme => f.write_str("acme"),
        }
    }
}

impl TlsMode {
    pub fn is_tls(&self) -> bool {
        !matches!(self, TlsMode::None)
    }
}

/// How gangway talks to a route's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 without TLS (prior knowledge), one multiplexed connection per replica.
    H2c,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A client must send a whole request head within this time once it starts one.
    pub client_header: Duration,
    /// An idle keep-alive client connection is closed after this time.
    pub client_idle: Duration,
    pub upstream_connect: Duration,
    /// Time from sending the request to receiving the upstream's response head.
    pub upstream_header: Duration,
    /// Longest pause in a response body from a replica before gangway cuts it.
    pub upstream_read: Duration,
    /// On SIGTERM/SIGINT, requests in flight get this long to finish.
    pub grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_header: Duration::from_secs(10),
            client_idle: Duration::from_secs(60),
            upstream_connect: Duration::from_secs(5),
            upstream_header: Duration::from_secs(60),
            upstream_read: Duration::from_secs(60),
            grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    Text,
    /// Common Log Format.
    Common,
    /// Combined Log Format (Common plus referer and user agent).
    Combined,
    Json,
    Off,
}

/// Peers whose incoming forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(pub Vec<IpNet>);

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// `::ffff:1.2.3.4` (a v4 client on a dual-stack socket) is treated as `1.2.3.4`.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[derive(Debug, Clone)]
pub struct Site {
    pub hosts: Vec<HostPattern>,
    pub tls: TlsMode,
    /// Sorted longest path first.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `app.example.com` (stored lower case).
    Exact(String),
    /// `*.app.example.com`, stored as `.app.example.com`.
    Suffix(String),
    /// `*`
    Any,
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Starts with `/`.
    pub path: String,
    pub strip_prefix: bool,
    pub upstreams: Vec<UpstreamAddr>,
    pub upstream_protocol: UpstreamProtocol,
    pub policy: Policy,
}

/// How a route spreads requests over its replicas and copes with failing ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub balance: Balance,
    /// Weight of each entry of `upstreams` (same order); every replica a name resolves to
    /// gets its entry's weight. All 1 unless `weights` says otherwise.
    pub weights: Vec<u32>,
    pub health: Option<HealthCheck>,
    /// `None` when `passive.failures` is 0.
    pub passive: Option<Passive>,
    pub retries: Retries,
    pub resolve_every: Duration,
    /// `timeouts.upstream_header` of this route (the top-level one unless it sets its own).
    pub upstream_header: Duration,
    /// `timeouts.upstream_read` of this route (the top-level one unless it sets its own).
    pub upstream_read: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    /// Power of two random choices, by in-flight requests.
    Random,
    /// Rendezvous hash of the client address.
    IpHash,
    /// Sticky by an opaque cookie naming the replica.
    Cookie,
}

/// Active HTTP health check of every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    /// Inclusive range of statuses that count as healthy.
    pub expect: (u16, u16),
}

/// Passive health: failures seen on real traffic take a replica out for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passive {
    /// Consecutive failures (connect errors, resets, 502/503/504) that take it out.
    pub failures: u32,
    /// First time out; doubled at each relapse, up to 16 times.
    pub cooldown: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retries {
    /// How many times a request may be sent in all (first try included).
    pub attempts: u32,
    /// Methods retried after a failure once the request was sent (bodiless requests only);
    /// a replica that cannot be connected to is always skipped, whatever the method.
    pub methods: Vec<http::Method>,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 2,
            methods: ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
                .iter()
                .filter_map(|m| m.parse().ok())
                .collect(),
        }
    }
}

/// `name:port` as written; the name may resolve to many replica addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub pos: Option<Pos>,
    /// Key path such as `sites[0].routes[1].path`; empty for the document itself.
    pub path: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: String,
    pub issues: Vec<Issue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        writeln!(
            f,
            "{}: {n} problem{} in config",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for issue in &self.issues {
            match issue.pos {
                Some(p) => write!(f, "  {}:{}:{}: ", self.file, p.line, p.col)?,
                None => write!(f, "  {}: ", self.file)?,
            }
            if !issue.path.is_empty() {
                write!(f, "{}: ", issue.path)?;
            }
            writeln!(f, "{}", issue.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            issues: vec![Issue {
                pos: None,
                path: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Config::parse(&text, &file)
    }

    /// Validates config text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        validate::parse(text).map_err(|issues| ConfigError {
            file: file.to_owned(),
            issues,
        })
    }
}
