//! Forwarding one request: route it, rewrite its headers, pick a replica, stream both ways.

pub mod body;
pub mod headers;
pub mod router;

use crate::config::{AccessLog, Config, Timeouts, TrustedProxies, UpstreamProtocol};
use crate::upstream::Replica;
use crate::upstream::pool::{self, ConnectError, Sender};
use body::{AccessRecord, ProxyBody};
use bytes::Bytes;
use headers::Forwarding;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use router::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// What the server knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Port of the listener (what `X-Forwarded-Port` reports).
    pub local_port: u16,
    /// `http` or `https`.
    pub proto: &'static str,
}

/// Everything a request needs, built from one config. Swapped whole on reload.
pub struct Proxy {
    pub router: Router,
    trusted: TrustedProxies,
    timeouts: Timeouts,
    access_log: AccessLog,
    /// The https listener's port, for redirects (none: no https listener).
    https_port: Option<u16>,
    hsts: Option<HeaderValue>,
}

/// Why gangway answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    BadRequest(&'static str),
    NoSite,
    NoRoute,
    /// No replica address is known (nothing resolved yet, or the name has no records).
    NoReplicas,
    /// Every replica refused or did not accept a connection in time.
    Unreachable,
    /// The replica did not send a response head in time.
    Timeout,
    /// The replica broke the connection after the request was sent.
    UpstreamBroken,
}

impl Failure {
    fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest(_) => StatusCode::BAD_REQUEST,
            Failure::NoSite | Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::NoReplicas => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Unreachable | Failure::UpstreamBroken => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Failure::BadRequest(why) => why,
            Failure::NoSite => "no site for this host",
            Failure::NoRoute => "no route for this path",
            Failure::NoReplicas => "no replica available",
            Failure::Unreachable => "no replica reachable",
            Failure::Timeout => "upstream did not answer in time",
            Failure::UpstreamBroken => "upstream connection failed",
        }
    }
}

/// The outcome of trying one replica.
enum Attempt {
    /// The response, and the HTTP/1.1 connection to pool once its body is read.
    Sent(Response<Incoming>, Option<Sender>),
    /// Nothing was sent: the request comes back to try elsewhere.
    NotConnected(Request<Incoming>, ConnectError),
    Failed(Failure, String),
}

impl Proxy {
    /// `https_port` is the bound https listener's port, if there is one.
    pub fn new(config: &Config, https_port: Option<u16>) -> Proxy {
        Proxy {
            router: Router::new(config),
            trusted: config.trusted_proxies.clone(),
            timeouts: config.timeouts,
            access_log: config.access_log,
            https_port,
            hsts: config.hsts.clone(),
        }
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Handles one request end to end; never fails (errors become responses).
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let mut resp = self.forward(req, conn).await;
        if conn.proto == "https"
            && let Some(hsts) = &self.hsts
        {
            resp.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        resp
    }

    async fn forward(&self, mut req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let start = Instant::now();
        // HTTP/2 carries the host in :authority; HTTP/1.1 in Host.
        let host = match req.headers().get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let mut log = (self.access_log != AccessLog::Off).then(|| {
            Box::new(AccessRecord {
                format: self.access_log,
                method: req.method().clone(),
                host: host.clone(),
                uri: req.uri().clone(),
                client: conn.peer.ip(),
                status: StatusCode::OK,
                replica: None,
                start,
                bytes: 0,
                error: None,
            })
        });
        let Some(host) = host else {
            return fail(Failure::BadRequest("missing Host header"), log, "");
        };
        let Ok(host_str) = host.to_str() else {
            return fail(Failure::BadRequest("invalid Host header"), log, "");
        };
        let Some(site) = self.router.site(host_str) else {
            return fail(Failure::NoSite, log, host_str);
        };
        if site.tls
            && conn.proto == "http"
            && let Some(port) = self.https_port
            && !req.uri().path().starts_with("/.well-known/acme-challenge/")
        {
            return redirect_to_https(host_str, port, req.uri(), log);
        }
        let Some(route) = site.route(req.uri().path()) else {
            return fail(Failure::NoRoute, log, host_str);
        };

        let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers, upgrade);
        let path_and_query = match &route.strip {
            Some(strip) => {
                let rest = router::stripped(parts.uri.path(), strip);
                let pq = match parts.uri.query() {
                    Some(q) => format!("{rest}?{q}"),
                    None => rest.to_owned(),
                };
                PathAndQuery::try_from(pq).ok()
            }
            None => parts.uri.path_and_query().cloned(),
        };
        let path_and_query = path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/"));
        let h2c = route.backend.protocol == UpstreamProtocol::H2c && !upgrade;
        parts.uri = if h2c {
            // HTTP/2 carries the host as :authority, taken from the absolute URI.
            Uri::builder()
                .scheme("http")
                .authority(host_str)
                .path_and_query(path_and_query.clone())
                .build()
                .unwrap_or_else(|_| Uri::from(path_and_query))
        } else {
            Uri::from(path_and_query)
        };
        parts.version = if h2c {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, host.clone());
        }
        let client = headers::set_forwarding(
            &mut parts.headers,
            &Forwarding {
                peer: conn.peer.ip(),
                proto: conn.proto,
                host: &host,
                port: conn.local_port,
                prefix: route.strip.as_deref(),
            },
            &self.trusted,
        );
        if let Some(l) = log.as_mut() {
            l.client = client;
        }

        let replicas = route.backend.replicas();
        if replicas.is_empty() {
            return fail(Failure::NoReplicas, log, host_str);
        }
        let first = route.backend.next_index(replicas.len());
        let mut req = Request::from_parts(parts, body);
        let mut last_error = String::new();
        for i in 0..replicas.len() {
            let replica = &replicas[(first + i) % replicas.len()];
            if let Some(l) = log.as_mut() {
                l.replica = Some(replica.addr);
            }
            let attempt = if h2c {
                self.attempt_h2(replica, req).await
            } else {
                self.attempt(replica, req, upgrade).await
            };
            match attempt {
                Attempt::Sent(resp, sender) => {
                    return self.respond(resp, sender, replica, client_upgrade, log);
                }
                Attempt::NotConnected(back, e) => {
                    tracing::warn!(replica = %replica.addr, error = %e, "replica unreachable, trying the next one");
                    last_error = format!("{}: {e}", replica.addr);
                    req = back;
                }
                Attempt::Failed(failure, detail) => return fail(failure, log, &detail),
            }
        }
        fail(Failure::Unreachable, log, &last_error)
    }

    /// Sends `req` to one replica, on a pooled connection when one is idle.
    async fn attempt(
        &self,
        replica: &Arc<Replica>,
        mut req: Request<Incoming>,
        upgrade: bool,
    ) -> Attempt {
        // An upgraded connection is never returned to the pool, so take a fresh one for it.
        if !upgrade {
            while let Some(sender) = replica.pool.take_idle() {
                match self.send(sender, req).await {
                    Ok(sent) => return sent,
                    // The pooled connection was closed before our request was written.
                    Err(back) => req = back,
                }
            }
        }
        let sender = match pool::connect(replica.addr, self.timeouts.upstream_connect).await {
            Ok(s) => s,
            Err(e) => return Attempt::NotConnected(req, e),
        };
        match self.send(sender, req).await {
            Ok(sent) => sent,
            Err(back) => Attempt::NotConnected(
                back,
                ConnectError::Io(std::io::Error::other("connection closed at once")),
            ),
        }
    }

    /// Sends `req` to one replica over its shared h2c connection, opening it if needed.
    async fn attempt_h2(&self, replica: &Arc<Replica>, req: Request<Incoming>) -> Attempt {
        let connect = || pool::connect_h2(replica.addr, self.timeouts.upstream_connect);
        let mut sender = match replica.h2.get() {
            Some(s) => s,
            None => match connect().await {
                Ok(s) => {
                    replica.h2.set(s.clone());
                    s
                }
                Err(e) => return Attempt::NotConnected(req, e),
            },
        };
        if sender.ready().await.is_err() {
            // The shared connection went away between requests: one new one.
            sender = match connect().await {
                Ok(s) => {
                    replica.h2.set(s.clone());
                    s
                }
                Err(e) => return Attempt::NotConnected(req, e),
            };
        }
        let sent =
            tokio::time::timeout(self.timeouts.upstream_header, sender.try_send_request(req));
        match sent.await {
            Err(_) => Attempt::Failed(Failure::Timeout, String::new()),
            Ok(Ok(resp)) => Attempt::Sent(resp, None),
            Ok(Err(mut e)) => match e.take_message() {
                Some(req) => Attempt::NotConnected(
                    req,
                    ConnectError::Io(std::io::Error::other("h2c connection not ready")),
                ),
                None => Attempt::Failed(Failure::UpstreamBroken, e.into_error().to_string()),
            },
        }
    }

    /// Sends on one connection. `Err` gives the request back when nothing was written.
    async fn send(
        &self,
        mut sender: Sender,
        req: Request<Incoming>,
    ) -> Result<Attempt, Request<Incoming>> {
        if sender.ready().await.is_err() {
            return Err(req);
        }
        let sent =
            tokio::time::timeout(self.timeouts.upstream_header, sender.try_send_request(req));
        match sent.await {
            Err(_) => Ok(Attempt::Failed(Failure::Timeout, String::new())),
            Ok(Ok(resp)) => Ok(Attempt::Sent(resp, Some(sender))),
            Ok(Err(mut e)) => match e.take_message() {
                Some(req) => Err(req),
                None => Ok(Attempt::Failed(
                    Failure::UpstreamBroken,
                    e.into_error().to_string(),
                )),
            },
        }
    }

    fn respond(
        &self,
        mut resp: Response<Incoming>,
        sender: Option<Sender>,
        replica: &Arc<Replica>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        mut log: Option<Box<AccessRecord>>,
    ) -> Response<ProxyBody> {
        if let Some(l) = log.as_mut() {
            l.status = resp.status();
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let addr = replica.addr;
                tokio::spawn(async move {
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((client, upstream)) => {
                            let mut client = TokioIo::new(client);
                            let mut upstream = TokioIo::new(upstream);
                            if let Err(e) =
                                tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                            {
                                tracing::debug!(replica = %addr, error = %e, "tunnel ended");
                            }
                        }
                        Err(e) => tracing::debug!(replica = %addr, error = %e, "upgrade failed"),
                    }
                });
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, ProxyBody::empty(log));
            }
            // A 101 nobody asked for cannot be relayed.
            return fail(Failure::UpstreamBroken, log, "unexpected 101 from upstream");
        }
        headers::remove_hop_by_hop(resp.headers_mut(), false);
        let (parts, body) = resp.into_parts();
        Response::from_parts(
            parts,
            ProxyBody::upstream(body, sender.map(|s| (s, Arc::clone(replica))), log),
        )
    }
}

/// 308 to the same host, path and query over https (308 keeps the method and body).
fn redirect_to_https(
    host: &str,
    port: u16,
    uri: &Uri,
    mut log: Option<Box<AccessRecord>>,
) -> Response<ProxyBody> {
    let name = router::host_without_port(host).to_ascii_lowercase();
    let name = name.as_str();
    let name_is_v6 = name.contains(':');
    let mut location = String::with_capacity(16 + host.len() + uri.path().len());
    location.push_str("https://");
    if name_is_v6 {
        location.push('[');
        location.push_str(name);
        location.push(']');
    } else {
        location.push_str(name);
    }
    if port != 443 {
        location.push(':');
        location.push_str(&port.to_string());
    }
    location.push_str(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let status = StatusCode::PERMANENT_REDIRECT;
    if let Some(l) = log.as_mut() {
        l.status = status;
    }
    let mut resp = Response::new(ProxyBody::empty(log));
    *resp.status_mut() = status;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
    }
    resp
}

fn fail(failure: Failure, mut log: Option<Box<AccessRecord>>, detail: &str) -> Response<ProxyBody> {
    let status = failure.status();
    if status.is_server_error() {
        tracing::warn!(
            status = status.as_u16(),
            reason = failure.reason(),
            detail,
            "request failed"
        );
    } else {
        tracing::debug!(
            status = status.as_u16(),
            reason = failure.reason(),
            detail,
            "request refused"
        );
    }
    if let Some(l) = log.as_mut() {
        l.status = status;
        l.error = Some(failure.reason());
    }
    let mut resp = Response::new(ProxyBody::full(
        Bytes::from(format!("{} {}\n", status.as_u16(), failure.reason())),
        log,
    ));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if failure == Failure::NoReplicas {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}
