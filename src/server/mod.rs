//! Listeners, accept loops, per-connection tasks and graceful shutdown.

mod timed_io;

use crate::config::Config;
use crate::proxy::{ConnInfo, Proxy};
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

/// Runs the proxy for `config` on an already bound listener until `shutdown` is cancelled,
/// then drains: no new connections, requests in flight get `timeouts.grace` to finish.
pub async fn run(
    config: Config,
    listener: TcpListener,
    resolver: Arc<dyn Resolve>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let proxy = Arc::new(Proxy::new(&config));
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

    let addr = listener.local_addr()?;
    tracing::info!(listen = %addr, "serving http");
    let tracker = TaskTracker::new();
    let builder = Arc::new(http_builder());
    accept_loop(&listener, &state, &builder, &tracker, &shutdown).await;
    drop(listener);

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

async fn accept_loop(
    listener: &TcpListener,
    state: &Arc<ArcSwap<Proxy>>,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let conn = serve_connection(
                    stream,
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
    let io = TokioIo::new(TimedIo::new(
        stream,
        Arc::clone(&activity),
        timeouts.client_header,
        timeouts.client_idle,
    ));
    let info = ConnInfo {
        peer,
        local_port: local.port(),
        proto: "http",
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
