//! Forwarding one request: route it, rewrite its headers, pick a replica, stream both ways.

pub mod body;
pub mod headers;
pub mod router;

use crate::admin::stats::ServerStats;
use crate::config::{AccessLog, Balance, Config, Timeouts, TrustedProxies, UpstreamProtocol};
use crate::upstream::PickCtx;
use crate::upstream::Replica;
use crate::upstream::h1::{Conn, H1Body, SendError};
use crate::upstream::pool::{self, ConnectError, ReqBody};
use body::{AccessRecord, InFlight, ProxyBody};
use bytes::Bytes;
use headers::{Forwarding, X_REQUEST_ID};
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use router::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What the server knows about the connection a request came on.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer address and listener port (what `X-Forwarded-Port` reports) as header text.
    pub text: headers::PeerText,
    /// `http` or `https`.
    pub proto: &'static str,
    /// For HTTPS connections, filled in once the handshake is done.
    pub tls: Option<Arc<std::sync::OnceLock<TlsInfo>>>,
}

/// What the access log says about a connection's TLS.
#[derive(Debug)]
pub struct TlsInfo {
    /// `TLSv1_3`, `TLSv1_2`.
    pub version: String,
    pub sni: Option<String>,
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
    /// Counters shared by every generation of the server.
    pub stats: Arc<ServerStats>,
    /// Send `X-Gangway-Replica` with each proxied response.
    replica_header: bool,
    /// HTTP-01 challenge responses (read from ACME storage), when ACME is configured.
    acme: Option<crate::acme::Challenges>,
}

/// Why gangway answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    BadRequest(&'static str),
    NoSite,
    NoRoute,
    /// No replica address is known (nothing resolved yet, or the name has no records).
    NoReplicas,
    /// Replicas are known but none is healthy.
    NoHealthy,
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
            Failure::NoReplicas | Failure::NoHealthy => StatusCode::SERVICE_UNAVAILABLE,
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
            Failure::NoHealthy => "no healthy replica",
            Failure::Unreachable => "no replica reachable",
            Failure::Timeout => "upstream did not answer in time",
            Failure::UpstreamBroken => "upstream connection failed",
        }
    }
}

/// The outcome of trying one replica.
enum Attempt {
    /// The response over h2c.
    Sent(Response<Incoming>),
    /// The response from gangway's own client, whose body gives its connection back.
    SentOwn(Response<H1Body>),
    /// Nothing was sent: the request comes back to try elsewhere (none for gangway's own
    /// client, which only borrows it).
    NotConnected(Option<Request<ReqBody>>, ConnectError),
    Failed(Failure, String),
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        local_port: u16,
        proto: &'static str,
        tls: Option<Arc<std::sync::OnceLock<TlsInfo>>>,
    ) -> ConnInfo {
        ConnInfo {
            peer,
            text: headers::PeerText::new(peer.ip(), local_port),
            proto,
            tls,
        }
    }
}

impl Proxy {
    /// `https_port` is the bound https listener's port, if there is one.
    pub fn new(config: &Config, https_port: Option<u16>, stats: Arc<ServerStats>) -> Proxy {
        Proxy {
            stats,
            replica_header: config.replica_header,
            router: Router::new(config),
            trusted: config.trusted_proxies.clone(),
            timeouts: config.timeouts,
            access_log: config.access_log,
            https_port,
            hsts: config.hsts.clone(),
            acme: config
                .acme
                .as_ref()
                .map(|a| crate::acme::Challenges::new(&a.storage, crate::tls::provider())),
        }
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Handles one request end to end; never fails (errors become responses).
    ///
    /// The request is taken apart and rewritten by plain functions, and only the attempts
    /// are awaited, on a borrowed [`Prepared`]: an `async fn` keeps its own copy of what it
    /// is given, and hyper moves the whole future (into its dispatcher for HTTP/1.1, into
    /// a task for each HTTP/2 stream), so passing the request down through nested async
    /// functions made the future 4.4 KB.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let mut p = match self.prepare(req, conn) {
            Prep::Forward(p) => p,
            Prep::Respond(resp) => return self.finish(resp, conn),
            Prep::Challenge(c) => {
                // Boxed: rare, and its state would enlarge every request.
                let resp = Box::pin(self.challenge(*c, conn)).await;
                return self.finish(resp, conn);
            }
        };
        let resp = self.dispatch(&mut p, conn).await;
        p.record(&resp);
        self.finish(resp, conn)
    }

    /// HSTS on HTTPS responses, when configured.
    fn finish(&self, mut resp: Response<ProxyBody>, conn: &ConnInfo) -> Response<ProxyBody> {
        if conn.proto == "https"
            && let Some(hsts) = &self.hsts
        {
            resp.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        resp
    }

    /// Checks the host, then routes (or sets an HTTP-01 token request aside).
    fn prepare(&self, req: Request<Incoming>, conn: &ConnInfo) -> Prep<'_> {
        let start = Instant::now();
        // HTTP/2 carries the host in :authority; HTTP/1.1 in Host.
        let host = match req.headers().get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let log = (self.access_log != AccessLog::Off).then(|| {
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
                version: req.version(),
                referer: req.headers().get(header::REFERER).cloned(),
                user_agent: req.headers().get(header::USER_AGENT).cloned(),
                request_id: None,
                upstream_ms: None,
                tls: conn.tls.clone(),
            })
        });
        let Some(host) = host else {
            return Prep::Respond(fail(Failure::BadRequest("missing Host header"), log, ""));
        };
        if host.to_str().is_err() {
            return Prep::Respond(fail(Failure::BadRequest("invalid Host header"), log, ""));
        }
        // ACME HTTP-01 validation: answered before routing and redirects when a validation
        // for this token is under way; other tokens go to the site as usual.
        if conn.proto == "http"
            && self.acme.is_some()
            && req
                .uri()
                .path()
                .starts_with(crate::acme::challenge::HTTP_PREFIX)
        {
            return Prep::Challenge(Box::new(Unrouted {
                req,
                host,
                log,
                start,
            }));
        }
        let unrouted = Unrouted {
            req,
            host,
            log,
            start,
        };
        match self.route(unrouted, conn) {
            Ok(p) => Prep::Forward(p),
            Err(resp) => Prep::Respond(resp),
        }
    }

    /// Answers an HTTP-01 validation request, or routes it like any other.
    async fn challenge(&self, u: Unrouted, conn: &ConnInfo) -> Response<ProxyBody> {
        let token = u
            .req
            .uri()
            .path()
            .strip_prefix(crate::acme::challenge::HTTP_PREFIX)
            .unwrap_or_default();
        if let Some(challenges) = &self.acme
            && let Some(key_authorization) = challenges.http_response(token).await
        {
            let host = u.host.to_str().unwrap_or_default();
            tracing::info!(host, token, "answered an HTTP-01 validation");
            let mut log = u.log;
            if let Some(l) = log.as_mut() {
                l.status = StatusCode::OK;
            }
            let mut resp = Response::new(ProxyBody::full(Bytes::from(key_authorization), log));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return resp;
        }
        match self.route(u, conn) {
            Ok(mut p) => {
                let resp = self.dispatch(&mut p, conn).await;
                p.record(&resp);
                resp
            }
            Err(resp) => resp,
        }
    }

    /// Finds the site and route, then rewrites the request for its replicas.
    // The error is a response, made once and returned by value from a plain function.
    #[allow(clippy::result_large_err)]
    fn route(&self, u: Unrouted, conn: &ConnInfo) -> Result<Prepared<'_>, Response<ProxyBody>> {
        let Unrouted {
            mut req,
            host,
            mut log,
            start,
        } = u;
        let Ok(host_str) = host.to_str() else {
            return Err(fail(Failure::BadRequest("invalid Host header"), log, ""));
        };
        let Some(site) = self.router.site(host_str) else {
            self.stats.unrouted.fetch_add(1, Ordering::Relaxed);
            return Err(fail(Failure::NoSite, log, host_str));
        };
        if site.tls
            && conn.proto == "http"
            && let Some(port) = self.https_port
            && !req.uri().path().starts_with("/.well-known/acme-challenge/")
        {
            return Err(redirect_to_https(host_str, port, req.uri(), log));
        }
        let Some(route) = site.route(req.uri().path()) else {
            self.stats.unrouted.fetch_add(1, Ordering::Relaxed);
            return Err(fail(Failure::NoRoute, log, host_str));
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
        // A request from a peer that is not a trusted proxy, to an HTTP/1.1 replica (nearly
        // all of them): its forwarding headers are the connection's, made once, and are
        // written after the map with the request id, never inserted into it. Otherwise they
        // are set in the map, for hyper's h2c client or to extend a trusted proxy's chain.
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, host.clone());
        }
        let trusted_peer = self.trusted.contains(conn.text.ip);
        let mut added = None;
        let client = if !h2c && !trusted_peer {
            headers::drop_claims(&mut parts.headers, true);
            let a = headers::Added {
                block: conn
                    .text
                    .forwarding_block(&host, conn.proto, route.strip.as_deref()),
                request_id: fastrand::u128(..),
            };
            if let Some(l) = log.as_mut() {
                l.client = conn.text.ip;
                l.request_id = Some(headers::request_id_value(a.request_id));
            }
            added = Some(a);
            conn.text.ip
        } else {
            // The forwarding headers and X-Request-Id below: one growth at most.
            parts.headers.reserve(headers::ADDED_HEADERS);
            let client = headers::set_forwarding(
                &mut parts.headers,
                &Forwarding {
                    conn: &conn.text,
                    proto: conn.proto,
                    host: &host,
                    prefix: route.strip.as_deref(),
                },
                &self.trusted,
            );
            let request_id = self.request_id(&mut parts.headers, conn.text.ip, log.is_some());
            if let Some(l) = log.as_mut() {
                l.client = client;
                l.request_id = request_id;
            }
            client
        };
        let backend = &route.backend;
        let members = backend.members();
        if members.is_empty() {
            // Counted in the route's traffic, like every answer after routing.
            let resp = fail(Failure::NoReplicas, log, host_str);
            backend
                .stats
                .traffic
                .record(resp.status().as_u16(), start.elapsed());
            return Err(resp);
        }
        let sticky = match backend.policy.balance {
            Balance::Cookie => sticky_cookie(&parts.headers),
            _ => None,
        };
        // A bodiless request can be rebuilt and sent again; one with a body cannot.
        let bodiless = body.is_end_stream();
        let retries = &backend.policy.retries;
        let retry_after_send =
            bodiless && retries.attempts > 1 && retries.methods.contains(&parts.method);
        // HTTP/1.1 goes through gangway's own client, which borrows the request; h2c
        // through hyper's, which consumes it (hence the copy for a resend).
        let msg = if h2c {
            let copy = retry_after_send.then(|| RequestCopy::of(&parts));
            let body: ReqBody = if bodiless {
                Either::Right(Empty::new())
            } else {
                Either::Left(body)
            };
            Msg::H2c(Box::new((Some(Request::from_parts(parts, body)), copy)))
        } else {
            Msg::Own(parts, added, (!bodiless).then_some(body))
        };
        Ok(Prepared {
            route,
            start,
            log,
            host,
            msg,
            client_upgrade,
            members,
            ctx: PickCtx { client, sticky },
            upgrade,
            retry_after_send,
        })
    }

    /// The request id sent upstream: a trusted peer's `X-Request-Id` when it is sane, else a
    /// new random one (a client must not choose the id other systems correlate by). Returns
    /// a copy for the access log when `keep` is set.
    fn request_id(
        &self,
        headers: &mut http::HeaderMap,
        peer: std::net::IpAddr,
        keep: bool,
    ) -> Option<HeaderValue> {
        if self.trusted.contains(peer)
            && let Some(v) = headers.get(&X_REQUEST_ID)
            && !v.is_empty()
            && v.len() <= 200
            && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        {
            return keep.then(|| v.clone());
        }
        let value = headers::request_id_value(fastrand::u128(..));
        let kept = keep.then(|| value.clone());
        headers.insert(&X_REQUEST_ID, value);
        kept
    }

    /// Tries the route's replicas in turn until one answers.
    async fn dispatch(&self, p: &mut Prepared<'_>, conn: &ConnInfo) -> Response<ProxyBody> {
        let backend = &p.route.backend;
        let retries = &backend.policy.retries;
        let sticky = p.ctx.sticky;
        let mut tried = [0usize; MAX_TRIES];
        let mut n_tried = 0;
        let mut sent = 0;
        let mut last_error = String::new();
        while n_tried < MAX_TRIES {
            let Some(idx) = backend.pick(&p.members, &p.ctx, &tried[..n_tried]) else {
                break;
            };
            tried[n_tried] = idx;
            n_tried += 1;
            let replica = &p.members.replicas[idx];
            if let Some(l) = p.log.as_mut() {
                l.replica = Some(replica.addr);
            }
            let in_flight = InFlight::new(replica);
            let attempt = match &mut p.msg {
                Msg::Own(parts, added, upload) => {
                    let to_send = Outgoing {
                        parts,
                        added: added.as_ref(),
                        body: upload.as_mut(),
                        upgrade: p.upgrade,
                        resend: p.retry_after_send,
                        start: p.start,
                        header_limit: backend.policy.upstream_header,
                    };
                    self.attempt_own(replica, to_send).await
                }
                // Boxed: h2c is the rare case, and its state would enlarge every request.
                Msg::H2c(h2c) => match h2c.0.take() {
                    Some(r) => {
                        let limit = backend.policy.upstream_header;
                        Box::pin(self.attempt_h2(replica, r, limit)).await
                    }
                    None => break,
                },
            };
            let passive = backend.policy.passive.as_ref();
            let read_limit = backend.policy.upstream_read;
            let log = &mut p.log;
            match attempt {
                Attempt::Sent(resp) => {
                    self.record_response(replica, resp.status(), p.start, log, passive);
                    let resp = respond_h2c(resp, log.take(), in_flight, read_limit);
                    return self.decorate(resp, backend, sticky, replica, conn);
                }
                Attempt::SentOwn(resp) => {
                    self.record_response(replica, resp.status(), p.start, log, passive);
                    let upgrade = p.client_upgrade.take();
                    let resp =
                        self.respond(resp, replica, upgrade, log.take(), in_flight, read_limit);
                    return self.decorate(resp, backend, sticky, replica, conn);
                }
                Attempt::NotConnected(back, e) => {
                    // Nothing was sent: always safe to try the next replica.
                    tracing::warn!(replica = %replica.addr, error = %e, "replica unreachable, trying the next one");
                    replica
                        .stats
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    backend.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    replica.report_failure(passive);
                    backend.resolve_now.notify_one();
                    last_error = format!("{}: {e}", replica.addr);
                    if let Msg::H2c(h2c) = &mut p.msg {
                        h2c.0 = back;
                    }
                }
                Attempt::Failed(Failure::UpstreamBroken, detail) => {
                    replica.stats.broken.fetch_add(1, Ordering::Relaxed);
                    replica.report_failure(passive);
                    sent += 1;
                    let again = p.retry_after_send && sent < retries.attempts;
                    if !again {
                        return fail(Failure::UpstreamBroken, log.take(), &detail);
                    }
                    backend.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(replica = %replica.addr, error = %detail, "upstream failed; retrying on another replica");
                    last_error = format!("{}: {detail}", replica.addr);
                    if let Msg::H2c(h2c) = &mut p.msg {
                        h2c.0 = h2c.1.as_ref().map(RequestCopy::rebuild);
                    }
                }
                Attempt::Failed(failure, detail) => {
                    // The replica got the request and did not answer in time.
                    replica.stats.broken.fetch_add(1, Ordering::Relaxed);
                    replica.report_failure(passive);
                    return fail(failure, log.take(), &detail);
                }
            }
        }
        let log = p.log.take();
        if n_tried == 0 {
            return fail(Failure::NoHealthy, log, p.host.to_str().unwrap_or_default());
        }
        fail(Failure::Unreachable, log, &last_error)
    }

    /// Sends a request to one replica with gangway's own client, on a pooled connection
    /// when one is idle (an upgrade always gets a new one: it is never pooled again).
    async fn attempt_own(&self, replica: &Arc<Replica>, mut out: Outgoing<'_>) -> Attempt {
        while !out.upgrade
            && let Some(conn) = replica.pool.take(out.start)
        {
            match self.send_own(conn, &mut out).await {
                // The pooled connection failed as the request went out: nothing was done.
                Err(SendError::Unsent(_)) => {}
                // The keep-alive race: the replica closed this idle connection as our
                // request went out (a replica shutting down does so), so it most likely
                // never handled it. Once, on a new connection, not counted as a retry.
                Err(SendError::Closed) if out.resend => break,
                Err(e) => return Attempt::Failed(Failure::UpstreamBroken, e.to_string()),
                Ok(sent) => return sent,
            }
        }
        // Boxed: a new connection is the rare case (the pool serves most requests).
        let connect = Box::pin(pool::connect(replica.addr, self.timeouts.upstream_connect));
        let conn = match connect.await {
            Ok(c) => c,
            Err(e) => return Attempt::NotConnected(None, e),
        };
        match self.send_own(conn, &mut out).await {
            Ok(sent) => sent,
            Err(SendError::Unsent(e)) => Attempt::NotConnected(None, ConnectError::Io(e)),
            Err(e) => Attempt::Failed(Failure::UpstreamBroken, e.to_string()),
        }
    }

    async fn send_own(&self, conn: Conn, out: &mut Outgoing<'_>) -> Result<Attempt, SendError> {
        let send = conn.send(
            out.parts,
            out.added,
            out.body.as_deref_mut(),
            out.header_limit,
        );
        match send.await {
            Ok(resp) => Ok(Attempt::SentOwn(resp)),
            Err(SendError::TimedOut) => Ok(Attempt::Failed(Failure::Timeout, String::new())),
            Err(e) => Err(e),
        }
    }

    /// Counts a replica's response head in its stats, health and the access log.
    fn record_response(
        &self,
        replica: &Replica,
        status: StatusCode,
        start: Instant,
        log: &mut Option<Box<AccessRecord>>,
        passive: Option<&crate::config::Passive>,
    ) {
        let upstream = start.elapsed();
        replica.stats.traffic.record(status.as_u16(), upstream);
        if let Some(l) = log.as_mut() {
            l.upstream_ms = Some(upstream.as_secs_f64() * 1000.0);
        }
        if matches!(status.as_u16(), 502..=504) {
            replica.report_failure(passive);
        } else {
            replica.report_success();
        }
    }

    /// The sticky cookie and `X-Gangway-Replica`, when configured.
    fn decorate(
        &self,
        mut resp: Response<ProxyBody>,
        backend: &crate::upstream::Backend,
        sticky: Option<u64>,
        replica: &Replica,
        conn: &ConnInfo,
    ) -> Response<ProxyBody> {
        if backend.policy.balance == Balance::Cookie && sticky != Some(replica.id) {
            set_sticky_cookie(&mut resp, replica.id, conn.proto == "https");
        }
        if self.replica_header {
            let mut buf = String::with_capacity(48);
            let _ = std::fmt::Write::write_fmt(&mut buf, format_args!("{}", replica.addr));
            if let Ok(v) = HeaderValue::from_str(&buf) {
                resp.headers_mut().insert(&X_GANGWAY_REPLICA, v);
            }
        }
        resp
    }

    /// Sends `req` to one replica over its shared h2c connection, opening it if needed.
    async fn attempt_h2(
        &self,
        replica: &Arc<Replica>,
        req: Request<ReqBody>,
        header_limit: Duration,
    ) -> Attempt {
        let connect = || pool::connect_h2(replica.addr, self.timeouts.upstream_connect);
        let mut sender = match replica.h2.get() {
            Some(s) => s,
            None => match connect().await {
                Ok(s) => {
                    replica.h2.set(s.clone());
                    s
                }
                Err(e) => return Attempt::NotConnected(Some(req), e),
            },
        };
        if sender.ready().await.is_err() {
            // The shared connection went away between requests: one new one.
            sender = match connect().await {
                Ok(s) => {
                    replica.h2.set(s.clone());
                    s
                }
                Err(e) => return Attempt::NotConnected(Some(req), e),
            };
        }
        let sent = tokio::time::timeout(header_limit, sender.try_send_request(req));
        match sent.await {
            Err(_) => Attempt::Failed(Failure::Timeout, String::new()),
            Ok(Ok(resp)) => Attempt::Sent(resp),
            Ok(Err(mut e)) => match e.take_message() {
                Some(req) => Attempt::NotConnected(
                    Some(req),
                    ConnectError::Io(std::io::Error::other("h2c connection not ready")),
                ),
                None => Attempt::Failed(Failure::UpstreamBroken, e.into_error().to_string()),
            },
        }
    }

    /// Relays a response from gangway's own client; a `101` to an upgrade request
    /// becomes a tunnel between the two connections.
    fn respond(
        &self,
        resp: Response<H1Body>,
        replica: &Arc<Replica>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        mut log: Option<Box<AccessRecord>>,
        in_flight: InFlight,
        read_limit: Duration,
    ) -> Response<ProxyBody> {
        let (parts, body) = logged_parts(resp, &mut log);
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // A 101 nobody asked for cannot be relayed.
            let (Some(client_upgrade), Some((upstream, early))) =
                (client_upgrade, body.into_upgraded())
            else {
                return fail(Failure::UpstreamBroken, log, "unexpected 101 from upstream");
            };
            let addr = replica.addr;
            let stats = Arc::clone(&self.stats);
            tokio::spawn(async move {
                let client = match client_upgrade.await {
                    Ok(client) => client,
                    Err(e) => {
                        tracing::debug!(replica = %addr, error = %e, "upgrade failed");
                        return;
                    }
                };
                let _open = crate::admin::stats::GaugeGuard::new(&stats.websockets);
                let mut client = TokioIo::new(client);
                let mut upstream = upstream;
                // What the replica sent right after its 101 goes first.
                let tunnel = async {
                    tokio::io::AsyncWriteExt::write_all(&mut client, &early).await?;
                    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                };
                if let Err(e) = tunnel.await {
                    tracing::debug!(replica = %addr, error = %e, "tunnel ended");
                }
            });
            return Response::from_parts(parts, ProxyBody::empty(log));
        }
        // The own client's parse left the hop-by-hop headers out already (upstream/h1.rs).
        Response::from_parts(
            parts,
            ProxyBody::h1(body, Arc::clone(replica), log, in_flight, read_limit),
        )
    }
}

/// A response over h2c, relayed.
fn respond_h2c(
    resp: Response<Incoming>,
    mut log: Option<Box<AccessRecord>>,
    in_flight: InFlight,
    read_limit: Duration,
) -> Response<ProxyBody> {
    let (mut parts, body) = logged_parts(resp, &mut log);
    headers::remove_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(
        parts,
        ProxyBody::upstream(body, log, Some(in_flight), read_limit),
    )
}

/// A replica's response taken apart, its status noted for the access log.
fn logged_parts<B>(
    resp: Response<B>,
    log: &mut Option<Box<AccessRecord>>,
) -> (http::response::Parts, B) {
    if let Some(l) = log.as_mut() {
        l.status = resp.status();
    }
    resp.into_parts()
}

/// A request not routed yet.
struct Unrouted {
    req: Request<Incoming>,
    /// From `Host` or the HTTP/2 authority; checked to be text.
    host: HeaderValue,
    log: Option<Box<AccessRecord>>,
    start: Instant,
}

/// What [`Proxy::prepare`] made of a request.
enum Prep<'a> {
    /// gangway answers itself (a bad request, no site, a redirect…).
    Respond(Response<ProxyBody>),
    /// Possibly an HTTP-01 validation: the token is looked up before routing.
    Challenge(Box<Unrouted>),
    Forward(Prepared<'a>),
}

/// A routed, rewritten request and what its attempts need.
struct Prepared<'a> {
    route: &'a router::RouteEntry,
    start: Instant,
    log: Option<Box<AccessRecord>>,
    host: HeaderValue,
    msg: Msg,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    members: Arc<crate::upstream::Members>,
    ctx: PickCtx,
    upgrade: bool,
    /// Bodiless and idempotent: may be sent to a second replica after a broken answer.
    retry_after_send: bool,
}

impl Prepared<'_> {
    /// Counts the response in its route's traffic.
    fn record(&self, resp: &Response<ProxyBody>) {
        self.route
            .backend
            .stats
            .traffic
            .record(resp.status().as_u16(), self.start.elapsed());
    }
}

/// The request in the form its client needs.
// The large variant is the common one; the rare h2c one is boxed so it adds nothing.
#[allow(clippy::large_enum_variant)]
enum Msg {
    /// For gangway's own HTTP/1.1 client: the head, what is written after its headers
    /// (see `Proxy::route`), and the body still to stream (none for a bodiless request).
    Own(
        http::request::Parts,
        Option<headers::Added>,
        Option<Incoming>,
    ),
    /// For hyper's h2c client, which consumes the request: the request (none while it is
    /// out), and a copy for a resend.
    H2c(Box<(Option<Request<ReqBody>>, Option<RequestCopy>)>),
}

/// What gangway's own client sends: the request, borrowed, so it can be sent again.
struct Outgoing<'a> {
    parts: &'a http::request::Parts,
    /// Headers written after the map's.
    added: Option<&'a headers::Added>,
    /// The client's body, streamed as it comes (none for a bodiless request).
    body: Option<&'a mut Incoming>,
    upgrade: bool,
    /// May be sent twice (bodiless and idempotent).
    resend: bool,
    /// When the request came in.
    start: Instant,
    /// The route's `upstream_header` timeout.
    header_limit: Duration,
}

/// Tries per request at most (connect failures included): more replicas than this are
/// not tried for one request.
const MAX_TRIES: usize = 16;

/// What is needed to send a bodiless request again.
struct RequestCopy {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
}

impl RequestCopy {
    fn of(parts: &http::request::Parts) -> RequestCopy {
        RequestCopy {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn rebuild(&self) -> Request<ReqBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

const STICKY_COOKIE: &str = "gw_sticky";
static X_GANGWAY_REPLICA: http::HeaderName = http::HeaderName::from_static("x-gangway-replica");

/// The replica id in a `gw_sticky` cookie, if any.
fn sticky_cookie(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == STICKY_COOKIE)
        .and_then(|(_, v)| u64::from_str_radix(v, 16).ok())
}

fn set_sticky_cookie(resp: &mut Response<ProxyBody>, id: u64, secure: bool) {
    let value = format!(
        "{STICKY_COOKIE}={id:016x}; Path=/; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().append(header::SET_COOKIE, v);
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
    if matches!(failure, Failure::NoReplicas | Failure::NoHealthy) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}
