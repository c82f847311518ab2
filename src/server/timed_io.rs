//! Client connection timeouts that hyper does not give us separately.
//!
//! hyper's own header timer starts as soon as a keep-alive connection waits for its next
//! request, so it cannot be both a short slowloris limit and a long idle keep-alive. This
//! wrapper tracks three states from the bytes it sees and from the request counter the
//! service keeps:
//! - idle (no request in flight): closed after `idle` without any traffic;
//! - header (bytes of a new request arrived, no request dispatched yet): closed `header`
//!   after the first byte, however slowly the rest trickles in;
//! - busy (a request is being handled): no client-side deadline; upstream timeouts apply.
//!
//! It also lets an idle plain-HTTP/1 connection be *parked*: once it has been idle for
//! `park_after` with every response body done, the next read reports end of stream to
//! hyper, which ends the connection cleanly without shutting the socket down (see
//! `poll_shutdown`). The server then holds the bare socket, with none of hyper's buffers,
//! until the client sends again, and starts a new hyper connection on it.

use crate::deadline::Deadline;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Shared between the connection's IO and its service.
#[derive(Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    finished: AtomicU64,
    /// Response bodies hyper is still sending.
    streaming: AtomicUsize,
    /// The connection was upgraded (WebSocket): a tunnel, never parked, no request heads.
    upgraded: std::sync::atomic::AtomicBool,
    /// Our side was shut down for good (not parked): the server ended the connection.
    closing: std::sync::atomic::AtomicBool,
    /// The client closed its side (a read returned end of stream).
    client_done: std::sync::atomic::AtomicBool,
}

/// Held by a response body until hyper has sent it (or dropped it).
pub struct Streaming(Arc<Activity>);

impl Drop for Streaming {
    fn drop(&mut self) {
        // Counts as activity: the connection goes idle again from now.
        self.0.finished.fetch_add(1, Ordering::AcqRel);
        self.0.streaming.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held while a request is handled.
pub struct Busy(Arc<Activity>);

impl Activity {
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// Whether the server ended the connection while the client may still be sending (its
    /// side not closed): the socket should linger before it is closed (see
    /// `server::linger`).
    pub fn should_linger(&self) -> bool {
        self.closing.load(Ordering::Acquire) && !self.client_done.load(Ordering::Acquire)
    }

    /// Marks a response body as being sent until the guard is dropped.
    pub fn streaming(self: &Arc<Self>) -> Streaming {
        self.streaming.fetch_add(1, Ordering::AcqRel);
        Streaming(Arc::clone(self))
    }
}

impl Busy {
    /// The connection becomes a tunnel once this request's response is sent.
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Release);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    Header,
    Busy,
}

pub struct TimedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    header: Duration,
    idle: Duration,
    mode: Mode,
    seen_finished: u64,
    /// When the current state's time runs out.
    deadline: Deadline,
    /// Park the connection after this much idleness (plain HTTP/1 only).
    park_after: Option<Duration>,
    /// The idle deadline currently armed is the park deadline.
    park_armed: bool,
    /// When the connection last went idle.
    idle_since: Instant,
    /// End of stream was reported to park the connection: shutdown must not close it.
    parked: bool,
    /// The last write could not proceed (the client is not reading).
    write_blocked: bool,
}

impl<T> TimedIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>, header: Duration, idle: Duration) -> Self {
        let now = Instant::now();
        TimedIo {
            inner,
            activity,
            header,
            idle,
            // A new connection must send its first request head within `header`.
            mode: Mode::Header,
            seen_finished: 0,
            deadline: Deadline::new(now + header),
            park_after: None,
            park_armed: false,
            idle_since: now,
            parked: false,
            write_blocked: false,
        }
    }

    /// Lets the connection be parked after `after` of idleness (when shorter than `idle`).
    pub fn park_after(mut self, after: Duration) -> Self {
        self.park_after = Some(after).filter(|a| *a < self.idle);
        self
    }

    /// Whether hyper was told end of stream to park this connection.
    pub fn is_parked(&self) -> bool {
        self.parked
    }

    /// Serves again after parking: shutdown closes the connection again.
    pub fn resume(&mut self) {
        self.parked = false;
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Brings `mode` up to date with the service's request counter.
    fn refresh(&mut self) {
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            self.mode = Mode::Busy;
            return;
        }
        let finished = self.activity.finished.load(Ordering::Acquire);
        if self.mode == Mode::Busy || finished != self.seen_finished {
            self.seen_finished = finished;
            self.mode = Mode::Idle;
            let now = Instant::now();
            self.idle_since = now;
            self.park_armed = self.park_after.is_some();
            let wait = self.park_after.unwrap_or(self.idle);
            self.deadline.set(now + wait);
        }
    }

    /// The park deadline passed: park if hyper has nothing left to send, else fall back to
    /// the idle deadline. Returns whether to park.
    fn try_park(&mut self, cx: &mut Context<'_>) -> bool {
        self.park_armed = false;
        if self.activity.streaming.load(Ordering::Acquire) == 0
            && !self.write_blocked
            && !self.activity.upgraded.load(Ordering::Acquire)
        {
            self.parked = true;
            return true;
        }
        self.deadline.set(self.idle_since + self.idle);
        // Register the new deadline with this task.
        let _ = self.expired(cx);
        false
    }

    fn on_read(&mut self, n: usize) {
        if n > 0 && self.mode == Mode::Idle && self.activity.upgraded.load(Ordering::Acquire) {
            // Tunnel traffic is activity, never the start of a request head.
            self.push_idle();
            return;
        }
        if n > 0 && self.mode == Mode::Idle {
            self.mode = Mode::Header;
            self.park_armed = false;
            self.deadline.set(Instant::now() + self.header);
        }
    }

    fn on_write(&mut self, n: usize, cx: &mut Context<'_>) {
        // Sending a response body is activity: push the idle deadline.
        if n > 0 && self.mode == Mode::Idle && !self.park_armed {
            self.push_idle();
        }
        // The read side may be parked since before the request (hyper polls it once and
        // waits): register the deadline with this task's waker so it is seen when it fires.
        if self.expired(cx) {
            cx.waker().wake_by_ref();
        }
    }

    /// Moves the idle deadline to `idle` from now (the timer stays where it is: see
    /// [`Deadline`]; a busy connection's is set again about once per park delay).
    fn push_idle(&mut self) {
        self.park_armed = false;
        self.deadline.set(Instant::now() + self.idle);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.mode != Mode::Busy && self.deadline.poll_expired(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.refresh();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n == 0 && buf.remaining() > 0 {
                    this.activity.client_done.store(true, Ordering::Release);
                }
                this.on_read(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.expired(cx) {
                    if this.mode == Mode::Idle && this.park_armed && this.try_park(cx) {
                        // End of stream, as far as hyper knows; the socket stays open.
                        return Poll::Ready(Ok(()));
                    }
                    if !this.deadline.is_elapsed() {
                        return Poll::Pending;
                    }
                    let what = if this.mode == Mode::Header {
                        "request head not received in time"
                    } else {
                        "idle keep-alive connection timed out"
                    };
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        this.write_blocked = polled.is_pending();
        let n = ready!(polled)?;
        this.refresh();
        this.on_write(n, cx);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.write_blocked = polled.is_pending();
        let n = ready!(polled)?;
        this.refresh();
        this.on_write(n, cx);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.parked {
            // hyper ends a parked connection as if the client had closed it: keep it open.
            return Poll::Ready(Ok(()));
        }
        this.activity.closing.store(true, Ordering::Release);
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl TimedIo<tokio::net::TcpStream> {
    /// Waits, holding no buffer, until the client sends again (a parked connection) or
    /// sends its first bytes (a new one). Fails when the idle (or header) time runs out.
    ///
    /// Polls the socket's readiness directly rather than through `TcpStream::readable`, whose
    /// future (a waiter node, about 150 bytes) would sit in every parked connection's task.
    pub async fn readable(&mut self) -> io::Result<()> {
        if self.parked {
            self.deadline.set(self.idle_since + self.idle);
        }
        // Through a method: a closure naming `self.inner` and `self.deadline` would hold a
        // reference to each, 8 bytes more in every parked connection's task.
        std::future::poll_fn(|cx| self.poll_readable(cx)).await
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(r) = self.inner.poll_read_ready(cx) {
            return Poll::Ready(r);
        }
        if self.deadline.poll_expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle keep-alive connection timed out",
            )));
        }
        Poll::Pending
    }

    /// Reads without consuming, into `buf`, what the client has sent; 0 at end of stream.
    pub async fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = tokio::io::ReadBuf::new(buf);
        std::future::poll_fn(|cx| self.inner.poll_peek(cx, &mut buf)).await
    }
}
