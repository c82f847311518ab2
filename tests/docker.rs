//! End-to-end on the real Docker engine: the FROM-scratch images built from host binaries by
//! `deploy/build-images.sh`, and the stack of `deploy/compose.yaml` (gangway in front of
//! `deploy.replicas: 3` gangway-whoami containers, found through compose's DNS) run with
//! `docker compose` (or `docker-compose`).
//!
//! - The static release build and the images are made once per test run (a no-op cargo build
//!   when nothing changed); images are tagged `gangway:e2e` and `gangway-whoami:e2e`.
//! - Each test brings up its own compose project (a unique name, so its own private network
//!   and volume), with gangway published on free loopback ports (`127.0.0.1::80`, read back
//!   with `compose port`). Traffic goes only to loopback and the test's own containers.
//! - A [`Stack`] guard runs `compose down -v --remove-orphans` when dropped, then removes by
//!   label anything left, so every container, network and volume goes away even when an
//!   assertion fails (and the logs are printed first).
//! - Waits are polls against deadlines.
//!
//! Without a Docker engine or compose, each test prints that it did not run and why, and
//! passes; under `CI=true` that is a failure.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const GANGWAY_IMAGE: &str = "gangway:e2e";
const WHOAMI_IMAGE: &str = "gangway-whoami:e2e";
const STACK_FILE: &str = "deploy/compose.yaml";
const DEMO_FILE: &str = "deploy/compose.demo.yaml";
/// Inside the gangway container (deploy/compose.yaml mounts the config folder there).
const STACK_CONFIG: &str = "/etc/gangway/compose-stack.yaml";
/// A docker or compose command that has not finished after this is killed.
const COMMAND_LIMIT: Duration = Duration::from_secs(180);
/// The cold static release build on a small machine.
const BUILD_LIMIT: Duration = Duration::from_secs(60 * 60);

// ---------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn expect_ok(self, what: &str) -> String {
        assert!(
            self.ok(),
            "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self.stdout
    }
}

/// Runs a command to its end, killing it after `limit`; stdout and stderr are captured.
fn run(mut cmd: Command, limit: Duration) -> Out {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Out {
                code: None,
                stdout: String::new(),
                stderr: format!("cannot run {desc}: {e}"),
            };
        }
    };
    let pipe = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = p {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = pipe(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = pipe(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    let stdout = out.join().unwrap_or_default();
    let mut stderr = err.join().unwrap_or_default();
    if status.is_none() {
        stderr.push_str(&format!("\n{desc}: killed after {limit:?}"));
    }
    Out {
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
    }
}

/// [`run`] on the blocking pool, so load tasks keep going meanwhile.
async fn run_async(cmd: Command, limit: Duration) -> Out {
    tokio::task::spawn_blocking(move || run(cmd, limit))
        .await
        .expect("command thread")
}

fn docker(args: &[&str]) -> Command {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    cmd
}

async fn docker_ok(args: &[&str]) -> String {
    run_async(docker(args), COMMAND_LIMIT)
        .await
        .expect_ok(&format!("docker {}", args.join(" ")))
}

// ---------------------------------------------------------------------------------------
// The engine, compose, and the images: found and built once per test run
// ---------------------------------------------------------------------------------------

struct Engine {
    /// `["docker", "compose"]` or `["docker-compose"]`.
    compose: Vec<String>,
}

enum Problem {
    /// No engine or no compose: the suite cannot run here.
    Unavailable(String),
    /// The images could not be built: always a failure.
    Broken(String),
}

fn setup() -> &'static Result<Engine, Problem> {
    static SETUP: OnceLock<Result<Engine, Problem>> = OnceLock::new();
    SETUP.get_or_init(|| {
        let info = run(
            docker(&["info", "--format", "{{.ServerVersion}}"]),
            Duration::from_secs(60),
        );
        if !info.ok() {
            return Err(Problem::Unavailable(format!(
                "no Docker engine answers (`docker info`: {})",
                info.stderr.trim()
            )));
        }
        let compose = [vec!["docker", "compose"], vec!["docker-compose"]]
            .into_iter()
            .find(|c| {
                let mut cmd = Command::new(c[0]);
                cmd.args(&c[1..]).arg("version");
                run(cmd, Duration::from_secs(60)).ok()
            });
        let Some(compose) = compose else {
            return Err(Problem::Unavailable(
                "neither `docker compose` nor `docker-compose` works".to_owned(),
            ));
        };
        Stack::sweep_stale();
        let started = Instant::now();
        let mut build = Command::new("bash");
        build
            .arg("deploy/build-images.sh")
            .current_dir(MANIFEST_DIR)
            .env("GANGWAY_IMAGE", GANGWAY_IMAGE)
            .env("WHOAMI_IMAGE", WHOAMI_IMAGE);
        let out = run(build, BUILD_LIMIT);
        if !out.ok() {
            return Err(Problem::Broken(format!(
                "deploy/build-images.sh failed ({:?})\nstdout:\n{}\nstderr:\n{}",
                out.code, out.stdout, out.stderr
            )));
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "tests/docker.rs: images {GANGWAY_IMAGE} and {WHOAMI_IMAGE} built in {:.1} s, using `{}`",
            started.elapsed().as_secs_f64(),
            compose.join(" ")
        );
        Ok(Engine {
            compose: compose.into_iter().map(str::to_owned).collect(),
        })
    })
}

/// The engine, or `None` after saying plainly why this test did not run (a failure under
/// `CI=true`).
fn engine_or_skip(test: &str) -> Option<&'static Engine> {
    match setup() {
        Ok(engine) => Some(engine),
        Err(Problem::Broken(msg)) => panic!("{test}: {msg}"),
        Err(Problem::Unavailable(why)) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: CI=true and the Docker end-to-end tests cannot run: {why}");
            }
            // Straight to stderr: the test harness captures eprintln! of passing tests.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "tests/docker.rs: {test} DID NOT RUN: {why}. It needs a Docker engine and \
                 `docker compose` or `docker-compose`; under CI=true this is a failure."
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// A compose project, removed on drop
// ---------------------------------------------------------------------------------------

struct Stack {
    engine: &'static Engine,
    project: String,
    file: &'static str,
    /// The config folder mounted on /etc/gangway (deploy/compose.yaml only).
    config_dir: Option<tempfile::TempDir>,
    /// gangway's published ports 80 and 443, on 127.0.0.1.
    http: SocketAddr,
    https: Option<SocketAddr>,
}

/// config/compose-stack.yaml as shipped, re-resolving every second so a scale-up shows
/// well within the 10 s the tests allow.
fn stack_config() -> String {
    let shipped = std::fs::read_to_string(format!("{MANIFEST_DIR}/config/compose-stack.yaml"))
        .expect("config/compose-stack.yaml");
    let yaml = shipped.replace("\nresolve_every: 2s", "\nresolve_every: 1s");
    assert_ne!(
        yaml, shipped,
        "config/compose-stack.yaml sets resolve_every: 2s"
    );
    yaml
}

impl Stack {
    fn unique_project() -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!(
            "gwe2e{}x{}x{nanos:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        )
    }

    /// `deploy/compose.yaml` with [`stack_config`], up and answering through gangway.
    async fn up(engine: &'static Engine) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("compose-stack.yaml");
        std::fs::write(&path, stack_config()).expect("write config");
        // gangway runs as 65532 in the container: the bind-mounted folder must be readable.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Self::start(engine, STACK_FILE, Some(dir), true).await
    }

    /// `deploy/compose.demo.yaml` as shipped (config/compose-demo.yaml, HTTP only).
    async fn up_demo(engine: &'static Engine) -> Stack {
        Self::start(engine, DEMO_FILE, None, false).await
    }

    async fn start(
        engine: &'static Engine,
        file: &'static str,
        config_dir: Option<tempfile::TempDir>,
        https: bool,
    ) -> Stack {
        let mut stack = Stack {
            engine,
            project: Self::unique_project(),
            file,
            config_dir,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            https: None,
        };
        // From here on the guard removes whatever `up` created, even if it fails halfway.
        stack.compose_ok(&["up", "-d", "--no-build"]).await;
        stack.http = stack.port("gangway", 80).await;
        if https {
            stack.https = Some(stack.port("gangway", 443).await);
        }
        stack
    }

    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.engine.compose[0]);
        cmd.args(&self.engine.compose[1..])
            .args(["-f", self.file, "-p", &self.project])
            .args(args)
            .current_dir(MANIFEST_DIR)
            .env("GANGWAY_IMAGE", GANGWAY_IMAGE)
            .env("APP_IMAGE", WHOAMI_IMAGE)
            .env("WHOAMI_IMAGE", WHOAMI_IMAGE)
            // "127.0.0.1:" + ":80" = "127.0.0.1::80": a free port on loopback.
            .env("GANGWAY_HTTP", "127.0.0.1:")
            .env("GANGWAY_HTTPS", "127.0.0.1:")
            .env_remove("COMPOSE_FILE")
            .env_remove("COMPOSE_PROJECT_NAME")
            .env_remove("COMPOSE_PROFILES");
        if let Some(dir) = &self.config_dir {
            cmd.env("GANGWAY_CONFIG_DIR", dir.path());
        }
        cmd
    }

    async fn compose_ok(&self, args: &[&str]) -> String {
        run_async(self.compose(args), COMMAND_LIMIT)
            .await
            .expect_ok(&format!("compose {}", args.join(" ")))
    }

    async fn port(&self, service: &str, port: u16) -> SocketAddr {
        let out = self.compose_ok(&["port", service, &port.to_string()]).await;
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("compose port {service} {port}: {out:?}: {e}"))
    }

    /// Running containers of a service (full ids).
    async fn containers(&self, service: &str) -> Vec<String> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let service = format!("label=com.docker.compose.service={service}");
        docker_ok(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &project,
            "--filter",
            &service,
        ])
        .await
        .lines()
        .map(str::to_owned)
        .collect()
    }

    async fn gangway(&self) -> String {
        let ids = self.containers("gangway").await;
        assert_eq!(ids.len(), 1, "one gangway container: {ids:?}");
        ids.into_iter().next().unwrap()
    }

    /// Hostname of each running replica of `app` (what gangway-whoami answers with), by id.
    async fn replicas(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for id in self.containers("app").await {
            let name = docker_ok(&["inspect", "-f", "{{.Config.Hostname}}", &id]).await;
            out.insert(name.trim().to_owned(), id);
        }
        out
    }

    /// Polls through gangway until every one of `hostnames` has answered (so each one is
    /// resolved and passed its health check); panics at the deadline.
    async fn until_all_answer(&self, hostnames: &BTreeSet<String>, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut conn = Conn::new(self.http);
        let mut seen = BTreeSet::new();
        let mut last = String::new();
        while !hostnames.is_subset(&seen) {
            assert!(
                Instant::now() < deadline,
                "after {limit:?} only {seen:?} of {hostnames:?} answered through gangway \
                 (last answer: {last})"
            );
            match conn
                .get(&host(self.http), "/", Duration::from_secs(5))
                .await
            {
                Ok(r) if r.status == StatusCode::OK => {
                    seen.insert(r.hostname());
                }
                Ok(r) => {
                    last = format!("{} {}", r.status, r.text());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Removes every container, network and volume labelled with the project.
    fn remove_by_label(project: &str) {
        for item in Stack::leftovers(project) {
            let (kind, id) = item.split_once(' ').unwrap();
            let args: Vec<&str> = match kind {
                "container" => vec!["rm", "-f", "-v", id],
                "network" => vec!["network", "rm", id],
                _ => vec!["volume", "rm", "-f", id],
            };
            let _ = run(docker(&args), COMMAND_LIMIT);
        }
    }

    /// Removes what an earlier run of these tests left behind when it was killed before its
    /// guards ran (its process is gone). Projects of live processes are left alone.
    fn sweep_stale() {
        let format = "{{.Label \"com.docker.compose.project\"}}";
        let mut projects = BTreeSet::new();
        for args in [
            vec!["ps", "-a", "--format", format],
            vec!["network", "ls", "--format", format],
            vec!["volume", "ls", "--format", format],
        ] {
            let out = run(docker(&args), COMMAND_LIMIT);
            projects.extend(out.stdout.split_whitespace().map(str::to_owned));
        }
        for project in projects {
            let pid = project
                .strip_prefix("gwe2e")
                .and_then(|rest| rest.split('x').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if let Some(pid) = pid
                && pid != std::process::id()
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                Stack::remove_by_label(&project);
            }
        }
    }

    /// Every container, network and volume of the project still there.
    fn leftovers(project: &str) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={project}");
        let mut left = Vec::new();
        for (kind, args) in [
            ("container", vec!["ps", "-aq", "--filter", &label]),
            ("network", vec!["network", "ls", "-q", "--filter", &label]),
            ("volume", vec!["volume", "ls", "-q", "--filter", &label]),
        ] {
            let out = run(docker(&args), COMMAND_LIMIT);
            for id in out.stdout.split_whitespace() {
                left.push(format!("{kind} {id}"));
            }
        }
        left
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = run(
                self.compose(&["logs", "--no-color", "--tail=60"]),
                COMMAND_LIMIT,
            );
            eprintln!(
                "---- logs of compose project {} ----\n{}{}",
                self.project, logs.stdout, logs.stderr
            );
        }
        let down = run(
            self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]),
            COMMAND_LIMIT,
        );
        if !down.ok() {
            eprintln!("compose down of {} failed: {}", self.project, down.stderr);
        }
        // Whatever compose could not remove.
        Stack::remove_by_label(&self.project);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP through gangway
// ---------------------------------------------------------------------------------------

fn host(addr: SocketAddr) -> String {
    addr.to_string()
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The replica that answered (gangway-whoami's `hostname`).
    fn hostname(&self) -> String {
        self.json()["hostname"]
            .as_str()
            .unwrap_or_else(|| panic!("no hostname in {}", self.text()))
            .to_owned()
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A keep-alive HTTP/1.1 client connection (plain TCP or TLS), reopened after an error.
struct Conn {
    addr: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
    sender: Option<Sender>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            tls: None,
            sender: None,
        }
    }

    fn tls(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, server_name: &str) -> Conn {
        Conn {
            addr,
            tls: Some((cfg, server_name.to_owned())),
            sender: None,
        }
    }

    async fn handshake<S>(io: S) -> Result<Sender, String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn exchange(&mut self, host: &str, path: &str) -> Result<Resp, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            let _ = tcp.set_nodelay(true);
            let sender = match &self.tls {
                None => Self::handshake(tcp).await?,
                Some((cfg, name)) => {
                    let name = rustls::pki_types::ServerName::try_from(name.clone())
                        .map_err(|e| e.to_string())?;
                    let tls = tokio_rustls::TlsConnector::from(Arc::clone(cfg))
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))?;
                    Self::handshake(tls).await?
                }
            };
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("sender");
        sender.ready().await.map_err(|e| format!("ready: {e}"))?;
        let req = Request::get(path)
            .header(header::HOST, host)
            .body(Empty::new())
            .expect("request");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn get(&mut self, host: &str, path: &str, limit: Duration) -> Result<Resp, String> {
        let result = match tokio::time::timeout(limit, self.exchange(host, path)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {limit:?}")),
        };
        if result.is_err() {
            self.sender = None;
        }
        result
    }
}

/// Client loops through gangway, each on its own keep-alive connection, recording every
/// answer until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Tally {
    /// (when, replica hostname) of each 200.
    ok: Vec<(Instant, String)>,
    /// Everything else: a status other than 200, or an error.
    failed: Vec<String>,
}

impl Tally {
    fn per_replica_since(&self, t: Instant) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (when, name) in &self.ok {
            if *when >= t {
                *m.entry(name.clone()).or_insert(0) += 1;
            }
        }
        m
    }
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
                tokio::spawn(async move {
                    let mut conn = Conn::new(addr);
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        let r = conn.get(&host(addr), "/", Duration::from_secs(20)).await;
                        let outcome = match r {
                            Ok(r) if r.status == StatusCode::OK => {
                                Ok((Instant::now(), r.hostname()))
                            }
                            Ok(r) => Err(format!(
                                "{} after {:?}: {}",
                                r.status,
                                started.elapsed(),
                                r.text().trim()
                            )),
                            Err(e) => Err(format!("{e} after {:?}", started.elapsed())),
                        };
                        {
                            let mut t = tally.lock().unwrap();
                            match outcome {
                                Ok(seen) => t.ok.push(seen),
                                Err(f) => t.failed.push(f),
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Load { stop, tally, tasks }
    }

    fn answered(&self) -> usize {
        self.tally.lock().unwrap().ok.len()
    }

    /// Polls until `n` more requests have succeeded.
    async fn until_answered(&self, n: usize, limit: Duration) {
        let target = self.answered() + n;
        let deadline = Instant::now() + limit;
        while self.answered() < target {
            assert!(
                Instant::now() < deadline,
                "the client loop got fewer than {n} answers in {limit:?}; failures: {:?}",
                self.tally.lock().unwrap().failed
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("client loop");
        }
        Arc::try_unwrap(self.tally)
            .ok()
            .expect("tally")
            .into_inner()
            .unwrap()
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_get_exactly_100_of_300_requests_found_by_service_name() {
    let Some(engine) =
        engine_or_skip("three_replicas_get_exactly_100_of_300_requests_found_by_service_name")
    else {
        return;
    };
    let stack = Stack::up(engine).await;
    let replicas = stack.replicas().await;
    assert_eq!(replicas.len(), 3, "deploy.replicas: 3 gives 3 containers");
    let names: BTreeSet<String> = replicas.keys().cloned().collect();
    stack
        .until_all_answer(&names, Duration::from_secs(60))
        .await;

    let mut conn = Conn::new(stack.http);
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    let mut last = None;
    for _ in 0..300 {
        let r = conn
            .get(&host(stack.http), "/count", Duration::from_secs(10))
            .await
            .expect("request through gangway");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        *count.entry(r.hostname()).or_insert(0) += 1;
        last = Some(r);
    }
    let expected: BTreeMap<String, usize> = names.iter().map(|n| (n.clone(), 100)).collect();
    assert_eq!(count, expected, "300 requests over 3 replicas, round robin");

    // What the app saw: forwarded headers from gangway.
    let seen = last.unwrap().json();
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-proto"], "http", "{seen:#}");
    assert_eq!(h["x-forwarded-host"], host(stack.http).as_str(), "{seen:#}");
    assert!(h["x-forwarded-for"].is_string(), "{seen:#}");

    // Found through DNS alone: no Docker socket, only the config folder and the volume.
    let gw = stack.gangway().await;
    let mounts = docker_ok(&[
        "inspect",
        "-f",
        "{{range .Mounts}}{{.Destination}} {{end}}",
        &gw,
    ])
    .await;
    let mounts: BTreeSet<&str> = mounts.split_whitespace().collect();
    assert_eq!(
        mounts,
        BTreeSet::from(["/etc/gangway", "/var/lib/gangway"]),
        "gangway's mounts"
    );
    let user = docker_ok(&["inspect", "-f", "{{.Config.User}}", &gw]).await;
    assert_eq!(user.trim(), "65532:65532");

    // The image's HEALTHCHECK (`gangway health`) turns the container healthy.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let state = docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", &gw]).await;
        if state.trim() == "healthy" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gangway's health is still {state:?} after 40 s: {}",
            docker_ok(&["inspect", "-f", "{{json .State.Health}}", &gw]).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scaled_up_replica_gets_traffic_within_10s() {
    let Some(engine) = engine_or_skip("a_scaled_up_replica_gets_traffic_within_10s") else {
        return;
    };
    let stack = Stack::up(engine).await;
    let before = stack.replicas().await;
    assert_eq!(before.len(), 3);
    stack
        .until_all_answer(&before.keys().cloned().collect(), Duration::from_secs(60))
        .await;

    stack
        .compose_ok(&[
            "up",
            "-d",
            "--no-build",
            "--no-recreate",
            "--scale",
            "app=4",
        ])
        .await;
    let scaled = Instant::now();
    let after = stack.replicas().await;
    assert_eq!(after.len(), 4, "{after:?}");
    let new: Vec<&String> = after.keys().filter(|n| !before.contains_key(*n)).collect();
    assert_eq!(new.len(), 1, "one new replica: {after:?}");
    let new = new[0].clone();

    let mut conn = Conn::new(stack.http);
    let mut seen = BTreeMap::new();
    loop {
        let r = conn
            .get(&host(stack.http), "/", Duration::from_secs(5))
            .await
            .expect("request through gangway");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let name = r.hostname();
        *seen.entry(name.clone()).or_insert(0) += 1;
        if name == new {
            break;
        }
        assert!(
            scaled.elapsed() < Duration::from_secs(10),
            "the new replica {new} got no request within 10 s of the scale-up; seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "new replica {new} answered {:.1} s after `--scale app=4` returned",
        scaled.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_down_under_load_fails_no_request() {
    let Some(engine) = engine_or_skip("scaling_down_under_load_fails_no_request") else {
        return;
    };
    let stack = Stack::up(engine).await;
    let before = stack.replicas().await;
    stack
        .until_all_answer(&before.keys().cloned().collect(), Duration::from_secs(60))
        .await;

    let load = Load::start(stack.http, 4);
    load.until_answered(100, Duration::from_secs(30)).await;
    stack
        .compose_ok(&[
            "up",
            "-d",
            "--no-build",
            "--no-recreate",
            "--scale",
            "app=2",
        ])
        .await;
    let scaled = Instant::now();
    let after = stack.replicas().await;
    assert_eq!(after.len(), 2, "{after:?}");
    // Keep the clients going until gangway has surely dropped the removed replicas.
    load.until_answered(200, Duration::from_secs(30)).await;
    while scaled.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = Instant::now();
    load.until_answered(100, Duration::from_secs(30)).await;
    let tally = load.finish().await;

    assert!(
        tally.failed.is_empty(),
        "{} of {} requests failed while scaling down: {:?}",
        tally.failed.len(),
        tally.failed.len() + tally.ok.len(),
        tally.failed
    );
    let recent = tally.per_replica_since(settled);
    let remaining: BTreeSet<&String> = after.keys().collect();
    assert_eq!(
        recent.keys().collect::<BTreeSet<_>>(),
        remaining,
        "after the scale-down only the remaining replicas answer"
    );
    eprintln!(
        "scale down 3 -> 2 under load: {} requests, none failed",
        tally.ok.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_a_replica_under_load_fails_no_request() {
    let Some(engine) = engine_or_skip("stopping_a_replica_under_load_fails_no_request") else {
        return;
    };
    let stack = Stack::up(engine).await;
    let replicas = stack.replicas().await;
    stack
        .until_all_answer(&replicas.keys().cloned().collect(), Duration::from_secs(60))
        .await;

    let load = Load::start(stack.http, 4);
    load.until_answered(100, Duration::from_secs(30)).await;
    let (victim, id) = replicas.iter().next().unwrap();
    docker_ok(&["stop", id]).await;
    let stopped = Instant::now();
    let state = docker_ok(&["inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", id]).await;
    assert_eq!(
        state.trim(),
        "exited 0",
        "gangway-whoami exits 0 on SIGTERM"
    );
    load.until_answered(200, Duration::from_secs(30)).await;
    while stopped.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = Instant::now();
    load.until_answered(100, Duration::from_secs(30)).await;
    let tally = load.finish().await;

    assert!(
        tally.failed.is_empty(),
        "{} of {} requests failed when a replica stopped: {:?}",
        tally.failed.len(),
        tally.failed.len() + tally.ok.len(),
        tally.failed
    );
    let recent = tally.per_replica_since(settled);
    assert!(!recent.contains_key(victim), "{victim} stopped: {recent:?}");
    assert_eq!(recent.len(), 2, "the two others answer: {recent:?}");
    eprintln!(
        "one replica stopped under load: {} requests, none failed",
        tally.ok.len()
    );
}

/// The rolling update of the README: scale out next to the old replicas, wait until the new
/// ones get traffic, stop and remove the old ones, scale back to the declared count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_by_scaling_out_then_stopping_the_old_replicas_fails_no_request() {
    let Some(engine) = engine_or_skip(
        "a_rolling_update_by_scaling_out_then_stopping_the_old_replicas_fails_no_request",
    ) else {
        return;
    };
    let stack = Stack::up(engine).await;
    let old = stack.replicas().await;
    stack
        .until_all_answer(&old.keys().cloned().collect(), Duration::from_secs(60))
        .await;

    let load = Load::start(stack.http, 4);
    load.until_answered(100, Duration::from_secs(30)).await;
    stack
        .compose_ok(&[
            "up",
            "-d",
            "--no-build",
            "--no-deps",
            "--no-recreate",
            "--scale",
            "app=6",
            "app",
        ])
        .await;
    let all = stack.replicas().await;
    assert_eq!(all.len(), 6, "{all:?}");
    let new: BTreeSet<String> = all
        .keys()
        .filter(|n| !old.contains_key(*n))
        .cloned()
        .collect();
    stack.until_all_answer(&new, Duration::from_secs(30)).await;

    let mut args = vec!["stop"];
    args.extend(old.values().map(String::as_str));
    docker_ok(&args).await;
    args[0] = "rm";
    docker_ok(&args).await;
    stack
        .compose_ok(&[
            "up",
            "-d",
            "--no-build",
            "--no-deps",
            "--no-recreate",
            "--scale",
            "app=3",
            "app",
        ])
        .await;
    let after = stack.replicas().await;
    assert_eq!(
        after.keys().cloned().collect::<BTreeSet<_>>(),
        new,
        "only the new replicas are left"
    );
    let replaced = Instant::now();
    load.until_answered(200, Duration::from_secs(30)).await;
    while replaced.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = Instant::now();
    load.until_answered(100, Duration::from_secs(30)).await;
    let tally = load.finish().await;

    assert!(
        tally.failed.is_empty(),
        "{} of {} requests failed during the rolling update: {:?}",
        tally.failed.len(),
        tally.failed.len() + tally.ok.len(),
        tally.failed
    );
    let recent = tally.per_replica_since(settled);
    assert_eq!(
        recent.keys().cloned().collect::<BTreeSet<_>>(),
        new,
        "after the update only the new replicas answer"
    );
    eprintln!(
        "rolling update of 3 replicas under load: {} requests, none failed",
        tally.ok.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_stop_lets_a_slow_request_finish_and_gangway_exits_0() {
    let Some(engine) = engine_or_skip("docker_stop_lets_a_slow_request_finish_and_gangway_exits_0")
    else {
        return;
    };
    let stack = Stack::up(engine).await;
    let replicas = stack.replicas().await;
    stack
        .until_all_answer(&replicas.keys().cloned().collect(), Duration::from_secs(60))
        .await;
    let gw = stack.gangway().await;

    // A request the replica holds for 4 s.
    let path = format!("/slow/{}?sleep_ms=4000", stack.project);
    let sent = Instant::now();
    let addr = stack.http;
    let p = path.clone();
    let slow = tokio::spawn(async move {
        Conn::new(addr)
            .get(&host(addr), &p, Duration::from_secs(30))
            .await
    });
    // Wait until a replica has it (gangway-whoami logs each request as it arrives).
    let deadline = Instant::now() + Duration::from_secs(10);
    'arrived: loop {
        for id in replicas.values() {
            let logs = run_async(docker(&["logs", id]), COMMAND_LIMIT).await;
            if logs.stdout.contains(&path) {
                break 'arrived;
            }
        }
        assert!(Instant::now() < deadline, "no replica got {path}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // `docker stop`: SIGTERM to gangway, PID 1 of its container, SIGKILL after the
    // stop_grace_period of deploy/compose.yaml (15 s).
    let stop_started = Instant::now();
    let stop = tokio::spawn(run_async(docker(&["stop", &gw]), COMMAND_LIMIT));

    // While it drains, its health check fails (admin /healthz answers 503).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let health = run_async(
            docker(&["exec", &gw, "/gangway", "health", "-c", STACK_CONFIG]),
            COMMAND_LIMIT,
        )
        .await;
        if !health.ok() && health.stdout.contains("503") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "`gangway health` did not report the drain (503): {:?} {} {}",
            health.code,
            health.stdout,
            health.stderr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let r = slow
        .await
        .expect("slow request task")
        .expect("the slow request completes through the drain");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], path.as_str());
    assert!(sent.elapsed() >= Duration::from_secs(4));

    stop.await.expect("docker stop").expect_ok("docker stop");
    let stop_took = stop_started.elapsed();
    let state = docker_ok(&[
        "inspect",
        "-f",
        "{{.State.Status}} {{.State.ExitCode}}",
        &gw,
    ])
    .await;
    assert_eq!(state.trim(), "exited 0", "gangway exits 0 after draining");
    assert!(
        stop_took < Duration::from_secs(10),
        "gangway stopped within its grace period (10 s), took {stop_took:?}"
    );
    let logs = docker_ok(&["logs", &gw]).await;
    assert!(
        logs.contains("SIGTERM"),
        "gangway logs the SIGTERM:\n{logs}"
    );
    eprintln!(
        "docker stop with a slow request in flight: request done after {:.1} s, gangway exited 0 after {:.1} s",
        sent.elapsed().as_secs_f64(),
        stop_took.as_secs_f64()
    );
}

fn roots(pem: &str) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for der in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
        store.add(der.expect("PEM certificate")).expect("root");
    }
    assert!(!store.is_empty(), "no certificate in {pem:?}");
    store
}

fn client_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_inside_the_stack_with_the_local_ca_survives_a_restart() {
    let Some(engine) =
        engine_or_skip("https_inside_the_stack_with_the_local_ca_survives_a_restart")
    else {
        return;
    };
    let stack = Stack::up(engine).await;
    let replicas = stack.replicas().await;
    stack
        .until_all_answer(&replicas.keys().cloned().collect(), Duration::from_secs(60))
        .await;
    let gw = stack.gangway().await;
    let https = stack.https.expect("https published");

    // The root of gangway's local CA, as a user gets it.
    let root = docker_ok(&["exec", &gw, "/gangway", "ca-cert", "-c", STACK_CONFIG]).await;
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
    let cfg = client_config(roots(&root));

    let mut conn = Conn::tls(https, Arc::clone(&cfg), "localhost");
    let mut names = BTreeSet::new();
    for _ in 0..6 {
        let r = conn
            .get("localhost", "/secure", Duration::from_secs(10))
            .await
            .expect("HTTPS request through gangway, verified against the local CA");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let seen = r.json();
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "{seen:#}");
        assert_eq!(seen["headers"]["x-forwarded-port"], "443", "{seen:#}");
        names.insert(r.hostname());
    }
    assert_eq!(names.len(), 3, "HTTPS is balanced too: {names:?}");

    // Plain HTTP for the TLS site is redirected to the https port (443: omitted).
    let r = Conn::new(stack.http)
        .get("localhost", "/secure?x=1", Duration::from_secs(10))
        .await
        .expect("http request");
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers[header::LOCATION], "https://localhost/secure?x=1");

    // The CA lives on the volume: a new gangway process keeps the same root.
    stack.compose_ok(&["restart", "-t", "5", "gangway"]).await;
    let again = docker_ok(&["exec", &gw, "/gangway", "ca-cert", "-c", STACK_CONFIG]).await;
    assert_eq!(again, root, "the local CA survives a restart");
    let https = stack.port("gangway", 443).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = Conn::tls(https, cfg, "localhost");
    loop {
        match conn.get("localhost", "/", Duration::from_secs(5)).await {
            Ok(r) if r.status == StatusCode::OK => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no HTTPS answer after the restart: {:?}",
                    other.map(|r| r.status)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_stack_shows_round_robin_across_containers() {
    let Some(engine) = engine_or_skip("the_demo_stack_shows_round_robin_across_containers") else {
        return;
    };
    let stack = Stack::up_demo(engine).await;
    let replicas = stack.replicas().await;
    assert_eq!(replicas.len(), 3);
    let names: BTreeSet<String> = replicas.keys().cloned().collect();
    stack
        .until_all_answer(&names, Duration::from_secs(60))
        .await;
    // Each client gets the next container in turn: 6 requests, each replica twice.
    let mut order = Vec::new();
    let mut conn = Conn::new(stack.http);
    for _ in 0..6 {
        let r = conn
            .get("localhost", "/", Duration::from_secs(10))
            .await
            .expect("request");
        assert_eq!(r.status, StatusCode::OK);
        order.push(r.hostname());
    }
    assert_eq!(
        order[..3].iter().collect::<BTreeSet<_>>().len(),
        3,
        "{order:?}"
    );
    assert_eq!(order[..3], order[3..], "round robin: {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_are_from_scratch_static_and_non_root() {
    let Some(_engine) = engine_or_skip("the_images_are_from_scratch_static_and_non_root") else {
        return;
    };
    for (image, entrypoint, user) in [
        (GANGWAY_IMAGE, "[/gangway]", "65532:65532"),
        (WHOAMI_IMAGE, "[/gangway-whoami]", "65532:65532"),
    ] {
        let got = docker_ok(&[
            "image",
            "inspect",
            "-f",
            "{{json .Config.Entrypoint}}|{{.Config.User}}|{{len .RootFS.Layers}}|{{.Size}}",
            image,
        ])
        .await;
        let parts: Vec<&str> = got.trim().split('|').collect();
        assert_eq!(parts[0].replace('"', ""), entrypoint, "{image}: {got}");
        assert_eq!(parts[1], user, "{image}: {got}");
        let size: u64 = parts[3].parse().unwrap();
        assert!(size < 64 << 20, "{image} is {size} bytes");
    }
    let cfg = docker_ok(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Cmd}}|{{json .Config.Healthcheck.Test}}|{{json .Config.Volumes}}",
        GANGWAY_IMAGE,
    ])
    .await;
    assert_eq!(
        cfg.trim(),
        r#"["run","-c","/etc/gangway/gangway.yaml"]|["CMD","/gangway","health","-c","/etc/gangway/gangway.yaml"]|{"/var/lib/gangway":{}}"#
    );
    // Nothing but the binary: there is no shell to run.
    let shell = run_async(
        docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "/bin/sh",
            GANGWAY_IMAGE,
            "-c",
            "true",
        ]),
        COMMAND_LIMIT,
    )
    .await;
    assert!(!shell.ok(), "a scratch image has no /bin/sh");
    // The shipped configs load in the image (no network: nothing is resolved for real).
    let config = format!("{MANIFEST_DIR}/config:/etc/gangway:ro");
    for file in ["compose-stack.yaml", "compose-demo.yaml", "reference.yaml"] {
        let out = docker_ok(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &config,
            GANGWAY_IMAGE,
            "check",
            "-c",
            &format!("/etc/gangway/{file}"),
        ])
        .await;
        assert!(out.contains("config OK"), "{file}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_test_still_removes_its_containers_networks_and_volumes() {
    let Some(engine) =
        engine_or_skip("a_failing_test_still_removes_its_containers_networks_and_volumes")
    else {
        return;
    };
    let stack = Stack::up(engine).await;
    let project = stack.project.clone();
    assert!(
        Stack::leftovers(&project)
            .iter()
            .any(|l| l.starts_with("volume")),
        "the stack has its storage volume: {:?}",
        Stack::leftovers(&project)
    );
    let failed = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _stack = stack;
            eprintln!("(a deliberate failure follows: the logs below are expected)");
            // Unwinds like a failed assertion, without the panic message and backtrace.
            std::panic::resume_unwind(Box::new("an assertion failed while the stack ran"));
        }))
    })
    .await
    .expect("thread");
    assert!(failed.is_err());
    assert_eq!(Stack::leftovers(&project), Vec::<String>::new());
}
