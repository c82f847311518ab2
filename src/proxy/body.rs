//! The response body gangway sends: an upstream's streamed body or a short local one.
//!
//! Streaming an upstream body also hands its connection back to the replica's pool once the
//! body has been read to its end, and writes the access-log line when the body is done.

use crate::config::AccessLog;
use crate::upstream::Replica;
use crate::upstream::h1::H1Body;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::Sleep;

/// What the access log says about one request; written when the response body ends.
pub struct AccessRecord {
    pub format: AccessLog,
    pub method: Method,
    pub host: Option<HeaderValue>,
    pub uri: Uri,
    pub client: IpAddr,
    pub status: StatusCode,
    pub replica: Option<SocketAddr>,
    pub start: Instant,
    pub bytes: u64,
    /// Why gangway answered itself, for error responses.
    pub error: Option<&'static str>,
    pub version: http::Version,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    /// Generated, or taken from a trusted `X-Request-Id`; also sent upstream.
    pub request_id: Option<HeaderValue>,
    /// Time to the upstream's response head.
    pub upstream_ms: Option<f64>,
    /// The connection's TLS version and SNI, for HTTPS.
    pub tls: Option<Arc<std::sync::OnceLock<crate::proxy::TlsInfo>>>,
}

/// `[04/Dec/2026:21:30:00 +0000]`, the Common Log Format time.
fn clf_time() -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        t.day(),
        MONTHS[usize::from(u8::from(t.month())) - 1],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn text(v: &Option<HeaderValue>) -> &str {
    v.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("-")
}

impl AccessRecord {
    fn emit(&self) {
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let host = self
            .host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or("-");
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let replica = ReplicaField(self.replica);
        let tls = self.tls.as_ref().and_then(|t| t.get());
        let tls_version = tls.map(|t| t.version.as_str());
        let sni = tls.and_then(|t| t.sni.as_deref());
        match self.format {
            AccessLog::Off => {}
            AccessLog::Text => tracing::info!(
                target: "access",
                "{client} {method} {host} {path} {status} {replica} {ms:.1}ms {bytes}B id={id}{tls}{sep}{error}",
                id = text(&self.request_id),
                tls = match tls {
                    Some(t) => format!(" {} sni={}", t.version, t.sni.as_deref().unwrap_or("-")),
                    None => String::new(),
                },
                client = self.client,
                method = self.method,
                status = self.status.as_u16(),
                bytes = self.bytes,
                sep = if self.error.is_some() { " " } else { "" },
                error = self.error.unwrap_or(""),
            ),
            AccessLog::Common | AccessLog::Combined => {
                let mut line = format!(
                    "{} - - [{}] \"{} {} {:?}\" {} {}",
                    self.client,
                    clf_time(),
                    self.method,
                    path,
                    self.version,
                    self.status.as_u16(),
                    self.bytes
                );
                if self.format == AccessLog::Combined {
                    line.push_str(&format!(
                        " \"{}\" \"{}\"",
                        text(&self.referer),
                        text(&self.user_agent)
                    ));
                }
                tracing::info!(target: "access", "{line}");
            }
            AccessLog::Json => tracing::info!(
                target: "access",
                client = %self.client,
                method = %self.method,
                host,
                path,
                protocol = ?self.version,
                status = self.status.as_u16(),
                replica = %replica,
                duration_ms = ms,
                upstream_ms = self.upstream_ms,
                bytes = self.bytes,
                request_id = text(&self.request_id),
                user_agent = text(&self.user_agent),
                tls_version,
                sni,
                error = self.error,
            ),
        }
    }
}

struct ReplicaField(Option<SocketAddr>);

impl std::fmt::Display for ReplicaField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}

enum Inner {
    /// A body over h2c.
    Upstream(Incoming),
    /// A body read by gangway's own HTTP/1.1 client; its connection goes back to the
    /// replica's pool when the body is done.
    H1 {
        body: H1Body,
        replica: Arc<Replica>,
    },
    Full(Option<Bytes>),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Adds a data frame's bytes to the access-log record.
fn count<E>(polled: &Poll<Option<Result<Frame<Bytes>, E>>>, log: &mut Option<Box<AccessRecord>>) {
    if let Poll::Ready(Some(Ok(frame))) = polled
        && let (Some(data), Some(log)) = (frame.data_ref(), log.as_mut())
    {
        log.bytes += data.len() as u64;
    }
}

/// Returns the connection to the replica's pool when the body was read to its end and the
/// replica keeps the connection open.
fn give_back(body: &mut H1Body, replica: &Replica) {
    if let Some(conn) = body.take_reusable() {
        replica.pool.put(conn);
    }
}

pub struct ProxyBody {
    inner: Inner,
    log: Option<Box<AccessRecord>>,
    /// `timeouts.upstream_read` for a replica's body; None for gangway's own bodies.
    stall: Option<Stall>,
    /// Counts this response in its replica's in-flight requests until it is done.
    _in_flight: Option<InFlight>,
    /// Tells the client connection a response is still being sent until it is done.
    _streaming: Option<crate::server::timed_io::Streaming>,
}

/// Ends a replica's body that sends nothing for `limit` (`timeouts.upstream_read`), like
/// nginx's `proxy_read_timeout`: a replica stuck halfway through a body would otherwise
/// hold the client's connection and its own until one side gives up.
///
/// The timer is only made when the body first has to wait, so a body that arrived with its
/// head (most small answers) costs no timer work; each frame after that moves the deadline
/// later, which tokio does without touching its timer wheel.
struct Stall {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    fn new(limit: Duration) -> Stall {
        Stall { limit, timer: None }
    }

    /// After the body returned Pending: whether `limit` has passed since it last sent.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).is_ready()
    }

    fn progressed(&mut self) {
        if let Some(timer) = self.timer.as_mut() {
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.limit);
        }
    }
}

/// One request in flight on a replica (for least_conn and random); ends when dropped.
pub struct InFlight(Arc<Replica>);

impl InFlight {
    pub fn new(replica: &Arc<Replica>) -> InFlight {
        replica
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(Arc::clone(replica))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ProxyBody {
    pub fn upstream(
        body: Incoming,
        log: Option<Box<AccessRecord>>,
        in_flight: Option<InFlight>,
        read_limit: Duration,
    ) -> Self {
        ProxyBody {
            inner: Inner::Upstream(body),
            log,
            stall: Some(Stall::new(read_limit)),
            _in_flight: in_flight,
            _streaming: None,
        }
    }

    pub fn h1(
        body: H1Body,
        replica: Arc<Replica>,
        log: Option<Box<AccessRecord>>,
        in_flight: InFlight,
        read_limit: Duration,
    ) -> Self {
        ProxyBody {
            inner: Inner::H1 { body, replica },
            log,
            stall: Some(Stall::new(read_limit)),
            _in_flight: Some(in_flight),
            _streaming: None,
        }
    }

    /// Keeps `guard` until hyper is done with this body.
    pub fn hold(&mut self, guard: crate::server::timed_io::Streaming) {
        self._streaming = Some(guard);
    }

    pub fn full(bytes: Bytes, log: Option<Box<AccessRecord>>) -> Self {
        let mut log = log;
        if let Some(l) = log.as_mut() {
            l.bytes = bytes.len() as u64;
        }
        ProxyBody {
            inner: Inner::Full(Some(bytes).filter(|b| !b.is_empty())),
            log,
            stall: None,
            _in_flight: None,
            _streaming: None,
        }
    }

    pub fn empty(log: Option<Box<AccessRecord>>) -> Self {
        Self::full(Bytes::new(), log)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Full(data) => return Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Inner::H1 { body, replica } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if let Poll::Ready(None) = polled {
                    give_back(body, replica);
                }
                polled.map(|f| f.map(|r| r.map_err(BoxError::from)))
            }
            Inner::Upstream(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
        };
        count(&polled, &mut this.log);
        let Some(stall) = this.stall.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Some(Ok(_))) => stall.progressed(),
            Poll::Pending if stall.expired(cx) => {
                // The replica's connection is dropped with this body, never pooled: the
                // body was not read to its end.
                this.stall = None;
                // Every replica's body counts its request in flight on that replica.
                let replica = this._in_flight.as_ref().map(|f| f.0.addr);
                tracing::warn!(
                    replica = %ReplicaField(replica),
                    "a response body stalled longer than timeouts.upstream_read; cut"
                );
                if let Some(log) = this.log.as_mut() {
                    log.error = Some("upstream read timeout");
                }
                return Poll::Ready(Some(Err(BoxError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the replica sent nothing within timeouts.upstream_read",
                )))));
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(data) => data.is_none(),
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::H1 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Upstream(body) => body.size_hint(),
            Inner::H1 { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // A body with nothing to read (HEAD, 204, Content-Length: 0) is never polled to its
        // end; its connection is still clean.
        if let Inner::H1 { body, replica } = &mut self.inner {
            give_back(body, replica);
        }
        if let Some(log) = &self.log {
            log.emit();
        }
    }
}
