//! Counters the request path bumps (atomics only) and the admin endpoints read.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds (Prometheus `le`).
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[idx].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is the total).
    pub fn cumulative(&self) -> [u64; BUCKETS.len() + 1] {
        let mut out = [0u64; BUCKETS.len() + 1];
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c.load(Ordering::Relaxed);
            out[i] = acc;
        }
        out
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The q-quantile (0..1) estimated from the buckets, in seconds; None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let cum = self.cumulative();
        let total = *cum.last()?;
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let idx = cum.iter().position(|c| *c >= rank)?;
        let upper = BUCKETS
            .get(idx)
            .copied()
            .unwrap_or(BUCKETS[BUCKETS.len() - 1]);
        let lower = if idx == 0 { 0.0 } else { BUCKETS[idx - 1] };
        let below = if idx == 0 { 0 } else { cum[idx - 1] };
        let in_bucket = cum[idx] - below;
        let frac = if in_bucket == 0 {
            1.0
        } else {
            (rank - below) as f64 / in_bucket as f64
        };
        Some(lower + (upper - lower) * frac)
    }
}

/// Responses by status class, and latency to the response head.
#[derive(Default)]
pub struct Traffic {
    /// 1xx, 2xx, 3xx, 4xx, 5xx.
    pub by_class: [AtomicU64; 5],
    pub latency: Histogram,
}

impl Traffic {
    pub fn record(&self, status: u16, latency: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(latency);
    }

    pub fn total(&self) -> u64 {
        self.by_class
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// What one replica saw.
#[derive(Default)]
pub struct ReplicaStats {
    /// Responses it sent, by class, with latency.
    pub traffic: Traffic,
    /// Requests it received but broke off before answering (reset, closed).
    pub broken: AtomicU64,
    /// Connections it refused or did not accept in time.
    pub connect_failures: AtomicU64,
    /// Unix time (s) of the last change of its eligibility.
    pub health_changed: AtomicU64,
}

impl ReplicaStats {
    /// Requests this replica received (answered or broken off).
    pub fn received(&self) -> u64 {
        self.traffic.total() + self.broken.load(Ordering::Relaxed)
    }
}

/// What one route answered.
#[derive(Default)]
pub struct RouteStats {
    /// What clients got from this route (proxied answers and gangway's own errors).
    pub traffic: Traffic,
    /// Requests sent again to another replica after one broke off.
    pub retries: AtomicU64,
    /// Requests moved to another replica because one could not be connected to.
    pub failovers: AtomicU64,
}

/// Server-wide gauges and counters, shared by every generation of one server.
#[derive(Default)]
pub struct ServerStats {
    pub connections_h1: AtomicI64,
    pub connections_h2: AtomicI64,
    pub websockets: AtomicI64,
    /// Idle plain HTTP/1.1 connections waiting for their next request without buffers
    /// (counted in `connections_h1` too).
    pub parked: AtomicI64,
    pub in_flight: AtomicI64,
    /// Requests for no site or no route.
    pub unrouted: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Set once shutdown starts: /healthz answers 503.
    pub draining: std::sync::atomic::AtomicBool,
}

/// Increments a gauge and decrements it when dropped.
pub struct GaugeGuard<'a>(&'a AtomicI64);

impl<'a> GaugeGuard<'a> {
    pub fn new(g: &'a AtomicI64) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_buckets() {
        let h = Histogram::default();
        for _ in 0..99 {
            h.observe(Duration::from_micros(800));
        }
        h.observe(Duration::from_millis(900));
        let p50 = h.quantile(0.5).unwrap();
        assert!(p50 > 0.0005 && p50 <= 0.001, "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!(p99 <= 0.001, "{p99}");
        let max = h.quantile(1.0).unwrap();
        assert!(max > 0.5 && max <= 1.0, "{max}");
        assert_eq!(h.cumulative()[BUCKETS.len()], 100);
    }
}
