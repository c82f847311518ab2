//! The admin listener: `/healthz`, `/metrics` (Prometheus), `/status` (JSON) and `/`, the
//! live dashboard. It binds to loopback by default and serves while gangway drains, so a
//! container health check sees the drain.

pub mod stats;

use crate::server::Generation;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stats::{BUCKETS, Histogram, ServerStats, Traffic};
use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const DASHBOARD: &str = include_str!("dashboard.html");

/// Serves the admin endpoints on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ArcSwap<Generation>>,
    stats: Arc<ServerStats>,
    stop: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "serving admin (metrics, status, dashboard)");
    }
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept");
                    continue;
                }
            },
        };
        let (state, stats, stop) = (Arc::clone(&state), Arc::clone(&stats), stop.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = answer(&req, &state, &stats);
                async move { Ok::<_, Infallible>(resp) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

fn answer(
    req: &Request<Incoming>,
    state: &ArcSwap<Generation>,
    stats: &ServerStats,
) -> Response<Full<Bytes>> {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => {
            if stats.draining.load(Ordering::Relaxed) {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else {
                reply(StatusCode::OK, "text/plain", "ok\n")
            }
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(&state.load(), stats),
        ),
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            status(&state.load(), stats).to_string(),
        ),
        "/" | "/dashboard" => reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn write_traffic(out: &mut String, name: &str, labels: &str, t: &Traffic) {
    for (i, class) in CLASSES.iter().enumerate() {
        let n = t.by_class[i].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_requests_total{{{labels},code=\"{class}\"}} {n}"
        );
    }
}

fn write_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let cum = h.cumulative();
    for (i, le) in BUCKETS.iter().enumerate() {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {}", cum[i]);
    }
    let total = cum[BUCKETS.len()];
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_secs());
    let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
}

/// The Prometheus text exposition.
pub fn metrics(g: &Generation, s: &ServerStats) -> String {
    let mut out = String::with_capacity(8192);
    let _ = writeln!(
        out,
        "# HELP gangway_build_info Version of the running gangway."
    );
    let _ = writeln!(out, "# TYPE gangway_build_info gauge");
    let _ = writeln!(
        out,
        "gangway_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(out, "# TYPE gangway_connections gauge");
    for (proto, g) in [
        ("h1", &s.connections_h1),
        ("h2", &s.connections_h2),
        ("websocket", &s.websockets),
    ] {
        let _ = writeln!(
            out,
            "gangway_connections{{protocol=\"{proto}\"}} {}",
            g.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP gangway_connections_parked Idle HTTP/1.1 keep-alive connections waiting \
         without buffers (also counted in gangway_connections{{protocol=\"h1\"}})."
    );
    let _ = writeln!(out, "# TYPE gangway_connections_parked gauge");
    let _ = writeln!(
        out,
        "gangway_connections_parked {}",
        s.parked.load(Ordering::Relaxed)
    );
    let loads = crate::server::workers::loads();
    if !loads.is_empty() {
        let _ = writeln!(
            out,
            "# HELP gangway_worker_connections Client connections each worker thread serves now."
        );
        let _ = writeln!(out, "# TYPE gangway_worker_connections gauge");
        for (i, w) in loads.iter().enumerate() {
            let _ = writeln!(
                out,
                "gangway_worker_connections{{worker=\"{i}\"}} {}",
                w.open
            );
        }
        let _ = writeln!(
            out,
            "# HELP gangway_worker_connections_accepted_total Client connections given to each \
             worker thread."
        );
        let _ = writeln!(
            out,
            "# TYPE gangway_worker_connections_accepted_total counter"
        );
        for (i, w) in loads.iter().enumerate() {
            let _ = writeln!(
                out,
                "gangway_worker_connections_accepted_total{{worker=\"{i}\"}} {}",
                w.accepted
            );
        }
    }
    let _ = writeln!(out, "# TYPE gangway_requests_in_flight gauge");
    let _ = writeln!(
        out,
        "gangway_requests_in_flight {}",
        s.in_flight.load(Ordering::Relaxed)
    );
    let _ = writeln!(out, "# TYPE gangway_unrouted_requests_total counter");
    let _ = writeln!(
        out,
        "gangway_unrouted_requests_total {}",
        s.unrouted.load(Ordering::Relaxed)
    );
    let _ = writeln!(out, "# TYPE gangway_config_reloads_total counter");
    let _ = writeln!(
        out,
        "gangway_config_reloads_total{{result=\"ok\"}} {}",
        s.reloads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "gangway_config_reloads_total{{result=\"failed\"}} {}",
        s.reloads_failed.load(Ordering::Relaxed)
    );

    let backends = g.proxy.router.backends();
    let _ = writeln!(
        out,
        "# HELP gangway_route_requests_total Responses sent to clients, by route and status class."
    );
    let _ = writeln!(out, "# TYPE gangway_route_requests_total counter");
    for b in &backends {
        let labels = format!("site=\"{}\",route=\"{}\"", esc(&b.site), esc(&b.path));
        write_traffic(&mut out, "gangway_route", &labels, &b.stats.traffic);
    }
    let _ = writeln!(out, "# TYPE gangway_route_latency_seconds histogram");
    for b in &backends {
        let labels = format!("site=\"{}\",route=\"{}\"", esc(&b.site), esc(&b.path));
        write_histogram(
            &mut out,
            "gangway_route_latency_seconds",
            &labels,
            &b.stats.traffic.latency,
        );
    }
    let _ = writeln!(out, "# TYPE gangway_retries_total counter");
    let _ = writeln!(out, "# TYPE gangway_failovers_total counter");
    for b in &backends {
        let labels = format!("site=\"{}\",route=\"{}\"", esc(&b.site), esc(&b.path));
        let _ = writeln!(
            out,
            "gangway_retries_total{{{labels}}} {}",
            b.stats.retries.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "gangway_failovers_total{{{labels}}} {}",
            b.stats.failovers.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP gangway_replica_requests_total Responses received from each replica, by status class."
    );
    let _ = writeln!(out, "# TYPE gangway_replica_requests_total counter");
    let mut replica_lines = String::new();
    let mut latency_lines = String::new();
    let mut health_lines = String::new();
    for b in &backends {
        for r in &b.members().replicas {
            let labels = format!(
                "site=\"{}\",route=\"{}\",replica=\"{}\"",
                esc(&b.site),
                esc(&b.path),
                r.addr
            );
            write_traffic(
                &mut replica_lines,
                "gangway_replica",
                &labels,
                &r.stats.traffic,
            );
            let _ = writeln!(
                replica_lines,
                "gangway_replica_broken_requests_total{{{labels}}} {}",
                r.stats.broken.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                replica_lines,
                "gangway_replica_connect_failures_total{{{labels}}} {}",
                r.stats.connect_failures.load(Ordering::Relaxed)
            );
            write_histogram(
                &mut latency_lines,
                "gangway_replica_latency_seconds",
                &labels,
                &r.stats.traffic.latency,
            );
            let healthy = u8::from(r.is_active_ok() && !r.passive_down());
            let _ = writeln!(
                health_lines,
                "gangway_replica_healthy{{{labels}}} {healthy}"
            );
            let _ = writeln!(
                health_lines,
                "gangway_replica_in_flight{{{labels}}} {}",
                r.in_flight.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                health_lines,
                "gangway_replica_health_changed_timestamp_seconds{{{labels}}} {}",
                r.stats.health_changed.load(Ordering::Relaxed)
            );
        }
    }
    out.push_str(&replica_lines);
    let _ = writeln!(out, "# TYPE gangway_replica_latency_seconds histogram");
    out.push_str(&latency_lines);
    let _ = writeln!(out, "# TYPE gangway_replica_healthy gauge");
    out.push_str(&health_lines);
    let acme = crate::acme::report(&g.config);
    if !acme.is_empty() {
        let _ = writeln!(
            out,
            "# HELP gangway_certificate_renewal_failing 1 while the last ACME attempt for a certificate failed."
        );
        let _ = writeln!(out, "# TYPE gangway_certificate_renewal_failing gauge");
        let secs = |t: Option<std::time::SystemTime>| {
            t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        for c in &acme {
            let name = esc(c.names.first().map(String::as_str).unwrap_or("-"));
            let _ = writeln!(
                out,
                "gangway_certificate_renewal_failing{{name=\"{name}\"}} {}",
                u8::from(c.last_error.is_some())
            );
            if let Some(t) = secs(c.next_renewal) {
                let _ = writeln!(
                    out,
                    "gangway_certificate_next_renewal_timestamp_seconds{{name=\"{name}\"}} {t}"
                );
            }
        }
    }
    if let Some(tls) = &g.tls {
        let _ = writeln!(
            out,
            "# HELP gangway_certificate_expiry_timestamp_seconds When the certificate served for a name expires."
        );
        let _ = writeln!(
            out,
            "# TYPE gangway_certificate_expiry_timestamp_seconds gauge"
        );
        for (name, expiry) in tls.store.certificates() {
            if let Some(t) = expiry {
                let _ = writeln!(
                    out,
                    "gangway_certificate_expiry_timestamp_seconds{{name=\"{}\"}} {t}",
                    esc(&name)
                );
            }
        }
    }
    out
}

fn ms(v: Option<f64>) -> serde_json::Value {
    v.map(|s| serde_json::json!((s * 1e6).round() / 1e3))
        .unwrap_or(serde_json::Value::Null)
}

/// The `/status` document: sites, routes, replicas with health and load, certificates.
pub fn status(g: &Generation, s: &ServerStats) -> serde_json::Value {
    let sites: Vec<serde_json::Value> = g
        .proxy
        .router
        .sites()
        .iter()
        .map(|site| {
            let routes: Vec<serde_json::Value> = site
                .routes
                .iter()
                .map(|route| {
                    let b = &route.backend;
                    let replicas: Vec<serde_json::Value> = b
                        .members()
                        .replicas
                        .iter()
                        .map(|r| {
                            let health = if !r.is_active_ok() {
                                "unhealthy"
                            } else if r.passive_down() {
                                "cooling down"
                            } else {
                                "healthy"
                            };
                            serde_json::json!({
                                "address": r.addr.to_string(),
                                "health": health,
                                "in_flight": r.in_flight.load(Ordering::Relaxed),
                                "requests": r.stats.received(),
                                "responses": r.stats.traffic.total(),
                                "connect_failures": r.stats.connect_failures.load(Ordering::Relaxed),
                                "p50_ms": ms(r.stats.traffic.latency.quantile(0.5)),
                                "p99_ms": ms(r.stats.traffic.latency.quantile(0.99)),
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "path": route.path,
                        "upstreams": b.upstreams.iter().map(|u| u.to_string()).collect::<Vec<_>>(),
                        "balance": format!("{:?}", b.policy.balance),
                        "requests": b.stats.traffic.total(),
                        "retries": b.stats.retries.load(Ordering::Relaxed),
                        "failovers": b.stats.failovers.load(Ordering::Relaxed),
                        "p50_ms": ms(b.stats.traffic.latency.quantile(0.5)),
                        "p99_ms": ms(b.stats.traffic.latency.quantile(0.99)),
                        "replicas": replicas,
                    })
                })
                .collect();
            serde_json::json!({ "site": site.name, "tls": site.tls, "routes": routes })
        })
        .collect();
    let certificates: Vec<serde_json::Value> = g
        .tls
        .as_ref()
        .map(|t| {
            t.store
                .certificates()
                .into_iter()
                .map(|(name, expiry)| {
                    serde_json::json!({
                        "name": name,
                        "expires": expiry,
                        "state": if expiry.is_some() { "ok" } else { "waiting for certificate" },
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "draining": s.draining.load(Ordering::Relaxed),
        "in_flight": s.in_flight.load(Ordering::Relaxed),
        "connections": {
            "h1": s.connections_h1.load(Ordering::Relaxed),
            "h2": s.connections_h2.load(Ordering::Relaxed),
            "websocket": s.websockets.load(Ordering::Relaxed),
            "parked": s.parked.load(Ordering::Relaxed),
        },
        "workers": crate::server::workers::loads()
            .iter()
            .map(|w| serde_json::json!({ "open": w.open, "accepted": w.accepted }))
            .collect::<Vec<_>>(),
        "reloads": { "ok": s.reloads_ok.load(Ordering::Relaxed), "failed": s.reloads_failed.load(Ordering::Relaxed) },
        "sites": sites,
        "certificates": certificates,
    })
}
