//! Worker threads: one single-threaded tokio runtime per core, each serving its own
//! connections from accept to close, with its own pool of upstream connections.
//!
//! The thread that calls [`start`] is worker 0: its runtime also runs the accept loops, the
//! admin endpoint and every background task (discovery, health checks, ACME). Workers 1..n
//! are threads started here. An accepted connection goes to the worker serving the fewest
//! connections, and stays there: its requests, its upstream connections and their timers
//! never cross threads. Against tokio's multi-threaded scheduler this saves the work
//! stealing, the cross-thread wake-ups between a request and its pooled upstream connection,
//! and the atomics both need (see README, Performance).
//!
//! Without [`start`] (library users, tests) there is one worker, the current runtime.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

thread_local! {
    /// The index of the worker this thread is (0 for any thread that is not a worker).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

/// The worker threads started by [`start`].
pub struct Workers {
    /// Runtimes of workers 1..n (worker 0 is the caller's).
    handles: Vec<Handle>,
    /// One per worker, worker 0 included.
    counters: Box<[Counters]>,
    /// Where the search for the least busy worker starts, so ties rotate.
    next: AtomicUsize,
}

/// What one worker serves.
#[derive(Default)]
struct Counters {
    /// Connections open now.
    open: AtomicI64,
    /// Connections given to it in all.
    accepted: AtomicU64,
}

/// What the admin endpoints show of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLoad {
    pub open: i64,
    pub accepted: u64,
}

/// Starts `n - 1` worker threads beside the calling one, which is worker 0 and must then run
/// a tokio runtime (the accept loops go there). Call once, before any config is loaded
/// (connection pools size themselves by [`count`]). A second call, or `n <= 1`, starts
/// nothing.
pub fn start(n: usize) -> std::io::Result<()> {
    if n <= 1 || WORKERS.get().is_some() {
        return Ok(());
    }
    let mut handles = Vec::with_capacity(n - 1);
    for index in 1..n {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(runtime.handle().clone());
        std::thread::Builder::new()
            .name(format!("gangway-worker-{index}"))
            .spawn(move || {
                WORKER.with(|w| w.set(index));
                // Runs the tasks given to this worker until the process exits.
                runtime.block_on(std::future::pending::<()>());
            })?;
    }
    let workers = Workers {
        handles,
        counters: (0..n).map(|_| Counters::default()).collect(),
        next: AtomicUsize::new(0),
    };
    let _ = WORKERS.set(workers);
    Ok(())
}

/// How many workers serve connections (1 unless [`start`] started more).
pub fn count() -> usize {
    WORKERS.get().map_or(1, |w| w.counters.len())
}

/// The worker the calling thread is; 0 outside worker threads.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// One `T` per worker, each used only by its worker thread once workers are started (so its
/// lock, if any, is not contended). Sized by [`count`] when created.
pub struct PerWorker<T>(Box<[T]>);

impl<T: Default> Default for PerWorker<T> {
    fn default() -> Self {
        PerWorker((0..count()).map(|_| T::default()).collect())
    }
}

impl<T> PerWorker<T> {
    /// The calling worker's `T` (the last one for a thread beyond the count, which only
    /// happens for values created before [`start`]).
    pub fn mine(&self) -> &T {
        let last = self.0.len().saturating_sub(1);
        &self.0[current().min(last)]
    }
}

/// Each worker's connections, open and accepted (empty without [`start`]).
pub fn loads() -> Vec<WorkerLoad> {
    WORKERS.get().map_or_else(Vec::new, |w| {
        w.counters
            .iter()
            .map(|c| WorkerLoad {
                open: c.open.load(Ordering::Relaxed),
                accepted: c.accepted.load(Ordering::Relaxed),
            })
            .collect()
    })
}

/// Serves an accepted connection on the least busy worker: `serve` runs there, with the
/// stream registered on that worker's runtime, and the future it returns (if any) becomes the
/// connection's task, tracked by `tracker` (the drain waits for it). Without workers it runs
/// on the current runtime.
pub fn dispatch<F, Fut>(stream: TcpStream, tracker: &TaskTracker, serve: F)
where
    F: FnOnce(TcpStream) -> Option<Fut> + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(workers) = WORKERS.get() else {
        if let Some(serving) = serve(stream) {
            tracker.spawn(serving);
        }
        return;
    };
    let index = workers.least_busy();
    let counters = &workers.counters[index];
    counters.open.fetch_add(1, Ordering::Relaxed);
    counters.accepted.fetch_add(1, Ordering::Relaxed);
    let done = OpenGuard(&counters.open);
    if index == current() {
        if let Some(serving) = serve(stream) {
            tracker.spawn(Counted { serving, done });
        }
        return;
    }
    // The stream is registered with this thread's reactor; the worker registers it anew.
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "cannot hand a connection to a worker");
            return;
        }
    };
    // A short task on the worker sets the connection up there and spawns the task that serves
    // it. Awaiting `serving` in this task instead would keep a second copy of the connection's
    // state in it for the connection's life.
    let spawner = tracker.clone();
    let handoff = tracker.track_future(async move {
        match TcpStream::from_std(std_stream).map(serve) {
            Ok(Some(serving)) => drop(spawner.spawn(Counted { serving, done })),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "worker cannot register a connection"),
        }
    });
    workers.handles[index - 1].spawn(handoff);
}

pin_project_lite::pin_project! {
    /// A connection's future, and its worker's open-connection count that ends with it.
    struct Counted<F> {
        #[pin]
        serving: F,
        done: OpenGuard,
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.project().serving.poll(cx)
    }
}

impl Workers {
    /// The worker with the fewest open connections; ties go round-robin.
    fn least_busy(&self) -> usize {
        let n = self.counters.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        let mut best_open = i64::MAX;
        for k in 0..n {
            let i = (start + k) % n;
            let open = self.counters[i].open.load(Ordering::Relaxed);
            if open < best_open {
                best = i;
                best_open = open;
            }
        }
        best
    }
}

/// Decrements a worker's open-connection count when the connection's task ends.
struct OpenGuard(&'static AtomicI64);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
