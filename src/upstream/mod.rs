//! Upstreams: the replicas behind each route, how they are found, checked and picked.
//!
//! A [`Backend`] is the replica set of one route. Its members are an immutable snapshot
//! ([`Members`]) swapped whole by discovery; health is a few atomics per replica. The request
//! path loads the snapshot, reads atomics and bumps a counter: it takes no lock.

pub mod h1;
pub mod health;
pub mod pool;
pub mod resolve;

use crate::admin::stats::{ReplicaStats, RouteStats, unix_now};
use crate::config::{Balance, Passive, Policy, UpstreamAddr, UpstreamProtocol};
use arc_swap::ArcSwap;
use pool::{ConnPool, H2Slot};
use resolve::Resolve;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Milliseconds on a process-wide monotonic clock (for "down until").
fn now_ms() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    EPOCH.elapsed().as_millis() as u64 + 1
}

/// One replica address: its connections, its load and its health.
pub struct Replica {
    pub addr: SocketAddr,
    /// Opaque, stable identifier (for sticky cookies and rendezvous hashing).
    pub id: u64,
    /// Idle HTTP/1.1 connections.
    pub pool: ConnPool,
    /// The shared connection, for h2c routes.
    pub h2: H2Slot,
    /// Requests being handled by this replica now (least_conn, random).
    pub in_flight: AtomicUsize,
    /// What it answered, for /metrics and /status.
    pub stats: ReplicaStats,
    /// Set by the active check; true when there is none.
    active_ok: AtomicBool,
    /// Passive health: consecutive failures, and out of rotation until this time.
    failures: AtomicU32,
    down_until: AtomicU64,
    relapses: AtomicU32,
}

impl Replica {
    pub fn new(addr: SocketAddr, checked: bool) -> Self {
        let mut h = std::hash::DefaultHasher::new();
        addr.hash(&mut h);
        Replica {
            addr,
            id: h.finish(),
            pool: ConnPool::default(),
            h2: H2Slot::default(),
            in_flight: AtomicUsize::new(0),
            stats: ReplicaStats::default(),
            // A replica that is actively checked gets traffic only once it passed.
            active_ok: AtomicBool::new(!checked),
            failures: AtomicU32::new(0),
            down_until: AtomicU64::new(0),
            relapses: AtomicU32::new(0),
        }
    }

    /// May this replica take new requests?
    pub fn eligible(&self, now: u64) -> bool {
        self.active_ok.load(Ordering::Relaxed) && self.down_until.load(Ordering::Relaxed) <= now
    }

    pub fn is_active_ok(&self) -> bool {
        self.active_ok.load(Ordering::Relaxed)
    }

    pub(crate) fn set_active(&self, ok: bool) -> bool {
        let changed = self.active_ok.swap(ok, Ordering::Relaxed) != ok;
        if changed {
            self.stats
                .health_changed
                .store(unix_now(), Ordering::Relaxed);
        }
        changed
    }

    /// Out of rotation by passive health right now?
    pub fn passive_down(&self) -> bool {
        self.down_until.load(Ordering::Relaxed) > now_ms()
    }

    /// A request to this replica failed in a way that points at the replica (connect error,
    /// reset, 502/503/504). Enough in a row take it out for the cooldown, doubled at each
    /// relapse.
    pub fn report_failure(&self, passive: Option<&Passive>) {
        let Some(p) = passive else { return };
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= p.failures {
            self.failures.store(0, Ordering::Relaxed);
            let relapses = self.relapses.fetch_add(1, Ordering::Relaxed).min(4);
            let cooldown = p.cooldown * (1u32 << relapses);
            self.down_until
                .store(now_ms() + cooldown.as_millis() as u64, Ordering::Relaxed);
            self.stats
                .health_changed
                .store(unix_now(), Ordering::Relaxed);
            tracing::warn!(replica = %self.addr, failures = n, cooldown = ?cooldown, "replica taken out of rotation");
        }
    }

    /// Forgets passive failures and any cooldown.
    pub(crate) fn clear_passive(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.relapses.store(0, Ordering::Relaxed);
        self.down_until.store(0, Ordering::Relaxed);
    }

    /// A request succeeded: the failure streak and, once back, the relapse count reset.
    pub fn report_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.relapses.load(Ordering::Relaxed) != 0
            && self.down_until.load(Ordering::Relaxed) <= now_ms()
        {
            self.relapses.store(0, Ordering::Relaxed);
            tracing::info!(replica = %self.addr, "replica back in rotation");
        }
    }
}

/// The current replicas of a backend and the weighted round-robin cycle over them.
pub struct Members {
    pub replicas: Vec<Arc<Replica>>,
    /// Replica indexes in smooth weighted round-robin order: one full cycle.
    schedule: Vec<u32>,
}

impl Members {
    fn new(replicas: Vec<Arc<Replica>>, weights: &[u32]) -> Members {
        let schedule = smooth_weighted_cycle(weights);
        Members { replicas, schedule }
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }
}

/// nginx's smooth weighted round robin, unrolled into one cycle of `sum(weights)` picks:
/// each replica appears `weight` times, spread out rather than in runs.
fn smooth_weighted_cycle(weights: &[u32]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle
}

/// What the balancer may use to choose.
pub struct PickCtx {
    pub client: IpAddr,
    /// The replica id from a sticky cookie, if the request carried one.
    pub sticky: Option<u64>,
}

/// The replica set of one route.
pub struct Backend {
    /// The names as configured; each resolves to zero or more replicas.
    pub upstreams: Vec<UpstreamAddr>,
    pub protocol: UpstreamProtocol,
    pub policy: Policy,
    members: ArcSwap<Members>,
    next: AtomicUsize,
    /// Wakes discovery early (after a connect failure).
    pub resolve_now: Notify,
    /// Wakes the health checker (membership changed).
    pub members_changed: Notify,
    /// The site (its first host) and route path, for metrics and status.
    pub site: String,
    pub path: String,
    pub stats: RouteStats,
}

impl Backend {
    pub fn new(upstreams: Vec<UpstreamAddr>, protocol: UpstreamProtocol, policy: Policy) -> Self {
        Backend {
            upstreams,
            protocol,
            policy,
            members: ArcSwap::from_pointee(Members::new(Vec::new(), &[])),
            next: AtomicUsize::new(0),
            resolve_now: Notify::new(),
            members_changed: Notify::new(),
            site: String::new(),
            path: String::new(),
            stats: RouteStats::default(),
        }
    }

    /// Names the backend after its site and route (metrics labels).
    pub fn labeled(mut self, site: &str, path: &str) -> Self {
        self.site = site.to_owned();
        self.path = path.to_owned();
        self
    }

    /// Takes over the replicas (with their health, load and connections) of the same
    /// backend in the previous config, so a reload forgets nothing.
    pub fn adopt(&self, old: &Backend) {
        let members = old.members.load_full();
        if self.policy.health.is_none() {
            for r in &members.replicas {
                r.set_active(true);
            }
        }
        // The same replicas in the same cycle; the resolve that follows applies new weights.
        self.members.store(members);
    }

    fn weights_by_addr(&self, members: &Members) -> Vec<(SocketAddr, u32)> {
        let mut counts = vec![0u32; members.replicas.len()];
        for i in &members.schedule {
            if let Some(c) = counts.get_mut(*i as usize) {
                *c += 1;
            }
        }
        members
            .replicas
            .iter()
            .map(|r| r.addr)
            .zip(counts)
            .collect()
    }

    /// The current members.
    pub fn members(&self) -> Arc<Members> {
        self.members.load_full()
    }

    /// Replaces the members with `addrs` (address, weight) in the order given, keeping the
    /// replica (health, load, pooled connections) of every address that stays. Returns
    /// (added, removed).
    pub fn set_addrs(&self, addrs: Vec<(SocketAddr, u32)>) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let mut unique: Vec<(SocketAddr, u32)> = Vec::with_capacity(addrs.len());
        for (a, w) in addrs {
            if !unique.iter().any(|(u, _)| *u == a) {
                unique.push((a, w));
            }
        }
        let old = self.members.load_full();
        let same = old.replicas.len() == unique.len()
            && old
                .replicas
                .iter()
                .zip(&unique)
                .all(|(r, (a, _))| r.addr == *a)
            && self.weights_by_addr(&old) == unique;
        if same {
            return (Vec::new(), Vec::new());
        }
        let checked = self.policy.health.is_some();
        let mut next = Vec::with_capacity(unique.len());
        let mut added = Vec::new();
        for (addr, _) in &unique {
            match old.replicas.iter().find(|r| r.addr == *addr) {
                Some(r) => next.push(Arc::clone(r)),
                None => {
                    added.push(*addr);
                    next.push(Arc::new(Replica::new(*addr, checked)));
                }
            }
        }
        let removed = old
            .replicas
            .iter()
            .map(|r| r.addr)
            .filter(|a| !unique.iter().any(|(u, _)| u == a))
            .collect();
        let weights: Vec<u32> = unique.iter().map(|(_, w)| *w).collect();
        self.members.store(Arc::new(Members::new(next, &weights)));
        self.members_changed.notify_one();
        (added, removed)
    }

    /// Chooses the replica for a request by the route's policy, among eligible replicas
    /// not in `tried`. With k eligible replicas, round robin gives each of N sequential
    /// requests floor(N/k) or ceil(N/k), weights respected over every cycle.
    pub fn pick(&self, m: &Members, ctx: &PickCtx, tried: &[usize]) -> Option<usize> {
        let now = now_ms();
        let ok = |i: usize| m.replicas[i].eligible(now) && !tried.contains(&i);
        if !tried.is_empty() {
            // A retry: the next eligible replica after the last one tried.
            let last = *tried.last()?;
            let n = m.replicas.len();
            return (1..n).map(|k| (last + k) % n).find(|i| ok(*i));
        }
        match self.policy.balance {
            Balance::RoundRobin => self.round_robin(m, &ok),
            Balance::Cookie => ctx
                .sticky
                .and_then(|id| (0..m.replicas.len()).find(|i| m.replicas[*i].id == id && ok(*i)))
                .or_else(|| self.round_robin(m, &ok)),
            Balance::LeastConn => {
                let n = m.replicas.len();
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|i| ok(*i))
                    .min_by_key(|i| m.replicas[*i].in_flight.load(Ordering::Relaxed))
            }
            Balance::Random => {
                let eligible = (0..m.replicas.len()).filter(|i| ok(*i)).count();
                if eligible == 0 {
                    return None;
                }
                let nth = |k: usize| (0..m.replicas.len()).filter(|i| ok(*i)).nth(k);
                let a = nth(fastrand::usize(..eligible))?;
                let b = nth(fastrand::usize(..eligible))?;
                let load = |i: usize| m.replicas[i].in_flight.load(Ordering::Relaxed);
                Some(if load(b) < load(a) { b } else { a })
            }
            Balance::IpHash => (0..m.replicas.len()).filter(|i| ok(*i)).max_by_key(|i| {
                let mut h = std::hash::DefaultHasher::new();
                ctx.client.hash(&mut h);
                m.replicas[*i].id.hash(&mut h);
                h.finish()
            }),
        }
    }

    fn round_robin(&self, m: &Members, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let eligible = m.schedule.iter().filter(|i| ok(**i as usize)).count();
        if eligible == 0 {
            return None;
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed) % eligible;
        m.schedule
            .iter()
            .map(|i| *i as usize)
            .filter(|i| ok(*i))
            .nth(k)
    }

    /// Resolves this backend's names once and updates the members. Names that fail keep
    /// their previous addresses (a DNS hiccup must not empty a healthy route); names with
    /// no records contribute none.
    pub async fn resolve(&self, resolver: &dyn Resolve) {
        let mut addrs: Vec<(SocketAddr, u32)> = Vec::new();
        let mut failed = false;
        for (up, weight) in self.upstreams.iter().zip(&self.policy.weights) {
            match resolver.resolve(&up.host, up.port).await {
                Ok(found) => {
                    if found.is_empty() {
                        tracing::warn!(upstream = %up, "upstream name has no addresses yet");
                    }
                    addrs.extend(found.into_iter().map(|a| (a, *weight)));
                }
                Err(e) => {
                    tracing::warn!(upstream = %up, error = %e, "cannot resolve upstream");
                    failed = true;
                }
            }
        }
        let current = self.members();
        if failed {
            let known = self.weights_by_addr(&current);
            for (a, w) in known {
                if !addrs.iter().any(|(x, _)| *x == a) {
                    addrs.push((a, w));
                }
            }
        }
        let (added, removed) = self.set_addrs(addrs);
        let names = NameList(&self.upstreams);
        for a in added {
            tracing::info!(upstreams = %names, replica = %a, "replica added");
        }
        for a in removed {
            tracing::info!(upstreams = %names, replica = %a, "replica removed; requests on it finish");
        }
    }
}

/// Resolves every backend once (at start, before serving).
pub async fn resolve_all(backends: &[Arc<Backend>], resolver: &dyn Resolve) {
    for backend in backends {
        backend.resolve(resolver).await;
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

/// Re-resolves one backend every `policy.resolve_every`, and soon after a connect failure
/// (at most every 250 ms), until `stop`.
pub async fn discovery_loop(
    backend: Arc<Backend>,
    resolver: Arc<dyn Resolve>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(backend.policy.resolve_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // immediate; the caller resolved once already
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = backend.resolve_now.notified() => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        backend.resolve(resolver.as_ref()).await;
    }
}

/// Starts discovery and health checking for every backend; they stop with `stop`.
pub fn spawn_tasks(
    backends: &[Arc<Backend>],
    resolver: &Arc<dyn Resolve>,
    stop: &CancellationToken,
) {
    for b in backends {
        tokio::spawn(discovery_loop(
            Arc::clone(b),
            Arc::clone(resolver),
            stop.clone(),
        ));
        if b.policy.health.is_some() {
            tokio::spawn(health::check_loop(Arc::clone(b), stop.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy(balance: Balance) -> Policy {
        Policy {
            balance,
            weights: vec![],
            health: None,
            passive: None,
            retries: Default::default(),
            resolve_every: Duration::from_secs(5),
            upstream_header: Duration::from_secs(60),
            upstream_read: Duration::from_secs(60),
        }
    }

    fn backend(balance: Balance, addrs: &[(&str, u32)]) -> Backend {
        let b = Backend::new(vec![], UpstreamProtocol::Http1, policy(balance));
        b.set_addrs(addrs.iter().map(|(a, w)| (addr(a), *w)).collect());
        b
    }

    fn ctx() -> PickCtx {
        PickCtx {
            client: "192.0.2.1".parse().unwrap(),
            sticky: None,
        }
    }

    fn counts(b: &Backend, n: usize) -> Vec<usize> {
        let m = b.members();
        let mut c = vec![0; m.replicas.len()];
        for _ in 0..n {
            c[b.pick(&m, &ctx(), &[]).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn set_addrs_keeps_existing_replicas() {
        let b = backend(Balance::RoundRobin, &[]);
        let (added, removed) =
            b.set_addrs(vec![(addr("10.0.0.1:80"), 1), (addr("10.0.0.2:80"), 1)]);
        assert_eq!(added, vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")]);
        assert!(removed.is_empty());
        let first = b.members();
        let (added, removed) =
            b.set_addrs(vec![(addr("10.0.0.2:80"), 1), (addr("10.0.0.3:80"), 1)]);
        assert_eq!(added, vec![addr("10.0.0.3:80")]);
        assert_eq!(removed, vec![addr("10.0.0.1:80")]);
        let second = b.members();
        assert!(
            Arc::ptr_eq(&first.replicas[1], &second.replicas[0]),
            "10.0.0.2 kept its replica"
        );
    }

    #[test]
    fn round_robin_is_exact_over_the_eligible_set() {
        let b = backend(
            Balance::RoundRobin,
            &[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)],
        );
        assert_eq!(counts(&b, 301), vec![101, 100, 100]);
        // One replica out: the other two share exactly.
        let m = b.members();
        m.replicas[1].report_failure(Some(&Passive {
            failures: 1,
            cooldown: Duration::from_secs(60),
        }));
        let c = counts(&b, 100);
        assert_eq!(c, vec![50, 0, 50]);
    }

    #[test]
    fn weights_are_exact_over_a_cycle_and_interleaved() {
        let b = backend(
            Balance::RoundRobin,
            &[("10.0.0.1:80", 3), ("10.0.0.2:80", 1)],
        );
        assert_eq!(counts(&b, 400), vec![300, 100]);
        assert_eq!(smooth_weighted_cycle(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn least_conn_prefers_the_idle_replica() {
        let b = backend(
            Balance::LeastConn,
            &[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)],
        );
        let m = b.members();
        m.replicas[0].in_flight.store(5, Ordering::Relaxed);
        assert_eq!(counts(&b, 10), vec![0, 10]);
    }

    #[test]
    fn ip_hash_is_stable_and_moves_only_when_its_replica_goes() {
        let b = backend(
            Balance::IpHash,
            &[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)],
        );
        let m = b.members();
        let clients: Vec<PickCtx> = (0..50)
            .map(|i| PickCtx {
                client: IpAddr::from([198, 51, 100, i]),
                sticky: None,
            })
            .collect();
        let before: Vec<usize> = clients
            .iter()
            .map(|c| b.pick(&m, c, &[]).unwrap())
            .collect();
        let again: Vec<usize> = clients
            .iter()
            .map(|c| b.pick(&m, c, &[]).unwrap())
            .collect();
        assert_eq!(before, again);
        assert!(before.contains(&0) && before.contains(&1) && before.contains(&2));
        m.replicas[2].report_failure(Some(&Passive {
            failures: 1,
            cooldown: Duration::from_secs(60),
        }));
        for (c, was) in clients.iter().zip(&before) {
            let now = b.pick(&m, c, &[]).unwrap();
            if *was != 2 {
                assert_eq!(
                    now, *was,
                    "a client not on the lost replica kept its replica"
                );
            } else {
                assert_ne!(now, 2);
            }
        }
    }

    #[test]
    fn cookie_sticks_and_falls_back() {
        let b = backend(Balance::Cookie, &[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let m = b.members();
        let id = m.replicas[1].id;
        let sticky = PickCtx {
            client: "192.0.2.1".parse().unwrap(),
            sticky: Some(id),
        };
        for _ in 0..5 {
            assert_eq!(b.pick(&m, &sticky, &[]), Some(1));
        }
        m.replicas[1].report_failure(Some(&Passive {
            failures: 1,
            cooldown: Duration::from_secs(60),
        }));
        assert_eq!(b.pick(&m, &sticky, &[]), Some(0));
    }

    #[test]
    fn retries_go_to_another_eligible_replica() {
        let b = backend(
            Balance::RoundRobin,
            &[("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)],
        );
        let m = b.members();
        assert_eq!(b.pick(&m, &ctx(), &[0]), Some(1));
        assert_eq!(b.pick(&m, &ctx(), &[0, 1]), Some(2));
        assert_eq!(b.pick(&m, &ctx(), &[0, 1, 2]), None);
    }

    #[test]
    fn passive_cooldown_doubles_on_relapse() {
        let r = Replica::new(addr("10.0.0.1:80"), false);
        let p = Passive {
            failures: 2,
            cooldown: Duration::from_millis(100),
        };
        r.report_failure(Some(&p));
        assert!(r.eligible(now_ms()), "one failure is not enough");
        r.report_failure(Some(&p));
        assert!(!r.eligible(now_ms()));
        let first = r.down_until.load(Ordering::Relaxed) - now_ms();
        assert!(first <= 100);
        r.report_failure(Some(&p));
        r.report_failure(Some(&p));
        let second = r.down_until.load(Ordering::Relaxed) - now_ms();
        assert!(second > 100 && second <= 200, "{second}");
    }
}
