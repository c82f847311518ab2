//! HTTPS termination: SNI certificates from files and the internal CA, ALPN h2/http1.1,
//! redirects, HSTS, unknown names, certificate rotation, h2c upstreams.
mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// A test CA that issues leaf certificates into files.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    dir: PathBuf,
}

impl TestCa {
    fn new(dir: &Path) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "gangway test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
            dir: dir.to_owned(),
        }
    }

    /// Writes `<stem>.pem` (leaf) and `<stem>.key`; returns the leaf DER.
    fn issue(&self, stem: &str, names: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

fn roots(pems: &[&str]) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for pem in pems {
        for der in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
            store.add(der.unwrap()).unwrap();
        }
    }
    store
}

fn client_config(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> Result<Tls, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::clone(cfg))
        .connect(server_name, tcp)
        .await
}

fn served_leaf(s: &Tls) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// One GET over an established TLS stream, HTTP/1.1 or HTTP/2 as negotiated.
async fn get_over(s: Tls, host: &str, path: &str) -> Got {
    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(s);
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(format!("https://{host}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req).await.unwrap()
    };
    let version = resp.version();
    let (parts, body) = resp.into_parts();
    let mut headers = parts.headers;
    headers.insert(
        "x-test-version",
        http::HeaderValue::from_static(if version == http::Version::HTTP_2 {
            "2"
        } else {
            "1.1"
        }),
    );
    Got {
        status: parts.status,
        headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    ca: TestCa,
    a_leaf: CertificateDer<'static>,
    c_leaf: CertificateDer<'static>,
    a: Upstream,
    c: Upstream,
    local: Upstream,
    plain: Upstream,
    gw: Gangway,
    storage: PathBuf,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let a_leaf = ca.issue("a", &["a.example.test"]);
    let c_leaf = ca.issue("c", &["c.example.test", "*.c.example.test"]);
    let (a, c, local, plain) = (
        Upstream::start("a").await,
        Upstream::start("c").await,
        Upstream::start("local").await,
        Upstream::start("plain").await,
    );
    let storage = dir.path().join("state");
    let yaml = format!(
        r#"
listen:
  http: 127.0.0.1:0
  https: 127.0.0.1:0
storage: {storage}
hsts: {{max_age: 600}}
sites:
  - hosts: [a.example.test]
    tls: {{cert: {a_pem}, key: {a_key}}}
    upstreams: [{a}]
  - hosts: [c.example.test, "*.c.example.test"]
    tls: {{cert: {c_pem}, key: {c_key}}}
    upstreams: [{c}]
  - hosts: [localhost, 127.0.0.1]
    tls: internal
    upstreams: [{local}]
  - hosts: [plain.example.test]
    tls: none
    upstreams: [{plain}]
"#,
        storage = storage.display(),
        a_pem = ca.path("a.pem"),
        a_key = ca.path("a.key"),
        c_pem = ca.path("c.pem"),
        c_key = ca.path("c.key"),
        a = a.addr,
        c = c.addr,
        local = local.addr,
        plain = plain.addr,
    );
    let gw = Gangway::start(&yaml).await;
    // gangway creates its local root as it starts.
    let root = storage.join("ca/root.crt");
    let created = eventually(Duration::from_secs(10), || {
        let root = root.clone();
        async move { root.exists() }
    })
    .await;
    assert!(created, "gangway never created its local root");
    Setup {
        _dir: dir,
        ca,
        a_leaf,
        c_leaf,
        a,
        c,
        local,
        plain,
        gw,
        storage,
    }
}

impl Setup {
    fn https(&self) -> SocketAddr {
        self.gw.https_addr.expect("https listener")
    }

    fn internal_root(&self) -> String {
        std::fs::read_to_string(self.storage.join("ca/root.crt")).expect("local root exists")
    }

    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        client_config(roots(&[&self.ca.pem, &self.internal_root()]), alpn)
    }
}

#[tokio::test]
async fn sni_picks_the_certificate_and_requests_are_forwarded_as_https() {
    let s = setup().await;
    let cfg = s.client(&[b"http/1.1"]);
    let stream = tls_connect(s.https(), "a.example.test", &cfg)
        .await
        .unwrap();
    assert_eq!(served_leaf(&stream), s.a_leaf);
    let got = get_over(stream, "a.example.test", "/p?q=1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "a");
    assert_eq!(got.headers.get("x-test-version").unwrap(), "1.1");
    assert_eq!(
        got.headers.get("strict-transport-security").unwrap(),
        "max-age=600"
    );
    let seen = s.a.last();
    let port = s.https().port().to_string();
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(seen.headers.get("x-forwarded-port").unwrap(), port.as_str());
    assert_eq!(
        seen.headers.get("forwarded").unwrap(),
        "for=127.0.0.1;host=a.example.test;proto=https"
    );

    // The wildcard certificate answers a name below the wildcard site.
    let stream = tls_connect(s.https(), "x.c.example.test", &cfg)
        .await
        .unwrap();
    assert_eq!(served_leaf(&stream), s.c_leaf);
    assert_eq!(get_over(stream, "x.c.example.test", "/").await.text(), "c");
    assert_eq!(s.c.hits(), 1);
}

#[tokio::test]
async fn alpn_h2_gives_http2_with_the_same_routing() {
    let s = setup().await;
    let cfg = s.client(&[b"h2", b"http/1.1"]);
    let stream = tls_connect(s.https(), "c.example.test", &cfg)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let got = get_over(stream, "c.example.test", "/h2?x=1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers.get("x-test-version").unwrap(), "2");
    assert_eq!(got.text(), "c");
    assert_eq!(
        got.headers.get("strict-transport-security").unwrap(),
        "max-age=600"
    );
    let seen = s.c.last();
    assert_eq!(seen.path, "/h2?x=1");
    assert_eq!(seen.headers.get("host").unwrap(), "c.example.test");
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "https");
}

fn alert_of(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

#[tokio::test]
async fn unknown_and_plain_names_get_unrecognized_name() {
    let s = setup().await;
    let cfg = s.client(&[b"http/1.1"]);
    for name in ["nobody.example.test", "plain.example.test"] {
        let err = tls_connect(s.https(), name, &cfg)
            .await
            .expect_err("handshake must fail");
        assert_eq!(
            alert_of(&err),
            Some(rustls::AlertDescription::UnrecognisedName),
            "{name}: {err}"
        );
    }
    assert_eq!(s.a.hits() + s.c.hits() + s.plain.hits(), 0);
}

#[tokio::test]
async fn internal_certificates_verify_against_the_local_root() {
    let s = setup().await;
    let cfg = client_config(roots(&[&s.internal_root()]), &[b"http/1.1"]);
    let stream = tls_connect(s.https(), "localhost", &cfg).await.unwrap();
    assert_eq!(get_over(stream, "localhost", "/").await.text(), "local");
    // An IP address: the client sends no SNI; the local address picks the certificate.
    let stream = tls_connect(s.https(), "127.0.0.1", &cfg).await.unwrap();
    assert_eq!(get_over(stream, "127.0.0.1", "/").await.text(), "local");
    assert_eq!(s.local.hits(), 2);
    // The key of the root is private.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.storage.join("ca/root.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn http_requests_for_tls_sites_are_redirected() {
    let s = setup().await;
    let mut c = Client::connect(s.gw.addr).await;
    let got = c.get("a.example.test", "/some/path?x=1&y=2").await;
    assert_eq!(got.status, 308);
    let want = format!(
        "https://a.example.test:{}/some/path?x=1&y=2",
        s.https().port()
    );
    assert_eq!(got.headers.get("location").unwrap(), want.as_str());
    assert!(got.headers.get("strict-transport-security").is_none());

    // A port in Host is replaced by the https port.
    let got = c.get("A.example.test:8080", "/").await;
    let want = format!("https://a.example.test:{}/", s.https().port());
    assert_eq!(got.headers.get("location").unwrap(), want.as_str());

    // ACME HTTP-01 challenges are never redirected.
    let got = c
        .get("a.example.test", "/.well-known/acme-challenge/token")
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(s.a.last().path, "/.well-known/acme-challenge/token");

    // A plain site is served over HTTP, without HSTS.
    let got = c.get("plain.example.test", "/").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "plain");
    assert!(got.headers.get("strict-transport-security").is_none());
    assert_eq!(
        s.plain.last().headers.get("x-forwarded-proto").unwrap(),
        "http"
    );
}

#[tokio::test]
async fn rotated_certificate_files_are_picked_up_without_dropping_requests() {
    let s = setup().await;
    let cfg = s.client(&[b"http/1.1"]);
    // A slow request in flight on a TLS connection with the old certificate.
    let stream = tls_connect(s.https(), "a.example.test", &cfg)
        .await
        .unwrap();
    assert_eq!(served_leaf(&stream), s.a_leaf);
    let slow = tokio::spawn(get_over(stream, "a.example.test", "/slow?ms=2500"));

    // Replace the files the way tools do: write elsewhere, then rename over.
    let new_leaf = s.ca.issue("a-new", &["a.example.test"]);
    std::fs::rename(s.ca.path("a-new.key"), s.ca.path("a.key")).unwrap();
    std::fs::rename(s.ca.path("a-new.pem"), s.ca.path("a.pem")).unwrap();

    let https = s.https();
    let switched = eventually(Duration::from_secs(5), || {
        let cfg = cfg.clone();
        let new_leaf = new_leaf.clone();
        async move {
            match tls_connect(https, "a.example.test", &cfg).await {
                Ok(st) => served_leaf(&st) == new_leaf,
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(switched, "new handshakes never saw the new certificate");
    let got = slow.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "a");
}

#[tokio::test]
async fn curl_speaks_http2_and_http11_to_the_file_certificate() {
    let s = setup().await;
    let ca_file = s.ca.dir.join("ca.pem");
    std::fs::write(&ca_file, &s.ca.pem).unwrap();
    let port = s.https().port();
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let args: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "10".into(),
            flag.into(),
            "--cacert".into(),
            ca_file.display().to_string(),
            "--resolve".into(),
            format!("a.example.test:{port}:127.0.0.1"),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_version} %{http_code}".into(),
            format!("https://a.example.test:{port}/curl"),
        ];
        // curl blocks: run it off the test's runtime, which also runs gangway.
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl").args(args).output()
        })
        .await
        .unwrap()
        .expect("curl is installed");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{want} 200"),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(s.a.hits(), 2);
}

#[tokio::test]
async fn bad_certificate_files_are_config_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    ca.issue("a", &["a.example.test"]);
    ca.issue("b", &["b.example.test"]);
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
    let yaml = format!(
        r#"listen: {{https: 127.0.0.1:0}}
sites:
  - hosts: [a.example.test]
    tls: {{cert: {a_pem}, key: {b_key}}}
    upstreams: [127.0.0.1:1]
  - hosts: [b.example.test, other.example.test]
    tls: {{cert: {b_pem}, key: {b_key}}}
    upstreams: [127.0.0.1:1]
  - hosts: [c.example.test]
    tls: {{cert: {junk}, key: {b_key}, chain: x}}
    upstreams: [127.0.0.1:1]
"#,
        a_pem = ca.path("a.pem"),
        b_pem = ca.path("b.pem"),
        b_key = ca.path("b.key"),
        junk = ca.path("junk.pem"),
    );
    let err = gangway::config::Config::parse(&yaml, "t.yaml").expect_err("invalid");
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().skip(1).map(str::trim).collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(text.starts_with("t.yaml: 4 problems in config"), "{text}");
    assert!(
        lines[0].starts_with("t.yaml:4:") && lines[0].contains("sites[0].tls.cert"),
        "{text}"
    );
    assert!(
        lines[0].contains(&format!("{}: this key does not belong", ca.path("b.key"))),
        "{text}"
    );
    assert!(
        lines[1].contains("sites[1].tls.cert")
            && lines[1].contains("does not cover the site's host other.example.test"),
        "{text}"
    );
    assert!(
        lines[2].contains("sites[2].tls.cert") && lines[2].contains("junk.pem"),
        "{text}"
    );
    assert!(
        lines[3].contains("sites[2].tls.chain: unknown key"),
        "{text}"
    );
}

#[tokio::test]
async fn h2c_upstreams_get_http2() {
    // An h2c-only upstream that reports the protocol version it was spoken to in.
    let up = H2cUpstream::start().await;
    let (addr, conns) = (up.addr, up.connections.clone());
    let yaml = format!(
        "sites:\n  - hosts: [\"*\"]\n    upstream_protocol: h2c\n    upstreams: [{addr}]\n"
    );
    let gw = Gangway::start(&yaml).await;
    let mut c = Client::connect(gw.addr).await;
    for i in 0..5 {
        let got = c.get("grpc.example.test", &format!("/call/{i}")).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), format!("HTTP/2.0 grpc.example.test /call/{i}"));
    }
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one multiplexed connection"
    );
}

/// gangway in front of an h2c upstream, with `timeouts.upstream_read: 400ms`.
async fn in_front_with_upstream_read_400ms(up: &H2cUpstream) -> Gangway {
    Gangway::start(&format!(
        "timeouts:\n  upstream_read: 400ms\nsites:\n  - hosts: [\"*\"]\n    upstream_protocol: h2c\n    upstreams: [{}]\n",
        up.addr
    ))
    .await
}

#[tokio::test]
async fn an_h2c_body_that_stalls_longer_than_upstream_read_is_cut() {
    let up = H2cUpstream::start().await;
    let gw = in_front_with_upstream_read_400ms(&up).await;
    let (text, took) = get_until_closed(gw.addr, "/stall").await;
    // Chunked (h2 gives no length), cut after "abc" without the last chunk.
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    assert!(text.ends_with("\r\n\r\n3\r\nabc\r\n"), "{text:?}");
    assert!(took >= Duration::from_millis(380), "cut after {took:?}");
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
    // The shared h2c connection stays up for the next request.
    let got = get(gw.addr, "app.test", "/after").await;
    assert_eq!(got.text(), "HTTP/2.0 app.test /after");
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stalled_body_ends_only_its_own_http2_stream() {
    // An HTTP/2 client (prior knowledge) with two streams on one connection: the stalled
    // one is reset after upstream_read, the other and later ones are answered on the same
    // connection.
    let up = H2cUpstream::start().await;
    let gw = in_front_with_upstream_read_400ms(&up).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        let mut send = send.clone();
        let req = http::Request::get(format!("http://app.test{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        async move { send.send_request(req).await.unwrap() }
    };
    let stalled = get("/stall").await;
    assert_eq!(stalled.status(), 200);
    let started = std::time::Instant::now();
    let other = get("/other").await.into_body().collect().await.unwrap();
    assert_eq!(other.to_bytes(), "HTTP/2.0 app.test /other");
    let mut body = stalled.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "abc");
    let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the stalled stream ended");
    assert!(
        matches!(end, Some(Err(_))),
        "a reset, not a clean end: {end:?}"
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(350), "cut after {took:?}");
    let after = get("/after").await.into_body().collect().await.unwrap();
    assert_eq!(after.to_bytes(), "HTTP/2.0 app.test /after");
}

/// gangway's cipher preference (AES-128-GCM, cheaper per byte) wins over a client that
/// lists AES-256-GCM first, as OpenSSL-based clients (curl, wrk, Python) and rustls do.
#[tokio::test]
async fn aes_128_gcm_is_chosen_over_the_clients_order() {
    let s = setup().await;
    let cfg = s.client(&[b"http/1.1"]);
    let offered: Vec<_> = cfg
        .crypto_provider()
        .cipher_suites
        .iter()
        .map(|c| c.suite())
        .collect();
    assert_eq!(
        offered.first(),
        Some(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
        "the test client must prefer AES-256"
    );
    let conn = tls_connect(s.https(), "a.example.test", &cfg)
        .await
        .unwrap();
    assert_eq!(
        conn.get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|c| c.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(get_over(conn, "a.example.test", "/").await.status, 200);
}

#[tokio::test]
async fn sessions_resume() {
    let s = setup().await;
    let cfg = s.client(&[b"http/1.1"]);
    let first = tls_connect(s.https(), "a.example.test", &cfg)
        .await
        .unwrap();
    assert_eq!(get_over(first, "a.example.test", "/").await.status, 200);
    let second = tls_connect(s.https(), "a.example.test", &cfg)
        .await
        .unwrap();
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
}

#[tokio::test]
async fn a_catch_all_site_with_a_certificate_answers_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let leaf = ca.issue("any", &["fallback.example.test"]);
    let up = Upstream::start("fallback").await;
    let yaml = format!(
        "listen: {{https: 127.0.0.1:0}}\nsites:\n  - hosts: [\"*\"]\n    tls: {{cert: {}, key: {}}}\n    upstreams: [{}]\n",
        ca.path("any.pem"),
        ca.path("any.key"),
        up.addr
    );
    let gw = Gangway::start(&yaml).await;
    // The client accepts the certificate for this test (it does not match the name).
    #[derive(Debug)]
    struct AcceptAny;
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth(),
    );
    let stream = tls_connect(gw.https_addr.unwrap(), "whatever.example.test", &cfg)
        .await
        .unwrap();
    assert_eq!(served_leaf(&stream), leaf);
    assert_eq!(
        get_over(stream, "whatever.example.test", "/").await.text(),
        "fallback"
    );
}

/// An app that refuses an upload from its head and closes, the body unread, behind an HTTPS
/// site, and a client that sends its whole body before reading (as Python's `requests`
/// does): gangway lingers on the TLS connection, reading and dropping the rest of the
/// upload, so the client's writes go through and it reads the 413. Closed at once, the
/// socket was reset with the upload unread, and the client saw a failed write instead.
#[tokio::test]
async fn an_early_answer_over_tls_reaches_a_client_that_sends_its_whole_body_first() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    ca.issue("a", &["a.example.test"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let replica = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!")
                    .await;
                // Dropped with the body unread: the replica's kernel resets the connection.
            });
        }
    });
    let gw = Gangway::start(&format!(
        "listen:\n  http: 127.0.0.1:0\n  https: 127.0.0.1:0\nstorage: {storage}\nsites:\n  - hosts: [a.example.test]\n    tls: {{cert: {pem}, key: {key}}}\n    upstreams: [{replica}]\n",
        storage = dir.path().join("state").display(),
        pem = ca.path("a.pem"),
        key = ca.path("a.key"),
    ))
    .await;
    let cfg = client_config(roots(&[&ca.pem]), &[b"http/1.1"]);
    let body = vec![7u8; 16 * 1024 * 1024];
    for round in 0..3 {
        let addr = gw.https_addr.expect("https listener");
        let mut s = tls_connect(addr, "a.example.test", &cfg).await.unwrap();
        let text = upload_whole_then_read(&mut s, "a.example.test", &body, round).await;
        assert_too_big(&text, round);
    }
}
