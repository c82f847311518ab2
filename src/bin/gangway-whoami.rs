//! `gangway-whoami`: a tiny demo app for the compose stack. Every request gets a JSON answer
//! naming the container that served it (its hostname) and echoing the request it saw, so
//! round robin across replicas and the forwarding headers gangway sets are visible.
//!
//! - Listens on `0.0.0.0:$PORT` (default 8000), HTTP/1.1 and h2c.
//! - `GET /health` answers `200 ok` (for gangway's active health checks).
//! - `?sleep_ms=N` on any other path waits N ms (at most 60 s) before answering: a slow
//!   request, to watch a drain.
//! - Logs one line per request as it arrives, so `docker compose logs app` shows which
//!   replica got what.
//! - SIGTERM or SIGINT: stops accepting, lets requests in flight finish (up to 10 s), exits 0.
//! - `gangway-whoami health` asks `http://127.0.0.1:$PORT/health` and exits 0 on 200, 1
//!   otherwise (a `HEALTHCHECK` for a scratch image, which has no curl).
#![forbid(unsafe_code)]

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

const DEFAULT_PORT: u16 = 8000;
const MAX_SLEEP: Duration = Duration::from_secs(60);
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = match port() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gangway-whoami: {e}");
            return ExitCode::from(64);
        }
    };
    match args.first().map(String::as_str) {
        None => {}
        Some("health") => return health(port),
        Some("-h" | "--help") => {
            println!(
                "gangway-whoami: answers every request with its hostname and the request it saw\n\n\
                 usage: gangway-whoami           serve on 0.0.0.0:$PORT (default {DEFAULT_PORT})\n       \
                 gangway-whoami health    exit 0 when http://127.0.0.1:$PORT/health answers 200"
            );
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("gangway-whoami: unknown argument {other:?} (try --help)");
            return ExitCode::from(64);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gangway-whoami: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(port))
}

fn port() -> Result<u16, String> {
    match std::env::var("PORT") {
        Ok(p) if !p.trim().is_empty() => p
            .trim()
            .parse()
            .map_err(|_| format!("PORT must be a port number, found {p:?}")),
        _ => Ok(DEFAULT_PORT),
    }
}

/// The container's hostname: /etc/hostname (Docker writes the container id there), else
/// $HOSTNAME.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

async fn serve(port: u16) -> ExitCode {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gangway-whoami: cannot listen on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    let name: Arc<str> = hostname().into();
    println!("gangway-whoami {name} listening on {addr}");
    let graceful = GracefulShutdown::new();
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    eprintln!("gangway-whoami: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let name = Arc::clone(&name);
        let service = service_fn(move |req: Request<Incoming>| answer(Arc::clone(&name), req));
        let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    // Stop accepting (new connections are refused from here on), let each connection finish
    // the request it is on, then exit.
    drop(listener);
    println!("gangway-whoami {name}: stopping, finishing requests in flight");
    match tokio::time::timeout(DRAIN_LIMIT, graceful.shutdown()).await {
        Ok(()) => println!("gangway-whoami {name}: stopped"),
        Err(_) => println!(
            "gangway-whoami {name}: stopped with requests still open after {DRAIN_LIMIT:?}"
        ),
    }
    ExitCode::SUCCESS
}

/// Resolves on the first SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            eprintln!("gangway-whoami: cannot watch SIGTERM ({e}); only SIGINT stops it");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn answer(
    name: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    if req.uri().path() == "/health" {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))));
    }
    println!("{name} {} {path}", req.method());
    let sleep = query_value(&path, "sleep_ms")
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms).min(MAX_SLEEP));
    let headers = gangway::demo::headers_json(req.headers());
    let doc = serde_json::json!({
        "hostname": &*name,
        "method": req.method().as_str(),
        "path": path,
        "headers": headers,
    });
    if let Some(d) = sleep {
        tokio::time::sleep(d).await;
    }
    let mut resp = Response::new(Full::new(Bytes::from(format!("{doc:#}\n"))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn query_value<'a>(path_and_query: &'a str, key: &str) -> Option<&'a str> {
    path_and_query
        .split_once('?')?
        .1
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// `gangway-whoami health`: one plain HTTP/1.0 GET of /health on loopback.
fn health(port: u16) -> ExitCode {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let limit = Duration::from_secs(3);
    let attempt = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, limit)?;
        s.set_read_timeout(Some(limit))?;
        s.set_write_timeout(Some(limit))?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut head = Vec::new();
        s.take(4096).read_to_end(&mut head)?;
        Ok(String::from_utf8_lossy(&head).into_owned())
    };
    match attempt() {
        Ok(resp) => {
            let status = resp.split_whitespace().nth(1).unwrap_or("");
            if status == StatusCode::OK.as_str() {
                ExitCode::SUCCESS
            } else {
                eprintln!("gangway-whoami health: http://{addr}/health answered {status:?}");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("gangway-whoami health: http://{addr}/health: {e}");
            ExitCode::from(1)
        }
    }
}
