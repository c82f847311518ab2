//! `gangway load URL`: a load generator for the question "is my traffic spread evenly?".
//!
//! Workers send requests over keep-alive HTTP/1.1 connections (one per worker) or one
//! multiplexed HTTP/2 connection per worker, record status and latency, and read which
//! replica answered from `X-Gangway-Replica` or, when gangway does not send it, from the
//! difference of its admin `/status` before and after the run.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// What to send, how much, how.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: Uri,
    pub requests: Option<u64>,
    pub duration: Option<Duration>,
    pub concurrency: usize,
    pub http2: bool,
    pub insecure: bool,
    pub cacert: Option<std::path::PathBuf>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub method: Method,
    /// gangway's admin /status, used when responses carry no X-Gangway-Replica.
    pub status_url: Option<Uri>,
    pub progress: bool,
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    replicas: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

/// The result of a run.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    /// Where the replica counts came from: `header` or `status`.
    pub replicas_from: String,
    pub replicas: Vec<ReplicaShare>,
    pub statuses: BTreeMap<u16, u64>,
    pub error_kinds: BTreeMap<String, u64>,
    pub latency_ms: Latency,
}

#[derive(Debug, serde::Serialize)]
pub struct ReplicaShare {
    pub replica: String,
    pub requests: u64,
    pub share_percent: f64,
    /// Share minus the perfect share (100 / replicas), in percentage points.
    pub deviation_points: f64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

fn tls_config(spec: &LoadSpec) -> io::Result<Arc<rustls::ClientConfig>> {
    let provider = crate::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    let mut cfg = if spec.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &spec.cacert {
            Some(path) => {
                use rustls_pki_types::pem::PemObject;
                for der in rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|e| io::Error::other(format!("{}: {e:?}", path.display())))?
                {
                    let der =
                        der.map_err(|e| io::Error::other(format!("{}: {e:?}", path.display())))?;
                    roots.add(der).map_err(io::Error::other)?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = if spec.http2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cfg))
}

/// `--insecure`: accept any certificate (still checks the handshake signature).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn connect(spec: &LoadSpec, tls: &Option<Arc<rustls::ClientConfig>>) -> io::Result<Conn> {
    let host = spec
        .url
        .host()
        .unwrap_or("127.0.0.1")
        .trim_matches(['[', ']']);
    let https = spec.url.scheme_str() == Some("https");
    let port = spec.url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host, port)).await?;
    let _ = tcp.set_nodelay(true);
    macro_rules! handshake {
        ($io:expr) => {
            if spec.http2 {
                let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), $io)
                    .await
                    .map_err(io::Error::other)?;
                tokio::spawn(c);
                Conn::H2(s)
            } else {
                let (s, c) = hyper::client::conn::http1::handshake($io)
                    .await
                    .map_err(io::Error::other)?;
                tokio::spawn(c);
                Conn::H1(s)
            }
        };
    }
    Ok(match tls {
        Some(cfg) => {
            let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                .map_err(io::Error::other)?;
            let stream = tokio_rustls::TlsConnector::from(Arc::clone(cfg))
                .connect(name, tcp)
                .await?;
            handshake!(TokioIo::new(stream))
        }
        None => handshake!(TokioIo::new(tcp)),
    })
}

fn request(spec: &LoadSpec, h2: bool) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.method_mut() = spec.method.clone();
    if h2 {
        *req.uri_mut() = spec.url.clone();
    } else {
        *req.uri_mut() = spec
            .url
            .path_and_query()
            .map(|p| Uri::from(p.clone()))
            .unwrap_or_else(|| Uri::from_static("/"));
        if let Some(a) = spec.url.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
    for (k, v) in &spec.headers {
        req.headers_mut().append(k.clone(), v.clone());
    }
    req
}

static REPLICA_HEADER: HeaderName = HeaderName::from_static("x-gangway-replica");

async fn worker(
    spec: Arc<LoadSpec>,
    tls: Option<Arc<rustls::ClientConfig>>,
    budget: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut t = Tally::default();
    let mut conn: Option<Conn> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // Take one request from the budget (unbounded in duration mode).
        if budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        if conn.is_none() {
            match connect(&spec, &tls).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    *t.errors
                        .entry(format!("connect: {}", e.kind()))
                        .or_default() += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let started = Instant::now();
        let result = match conn.as_mut() {
            Some(Conn::H1(s)) => match s.ready().await {
                Ok(()) => s.send_request(request(&spec, false)).await,
                Err(e) => Err(e),
            },
            Some(Conn::H2(s)) => match s.ready().await {
                Ok(()) => s.send_request(request(&spec, true)).await,
                Err(e) => Err(e),
            },
            None => continue,
        };
        match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let replica = resp
                    .headers()
                    .get(&REPLICA_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let closes = resp
                    .headers()
                    .get(http::header::CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                match resp.into_body().collect().await {
                    Ok(_) => {
                        t.latencies_us
                            .push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        *t.statuses.entry(status).or_default() += 1;
                        if let Some(r) = replica {
                            *t.replicas.entry(r).or_default() += 1;
                        }
                    }
                    Err(e) => {
                        *t.errors.entry(format!("body: {e}")).or_default() += 1;
                        conn = None;
                    }
                }
                if closes {
                    conn = None;
                }
            }
            Err(e) => {
                *t.errors.entry(format!("request: {e}")).or_default() += 1;
                conn = None;
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    t
}

/// Requests per replica from gangway's admin /status.
async fn status_counts(url: &Uri) -> Option<BTreeMap<String, u64>> {
    let host = url.host()?;
    let port = url.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host, port)).await.ok()?;
    let (mut s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(c);
    let req = Request::get(url.path())
        .header(http::header::HOST, url.authority()?.as_str())
        .body(Empty::<Bytes>::new())
        .ok()?;
    let body = s
        .send_request(req)
        .await
        .ok()?
        .into_body()
        .collect()
        .await
        .ok()?
        .to_bytes();
    let doc: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let mut out = BTreeMap::new();
    for site in doc["sites"].as_array()? {
        for route in site["routes"].as_array()? {
            for r in route["replicas"].as_array()? {
                let addr = r["address"].as_str()?.to_owned();
                *out.entry(addr).or_default() += r["requests"].as_u64().unwrap_or(0);
            }
        }
    }
    Some(out)
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[idx]) / 1000.0
}

/// Runs the load and returns the report.
pub async fn run(spec: LoadSpec) -> io::Result<Report> {
    let tls = if spec.url.scheme_str() == Some("https") {
        Some(tls_config(&spec)?)
    } else {
        None
    };
    let before = match &spec.status_url {
        Some(u) => status_counts(u).await,
        None => None,
    };
    let budget = Arc::new(AtomicU64::new(spec.requests.unwrap_or(u64::MAX)));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let spec = Arc::new(spec);
    let started = Instant::now();
    let workers: Vec<_> = (0..spec.concurrency.max(1))
        .map(|_| {
            tokio::spawn(worker(
                Arc::clone(&spec),
                tls.clone(),
                Arc::clone(&budget),
                Arc::clone(&done),
                Arc::clone(&stop),
            ))
        })
        .collect();
    let progress = {
        let (done, stop, spec) = (Arc::clone(&done), Arc::clone(&stop), Arc::clone(&spec));
        tokio::spawn(async move {
            let show = spec.progress && io::stderr().is_terminal();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let elapsed = started.elapsed();
                if let Some(d) = spec.duration
                    && elapsed >= d
                {
                    stop.store(true, Ordering::Relaxed);
                }
                if stop.load(Ordering::Relaxed) && !show {
                    return;
                }
                if show {
                    let n = done.load(Ordering::Relaxed);
                    let frac = match (spec.requests, spec.duration) {
                        (Some(total), _) => n as f64 / total.max(1) as f64,
                        (None, Some(d)) => elapsed.as_secs_f64() / d.as_secs_f64(),
                        _ => 0.0,
                    }
                    .min(1.0);
                    let width = 30;
                    let filled = (frac * width as f64) as usize;
                    let rate = n as f64 / elapsed.as_secs_f64().max(1e-9);
                    let mut err = io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r[{}{}] {:3.0}% {n} requests {rate:.0} req/s ",
                        "=".repeat(filled),
                        " ".repeat(width - filled),
                        frac * 100.0
                    );
                    let _ = err.flush();
                    if stop.load(Ordering::Relaxed) || frac >= 1.0 {
                        let _ = writeln!(err);
                        return;
                    }
                }
            }
        })
    };
    let mut total = Tally::default();
    for w in workers {
        let t = w.await.map_err(io::Error::other)?;
        total.latencies_us.extend(t.latencies_us);
        for (k, v) in t.statuses {
            *total.statuses.entry(k).or_default() += v;
        }
        for (k, v) in t.replicas {
            *total.replicas.entry(k).or_default() += v;
        }
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = progress.await;

    let (replica_counts, from) = if !total.replicas.is_empty() {
        (total.replicas, "header")
    } else {
        match (&spec.status_url, before) {
            (Some(u), Some(before)) => {
                let after = status_counts(u).await.unwrap_or_default();
                let diff = after
                    .into_iter()
                    .map(|(k, v)| {
                        let b = before.get(&k).copied().unwrap_or(0);
                        (k, v.saturating_sub(b))
                    })
                    .filter(|(_, v)| *v > 0)
                    .collect();
                (diff, "status")
            }
            _ => (BTreeMap::new(), "none"),
        }
    };
    let answered: u64 = total.statuses.values().sum();
    let counted: u64 = replica_counts.values().sum();
    let k = replica_counts.len().max(1) as f64;
    let replicas = replica_counts
        .into_iter()
        .map(|(replica, requests)| {
            let share = 100.0 * requests as f64 / counted.max(1) as f64;
            ReplicaShare {
                replica,
                requests,
                share_percent: (share * 100.0).round() / 100.0,
                deviation_points: ((share - 100.0 / k) * 100.0).round() / 100.0,
            }
        })
        .collect();
    total.latencies_us.sort_unstable();
    let l = &total.latencies_us;
    Ok(Report {
        requests: answered,
        errors: total.errors.values().sum(),
        seconds: (seconds * 1000.0).round() / 1000.0,
        requests_per_second: (answered as f64 / seconds.max(1e-9)).round(),
        replicas_from: from.to_owned(),
        replicas,
        statuses: total.statuses,
        error_kinds: total.errors,
        latency_ms: Latency {
            p50: percentile(l, 0.50),
            p90: percentile(l, 0.90),
            p99: percentile(l, 0.99),
            max: percentile(l, 1.0),
        },
    })
}

/// The human-readable report.
pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} requests in {:.2} s, {:.0} req/s, {} errors",
        r.requests, r.seconds, r.requests_per_second, r.errors
    );
    let _ = writeln!(
        out,
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        r.latency_ms.p50, r.latency_ms.p90, r.latency_ms.p99, r.latency_ms.max
    );
    let codes: Vec<String> = r
        .statuses
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let _ = writeln!(out, "status codes: {}", codes.join(", "));
    for (k, v) in &r.error_kinds {
        let _ = writeln!(out, "error {k}: {v}");
    }
    if r.replicas.is_empty() {
        let _ = writeln!(
            out,
            "replicas: unknown (enable replica_header: true, or pass --admin with gangway's admin address)"
        );
    } else {
        let _ = writeln!(
            out,
            "\nreplica (from {})                requests   share   vs even",
            r.replicas_from
        );
        for s in &r.replicas {
            let _ = writeln!(
                out,
                "{:<32} {:>10} {:>6.2}% {:>+7.2}",
                s.replica, s.requests, s.share_percent, s.deviation_points
            );
        }
    }
    out
}
