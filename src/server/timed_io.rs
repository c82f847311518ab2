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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Shared between the connection's IO and its service.
#[derive(Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    finished: AtomicU64,
}

/// Held while a request is handled.
pub struct Busy(Arc<Activity>);

impl Activity {
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
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
    deadline: Pin<Box<Sleep>>,
}

impl<T> TimedIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>, header: Duration, idle: Duration) -> Self {
        TimedIo {
            inner,
            activity,
            header,
            idle,
            // A new connection must send its first request head within `header`.
            mode: Mode::Header,
            seen_finished: 0,
            deadline: Box::pin(tokio::time::sleep(header)),
        }
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
            self.deadline.as_mut().reset(Instant::now() + self.idle);
        }
    }

    fn on_read(&mut self, n: usize) {
        if n > 0 && self.mode == Mode::Idle {
            self.mode = Mode::Header;
            self.deadline.as_mut().reset(Instant::now() + self.header);
        }
    }

    fn on_write(&mut self, n: usize, cx: &mut Context<'_>) {
        // Sending a response body is activity: push the idle deadline, at most every second
        // of real time to keep timer work off the per-write path.
        if n > 0 && self.mode == Mode::Idle {
            let next = Instant::now() + self.idle;
            if next > self.deadline.deadline() + Duration::from_secs(1) {
                self.deadline.as_mut().reset(next);
            }
        }
        // The read side may be parked since before the request (hyper polls it once and
        // waits): register the deadline with this task's waker so it is seen when it fires.
        if self.expired(cx) {
            cx.waker().wake_by_ref();
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.mode != Mode::Busy && self.deadline.as_mut().poll(cx).is_ready()
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
                this.on_read(buf.filled().len() - before);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.expired(cx) {
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
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
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
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
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
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
