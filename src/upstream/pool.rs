//! Keep-alive HTTP/1.1 connections to one replica, and the shared h2c connection.
//!
//! A connection is checked out for one request and returned when the response body has been
//! read to its end (see [`h1::H1Body`]); a connection whose body was abandoned is closed,
//! never reused half-read. The lock is a plain mutex held for a push or a pop, never across
//! `.await`.

use super::h1;
use crate::server::workers::PerWorker;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections older than this are not reused (servers commonly close at 60–75 s).
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);
/// Idle connections kept per replica and worker.
const MAX_IDLE: usize = 256;

/// What hyper's h2c client sends upstream: the client's streamed body, or nothing (bodiless
/// requests, which can be rebuilt and retried on another replica).
pub type ReqBody = http_body_util::Either<Incoming, http_body_util::Empty<bytes::Bytes>>;

struct Idle {
    conn: h1::Conn,
    since: Instant,
}

/// Idle connections, one list per worker thread: a connection is registered with the
/// runtime of the worker that opened it, so only that worker takes it again (no request
/// crosses threads).
#[derive(Default)]
pub struct ConnPool {
    idle: PerWorker<Mutex<Vec<Idle>>>,
}

/// Why no connection could be had.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(io::Error),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timed out"),
            ConnectError::Io(e) => write!(f, "connect failed: {e}"),
            ConnectError::Handshake(e) => write!(f, "connection setup failed: {e}"),
        }
    }
}

impl ConnPool {
    /// An idle connection that is still open, if any. `now` is the request's start (a
    /// clock read saved; the age limit is coarse).
    pub fn take(&self, now: Instant) -> Option<h1::Conn> {
        let mut idle = self.idle.mine().lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut idle_conn) = idle.pop() {
            if now.duration_since(idle_conn.since) < MAX_IDLE_AGE && idle_conn.conn.is_reusable() {
                return Some(idle_conn.conn);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to its end.
    pub fn put(&self, mut conn: h1::Conn) {
        conn.trim();
        let mut idle = self.idle.mine().lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

/// Opens a new HTTP/1.1 connection for gangway's own client.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<h1::Conn, ConnectError> {
    Ok(h1::Conn::new(tcp(addr, timeout).await?))
}

pub type H2Sender = http2::SendRequest<ReqBody>;

/// The multiplexed HTTP/2 (h2c) connection to a replica, for `upstream_protocol: h2c`: one
/// per worker thread, for the same reason as [`ConnPool`]'s idle lists.
#[derive(Default)]
pub struct H2Slot(PerWorker<Mutex<Option<H2Sender>>>);

impl H2Slot {
    /// The calling worker's connection, unless it is known to be closed.
    pub fn get(&self) -> Option<H2Sender> {
        let slot = self.0.mine().lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    pub fn set(&self, sender: H2Sender) {
        *self.0.mine().lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    }
}

async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// Opens an HTTP/2 connection with prior knowledge (h2c).
pub async fn connect_h2(addr: SocketAddr, timeout: Duration) -> Result<H2Sender, ConnectError> {
    let stream = tcp(addr, timeout).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(upstream = %addr, error = %e, "upstream h2c connection ended");
        }
    });
    Ok(sender)
}
