//! A real ACME CA for tests: Debian's pebble and pebble-challtestsrv, started per test on
//! free loopback ports and killed on drop; gangway in-process on listeners bound first, so
//! pebble can be told where to validate.
#![allow(dead_code)]

use bytes::Bytes;
use gangway::config::Config;
use gangway::upstream::resolve::SystemResolver;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Finds a program on PATH.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Is pebble installed? Under CI (CI=true) a missing pebble fails the test instead of
/// skipping it.
pub fn pebble_available() -> bool {
    let found = which("pebble").is_some() && which("pebble-challtestsrv").is_some();
    if !found {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "pebble is not installed (apt-get install -y pebble); CI must run the ACME tests"
        );
        eprintln!("SKIPPED: pebble is not installed (apt-get install -y pebble)");
    }
    found
}

/// A free TCP port on 127.0.0.1 (also free for UDP when `udp`).
fn free_port(udp: bool) -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if !udp || std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A child process killed (and reaped) on drop, its output collected.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_logged(name: &'static str, mut cmd: Command, log: &Arc<Mutex<String>>) -> Proc {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    for out in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let log = Arc::clone(log);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let mut l = log.lock().unwrap();
                l.push_str(name);
                l.push_str(": ");
                l.push_str(&line);
                l.push('\n');
            }
        });
    }
    Proc { child, name }
}

/// What to start pebble with.
#[derive(Default, Clone)]
pub struct PebbleOptions {
    /// Where pebble connects for HTTP-01 (gangway's http listener).
    pub http_port: u16,
    /// Where pebble connects for TLS-ALPN-01 (gangway's https listener).
    pub tls_port: u16,
    /// Lifetime of issued certificates, in seconds.
    pub validity: Option<u64>,
    /// Names pebble refuses to order.
    pub blocklist: Vec<String>,
}

/// pebble and its DNS (pebble-challtestsrv answering 127.0.0.1 for every name).
pub struct Pebble {
    /// `https://127.0.0.1:PORT/dir`.
    pub directory: String,
    /// The CA pebble's own HTTPS uses (for `acme.directory_ca`).
    pub directory_ca: PathBuf,
    /// The root that issues certificates (fetched from the management port).
    pub root_pem: String,
    log: Arc<Mutex<String>>,
    procs: Vec<Proc>,
    _dir: tempfile::TempDir,
}

impl Pebble {
    pub async fn start(opts: PebbleOptions) -> Pebble {
        let dir = tempfile::tempdir().expect("tempdir");
        // pebble's own HTTPS certificate (Debian ships none), from a test CA.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pebble test listener CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let directory_ca = dir.path().join("listener-ca.pem");
        std::fs::write(&directory_ca, ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();

        let log = Arc::new(Mutex::new(String::new()));
        let mut last_error = String::new();
        // Ports are picked free and released before the daemons bind them: retry if one was
        // taken in between.
        for _ in 0..5 {
            let (dns, dns_mgmt, listen, mgmt) = (
                free_port(true),
                free_port(false),
                free_port(false),
                free_port(false),
            );
            let mut cmd = Command::new("pebble-challtestsrv");
            cmd.args(["-dns01", &format!("127.0.0.1:{dns}")])
                .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]);
            let mut dns_proc = spawn_logged("challtestsrv", cmd, &log);
            if !until_listening(&mut dns_proc, dns_mgmt).await {
                last_error = format!("pebble-challtestsrv did not start:\n{}", lock(&log));
                continue;
            }
            let config = serde_json::json!({
                "pebble": {
                    "listenAddress": format!("127.0.0.1:{listen}"),
                    "managementListenAddress": format!("127.0.0.1:{mgmt}"),
                    "certificate": dir.path().join("cert.pem"),
                    "privateKey": dir.path().join("key.pem"),
                    "httpPort": opts.http_port,
                    "tlsPort": opts.tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": false,
                    "domainBlocklist": opts.blocklist,
                    "certificateValidityPeriod": opts.validity.unwrap_or(90 * 86400),
                }
            });
            let config_path = dir.path().join("pebble.json");
            std::fs::write(&config_path, config.to_string()).unwrap();
            let mut cmd = Command::new("pebble");
            cmd.arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0");
            let mut pebble = spawn_logged("pebble", cmd, &log);
            if !until_listening(&mut pebble, listen).await
                || !until_listening(&mut pebble, mgmt).await
            {
                last_error = format!("pebble did not start:\n{}", lock(&log));
                continue;
            }
            // Another process may have taken a port first: then this is not pebble.
            let trust = roots(&[&ca_cert.pem()]);
            let mgmt_addr = SocketAddr::from(([127, 0, 0, 1], mgmt));
            let root_pem = match https_get(mgmt_addr, "127.0.0.1", "/roots/0", &trust).await {
                Ok((200, pem)) if pem.contains("BEGIN CERTIFICATE") => pem,
                other => {
                    last_error = format!("GET /roots/0 from pebble: {other:?}\n{}", lock(&log));
                    continue;
                }
            };
            let directory = format!("https://127.0.0.1:{listen}/dir");
            match https_get(
                SocketAddr::from(([127, 0, 0, 1], listen)),
                "127.0.0.1",
                "/dir",
                &trust,
            )
            .await
            {
                Ok((200, body)) if body.contains("newOrder") => {}
                other => {
                    last_error = format!("GET {directory}: {other:?}\n{}", lock(&log));
                    continue;
                }
            }
            return Pebble {
                directory,
                directory_ca,
                root_pem,
                log,
                procs: vec![pebble, dns_proc],
                _dir: dir,
            };
        }
        panic!("{last_error}");
    }

    /// Everything pebble and its DNS printed.
    pub fn log(&self) -> String {
        lock(&self.log)
    }

    /// Orders pebble accepted (each logs "Added order").
    pub fn orders(&self) -> usize {
        self.log().matches("Added order").count()
    }

    /// Certificates pebble issued.
    pub fn issued(&self) -> usize {
        self.log().matches("Issued certificate serial").count()
    }

    /// Stops pebble (the CA goes away) but keeps the log.
    pub fn stop(&mut self) {
        self.procs.clear();
    }
}

fn lock(log: &Arc<Mutex<String>>) -> String {
    log.lock().map(|l| l.clone()).unwrap_or_default()
}

/// Waits until something accepts on 127.0.0.1:`port`, or the process exits, or 10 s pass.
async fn until_listening(proc: &mut Proc, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = proc.child.try_wait() {
            return false;
        }
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = proc.name;
    false
}

pub fn roots(pems: &[&str]) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for pem in pems {
        for der in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
            store.add(der.unwrap()).unwrap();
        }
    }
    store
}

pub fn client_config(roots: &rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A verified TLS connection to `addr` for `name` (the chain must lead to `roots`).
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::clone(cfg))
        .connect(server_name, tcp)
        .await
}

/// The leaf certificate the server sent.
pub fn leaf(s: &Tls) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().expect("certificates")[0]
        .clone()
        .into_owned()
}

/// A GET over HTTPS with a one-shot HTTP/1.1 connection.
pub async fn https_get(
    addr: SocketAddr,
    name: &str,
    path: &str,
    roots: &rustls::RootCertStore,
) -> std::io::Result<(u16, String)> {
    let tls = tls_connect(addr, name, &client_config(roots)).await?;
    let mut conn = Http1::over(tls).await?;
    conn.get(name, path).await
}

/// A keep-alive HTTP/1.1 connection over TLS.
pub struct Http1 {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Http1 {
    pub async fn over(tls: Tls) -> std::io::Result<Http1> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Http1 { sender })
    }

    pub async fn get(&mut self, host: &str, path: &str) -> std::io::Result<(u16, String)> {
        self.sender.ready().await.map_err(std::io::Error::other)?;
        let req = http::Request::get(path)
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .map_err(std::io::Error::other)?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// gangway's listeners, bound before pebble starts so pebble can validate against them.
pub struct Bound {
    pub http: TcpListener,
    pub https: TcpListener,
    /// The admin listener (metrics, status), used unless the config says `admin: off`.
    pub admin: TcpListener,
    pub http_addr: SocketAddr,
    pub https_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

impl Bound {
    pub async fn new() -> Bound {
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let https = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        Bound {
            http_addr: http.local_addr().unwrap(),
            https_addr: https.local_addr().unwrap(),
            admin_addr: admin.local_addr().unwrap(),
            http,
            https,
            admin,
        }
    }
}

/// gangway running in-process on bound listeners.
pub struct Instance {
    pub http_addr: SocketAddr,
    pub https_addr: SocketAddr,
    /// The admin listener (`None` when the config says `admin: off`).
    pub admin_addr: Option<SocketAddr>,
    pub stop: CancellationToken,
    pub task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Instance {
    pub fn start(yaml: &str, bound: Bound) -> Instance {
        let config = Config::parse(yaml, "acme-test.yaml").unwrap_or_else(|e| panic!("{e}"));
        let stop = CancellationToken::new();
        let mut listeners = gangway::server::Listeners::http_only(bound.http);
        listeners.https = Some(bound.https);
        // The configured admin address is ignored like the others: tests bind port 0.
        let admin_addr = config.listen.admin.map(|_| bound.admin_addr);
        if admin_addr.is_some() {
            listeners.admin = Some(bound.admin);
        }
        let task = tokio::spawn(gangway::server::run(
            config,
            listeners,
            Arc::new(SystemResolver::new()),
            stop.clone(),
        ));
        Instance {
            http_addr: bound.http_addr,
            https_addr: bound.https_addr,
            admin_addr,
            stop,
            task: Some(task),
        }
    }

    /// Stops it and waits until it has stopped.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The config of a test instance: `sites` is YAML for the sites list.
pub fn config_yaml(pebble: &Pebble, storage: &Path, challenge: &str, sites: &str) -> String {
    format!(
        r#"
listen:
  http: 127.0.0.1:0
  https: 127.0.0.1:0
  admin: 127.0.0.1:0
storage: {storage}
access_log: off
acme:
  email: ops@example.com
  directory: {directory}
  directory_ca: {ca}
  challenge: {challenge}
sites:
{sites}
"#,
        storage = storage.display(),
        directory = pebble.directory,
        ca = pebble.directory_ca.display(),
    )
}

/// Polls `check` every 50 ms until it returns `Some` or `limit` passes.
pub async fn poll<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `addr` serves `name` a certificate chaining to pebble's root; returns the
/// leaf.
pub async fn until_served(
    pebble: &Pebble,
    addr: SocketAddr,
    name: &str,
    limit: Duration,
) -> CertificateDer<'static> {
    let cfg = client_config(&roots(&[&pebble.root_pem]));
    let got = poll(limit, || {
        let cfg = Arc::clone(&cfg);
        async move { tls_connect(addr, name, &cfg).await.ok().map(|s| leaf(&s)) }
    })
    .await;
    match got {
        Some(leaf) => leaf,
        None => panic!(
            "{addr} did not serve a certificate for {name} within {limit:?}\npebble log:\n{}",
            pebble.log()
        ),
    }
}

/// The serial number of a certificate, hex.
pub fn serial(der: &CertificateDer<'_>) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// When a certificate expires (notAfter), in seconds since the Unix epoch.
pub fn not_after(der: &CertificateDer<'_>) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
    cert.validity().not_after.timestamp()
}

/// The value of the sample `metric{name="<name>"}` in a Prometheus text exposition.
pub fn sample(text: &str, metric: &str, name: &str) -> Option<f64> {
    let prefix = format!("{metric}{{name=\"{name}\"}} ");
    let values: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect();
    assert!(values.len() <= 1, "{prefix}appears more than once:\n{text}");
    values.first().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{prefix}{v:?}: {e}"))
    })
}

/// `<storage>/acme/<directory>/certs/<name>/status.json`, parsed.
pub fn status(storage: &Path, pebble: &Pebble, first_name: &str) -> Option<serde_json::Value> {
    let paths = gangway::acme::storage::CertPaths::new(storage, &pebble.directory, first_name);
    let text = std::fs::read(paths.status()).ok()?;
    serde_json::from_slice(&text).ok()
}
