//! Upstreams: the replicas behind each route, how they are found and how one is picked.
//!
//! A [`Backend`] is the replica set of one route. Its members are an immutable snapshot
//! (`Arc<[Arc<Replica>]>`) swapped whole by discovery; the request path only loads the
//! snapshot and bumps an atomic round-robin counter.

pub mod pool;
pub mod resolve;

use crate::config::{UpstreamAddr, UpstreamProtocol};
use arc_swap::ArcSwap;
use pool::{ConnPool, H2Slot};
use resolve::Resolve;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One replica address and its keep-alive connections.
pub struct Replica {
    pub addr: SocketAddr,
    /// Idle HTTP/1.1 connections.
    pub pool: ConnPool,
    /// The shared connection, for h2c routes.
    pub h2: H2Slot,
}

impl Replica {
    pub fn new(addr: SocketAddr) -> Self {
        Replica {
            addr,
            pool: ConnPool::default(),
            h2: H2Slot::default(),
        }
    }
}

/// The replica set of one route.
pub struct Backend {
    /// The names as configured; each resolves to zero or more replicas.
    pub upstreams: Vec<UpstreamAddr>,
    pub protocol: UpstreamProtocol,
    replicas: ArcSwap<Vec<Arc<Replica>>>,
    next: AtomicUsize,
}

impl Backend {
    pub fn new(upstreams: Vec<UpstreamAddr>, protocol: UpstreamProtocol) -> Self {
        Backend {
            upstreams,
            protocol,
            replicas: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
        }
    }

    /// The current replicas, in a stable order.
    pub fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas.load_full()
    }

    /// Round robin: the index to start from for the next request. With k replicas and N
    /// sequential requests each replica gets floor(N/k) or ceil(N/k).
    pub fn next_index(&self, len: usize) -> usize {
        if len <= 1 {
            return 0;
        }
        self.next.fetch_add(1, Ordering::Relaxed) % len
    }

    /// Replaces the member list with `addrs` (in the order given: upstreams as configured,
    /// each name's addresses sorted), keeping the replica (and its pooled connections) of
    /// every address that stays. Returns (added, removed).
    pub fn set_addrs(&self, addrs: Vec<SocketAddr>) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let mut unique: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
        for a in addrs {
            if !unique.contains(&a) {
                unique.push(a);
            }
        }
        let addrs = unique;
        let old = self.replicas.load_full();
        if old.len() == addrs.len() && old.iter().zip(&addrs).all(|(r, a)| r.addr == *a) {
            return (Vec::new(), Vec::new());
        }
        let mut next = Vec::with_capacity(addrs.len());
        let mut added = Vec::new();
        for addr in &addrs {
            match old.iter().find(|r| r.addr == *addr) {
                Some(r) => next.push(Arc::clone(r)),
                None => {
                    added.push(*addr);
                    next.push(Arc::new(Replica::new(*addr)));
                }
            }
        }
        let removed = old
            .iter()
            .map(|r| r.addr)
            .filter(|a| !addrs.contains(a))
            .collect();
        self.replicas.store(Arc::new(next));
        (added, removed)
    }
}

/// Resolves every backend's names once. Names that fail keep their previous addresses (a DNS
/// hiccup must not empty a healthy route); names with no records contribute none.
pub async fn resolve_all(backends: &[Arc<Backend>], resolver: &dyn Resolve) {
    for backend in backends {
        let mut addrs = Vec::new();
        let mut failed = false;
        for up in &backend.upstreams {
            match resolver.resolve(&up.host, up.port).await {
                Ok(found) => {
                    if found.is_empty() {
                        tracing::warn!(upstream = %up, "upstream name has no addresses yet");
                    }
                    addrs.extend(found);
                }
                Err(e) => {
                    tracing::warn!(upstream = %up, error = %e, "cannot resolve upstream");
                    failed = true;
                }
            }
        }
        if failed {
            // Keep the addresses we had for names that did not answer.
            let current = backend.replicas();
            for r in current.iter() {
                if !addrs.contains(&r.addr) {
                    addrs.push(r.addr);
                }
            }
        }
        let (added, removed) = backend.set_addrs(addrs);
        let names = NameList(&backend.upstreams);
        for a in added {
            tracing::info!(upstreams = %names, replica = %a, "replica added");
        }
        for a in removed {
            tracing::info!(upstreams = %names, replica = %a, "replica removed");
        }
    }
}

struct NameList<'a>(&'a [UpstreamAddr]);

impl std::fmt::Display for NameList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, u) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{u}")?;
        }
        Ok(())
    }
}

/// Re-resolves every backend every `every` until `stop` is cancelled.
pub async fn discovery_loop(
    backends: Vec<Arc<Backend>>,
    resolver: Arc<dyn Resolve>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the caller resolved once already
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => resolve_all(&backends, resolver.as_ref()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn set_addrs_keeps_existing_replicas() {
        let b = Backend::new(vec![], UpstreamProtocol::Http1);
        let (added, removed) = b.set_addrs(vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")]);
        assert_eq!(added, vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")]);
        assert!(removed.is_empty());
        let first = b.replicas();
        let (added, removed) = b.set_addrs(vec![addr("10.0.0.2:80"), addr("10.0.0.3:80")]);
        assert_eq!(added, vec![addr("10.0.0.3:80")]);
        assert_eq!(removed, vec![addr("10.0.0.1:80")]);
        let second = b.replicas();
        assert!(
            Arc::ptr_eq(&first[1], &second[0]),
            "10.0.0.2 kept its replica"
        );
    }

    #[test]
    fn round_robin_is_exact() {
        let b = Backend::new(vec![], UpstreamProtocol::Http1);
        let mut counts = [0usize; 3];
        for _ in 0..301 {
            counts[b.next_index(3)] += 1;
        }
        assert_eq!(counts, [101, 100, 100]);
    }
}
