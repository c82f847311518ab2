//! Listeners, accept loops, per-connection tasks and graceful shutdown.

mod timed_io;

use crate::config::Config;
use crate::proxy::{ConnInfo, Proxy};
use crate::tls;
use crate::upstream::{self, resolve::Resolve};
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use timed_io::{Activity, TimedIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The bound sockets gangway serves on.
pub struct Listeners {
    pub http: TcpListener,
    pub https: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `listen`.
    pub async fn bind(listen: &crate::config::Listen) -> io::Result<Listeners> {
        let http = TcpListener::bind(listen.http).await.map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {}: {e}", listen.http))
        })?;
        let https =
            match listen.https {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?),
                None => None,
            };
        Ok(Listeners { http, https })
    }

    pub fn http_only(http: TcpListener) -> Listeners {
        Listeners { http, https: None }
    }
}

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the proxy for `config` on already bound listeners until `shutdown` is cancelled,
/// then drains: no new connections, requests in flight get `timeouts.grace` to finish.
pub async fn run(
    config: Config,
    listeners: Listeners,
    resolver: Arc<dyn Resolve>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let https_port = match &listeners.https {
        Some(l) => Some(l.local_addr()?.port()),
        None => None,
    };
    let tls = match &listeners.https {
        Some(_) => {
            let provider = tls::provider();
            let mut t = tls::Tls::new(&config, &provider)?;
            tokio::spawn(tls::maintain(
                t.take_watched(),
                config.storage.clone(),
                provider,
                shutdown.child_token(),
            ));
            Some(Arc::new(t))
        }
        None => None,
    };
    let proxy = Arc::new(Proxy::new(&config, https_port));
    let backends = proxy.router.backends();
    upstream::resolve_all(&backends, resolver.as_ref()).await;
    let state = Arc::new(ArcSwap::new(proxy));

    let stop_discovery = shutdown.child_token();
    tokio::spawn(upstream::discovery_loop(
        backends,
        resolver,
        config.resolve_every,
        stop_discovery.clone(),
    ));

    let tracker = TaskTracker::new();
    let builder = Arc::new(http_builder());
    let http = Endpoint {
        listener: listeners.http,
        tls: None,
    };
    tracing::info!(listen = %http.listener.local_addr()?, "serving http");
    let https = match (listeners.https, tls) {
        (Some(listener), Some(tls)) => {
            tracing::info!(listen = %listener.local_addr()?, "serving https");
            Some(Endpoint {
                listener,
                tls: Some(tls),
            })
        }
        _ => None,
    };
    let serve_https = async {
        if let Some(https) = &https {
            accept_loop(https, &state, &builder, &tracker, &shutdown).await;
        }
    };
    tokio::join!(
        accept_loop(&http, &state, &builder, &tracker, &shutdown),
        serve_https
    );
    drop(http);
    drop(https);

    let grace = config.timeouts.grace;
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(connections = open, grace = ?grace, "draining connections");
    }
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            connections = tracker.len(),
            "grace period over; closing remaining connections"
        );
    }
    stop_discovery.cancel();
    tracing::info!("stopped");
    Ok(())
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

/// A listener and, for https, its TLS state.
struct Endpoint {
    listener: TcpListener,
    tls: Option<Arc<tls::Tls>>,
}

async fn accept_loop(
    endpoint: &Endpoint,
    state: &Arc<ArcSwap<Proxy>>,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = endpoint.listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let conn = serve_connection(
                    stream,
                    endpoint.tls.clone(),
                    Arc::clone(state),
                    Arc::clone(builder),
                    shutdown.clone(),
                );
                tracker.spawn(conn);
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

async fn serve_connection(
    stream: TcpStream,
    tls: Option<Arc<tls::Tls>>,
    state: Arc<ArcSwap<Proxy>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shutdown: CancellationToken,
) {
    let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let timeouts = *state.load().timeouts();
    let activity = Arc::new(Activity::default());
    let io = TimedIo::new(
        stream,
        Arc::clone(&activity),
        timeouts.client_header,
        timeouts.client_idle,
    );
    let proto = if tls.is_some() { "https" } else { "http" };
    let info = ConnInfo {
        peer,
        local_port: local.port(),
        proto,
    };
    let service = service_fn(move |req| {
        let proxy = state.load_full();
        let busy = activity.begin();
        async move {
            let resp = proxy.handle(req, &info).await;
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    match tls {
        None => serve_http(TokioIo::new(io), &builder, service, &shutdown, peer).await,
        Some(tls) => {
            let handshake =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, tls_handshake(io, &tls, local.ip(), peer));
            match handshake.await {
                Ok(Some(stream)) => {
                    serve_http(TokioIo::new(stream), &builder, service, &shutdown, peer).await
                }
                Ok(None) => {}
                Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
            }
        }
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
