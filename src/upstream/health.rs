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

/// Streak of results for one replica: positive = passes in a row, negative = failures.
fn record(replica: &Replica, streak: &mut i64, result: Result<(), String>, check: &HealthCheck) {
    match result {
        Ok(()) => {
            *streak = (*streak).max(0) + 1;
            if *streak >= i64::from(check.healthy_after) && replica.set_active(true) {
                // The active check is the authority: a replica it finds healthy again
                // (restarted, say) is not kept out by an older passive cooldown.
                replica.clear_passive();
                tracing::info!(replica = %replica.addr, passes = *streak, "replica healthy: gets traffic");
            }
        }
        Err(why) => {
            *streak = (*streak).min(0) - 1;
            if -*streak >= i64::from(check.unhealthy_after) && replica.set_active(false) {
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
    let mut streaks: HashMap<SocketAddr, i64> = HashMap::new();
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
            let streak = streaks.entry(replica.addr).or_insert(0);
            record(replica, streak, result, &check);
        }
    }
}
