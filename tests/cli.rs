//! The `gangway` binary as a user meets it: exit codes, what it prints, signals.
//!
//! Every child process is owned by a [`Proc`] guard that kills it on drop, so a failing
//! assertion never leaves a proxy running. Waits are polls against deadlines.

mod common;

use common::Upstream;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gangway");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// A `gangway` command run from the crate root (so fixture paths print as written), with a
/// predictable log filter.
fn gangway(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(MANIFEST_DIR)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// A running child process, killed and reaped on drop. Its stdout and stderr go to files
/// (read with [`Proc::stdout`] / [`Proc::stderr`]) unless the caller piped them.
struct Proc {
    child: Child,
    out: Option<(PathBuf, PathBuf)>,
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// Spawns with stdout and stderr captured to files.
    fn spawn(mut cmd: Command) -> Proc {
        let dir = tempfile::tempdir().expect("tempdir");
        let (o, e) = (dir.path().join("stdout"), dir.path().join("stderr"));
        cmd.stdout(File::create(&o).expect("stdout file"))
            .stderr(File::create(&e).expect("stderr file"));
        let child = cmd.spawn().expect("spawn gangway");
        Proc {
            child,
            out: Some((o, e)),
            _dir: Some(dir),
        }
    }

    /// Spawns with stdout piped (taken by the caller) and stderr discarded.
    fn spawn_piped(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let child = cmd.spawn().expect("spawn gangway");
        Proc {
            child,
            out: None,
            _dir: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&self) -> String {
        let (o, _) = self.out.as_ref().expect("stdout captured");
        std::fs::read_to_string(o).expect("read stdout")
    }

    fn stderr(&self) -> String {
        let (_, e) = self.out.as_ref().expect("stderr captured");
        std::fs::read_to_string(e).expect("read stderr")
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Polls until the process exits; `None` if it is still running at the deadline.
    fn wait_until(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Async flavour of [`Proc::wait_until`], for tests that also serve an upstream.
    async fn wait_until_async(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGTERM through `kill(1)` (no unsafe code).
    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs a command that should end by itself; fails the test if it is still running after
/// `limit`. Returns the status, stdout and stderr.
fn run_to_end(cmd: Command, limit: Duration) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn(cmd);
    let status = p
        .wait_until(limit)
        .unwrap_or_else(|| panic!("gangway still running after {limit:?}"));
    (status, p.stdout(), p.stderr())
}

const QUICK: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> String {
    format!("tests/fixtures/{name}")
}

// ---------------------------------------------------------------------------------------
// --version
// ---------------------------------------------------------------------------------------

#[test]
fn version_prints_name_and_version() {
    let (status, out, err) = run_to_end(gangway(&["--version"]), QUICK);
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert_eq!(out, format!("gangway {}\n", env!("CARGO_PKG_VERSION")));
    assert_eq!(out, "gangway 0.1.0\n");
    assert_eq!(err, "");
}

// ---------------------------------------------------------------------------------------
// check / run on invalid configs
// ---------------------------------------------------------------------------------------

/// What `check` and `run` print for tests/fixtures/problems.yaml.
fn problems_report() -> String {
    let f = fixture("problems.yaml");
    [
        format!("gangway: {f}: 6 problems in config"),
        format!("  {f}:4:3: listen.htpp: unknown key"),
        format!(
            "  {f}:6:10: timeouts.grace: expected a duration such as 500ms, 10s, 5m or 1h, found \"soon\""
        ),
        format!(
            "  {f}:9:17: sites[0].upstreams[0]: expected host:port such as app:8000 or 10.0.0.5:8000, found \"app\""
        ),
        format!("  {f}:10:30: sites[1].hosts[1]: host app.example.com is already served by sites[0]"),
        format!(
            "  {f}:12:15: sites[1].routes[0].path: expected a path starting with /, found \"v1\""
        ),
        format!("  {f}:14:9: sites[1].routes[0].colour: unknown key"),
        String::new(),
    ]
    .join("\n")
}

#[test]
fn check_lists_every_problem_with_position_and_key_path() {
    let f = fixture("problems.yaml");
    let (status, out, err) = run_to_end(gangway(&["check", "-c", &f]), QUICK);
    assert_eq!(status.code(), Some(64), "stdout: {out}\nstderr: {err}");
    assert_eq!(out, "", "nothing on stdout for a bad config");
    assert_eq!(err, problems_report());
}

#[test]
fn run_refuses_an_invalid_config_with_the_same_report() {
    let f = fixture("problems.yaml");
    let (status, out, err) = run_to_end(gangway(&["run", "-c", &f]), QUICK);
    assert_eq!(status.code(), Some(64), "stdout: {out}\nstderr: {err}");
    assert_eq!(out, "");
    assert_eq!(err, problems_report());
}

/// Status, position and message of a duplicate key (parsing stops there, so it is alone).
#[test]
fn check_reports_a_duplicate_key_with_its_position() {
    let f = fixture("duplicate_key.yaml");
    for cmd in ["check", "run"] {
        let (status, out, err) = run_to_end(gangway(&[cmd, "-c", &f]), QUICK);
        assert_eq!(status.code(), Some(64), "{cmd}: stderr: {err}");
        assert_eq!(out, "", "{cmd}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{cmd}: {err}");
        assert_eq!(lines[0], format!("gangway: {f}: 1 problem in config"));
        let prefix = format!("  {f}:5:5: ");
        assert!(lines[1].starts_with(&prefix), "{cmd}: {err}");
        assert!(
            lines[1].contains("duplicate mapping key: hosts"),
            "{cmd}: {err}"
        );
    }
}

/// The key path of a duplicate key must be the duplicated key itself.
#[test]
fn check_names_the_duplicate_key_path() {
    let f = fixture("duplicate_key.yaml");
    let (status, _, err) = run_to_end(gangway(&["check", "-c", &f]), QUICK);
    assert_eq!(status.code(), Some(64), "stderr: {err}");
    let line = err.lines().nth(1).unwrap_or_default().to_owned();
    let prefix = format!("  {f}:5:5: sites[0].hosts: duplicate mapping key: hosts");
    assert!(line.starts_with(&prefix), "got: {line}\nwant: {prefix}…");
}

#[test]
fn run_fails_when_the_listen_address_is_taken() {
    let taken = StdListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("taken.yaml");
    std::fs::write(
        &path,
        format!(
            "listen:\n  http: {addr}\nsites:\n  - hosts: [\"*\"]\n    upstreams: [127.0.0.1:9]\n"
        ),
    )
    .expect("write config");
    let (status, _, err) = run_to_end(gangway(&["run", "-c", path.to_str().unwrap()]), QUICK);
    assert_eq!(status.code(), Some(1), "stderr: {err}");
    let prefix = format!("gangway: cannot listen on {addr}: ");
    assert!(err.starts_with(&prefix), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    drop(taken);
}

// ---------------------------------------------------------------------------------------
// check on a valid config
// ---------------------------------------------------------------------------------------

#[test]
fn check_prints_sites_routes_and_replicas() {
    let f = fixture("valid.yaml");
    let (status, out, err) = run_to_end(gangway(&["check", "-c", &f]), QUICK);
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert_eq!(err, "");
    let want = format!(
        "{f}: config OK
listen http 127.0.0.1:18080
trusted_proxies 10.0.0.0/8, 192.168.1.7/32
site app.example.com, *.app.example.com
  route /
    127.0.0.1:8001 -> 127.0.0.1:8001
    127.0.0.1:8002 -> 127.0.0.1:8002
site api.example.com
  route /v1/ (strip prefix) (upstream_read 3600s)
    [::1]:8004 -> [::1]:8004
  route /
    127.0.0.1:8003 -> 127.0.0.1:8003
site *
  route /
    127.0.0.1:8005 -> 127.0.0.1:8005
"
    );
    assert_eq!(out, want);
}

#[test]
fn check_reports_an_unreadable_file() {
    let (status, out, err) = run_to_end(
        gangway(&["check", "-c", "tests/fixtures/does-not-exist.yaml"]),
        QUICK,
    );
    assert_eq!(status.code(), Some(64));
    assert_eq!(out, "");
    let mut lines = err.lines();
    assert_eq!(
        lines.next(),
        Some("gangway: tests/fixtures/does-not-exist.yaml: 1 problem in config")
    );
    let second = lines.next().unwrap_or_default();
    assert!(
        second.starts_with("  tests/fixtures/does-not-exist.yaml: cannot read: "),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// run: SIGTERM drains
// ---------------------------------------------------------------------------------------

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// One GET on a fresh connection; errors instead of panicking.
async fn try_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, "app.test")
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `gangway run` over `up` on a port picked just before spawning; retried on a new port if
/// another process took it first. Returns once the proxy answers through to `up`.
async fn start_proxy(up: &Upstream, grace: &str) -> (Proc, SocketAddr, tempfile::TempDir) {
    start_proxy_with(up, grace, None).await
}

/// [`start_proxy`] with `TOKIO_WORKER_THREADS` set to `workers`.
async fn start_proxy_with(
    up: &Upstream,
    grace: &str,
    workers: Option<&str>,
) -> (Proc, SocketAddr, tempfile::TempDir) {
    let (proc, addr, _, dir) = start_proxy_admin(up, grace, workers, false).await;
    (proc, addr, dir)
}

/// [`start_proxy_with`], with an admin listener when `admin` is set (its address is the
/// third value).
async fn start_proxy_admin(
    up: &Upstream,
    grace: &str,
    workers: Option<&str>,
    admin: bool,
) -> (Proc, SocketAddr, Option<SocketAddr>, tempfile::TempDir) {
    let env: Vec<(&str, &str)> = workers
        .map(|n| ("TOKIO_WORKER_THREADS", n))
        .into_iter()
        .collect();
    start_proxy_over(up.addr, "", &up.name, grace, &env, admin).await
}

/// `gangway run` with one catch-all site over `upstream` (plus `site_extra` YAML lines in
/// the site) and `env` added to its environment; ready once `/` answers 200 with
/// `ready_body`.
async fn start_proxy_over(
    upstream: SocketAddr,
    site_extra: &str,
    ready_body: &str,
    grace: &str,
    env: &[(&str, &str)],
    admin: bool,
) -> (Proc, SocketAddr, Option<SocketAddr>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gangway.yaml");
    for attempt in 1..=5 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin_addr = admin.then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let admin_yaml = admin_addr.map_or("off".to_owned(), |a| a.to_string());
        std::fs::write(
            &path,
            format!(
                "listen: {{http: {addr}, admin: {admin_yaml}}}\ntimeouts: {{grace: {grace}}}\n\
                 access_log: off\nsites:\n  - hosts: [\"*\"]\n    upstreams: [{upstream}]\n\
                 {site_extra}"
            ),
        )
        .expect("write config");
        let mut cmd = gangway(&["run", "-c", path.to_str().unwrap()]);
        cmd.envs(env.iter().copied());
        let mut proc = Proc::spawn(cmd);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = proc.exited() {
                let err = proc.stderr();
                assert!(
                    status.code() == Some(1) && err.contains("cannot listen on"),
                    "gangway exited during startup with {status}: {err}"
                );
                eprintln!("attempt {attempt}: port {addr} was taken, retrying");
                break;
            }
            if let Ok((200, body)) = try_get(addr, "/").await
                && body == ready_body
            {
                return (proc, addr, admin_addr, dir);
            }
            assert!(
                Instant::now() < deadline,
                "gangway did not answer on {addr}: stderr: {}",
                proc.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("could not start gangway on a free port in 5 attempts");
}

/// Polls until `up` has received a request for `path`.
async fn until_upstream_saw(up: &Upstream, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !up.seen.lock().unwrap().iter().any(|s| s.path == path) {
        assert!(Instant::now() < deadline, "upstream never received {path}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until a new connection to `addr` is refused.
async fn until_refused(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ => {}
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A serving gangway turns transparent huge pages off and executes itself again, so that no
/// page becomes resident 2 MiB at a time (benches/README.md: 10 000 idle connections), with
/// mimalloc told to give freed memory back after 100 ms instead of a second. The process
/// keeps the pid it was started with, its arguments, and serves as configured.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_serving_process_runs_without_huge_pages_under_the_pid_it_was_started_with() {
    let up = Upstream::start("thp-upstream").await;
    let (proc, addr, _dir) = start_proxy(&up, "1s").await;
    let pid = proc.child.id();
    assert_eq!(thp_enabled(pid).as_deref(), Some("0"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args: Vec<&[u8]> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    assert_eq!(args.len(), 4, "{args:?}");
    assert_eq!(args[0], BIN.as_bytes());
    assert_eq!(args[1], b"run");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    assert_eq!(exe, std::fs::canonicalize(BIN).expect("binary path"));
    assert_eq!(purge_delay(pid), ["MIMALLOC_PURGE_DELAY=100"]);
    assert_eq!(
        try_get(addr, "/").await,
        Ok((200, "thp-upstream".to_owned()))
    );
}

/// An operator's own `MIMALLOC_PURGE_DELAY` is kept through that restart.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_operators_mimalloc_purge_delay_is_kept() {
    let up = Upstream::start("purge-upstream").await;
    let env = [("MIMALLOC_PURGE_DELAY", "2500")];
    let (proc, _addr, _, _dir) = start_proxy_over(up.addr, "", &up.name, "1s", &env, false).await;
    assert_eq!(
        thp_enabled(proc.pid()).as_deref(),
        Some("0"),
        "not restarted"
    );
    assert_eq!(purge_delay(proc.pid()), ["MIMALLOC_PURGE_DELAY=2500"]);
}

/// The `THP_enabled` field of a process's /proc status (0 once it turned huge pages off).
#[cfg(target_os = "linux")]
fn thp_enabled(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_owned())
}

/// The `MIMALLOC_PURGE_DELAY` entries of a process's environment.
#[cfg(target_os = "linux")]
fn purge_delay(pid: u32) -> Vec<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .filter(|v| v.starts_with("MIMALLOC_PURGE_DELAY="))
        .collect()
}

#[tokio::test]
async fn sigterm_drains_the_request_in_flight_then_exits_0() {
    drains_in_flight_then_exits_0(None).await;
}

/// One worker runs on tokio's single-threaded scheduler (see main.rs): the same serving,
/// draining and exit.
#[tokio::test]
async fn a_single_worker_drains_the_request_in_flight_then_exits_0() {
    drains_in_flight_then_exits_0(Some("1")).await;
}

/// With two workers the drain waits for requests on either worker.
#[tokio::test]
async fn two_workers_drain_the_request_in_flight_then_exit_0() {
    drains_in_flight_then_exits_0(Some("2")).await;
}

/// Opens `n` keep-alive clients to `addr`, then sends five rounds of requests, one at a time,
/// client after client, to `/turn/ROUND/CLIENT`; each must answer 200 with `body(path)`.
/// Returns the clients, still connected.
async fn take_turns(
    addr: SocketAddr,
    n: usize,
    body: impl Fn(&str) -> String,
) -> Vec<common::Client> {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(common::Client::connect(addr).await);
    }
    for round in 0..5 {
        for (i, c) in clients.iter_mut().enumerate() {
            let path = format!("/turn/{round}/{i}");
            let got = c.get("app.test", &path).await;
            assert_eq!(got.status, 200, "{path}");
            assert_eq!(got.text(), body(&path));
        }
    }
    clients
}

/// Several workers: connections are spread evenly over them, each worker keeps its own
/// keep-alive connections upstream, and the admin endpoints show both.
#[tokio::test]
async fn three_workers_share_connections_evenly_and_each_keeps_its_upstream_connections() {
    let up = Upstream::start("workers-upstream").await;
    let (_proc, addr, admin, _dir) = start_proxy_admin(&up, "1s", Some("3"), true).await;
    let admin = admin.expect("admin listener");
    let status = || async move {
        let (code, body) = try_get(admin, "/status").await.expect("GET /status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("status is JSON")
    };
    let open = |v: &serde_json::Value| -> Vec<i64> {
        v["workers"]
            .as_array()
            .expect("status lists the workers")
            .iter()
            .map(|w| w["open"].as_i64().expect("open"))
            .collect()
    };
    // The start-up probe's connection closes asynchronously: wait until nothing is open.
    let idle = common::eventually(Duration::from_secs(5), || async {
        open(&status().await) == vec![0, 0, 0]
    })
    .await;
    assert!(idle, "connections still open: {}", status().await);
    let accepted = |v: &serde_json::Value| -> u64 {
        v["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["accepted"].as_u64().expect("accepted"))
            .sum()
    };
    let before = accepted(&status().await);

    // Six keep-alive clients; requests go one at a time, client after client.
    let clients = take_turns(addr, 6, |_| "workers-upstream".to_owned()).await;
    let now = status().await;
    assert_eq!(open(&now), vec![2, 2, 2], "{now}");
    assert_eq!(accepted(&now) - before, 6, "six clients accepted: {now}");
    // Requests never overlapped, so each worker needed one upstream connection, kept alive
    // for all its requests (the probe's worker reused the one it opened for the probe).
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(up.hits(), 31);

    let (code, metrics) = try_get(admin, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200);
    for w in 0..3 {
        let line = format!("gangway_worker_connections{{worker=\"{w}\"}} 2\n");
        assert!(metrics.contains(&line), "no {line:?} in:\n{metrics}");
    }
    drop(clients);
    let closed = common::eventually(Duration::from_secs(5), || async {
        open(&status().await) == vec![0, 0, 0]
    })
    .await;
    assert!(closed, "closed clients still counted: {}", status().await);
}

/// An h2c upstream gets one multiplexed connection per worker, used only by that worker.
#[tokio::test]
async fn two_workers_each_keep_one_h2c_connection_upstream() {
    let up = common::H2cUpstream::start().await;
    let (_proc, addr, _, _dir) = start_proxy_over(
        up.addr,
        "    upstream_protocol: h2c\n",
        "HTTP/2.0 app.test /",
        "1s",
        &[("TOKIO_WORKER_THREADS", "2")],
        false,
    )
    .await;
    // Four clients at once: the least busy worker gets each, two per worker.
    let _clients = take_turns(addr, 4, |path| format!("HTTP/2.0 app.test {path}")).await;
    assert_eq!(
        up.connections.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one h2c connection per worker"
    );
}

async fn drains_in_flight_then_exits_0(workers: Option<&str>) {
    let up = Upstream::start("drain-upstream").await;
    let (mut proc, addr, _dir) = start_proxy_with(&up, "5s", workers).await;

    // Two at once: with several workers they go to the least busy ones, so the drain is
    // seen on more than the main thread (unless the start-up probe's connection is still
    // open on one of them).
    let slow = tokio::spawn(try_get(addr, "/slow?ms=1500"));
    let other = tokio::spawn(try_get(addr, "/slow?ms=1500&other"));
    until_upstream_saw(&up, "/slow?ms=1500").await;
    until_upstream_saw(&up, "/slow?ms=1500&other").await;
    let signalled = Instant::now();
    proc.sigterm();

    assert!(
        until_refused(addr, Duration::from_secs(5)).await,
        "new connections still accepted after SIGTERM"
    );
    assert!(
        !slow.is_finished(),
        "the slow request ended before the listener closed"
    );

    let got = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("slow request finished")
        .expect("task");
    assert_eq!(got, Ok((200, "drain-upstream".to_owned())));
    let got = tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .expect("the other slow request finished")
        .expect("task");
    assert_eq!(got, Ok((200, "drain-upstream".to_owned())));

    let status = proc
        .wait_until_async(Duration::from_secs(5) + Duration::from_millis(500))
        .await
        .unwrap_or_else(|| {
            panic!(
                "gangway still running {:?} after SIGTERM",
                signalled.elapsed()
            )
        });
    assert_eq!(status.code(), Some(0), "stderr: {}", proc.stderr());
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exit took {:?}, longer than the 5 s grace although the request ended at ~1.5 s",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn sigterm_cuts_requests_still_running_after_the_grace_period() {
    let up = Upstream::start("cut-upstream").await;
    let (mut proc, addr, _dir) = start_proxy(&up, "1s").await;

    let slow = tokio::spawn(try_get(addr, "/slow?ms=5000"));
    until_upstream_saw(&up, "/slow?ms=5000").await;
    let signalled = Instant::now();
    proc.sigterm();

    let status = proc
        .wait_until_async(Duration::from_secs(3))
        .await
        .unwrap_or_else(|| {
            panic!(
                "gangway still running {:?} after SIGTERM",
                signalled.elapsed()
            )
        });
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "stderr: {}", proc.stderr());
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}: the 1 s grace was not given to the request in flight"
    );
    assert!(took < Duration::from_millis(2500), "exited after {took:?}");

    let got = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the cut request ended")
        .expect("task");
    assert!(got.is_err(), "request should have been cut, got {got:?}");
}

// ---------------------------------------------------------------------------------------
// demo
// ---------------------------------------------------------------------------------------

#[test]
fn demo_shows_round_robin_over_three_replicas_and_stops_on_sigterm() {
    let storage = tempfile::tempdir().expect("tempdir");
    let mut proc = Proc::spawn_piped(gangway(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--https",
        "127.0.0.1:0",
        "--storage",
        storage.path().to_str().expect("utf-8 path"),
        "--admin",
        "127.0.0.1:0",
    ]));
    let stdout = proc.child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen_lines = Vec::new();
    let line = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with("round robin,") => break l,
            Ok(l) => seen_lines.push(l),
            Err(e) => panic!("no `round robin,` line ({e}); stdout so far: {seen_lines:#?}"),
        }
    };

    let (head, names) = line
        .split_once(": ")
        .expect("`round robin, N requests: ...`");
    assert_eq!(head, "round robin, 6 requests");
    let names: Vec<&str> = names.split(' ').collect();
    assert_eq!(names.len(), 6, "{line}");
    for r in ["replica-1", "replica-2", "replica-3"] {
        assert_eq!(
            names.iter().filter(|n| **n == r).count(),
            2,
            "{r} twice: {line}"
        );
    }
    assert!(
        names.windows(2).all(|w| w[0] != w[1]),
        "consecutive requests went to the same replica: {line}"
    );

    proc.sigterm();
    let status = proc
        .wait_until(Duration::from_secs(15))
        .expect("demo still running after SIGTERM");
    assert_eq!(status.code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// shipped configs
// ---------------------------------------------------------------------------------------

#[test]
fn every_shipped_config_is_valid() {
    let dir = Path::new(MANIFEST_DIR).join("config");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return; // no config/ directory: nothing shipped
    };
    let mut failures = Vec::new();
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Err(e) = gangway::config::Config::load(&path) {
                failures.push(e.to_string());
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.concat());
}

// ---------------------------------------------------------------------------------------
// run: SIGHUP reloads
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sighup_reloads_and_a_bad_config_keeps_the_old_one() {
    let a = Upstream::start("sighup-a").await;
    let b = Upstream::start("sighup-b").await;
    let (proc, addr, dir) = start_proxy(&a, "5s").await;
    let path = dir.path().join("gangway.yaml");
    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &proc.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    };

    // A broken edit, then SIGHUP: rejected with its position; a still serves.
    let good = std::fs::read_to_string(&path).expect("config");
    std::fs::write(
        &path,
        good.replace("access_log: off", "access_log: off\nbogus: 1"),
    )
    .expect("write");
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proc.stdout().contains("config rejected") {
        assert!(
            Instant::now() < deadline,
            "no rejection logged: {}",
            proc.stdout()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        proc.stdout().contains(":4:1: bogus: unknown key"),
        "{}",
        proc.stdout()
    );
    assert_eq!(try_get(addr, "/").await, Ok((200, "sighup-a".to_owned())));

    // A good edit, then SIGHUP: b takes over.
    std::fs::write(
        &path,
        good.replace(&a.addr.to_string(), &b.addr.to_string()),
    )
    .expect("write");
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if try_get(addr, "/").await == Ok((200, "sighup-b".to_owned())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never switched to b: {}",
            proc.stdout()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proc.stdout().contains("SIGHUP"), "{}", proc.stdout());
}

// ---------------------------------------------------------------------------------------
// run: access log
// ---------------------------------------------------------------------------------------

/// Starts `gangway run` with `extra` top-level YAML over `up`; returns once it answers.
async fn start_logging_proxy(up: &Upstream, extra: &str) -> (Proc, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gangway.yaml");
    for _ in 0..5 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        std::fs::write(
            &path,
            format!(
                "listen: {{http: {addr}, admin: off}}\n{extra}\nsites:\n  - hosts: [\"*\"]\n    upstreams: [{}]\n",
                up.addr
            ),
        )
        .expect("write config");
        let mut proc = Proc::spawn(gangway(&["run", "-c", path.to_str().unwrap()]));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if proc.exited().is_some() {
                break; // port taken: next attempt
            }
            if let Ok((200, _)) = try_get(addr, "/ready").await {
                return (proc, addr, dir);
            }
            assert!(
                Instant::now() < deadline,
                "gangway did not start: {}",
                proc.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("could not start gangway");
}

async fn wait_for_line(proc: &Proc, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = proc.stdout().lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle}: {}",
            proc.stdout()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_json_access_log_has_one_parseable_line_per_request() {
    let up = Upstream::start("logged").await;
    let (proc, addr, _dir) = start_logging_proxy(&up, "access_log: json").await;
    assert_eq!(
        try_get(addr, "/logged/path?q=1").await,
        Ok((200, "logged".to_owned()))
    );
    let line = wait_for_line(&proc, "/logged/path?q=1").await;
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["target"], "access");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["host"], "app.test");
    assert_eq!(v["path"], "/logged/path?q=1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["replica"], up.addr.to_string());
    assert_eq!(v["bytes"], 6);
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["request_id"].as_str().map(str::len), Some(32));
    let sent_id = up
        .last()
        .headers
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        v["request_id"], sent_id,
        "the logged id is the one sent upstream"
    );
    assert!(v["duration_ms"].as_f64().is_some() && v["upstream_ms"].as_f64().is_some());
}

/// A response cut by `timeouts.upstream_read` is logged with what was sent and why, and a
/// warning names the replica.
#[tokio::test]
async fn a_stalled_response_is_logged_as_an_upstream_read_timeout() {
    let up = Upstream::start("stall").await;
    let extra = "access_log: json\ntimeouts:\n  upstream_read: 300ms";
    let (proc, addr, _dir) = start_logging_proxy(&up, extra).await;
    let (text, _) = common::get_until_closed(addr, "/stall").await;
    assert!(text.ends_with("\r\n3\r\nabc\r\n"), "{text:?}");
    let line = wait_for_line(&proc, "\"/stall\"").await;
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes"], 3);
    assert_eq!(v["error"], "upstream read timeout");
    let warning = wait_for_line(&proc, "timeouts.upstream_read").await;
    assert!(warning.contains(&up.addr.to_string()), "{warning}");
}

#[tokio::test]
async fn the_combined_access_log_is_the_classic_format() {
    let up = Upstream::start("combined").await;
    let (proc, addr, _dir) = start_logging_proxy(&up, "access_log: combined").await;
    assert_eq!(try_get(addr, "/c").await, Ok((200, "combined".to_owned())));
    let line = wait_for_line(&proc, "\"GET /c HTTP/1.1\"").await;
    assert!(line.contains("127.0.0.1 - - ["), "{line}");
    assert!(
        line.ends_with("\"GET /c HTTP/1.1\" 200 8 \"-\" \"-\""),
        "{line}"
    );
}

/// The access log is written from a thread of its own; no line may be lost, not even the
/// ones still queued when SIGTERM comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_logged_even_right_before_sigterm() {
    let up = Upstream::start("many").await;
    let (mut proc, addr, _dir) = start_logging_proxy(&up, "access_log: json").await;
    let mut tasks = Vec::new();
    for c in 0..20 {
        tasks.push(tokio::spawn(async move {
            let mut client = common::Client::connect(addr).await;
            for i in 0..100 {
                let got = client.get("app.test", &format!("/n/{c}/{i}")).await;
                assert_eq!(got.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    proc.sigterm();
    let status = proc
        .wait_until_async(Duration::from_secs(10))
        .await
        .expect("gangway exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "stderr: {}", proc.stderr());
    let mut paths: Vec<String> = proc
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .filter_map(|v| v["path"].as_str().map(str::to_owned))
        .filter(|p| p.starts_with("/n/"))
        .collect();
    paths.sort();
    let mut expected: Vec<String> = (0..20)
        .flat_map(|c| (0..100).map(move |i| format!("/n/{c}/{i}")))
        .collect();
    expected.sort();
    assert_eq!(paths.len(), 2000, "access log lines for 2000 requests");
    assert_eq!(paths, expected);
}
