//! Active health checks: an HTTP GET to every replica of a backend on a timer.
//!
//! A replica gets traffic after `healthy_after` passing checks in a row and loses it after
//! `unhealthy_after` failing ones. A new replica is checked as soon as it appears.

use super::{Backend, Replica};
use crate::config::HealthCheck;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// One check: connect, GET `path`, compare the status. Errors are the reason it failed.
pub async fn check_once(addr: SocketAddr, check: &HealthCheck) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::get(check.path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "gangway-health-check")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        if (check.expect.0..=check.expect.1).contains(&status) {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

/// What the checker remembers about one replica.
#[derive(Default)]
struct Streak {
    /// Positive = passes in a row, negative = failures.
    n: i64,
    /// The passive ejection (its `down_until`) the current run of passes started after.
    ejection: u64,
}

fn record(replica: &Replica, streak: &mut Streak, result: Result<(), String>, check: &HealthCheck) {
    match result {
        Ok(()) => {
            // Passive health took the replica out since the last check (requests failed):
            // it comes back after `healthy_after` passes counted from then, like a replica
            // the checks themselves had found down, not only when its cooldown ends. A
            // replica restarted faster than one check interval is back in moments.
            let ejection = replica
                .down_until
                .load(std::sync::atomic::Ordering::Relaxed);
            if replica.passive_down() && streak.ejection != ejection {
                streak.ejection = ejection;
                streak.n = 0;
            }
            streak.n = streak.n.max(0) + 1;
            if streak.n >= i64::from(check.healthy_after) {
                if replica.set_active(true) {
                    // The active check is the authority: a replica it finds healthy again
                    // (restarted, say) is not kept out by an older passive cooldown.
                    replica.clear_passive();
                    tracing::info!(replica = %replica.addr, passes = streak.n, "replica healthy: gets traffic");
                } else if replica.passive_down() {
                    replica.clear_passive();
                    tracing::info!(replica = %replica.addr, passes = streak.n, "replica passes its checks again: back in rotation");
                }
            }
        }
        Err(why) => {
            streak.n = streak.n.min(0) - 1;
            if -streak.n >= i64::from(check.unhealthy_after) && replica.set_active(false) {
                tracing::warn!(replica = %replica.addr, reason = %why, "replica unhealthy: no more traffic");
            } else {
                tracing::debug!(replica = %replica.addr, reason = %why, "health check failed");
            }
        }
    }
}

/// Checks every replica of `backend` every `interval` (and at once when members change)
/// until `stop`.
pub async fn check_loop(backend: Arc<Backend>, stop: CancellationToken) {
    let Some(check) = backend.policy.health.clone() else {
        return;
    };
    let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = backend.members_changed.notified() => {}
        }
        let members = backend.members();
        let results = futures_util::future::join_all(members.replicas.iter().map(|r| {
            let addr = r.addr;
            let check = &check;
            async move { check_once(addr, check).await }
        }))
        .await;
        streaks.retain(|a, _| members.replicas.iter().any(|r| r.addr == *a));
        for (replica, result) in members.replicas.iter().zip(results) {
            let streak = streaks.entry(replica.addr).or_default();
            record(replica, streak, result, &check);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Passive;
    use std::time::Duration;

    fn check() -> HealthCheck {
        HealthCheck {
            path: "/health".into(),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
            healthy_after: 2,
            unhealthy_after: 1,
            expect: (200, 399),
        }
    }

    #[test]
    fn a_passively_ejected_replica_returns_after_healthy_after_passes() {
        let check = check();
        let replica = Replica::new("127.0.0.1:1".parse().unwrap(), true);
        let mut streak = Streak::default();
        for _ in 0..3 {
            record(&replica, &mut streak, Ok(()), &check);
        }
        assert!(replica.eligible(crate::upstream::now_ms()));
        // Failed requests take it out (a long cooldown) while its checks never fail: the
        // active state does not change.
        let passive = Passive {
            failures: 1,
            cooldown: Duration::from_secs(600),
        };
        replica.report_failure(Some(&passive));
        assert!(replica.passive_down());
        record(&replica, &mut streak, Ok(()), &check);
        assert!(
            replica.passive_down(),
            "one pass after the ejection is not enough"
        );
        record(&replica, &mut streak, Ok(()), &check);
        assert!(!replica.passive_down(), "back after healthy_after passes");
        assert!(replica.eligible(crate::upstream::now_ms()));
    }
}
