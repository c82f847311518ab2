//! The `gangway` command: CLI, files, logging, signals and exit codes around the library.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use gangway::config::{AccessLog, Config, ConfigError, TlsMode, UpstreamProtocol};
use gangway::server::{Listeners, ReloadSource};
use gangway::upstream::resolve::{Resolve, SystemResolver};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// mimalloc: faster than glibc malloc for hyper's many small, short-lived allocations, and it
/// gives freed pages back to the system (glibc keeps them), so memory falls again after a
/// burst of connections.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option, and gangway's value for it (milliseconds).
#[cfg(target_os = "linux")]
const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";
#[cfg(target_os = "linux")]
const PURGE_DELAY_MS: &str = "100";

/// Sets up memory for a serving process: transparent huge pages off, and mimalloc's purge
/// delay shortened.
///
/// mimalloc asks the kernel for huge pages on its arenas (where THP is `madvise`, Debian's
/// default), so every 2 MiB region it touches becomes resident whole: 8 MiB more at start,
/// and 10 000 idle connections took 47–60 MiB instead of 36–45. The A/B run on scenarios 1,
/// 3 and 4 showed no CPU difference beyond noise (benches/README.md).
///
/// mimalloc gives freed memory back to the system (purges it) only once it has been free for
/// `MIMALLOC_PURGE_DELAY` (1000 ms by default), and only when a later free comes to check:
/// after a burst of connections that then go idle, up to a second's worth of freed buffers
/// stays resident. 100 ms held 10 000 idle connections in 28 MiB instead of 42–45, for at
/// most 1–2 % more CPU per request under saturation (benches/README.md). An operator's own
/// `MIMALLOC_PURGE_DELAY` wins.
///
/// The THP flag only stops huge pages that are faulted in later, the runtime's first
/// allocations before `main` already made two, and mimalloc reads its options once, at start.
/// So the process sets the flag, which `execve` keeps, and executes itself again (same pid,
/// arguments, and environment plus the purge delay); the new image sees the flag set and goes
/// on. Where that fails it goes on as it is.
fn tune_memory() {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::prctl;
        use std::os::unix::process::CommandExt;
        if prctl::get_thp_disable().unwrap_or(true) || prctl::set_thp_disable(true).is_err() {
            return;
        }
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| "gangway".into());
        let mut again = std::process::Command::new("/proc/self/exe");
        again.arg0(arg0).args(args);
        if cfg!(feature = "mimalloc") && std::env::var_os(PURGE_DELAY).is_none() {
            again.env(PURGE_DELAY, PURGE_DELAY_MS);
        }
        let err = again.exec();
        eprintln!("gangway: cannot restart without huge pages, going on with them: {err}");
    }
}

/// sysexits.h EX_USAGE: the config is wrong.
const EX_USAGE: u8 = 64;
/// sysexits.h EX_UNAVAILABLE-ish: could not start (port taken, no permission).
const EX_START: u8 = 1;

#[derive(Parser)]
#[command(
    name = "gangway",
    version,
    about = "Edge reverse proxy for Docker Compose stacks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file.
        #[arg(short, long, default_value = "config/gangway.yaml")]
        config: PathBuf,
    },
    /// Validate a config and print the sites, routes and replica addresses it resolves to.
    Check {
        #[arg(short, long, default_value = "config/gangway.yaml")]
        config: PathBuf,
    },
    /// Print the root certificate of gangway's local CA (for `tls: internal` sites), creating
    /// it if needed, so it can be added to a trust store.
    CaCert {
        #[arg(short, long, default_value = "config/gangway.yaml")]
        config: PathBuf,
    },
    /// List every certificate obtained over ACME: names, issuer, expiry, next renewal and
    /// last error (read from storage; the CA is not contacted).
    Certs {
        #[arg(short, long, default_value = "config/gangway.yaml")]
        config: PathBuf,
    },
    /// Ask a running gangway whether it is healthy (for container health checks): exits 0
    /// when its admin /healthz answers 200, 1 otherwise (not running, draining).
    Health {
        #[arg(short, long, default_value = "config/gangway.yaml")]
        config: PathBuf,
        /// The health URL, instead of the config's listen.admin.
        #[arg(long)]
        url: Option<String>,
    },
    /// Send load to a URL and show how the replicas behind gangway shared it.
    Load {
        url: String,
        /// Number of requests [default: 1000 unless -d is given].
        #[arg(short = 'n', long)]
        requests: Option<u64>,
        /// Run for this long instead (e.g. 10s).
        #[arg(short = 'd', long)]
        duration: Option<String>,
        /// Concurrent connections.
        #[arg(short = 'c', long, default_value_t = 10)]
        concurrency: usize,
        /// Speak HTTP/2 (over TLS by ALPN, or h2c for http://).
        #[arg(long)]
        http2: bool,
        /// Accept any server certificate.
        #[arg(short = 'k', long)]
        insecure: bool,
        /// Trust this PEM CA instead of the built-in roots.
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// Extra header, "Name: value" (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Request method.
        #[arg(short = 'm', long, default_value = "GET")]
        method: String,
        /// gangway's admin address, to count replicas when responses carry no
        /// X-Gangway-Replica header.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start the proxy in front of three built-in demo replicas.
    Demo {
        /// Where the demo proxy listens for plain HTTP.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where it listens for HTTPS (`localhost`, certificate from the local CA).
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// Where the dashboard, /metrics and /status are served ("off" for none).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: String,
        /// Where the demo keeps its local CA [default: ~/.local/share/gangway-demo].
        #[arg(long)]
        storage: Option<PathBuf>,
        /// How many demo replicas to start.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
    },
}

/// How many workers: as `TOKIO_WORKER_THREADS` says, else as many as CPUs gangway may use
/// (cgroup limits included).
fn worker_count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The tokio runtime of the main thread.
///
/// A serving command (`run`, `demo`) gets tokio's single-threaded scheduler on every worker
/// (see `server::workers`): the main thread is worker 0 and the others are started beside
/// it, each with its own runtime. Its run queue is one FIFO list: under hundreds of
/// concurrent requests every task waits its turn. The multi-threaded scheduler spills tasks
/// beyond a worker's 256-slot local queue into a global queue that it visits rarely; in the
/// benchmark (500 concurrent HTTP/2 streams, one worker), 10 % of requests then waited
/// 30–55 ms (p99 50 ms against 11 ms), and it spent about 13 % more CPU per request.
///
/// Other commands (`load` above all) use the multi-threaded scheduler when there are
/// several CPUs.
fn runtime(serving: bool, workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if serving || workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let workers = worker_count();
    let serving = matches!(cli.command, Command::Run { .. } | Command::Demo { .. });
    if serving {
        tune_memory();
    }
    let started = runtime(serving, workers).and_then(|rt| {
        if serving {
            gangway::server::workers::start(workers)?;
        }
        Ok(rt)
    });
    let runtime = match started {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gangway: cannot start the runtime: {e}");
            return ExitCode::from(EX_START);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Check { config } => check(config).await,
            Command::CaCert { config } => ca_cert(config),
            Command::Certs { config } => certs(config),
            Command::Demo {
                listen,
                https,
                admin,
                storage,
                replicas,
            } => demo(listen, https, admin, storage, replicas).await,
            Command::Health { config, url } => health(config, url).await,
            Command::Load {
                url,
                requests,
                duration,
                concurrency,
                http2,
                insecure,
                cacert,
                headers,
                method,
                admin,
                json,
            } => {
                load(
                    url,
                    requests,
                    duration,
                    concurrency,
                    http2,
                    insecure,
                    cacert,
                    headers,
                    method,
                    admin,
                    json,
                )
                .await
            }
        }
    })
}

/// Log lines (access log included) queued before a worker thread waits for the writer.
const LOG_QUEUE_LINES: usize = 64 * 1024;

/// Logs to stdout from a thread of its own: a worker thread formats a line and queues it,
/// and never blocks on a slow reader of stdout (a full pipe to the container runtime) until
/// `LOG_QUEUE_LINES` lines wait. The writer thread takes every line queued and writes them
/// with one system call. No line is dropped; the returned guard writes what is left when
/// gangway exits.
fn init_logging(format: AccessLog) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("gangway-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    if format == AccessLog::Json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    guard
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprint!("gangway: {e}");
    ExitCode::from(EX_USAGE)
}

/// Cancelled on the first SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops gangway");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    token
}

/// Notified on every SIGHUP.
fn reload_on_sighup() -> Arc<tokio::sync::Notify> {
    let notify = Arc::new(tokio::sync::Notify::new());
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                let n = Arc::clone(&notify);
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        n.notify_one();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch SIGHUP; reload by editing the file"),
        }
    }
    notify
}

async fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let _log = init_logging(config.access_log);
    let listeners = match Listeners::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gangway: {e}");
            return ExitCode::from(EX_START);
        }
    };
    let shutdown = shutdown_on_signal();
    let resolver: Arc<dyn Resolve> = Arc::new(SystemResolver::new());
    let reload = ReloadSource {
        path,
        trigger: reload_on_sighup(),
    };
    match gangway::server::run_with_reload(config, listeners, resolver, shutdown, Some(reload))
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gangway: {e}");
            ExitCode::from(EX_START)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn load(
    url: String,
    requests: Option<u64>,
    duration: Option<String>,
    concurrency: usize,
    http2: bool,
    insecure: bool,
    cacert: Option<PathBuf>,
    headers: Vec<String>,
    method: String,
    admin: String,
    json: bool,
) -> ExitCode {
    let usage = |msg: String| {
        eprintln!("gangway load: {msg}");
        ExitCode::from(EX_USAGE)
    };
    let Ok(uri) = url.parse::<http::Uri>() else {
        return usage(format!("not a URL: {url}"));
    };
    if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
        return usage(format!("expected an http:// or https:// URL, got {url}"));
    }
    let duration = match duration.as_deref().map(gangway::config::parse_duration) {
        None => None,
        Some(Some(d)) => Some(d),
        Some(None) => return usage("-d expects a duration such as 10s".into()),
    };
    let mut parsed = Vec::new();
    for h in &headers {
        let Some((k, v)) = h.split_once(':') else {
            return usage(format!("header {h:?} is not \"Name: value\""));
        };
        match (
            k.trim().parse::<http::HeaderName>(),
            http::HeaderValue::from_str(v.trim()),
        ) {
            (Ok(k), Ok(v)) => parsed.push((k, v)),
            _ => return usage(format!("header {h:?} is not valid")),
        }
    }
    let Ok(method) = method.to_ascii_uppercase().parse::<http::Method>() else {
        return usage(format!("not a method: {method}"));
    };
    let status_url = if admin == "off" {
        None
    } else {
        format!("http://{admin}/status").parse().ok()
    };
    let spec = gangway::load::LoadSpec {
        url: uri,
        requests: requests.or(if duration.is_some() { None } else { Some(1000) }),
        duration,
        concurrency: concurrency.max(1),
        http2,
        insecure,
        cacert,
        headers: parsed,
        method,
        status_url,
        progress: !json,
    };
    match gangway::load::run(spec).await {
        Ok(report) => {
            if json {
                emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                ));
            } else {
                emit(&gangway::load::render(&report));
            }
            if report.errors > 0 && report.requests == 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("gangway load: {e}");
            ExitCode::from(1)
        }
    }
}

async fn health(path: PathBuf, url: Option<String>) -> ExitCode {
    let target = match url {
        Some(u) => u,
        None => match Config::load(&path) {
            Ok(c) => match c.listen.admin {
                Some(a) => {
                    // A wildcard admin address is reached on loopback.
                    let host = if a.ip().is_unspecified() {
                        std::net::SocketAddr::new([127, 0, 0, 1].into(), a.port())
                    } else {
                        a
                    };
                    format!("http://{host}/healthz")
                }
                None => {
                    eprintln!("gangway health: listen.admin is off; pass --url");
                    return ExitCode::from(1);
                }
            },
            Err(e) => return config_error(&e),
        },
    };
    let Some(rest) = target.strip_prefix("http://") else {
        eprintln!("gangway health: only http:// URLs are supported, got {target}");
        return ExitCode::from(1);
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/healthz"),
    };
    let result = tokio::time::timeout(Duration::from_secs(3), async {
        let stream = tokio::net::TcpStream::connect(authority).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(std::io::Error::other)?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(resp.status())
    })
    .await;
    match result {
        Ok(Ok(status)) if status == http::StatusCode::OK => {
            println!("healthy");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            println!("unhealthy: {target} answered {status}");
            ExitCode::from(1)
        }
        Ok(Err(e)) => {
            println!("unhealthy: {target}: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            println!("unhealthy: {target} did not answer within 3 s");
            ExitCode::from(1)
        }
    }
}

fn ca_cert(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    match gangway::tls::internal::LocalCa::load_or_create(&config.storage) {
        Ok(ca) => {
            emit(ca.root_pem());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "gangway: cannot open the local CA in {}: {e}",
                gangway::tls::internal::LocalCa::dir(&config.storage).display()
            );
            ExitCode::from(EX_START)
        }
    }
}

/// `gangway certs`: one block per ACME certificate, from storage.
fn certs(path: PathBuf) -> ExitCode {
    use std::fmt::Write;
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let Some(acme) = &config.acme else {
        emit("no acme: block in this config; no certificates are managed over ACME\n");
        return ExitCode::SUCCESS;
    };
    let when = |t: std::time::SystemTime| httpdate::fmt_http_date(t);
    let mut out = String::new();
    let _ = writeln!(out, "directory {}", acme.directory);
    let reports = gangway::acme::report(&config);
    if reports.is_empty() {
        let _ = writeln!(out, "no site uses tls: acme");
    }
    for r in reports {
        let _ = writeln!(out, "{}: {}", r.names.join(", "), r.state);
        if let Some(issuer) = &r.issuer {
            let _ = writeln!(out, "  issuer        {issuer}");
        }
        if let Some(serial) = &r.serial {
            let _ = writeln!(out, "  serial        {serial}");
        }
        if let Some(t) = r.not_after {
            let _ = writeln!(out, "  expires       {}", when(t));
        }
        if let Some(t) = r.next_renewal {
            let how = if r.renewal_from_ari {
                "CA's renewal window"
            } else {
                "two thirds of the lifetime"
            };
            let _ = writeln!(out, "  next renewal  {} ({how})", when(t));
        }
        let _ = writeln!(
            out,
            "  last error    {}",
            r.last_error.as_deref().unwrap_or("none")
        );
        if let (Some(_), Some(t)) = (&r.last_error, r.next_attempt) {
            let _ = writeln!(out, "  next attempt  {}", when(t));
        }
    }
    emit(&out);
    ExitCode::SUCCESS
}

/// Writes to stdout, ignoring a closed pipe (`gangway check | head`).
fn emit(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

async fn check(path: PathBuf) -> ExitCode {
    use std::fmt::Write;
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let resolver = SystemResolver::new();
    let mut out = String::new();
    let _ = writeln!(out, "{}: config OK", path.display());
    let _ = writeln!(out, "listen http {}", config.listen.http);
    if let Some(https) = config.listen.https {
        let _ = writeln!(out, "listen https {https}");
    }
    if !config.trusted_proxies.0.is_empty() {
        let nets: Vec<String> = config
            .trusted_proxies
            .0
            .iter()
            .map(|n| n.to_string())
            .collect();
        let _ = writeln!(out, "trusted_proxies {}", nets.join(", "));
    }
    for site in &config.sites {
        let hosts: Vec<String> = site.hosts.iter().map(|h| h.to_string()).collect();
        let tls = match &site.tls {
            TlsMode::None => String::new(),
            TlsMode::Internal => " (tls: internal CA)".to_owned(),
            TlsMode::Files { cert, .. } => format!(" (tls: {})", cert.display()),
            TlsMode::Acme => " (tls: acme)".to_owned(),
        };
        let _ = writeln!(out, "site {}{tls}", hosts.join(", "));
        for route in &site.routes {
            let strip = if route.strip_prefix {
                " (strip prefix)"
            } else {
                ""
            };
            let h2c = if route.upstream_protocol == UpstreamProtocol::H2c {
                " (h2c)"
            } else {
                ""
            };
            // A route's own upstream timeouts, where they differ from the top-level ones.
            let mut own = String::new();
            let policy = &route.policy;
            if policy.upstream_header != config.timeouts.upstream_header {
                let _ = write!(own, " (upstream_header {:?})", policy.upstream_header);
            }
            if policy.upstream_read != config.timeouts.upstream_read {
                let _ = write!(own, " (upstream_read {:?})", policy.upstream_read);
            }
            let _ = writeln!(out, "  route {}{strip}{h2c}{own}", route.path);
            for up in &route.upstreams {
                let lookup = tokio::time::timeout(
                    Duration::from_secs(3),
                    resolver.resolve(&up.host, up.port),
                )
                .await;
                let replicas = match lookup {
                    Ok(Ok(addrs)) if addrs.is_empty() => {
                        "no addresses yet (503 until it resolves)".to_owned()
                    }
                    Ok(Ok(addrs)) => addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    Ok(Err(e)) => format!("does not resolve yet: {e} (503 until it does)"),
                    Err(_) => "DNS timed out (503 until it resolves)".to_owned(),
                };
                let _ = writeln!(out, "    {up} -> {replicas}");
            }
        }
    }
    emit(&out);
    ExitCode::SUCCESS
}

async fn demo(
    listen: SocketAddr,
    https: SocketAddr,
    admin: String,
    storage: Option<PathBuf>,
    n: usize,
) -> ExitCode {
    let _log = init_logging(AccessLog::Text);
    let stop = shutdown_on_signal();
    let storage = storage.unwrap_or_else(|| match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/gangway-demo"),
        None => std::env::temp_dir().join("gangway-demo"),
    });
    let replicas = match gangway::demo::start_replicas(n.max(1), &stop).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gangway demo: cannot start the demo replicas: {e}");
            return ExitCode::from(EX_START);
        }
    };
    let mut listeners = Vec::new();
    for (addr, flag) in [(listen, "--listen"), (https, "--https")] {
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!(
                    "gangway demo: cannot listen on {addr}: {e}\n  choose another address with {flag}"
                );
                return ExitCode::from(EX_START);
            }
        }
    }
    let admin_listener = if admin == "off" {
        None
    } else {
        let Ok(addr) = admin.parse::<SocketAddr>() else {
            eprintln!("gangway demo: --admin expects an address such as 127.0.0.1:9090, or off");
            return ExitCode::from(EX_USAGE);
        };
        match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!(
                    "gangway demo: cannot listen on {addr}: {e}\n  choose another address with --admin"
                );
                return ExitCode::from(EX_START);
            }
        }
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let https_listener = listeners.pop();
    let Some(http_listener) = listeners.pop() else {
        return ExitCode::from(EX_START);
    };
    let addr = http_listener.local_addr().unwrap_or(listen);
    let https_addr = https_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(https);
    let yaml = gangway::demo::config_yaml(addr, https_addr, &storage, &replicas);
    let config = match Config::parse(&yaml, "<demo>") {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let server = tokio::spawn(gangway::server::run(
        config,
        Listeners {
            http: http_listener,
            https: https_listener,
            admin: admin_listener,
        },
        Arc::new(SystemResolver::new()),
        stop.clone(),
    ));

    println!(
        "\ngangway demo: http://{addr} in front of {} replicas",
        replicas.len()
    );
    for (i, r) in replicas.iter().enumerate() {
        println!("  replica-{} at {r}", i + 1);
    }
    if let Some(a) = admin_addr {
        println!("  dashboard at http://{a}/ (metrics at /metrics, status at /status)");
    }
    let mut seen = Vec::new();
    for _ in 0..replicas.len() * 2 {
        match gangway::demo::get(addr, "/").await {
            Ok((_, body)) => {
                let name = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["replica"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "?".into());
                seen.push(name);
            }
            Err(e) => seen.push(format!("error: {e}")),
        }
    }
    println!("\nround robin, {} requests: {}", seen.len(), seen.join(" "));
    let root = gangway::tls::internal::LocalCa::dir(&storage).join("root.crt");
    println!(
        "\ntry it:\n  curl -s http://{addr}/hello\n  curl -s --cacert {} https://localhost:{}/hello\n\
         (http://localhost:{} redirects to https; the local CA's root is {0})\n\nCtrl-C stops the demo.\n",
        root.display(),
        https_addr.port(),
        addr.port()
    );
    match server.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        _ => ExitCode::from(EX_START),
    }
}
