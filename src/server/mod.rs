//! Listeners, accept loops, per-connection tasks and graceful shutdown.

pub mod timed_io;
pub mod workers;

use crate::admin::{
    self,
    stats::{GaugeGuard, ServerStats},
};
use crate::config::Config;
use crate::proxy::{ConnInfo, Proxy};
use crate::tls;
use crate::upstream::{self, resolve::Resolve};
use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use timed_io::{Activity, TimedIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The bound sockets gangway serves on.
pub struct Listeners {
    pub http: TcpListener,
    pub https: Option<TcpListener>,
    /// The admin listener (metrics, status, health, dashboard).
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `listen`.
    pub async fn bind(listen: &crate::config::Listen) -> io::Result<Listeners> {
        let http = TcpListener::bind(listen.http).await.map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {}: {e}", listen.http))
        })?;
        let https = match listen.https {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let admin = match listen.admin {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Listeners { http, https, admin })
    }

    pub fn http_only(http: TcpListener) -> Listeners {
        Listeners {
            http,
            https: None,
            admin: None,
        }
    }
}

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one config produced: the request handler and the TLS state, swapped whole on reload.
/// Connections and requests in flight keep the generation they started with.
pub struct Generation {
    pub proxy: Arc<Proxy>,
    pub tls: Option<Arc<tls::Tls>>,
    pub config: Config,
    /// Stops this generation's discovery, health and certificate tasks.
    stop: CancellationToken,
}

/// Where a reload reads the config from, and what asks for one besides a file change.
pub struct ReloadSource {
    pub path: PathBuf,
    /// Notified on SIGHUP.
    pub trigger: Arc<Notify>,
}

/// How often the config file is checked for changes.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Builds a generation: TLS state, routes, replica sets (taking over the replicas of the
/// previous generation so health and connections survive), resolves every name once and
/// starts the background tasks.
async fn build_generation(
    config: Config,
    https_port: Option<u16>,
    resolver: &Arc<dyn Resolve>,
    previous: Option<&Generation>,
    shutdown: &CancellationToken,
    stats: &Arc<ServerStats>,
) -> io::Result<Generation> {
    let stop = shutdown.child_token();
    let tls = match https_port {
        Some(_) => {
            let provider = tls::provider();
            let mut t = tls::Tls::new(&config, &provider)?;
            if let (Some(acme), Some(challenges)) = (&config.acme, t.acme_challenges()) {
                // Loads stored certificates into the slots now, then keeps them renewed.
                crate::acme::spawn(
                    acme.clone(),
                    t.take_acme(),
                    challenges,
                    Arc::clone(&provider),
                    stop.clone(),
                );
            }
            tokio::spawn(tls::maintain(
                t.take_watched(),
                config.storage.clone(),
                provider,
                stop.clone(),
            ));
            Some(Arc::new(t))
        }
        None => None,
    };
    let proxy = Arc::new(Proxy::new(&config, https_port, Arc::clone(stats)));
    let backends = proxy.router.backends();
    if let Some(prev) = previous {
        let old = prev.proxy.router.backends();
        for b in &backends {
            if let Some(o) = old
                .iter()
                .find(|o| o.upstreams == b.upstreams && o.protocol == b.protocol)
            {
                b.adopt(o);
            }
        }
    }
    upstream::resolve_all(&backends, resolver.as_ref()).await;
    upstream::spawn_tasks(&backends, resolver, &stop);
    Ok(Generation {
        proxy,
        tls,
        config,
        stop,
    })
}

/// A running accept loop.
struct Endpoint {
    /// The address as configured (what a reload compares).
    configured: SocketAddr,
    stop: CancellationToken,
}

/// The running admin endpoint, if any.
struct AdminEndpoint {
    /// `listen.admin` as configured (what a reload compares).
    configured: Option<SocketAddr>,
    /// Stops its accept loop (none: the endpoint is off).
    stop: Option<CancellationToken>,
}

/// Everything the accept loops share.
#[derive(Clone)]
struct Shared {
    state: Arc<ArcSwap<Generation>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    h1: Arc<http1::Builder>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    stats: Arc<ServerStats>,
}

impl Shared {
    fn start(&self, listener: TcpListener, configured: SocketAddr, https: bool) -> Endpoint {
        let stop = self.shutdown.child_token();
        match listener.local_addr() {
            Ok(a) => {
                tracing::info!(listen = %a, "serving {}", if https { "https" } else { "http" })
            }
            Err(e) => tracing::warn!(error = %e, "listener without an address"),
        }
        tokio::spawn(accept_loop(listener, https, self.clone(), stop.clone()));
        Endpoint { configured, stop }
    }

    /// Serves the admin endpoints on `listener` until the returned token is cancelled.
    fn start_admin(&self, listener: TcpListener) -> CancellationToken {
        let stop = CancellationToken::new();
        tokio::spawn(admin::serve(
            listener,
            Arc::clone(&self.state),
            Arc::clone(&self.stats),
            stop.clone(),
        ));
        stop
    }
}

/// Runs the proxy for `config` on already bound listeners until `shutdown` is cancelled,
/// then drains: no new connections, requests in flight get `timeouts.grace` to finish.
pub async fn run(
    config: Config,
    listeners: Listeners,
    resolver: Arc<dyn Resolve>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    run_with_reload(config, listeners, resolver, shutdown, None).await
}

/// [`run`], reloading the config from `reload` when its file changes or its trigger fires.
/// A config that does not validate (or whose listeners or certificates cannot be set up) is
/// logged with every problem and the running one stays.
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    resolver: Arc<dyn Resolve>,
    shutdown: CancellationToken,
    reload: Option<ReloadSource>,
) -> io::Result<()> {
    let mut https_port = match &listeners.https {
        Some(l) => Some(l.local_addr()?.port()),
        None => None,
    };
    let (cfg_http, cfg_https, cfg_admin) =
        (config.listen.http, config.listen.https, config.listen.admin);
    let stats = Arc::new(ServerStats::default());
    let generation =
        build_generation(config, https_port, &resolver, None, &shutdown, &stats).await?;
    let shared = Shared {
        state: Arc::new(ArcSwap::from_pointee(generation)),
        builder: Arc::new(http_builder()),
        h1: Arc::new(h1_builder()),
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
        stats: Arc::clone(&stats),
    };
    // The admin listener outlives the drain, so health checks see it.
    let mut admin = AdminEndpoint {
        configured: cfg_admin,
        stop: listeners.admin.map(|l| shared.start_admin(l)),
    };
    let mut http = shared.start(listeners.http, cfg_http, false);
    let mut https = match (listeners.https, cfg_https) {
        (Some(l), Some(addr)) => Some(shared.start(l, addr, true)),
        (Some(l), None) => Some(shared.start(l, SocketAddr::from(([0, 0, 0, 0], 0)), true)),
        _ => None,
    };

    if let Some(source) = reload {
        let mut stamp = tls::files::Stamp::of(&source.path);
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = source.trigger.notified() => "SIGHUP",
                _ = tick.tick() => {
                    let now = tls::files::Stamp::of(&source.path);
                    if now == stamp {
                        continue;
                    }
                    stamp = now;
                    "config file changed"
                }
            };
            tracing::info!(path = %source.path.display(), reason = why, "reloading config");
            let config = match Config::load(&source.path) {
                Ok(c) => c,
                Err(e) => {
                    for issue in e.to_string().lines().skip(1) {
                        tracing::error!("{}", issue.trim());
                    }
                    tracing::error!("config rejected; still running the previous one");
                    stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            match reload_to(
                config,
                &shared,
                &resolver,
                &mut http,
                &mut https,
                &mut admin,
                &mut https_port,
            )
            .await
            {
                Ok(()) => {
                    stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("config reloaded")
                }
                Err(e) => {
                    stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "reload failed; still running the previous config")
                }
            }
        }
    } else {
        shutdown.cancelled().await;
    }

    stats.draining.store(true, Ordering::Relaxed);
    http.stop.cancel();
    if let Some(h) = &https {
        h.stop.cancel();
    }
    let grace = shared.state.load().config.timeouts.grace;
    shared.tracker.close();
    let open = shared.tracker.len();
    if open > 0 {
        tracing::info!(connections = open, grace = ?grace, "draining connections");
    }
    if tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = shared.tracker.len(),
            "grace period over; closing remaining connections"
        );
    }
    shared.state.load().stop.cancel();
    if let Some(stop) = admin.stop {
        stop.cancel();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Applies a validated config: binds listeners whose address changed (keeping unchanged
/// ones without a gap), builds the new generation, swaps it in, then retires the old one.
async fn reload_to(
    config: Config,
    shared: &Shared,
    resolver: &Arc<dyn Resolve>,
    http: &mut Endpoint,
    https: &mut Option<Endpoint>,
    admin: &mut AdminEndpoint,
    https_port: &mut Option<u16>,
) -> io::Result<()> {
    // Some(new listener, or None to turn the admin endpoint off) when it moves.
    let new_admin = match config.listen.admin {
        addr if addr == admin.configured => None,
        Some(addr) => Some(Some(bind(addr).await?)),
        None => Some(None),
    };
    let new_http = if config.listen.http != http.configured {
        Some(bind(config.listen.http).await?)
    } else {
        None
    };
    let new_https = match (config.listen.https, https.as_ref()) {
        (Some(addr), Some(ep)) if addr == ep.configured => None,
        (Some(addr), _) => Some(bind(addr).await?),
        (None, _) => None,
    };
    let port = match (&new_https, config.listen.https) {
        (Some(l), _) => Some(l.local_addr()?.port()),
        (None, Some(_)) => *https_port,
        (None, None) => None,
    };
    let old = shared.state.load_full();
    let generation = build_generation(
        config,
        port,
        resolver,
        Some(&old),
        &shared.shutdown,
        &shared.stats,
    )
    .await?;
    let (cfg_http, cfg_https, cfg_admin) = (
        generation.config.listen.http,
        generation.config.listen.https,
        generation.config.listen.admin,
    );
    shared.state.store(Arc::new(generation));
    old.stop.cancel();
    *https_port = port;
    if let Some(listener) = new_admin {
        if let Some(old) = admin.stop.take() {
            old.cancel();
        }
        admin.stop = listener.map(|l| shared.start_admin(l));
        admin.configured = cfg_admin;
    }
    if let Some(l) = new_http {
        http.stop.cancel();
        *http = shared.start(l, cfg_http, false);
    }
    match (new_https, cfg_https) {
        (Some(l), Some(addr)) => {
            if let Some(old) = https.take() {
                old.stop.cancel();
            }
            *https = Some(shared.start(l, addr, true));
        }
        (None, None) => {
            if let Some(old) = https.take() {
                old.stop.cancel();
            }
        }
        _ => {}
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// HTTP/1.1 on plain connections, which are parked between requests (see [`serve_connection`]).
fn h1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    builder
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // TimedIo enforces header and idle timeouts; hyper's timer would conflate them.
        .header_read_timeout(None)
        .keep_alive(true);
    // No HTTP/2 keep-alive pings: each would count as traffic and keep an idle connection
    // open forever; the idle timeout closes silent connections, dead peers included.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(None);
    builder
}

async fn accept_loop(listener: TcpListener, https: bool, shared: Shared, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let conn = shared.clone();
                workers::dispatch(stream, &shared.tracker, move |stream| {
                    serve_connection(stream, https, conn)
                });
            }
            Err(e) => {
                // Per-connection failures (reset before accept) are the client's problem;
                // running out of descriptors is ours: back off instead of spinning.
                match e.kind() {
                    io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::Interrupted => {
                        tracing::debug!(error = %e, "accept");
                    }
                    _ => {
                        tracing::error!(error = %e, "accept failed; retrying in 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

/// Sets up a freshly accepted connection and returns the future that serves it, or `None` when
/// it cannot be served (HTTPS without certificates, a socket already gone).
///
/// Not an `async fn`: an async fn keeps a second copy of its arguments in its state, and the
/// state of this future is most of what an idle (parked) connection costs, held by every one
/// of 10 000 idle clients. So the setup runs before the future exists, the future serves from
/// the variables it captured, and what only an active connection needs is boxed: hyper's
/// HTTP/1 connection (`serve_h1`), HTTP/2 and TLS. A parked plain connection's task is 640
/// bytes (rustc's `-Zprint-type-sizes` shows the layout).
fn serve_connection(
    stream: TcpStream,
    https: bool,
    shared: Shared,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let generation = shared.state.load_full();
    let tls = match (https, &generation.tls) {
        (false, _) => None,
        (true, Some(t)) => Some(Arc::clone(t)),
        (true, None) => return None,
    };
    let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return None;
    };
    let _ = stream.set_nodelay(true);
    let timeouts = *generation.proxy.timeouts();
    drop(generation);
    let activity = Arc::new(Activity::default());
    let mut io = TimedIo::new(
        stream,
        Arc::clone(&activity),
        timeouts.client_header,
        timeouts.client_idle,
    );
    let proto = if tls.is_some() { "https" } else { "http" };
    let tls_info = tls.as_ref().map(|_| Arc::new(std::sync::OnceLock::new()));
    let info = Arc::new(ConnInfo::new(peer, local.port(), proto, tls_info.clone()));
    let state = Arc::clone(&shared.state);
    let request_stats = Arc::clone(&shared.stats);
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&state.load().proxy);
        let busy = activity.begin();
        let streaming = activity.streaming();
        let stats = Arc::clone(&request_stats);
        let info = Arc::clone(&info);
        async move {
            stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let mut resp = proxy.handle(req, &info).await;
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            resp.body_mut().hold(streaming);
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                busy.upgraded();
            }
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    if tls.is_none() {
        io = io.park_after(PARK_AFTER);
    }
    // Only what the connection uses is moved into its future (the generation and the task
    // tracker are not): each field is 8 bytes of every idle connection.
    let Shared {
        builder,
        h1,
        shutdown,
        stats,
        ..
    } = shared;
    Some(async move {
        let (builder, h1, shutdown, stats) = (&builder, &h1, &shutdown, &stats);
        if let Some(tls) = tls {
            let tls = TlsConn {
                config: tls,
                info: tls_info,
                local: local.ip(),
            };
            return Box::pin(serve_tls(io, tls, builder, service, shutdown, stats, peer)).await;
        }
        let _open = GaugeGuard::new(&stats.connections_h1);
        // The first bytes decide the protocol; nothing is allocated for a silent connection.
        // (This wait and the parked one below are written out: a shared helper future made
        // every connection's state 16 bytes larger, past the size the test below guards.)
        tokio::select! {
            r = io.readable() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        if starts_h2(&mut io).await {
            return Box::pin(serve_http(
                TokioIo::new(io),
                builder,
                service,
                shutdown,
                peer,
            ))
            .await;
        }
        let mut unread = bytes::Bytes::new();
        loop {
            // Boxed: while parked, the task holds only the socket, its timers and this loop.
            let served = Box::pin(serve_h1(io, unread, h1, service.clone(), shutdown, peer));
            (io, unread) = match served.await {
                Some(parked) => parked,
                None => return,
            };
            tracing::trace!(peer = %peer, "idle connection parked");
            if unread.is_empty() {
                let _parked = GaugeGuard::new(&stats.parked);
                tokio::select! {
                    r = io.readable() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    })
}

/// How long a plain HTTP/1 connection stays idle with hyper's buffers (16 KiB) before it is
/// parked as a bare socket (about 1.4 KiB of heap with its task and timers). Short enough that a burst
/// of clients that then sit idle never holds all their buffers at once, long enough that a
/// connection under load (next request within milliseconds) is not parked between requests.
const PARK_AFTER: Duration = Duration::from_millis(50);

/// The HTTP/2 connection preface (RFC 9113 §3.4), which starts h2c with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether what the client sent first is (the start of) the HTTP/2 preface: h2c with prior
/// knowledge.
async fn starts_h2(io: &mut TimedIo<TcpStream>) -> bool {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = io.peek(&mut first).await.unwrap_or(0);
    n > 0 && H2_PREFACE.starts_with(&first[..n])
}

/// What hyper's servers need of a connection's service. There is one such type, the closure
/// `serve_connection` builds, which cannot be named.
trait ConnService:
    hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<crate::proxy::body::ProxyBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> ConnService for S where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::proxy::body::ProxyBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// What a TLS connection needs for its handshake.
struct TlsConn {
    config: Arc<tls::Tls>,
    info: Option<Arc<std::sync::OnceLock<crate::proxy::TlsInfo>>>,
    local: std::net::IpAddr,
}

/// Serves an HTTPS connection: the handshake, then HTTP/1.1 or HTTP/2 as ALPN chose.
async fn serve_tls<S>(
    io: TimedIo<TcpStream>,
    tls: TlsConn,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    shutdown: &CancellationToken,
    stats: &ServerStats,
    peer: SocketAddr,
) where
    S: ConnService,
{
    // The socket once more, to linger on once hyper and the TLS layer are done with it (an
    // extra descriptor of the same socket: one system call per TLS connection).
    let activity = Arc::clone(io.activity());
    let lingering = std::os::fd::AsFd::as_fd(io.get_ref())
        .try_clone_to_owned()
        .ok();
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tls_handshake(io, &tls.config, tls.local, peer),
    );
    let stream = match handshake.await {
        Ok(Some(stream)) => stream,
        Ok(None) => return,
        Err(_) => {
            tracing::debug!(peer = %peer, "TLS handshake timed out");
            return;
        }
    };
    let session = stream.get_ref().1;
    let h2 = session.alpn_protocol() == Some(b"h2");
    if let Some(cell) = &tls.info {
        let _ = cell.set(crate::proxy::TlsInfo {
            version: session
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            sni: session.server_name().map(str::to_owned),
        });
    }
    let _open = GaugeGuard::new(if h2 {
        &stats.connections_h2
    } else {
        &stats.connections_h1
    });
    serve_http(TokioIo::new(stream), builder, service, shutdown, peer).await;
    if let Some(fd) = lingering
        && activity.should_linger()
        && !shutdown.is_cancelled()
        && let Ok(stream) = tcp_from_fd(fd)
    {
        // The client's bytes are TLS records here: read and dropped all the same.
        Box::pin(linger(stream, shutdown)).await;
    }
}

/// A tokio socket on a second descriptor of a connection's socket.
fn tcp_from_fd(fd: std::os::fd::OwnedFd) -> io::Result<TcpStream> {
    let std_stream = std::net::TcpStream::from(fd);
    std_stream.set_nonblocking(true)?;
    TcpStream::from_std(std_stream)
}

/// Serves HTTP/1.1 requests on a plain connection, starting with the bytes a parked
/// connection had received. Gives the socket back, with what it has received but not parsed,
/// when the connection has been idle long enough to park; `None` when it is done (closed,
/// timed out, upgraded, failed, or shutting down).
async fn serve_h1<S>(
    mut io: TimedIo<TcpStream>,
    unread: bytes::Bytes,
    h1: &http1::Builder,
    service: S,
    shutdown: &CancellationToken,
    peer: SocketAddr,
) -> Option<(TimedIo<TcpStream>, bytes::Bytes)>
where
    S: ConnService,
{
    io.resume();
    let mut conn = h1
        .serve_connection(TokioIo::new(Prefixed::new(unread, io)), service)
        .with_upgrades();
    let result = tokio::select! {
        r = &mut conn => r,
        _ = shutdown.cancelled() => {
            Pin::new(&mut conn).graceful_shutdown();
            (&mut conn).await
        }
    };
    if let Err(e) = &result {
        tracing::debug!(peer = %peer, error = %e, "client connection ended with an error");
        return None;
    }
    // Upgraded (WebSocket): done.
    let parts = conn.into_parts()?;
    let (rest, back) = parts.io.into_inner().into_inner();
    if shutdown.is_cancelled() {
        return None;
    }
    if !back.is_parked() {
        if back.activity().should_linger() {
            // Boxed: rare, and its state would enlarge this future.
            drop((rest, parts.read_buf));
            Box::pin(linger(back.into_inner(), shutdown)).await;
        }
        return None;
    }
    // Copied out, and hyper's read buffer (8 KiB and more) dropped with this future: it must
    // not live on while the connection is parked.
    Some((back, unread_bytes(rest, parts.read_buf)))
}

/// How long a lingering close waits for the client's next bytes, and for it to finish in all
/// (nginx's `lingering_timeout` and `lingering_time`).
const LINGER_IDLE: Duration = Duration::from_secs(5);
const LINGER_MAX: Duration = Duration::from_secs(30);

/// Lingering close, as nginx's `lingering_close`: when the server ended a connection whose
/// client had not closed its side ([`Activity::should_linger`]; hyper has sent the response
/// and shut the socket down for writing), what the client still sends is read and dropped
/// until it closes too, waiting at most [`LINGER_IDLE`] for each read and [`LINGER_MAX`] in
/// all. The case is an early answer to an upload: an app that refuses a body from its head
/// (a 413, a 401) answers before the client has sent it all, and a socket closed with bytes
/// unread is reset by the kernel, which throws away the answer the client has not read yet.
/// A client that sends its whole body before it reads (Python's `http.client` and
/// `requests`, for ones) then saw a broken pipe instead of the 413.
async fn linger(mut stream: TcpStream, shutdown: &CancellationToken) {
    use tokio::io::AsyncReadExt;
    let end = tokio::time::Instant::now() + LINGER_MAX;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let until = end.min(tokio::time::Instant::now() + LINGER_IDLE);
        tokio::select! {
            r = tokio::time::timeout_at(until, stream.read(&mut buf)) => match r {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// What a parked connection had received but not parsed, in a buffer of its own size. Takes
/// the buffers by value so that they are freed here, before the connection waits.
fn unread_bytes(rest: bytes::Bytes, read_buf: bytes::Bytes) -> bytes::Bytes {
    if rest.is_empty() && read_buf.is_empty() {
        bytes::Bytes::new()
    } else {
        [rest, read_buf].concat().into()
    }
}

/// An IO that first yields bytes already read from it (hyper's leftover buffer).
struct Prefixed<T> {
    unread: bytes::Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    fn new(unread: bytes::Bytes, inner: T) -> Self {
        Prefixed { unread, inner }
    }

    fn into_inner(self) -> (bytes::Bytes, T) {
        (self.unread, self.inner)
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads the ClientHello, picks the certificate, and completes the handshake. A name gangway
/// has no certificate for gets an `unrecognized_name` alert, never another site's
/// certificate.
async fn tls_handshake<IO>(
    io: IO,
    tls: &tls::Tls,
    local_ip: std::net::IpAddr,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let mut start = match acceptor.await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(peer = %peer, error = %e, "not a TLS ClientHello");
            return None;
        }
    };
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    let acme_validation = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == crate::acme::challenge::ALPN));
    if acme_validation {
        // An ACME CA validating TLS-ALPN-01 (RFC 8737): answer with the challenge
        // certificate for that name, then close; no application data is exchanged.
        let config = match &sni {
            Some(name) => tls.acme_challenge_config(name).await,
            None => None,
        };
        let Some(config) = config else {
            tracing::debug!(peer = %peer, sni = ?sni, "acme-tls/1 handshake for a name with no validation under way");
            let _ = start.io.write_all(&tls::UNRECOGNIZED_NAME_ALERT).await;
            let _ = start.io.shutdown().await;
            return None;
        };
        match start.into_stream(config).await {
            Ok(mut stream) => {
                tracing::info!(peer = %peer, sni = ?sni, "answered a TLS-ALPN-01 validation");
                let _ = stream.shutdown().await;
            }
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "TLS-ALPN-01 handshake failed")
            }
        }
        return None;
    }
    let Some(cert) = tls.store.lookup(sni.as_deref(), local_ip) else {
        match &sni {
            Some(name) if tls.store.knows(name) => tracing::warn!(
                peer = %peer, sni = %name, "no certificate for this site yet; handshake refused"
            ),
            Some(name) => tracing::debug!(peer = %peer, sni = %name, "unknown server name"),
            None => tracing::debug!(peer = %peer, "no SNI and no certificate for this address"),
        }
        let _ = start.io.write_all(&tls::UNRECOGNIZED_NAME_ALERT).await;
        let _ = start.io.shutdown().await;
        return None;
    };
    let config = tls.config_for(sni.is_some(), cert);
    match start.into_stream(config).await {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
            None
        }
    }
}

async fn serve_http<IO, S, B>(
    io: IO,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    shutdown: &CancellationToken,
    peer: std::net::SocketAddr,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %peer, error = %e, "client connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The future that serves a connection is what each of 10 000 idle clients costs (with
    /// its socket registration and timer): 504 bytes when this was written, 1648 as an
    /// `async fn` with the parked state held inline.
    #[tokio::test]
    async fn a_plain_connection_future_stays_under_half_a_kib() {
        let config = Config::parse(
            "listen: {http: 127.0.0.1:0, admin: off}\nsites:\n  - hosts: [\"*\"]\n    \
             upstreams: [127.0.0.1:9]\n",
            "test.yaml",
        )
        .expect("valid config");
        let resolver: Arc<dyn Resolve> = Arc::new(upstream::resolve::StaticResolver::default());
        let shutdown = CancellationToken::new();
        let stats = Arc::new(ServerStats::default());
        let generation = build_generation(config, None, &resolver, None, &shutdown, &stats)
            .await
            .expect("generation");
        let shared = Shared {
            state: Arc::new(ArcSwap::from_pointee(generation)),
            builder: Arc::new(http_builder()),
            h1: Arc::new(h1_builder()),
            tracker: TaskTracker::new(),
            shutdown: shutdown.clone(),
            stats,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let serving = serve_connection(stream, false, shared).expect("a plain connection");
        let size = std::mem::size_of_val(&serving);
        assert!(size <= 512, "the connection's future is {size} bytes");
        shutdown.cancel();
    }
}
