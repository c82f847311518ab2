//! Turning an upstream name into replica addresses.
//!
//! The resolver is a trait so tests (and later other discovery sources) can add and remove
//! replica addresses without real DNS.

use hickory_resolver::TokioResolver;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Resolves `host` to every address that answers for it; each address is one replica.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a>;
}

/// The system's DNS (`/etc/resolv.conf`, `/etc/hosts`), queried afresh on every call.
///
/// Docker's embedded DNS answers a compose service name with one A record per replica, with a
/// TTL of 600 s; caching would hide scale-ups for ten minutes, so the cache is off: the caller
/// decides how often to ask.
pub struct SystemResolver {
    dns: Option<TokioResolver>,
}

impl SystemResolver {
    pub fn new() -> Self {
        let dns = match TokioResolver::builder_tokio() {
            Ok(mut builder) => {
                let opts = builder.options_mut();
                opts.cache_size = 0;
                opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
                match builder.build() {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "DNS resolver unavailable; using getaddrinfo");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the system DNS config; using getaddrinfo");
                None
            }
        };
        SystemResolver { dns }
    }
}

impl Default for SystemResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(async move {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(vec![SocketAddr::new(ip, port)]);
            }
            let mut addrs: Vec<SocketAddr> = match &self.dns {
                Some(dns) => match dns.lookup_ip(host).await {
                    Ok(lookup) => lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect(),
                    Err(e) if e.is_no_records_found() => Vec::new(),
                    Err(e) => return Err(io::Error::other(e.to_string())),
                },
                None => tokio::net::lookup_host((host, port)).await?.collect(),
            };
            addrs.sort();
            addrs.dedup();
            Ok(addrs)
        })
    }
}

/// A resolver answering from a table that can be changed at run time: for tests, and for
/// anything that discovers replicas by other means than DNS.
#[derive(Default)]
pub struct StaticResolver {
    table: std::sync::Mutex<std::collections::HashMap<String, Vec<SocketAddr>>>,
}

impl StaticResolver {
    /// Sets the addresses `host` resolves to. They are returned with their own ports (the
    /// configured port is ignored), so replicas on one loopback host can differ by port.
    pub fn set(&self, host: &str, addrs: Vec<SocketAddr>) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.insert(host.to_ascii_lowercase(), addrs);
    }
}

impl Resolve for StaticResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        let found = if let Ok(ip) = host.parse::<IpAddr>() {
            Some(vec![SocketAddr::new(ip, port)])
        } else {
            let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            table.get(host).cloned()
        };
        Box::pin(async move {
            found.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{host}: unknown name"))
            })
        })
    }
}
