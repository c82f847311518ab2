//! Shared test builders: real upstream servers on 127.0.0.1:0, gangway in-process, a client.
#![allow(dead_code)]

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gangway::config::Config;
use gangway::upstream::resolve::{Resolve, StaticResolver, SystemResolver};
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    pub body_len: u64,
}

/// A real HTTP/1.1 upstream on 127.0.0.1:0 that records what it receives.
///
/// Its answers depend on the path:
/// - `/slow?ms=N`: waits N ms, then answers like any other path.
/// - `/upload`: reads the body as it streams and answers with the byte count.
/// - `/big?bytes=N`: streams N bytes in 64 KiB chunks.
/// - `/hop`: answers with hop-by-hop headers the proxy must remove.
/// - `/stall`: `abc` (chunked), then the response stays open without another byte.
/// - `/ws`: WebSocket echo.
/// - anything else: the upstream's name as body, with `x-replica: NAME`.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted (to see keep-alive reuse).
    pub connections: Arc<AtomicUsize>,
    /// What `/health` answers (200 unless a test changes it); health checks are counted
    /// here, not in `seen`.
    pub health_status: Arc<std::sync::atomic::AtomicU16>,
    pub health_checks: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        Self::serve(name, listener)
    }

    /// Starts on a given listener (to restart a replica on the same port).
    pub fn serve(name: &str, listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let health_status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let health_checks = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let up = Upstream {
            name: name.to_owned(),
            addr,
            seen: seen.clone(),
            connections: connections.clone(),
            health_status: health_status.clone(),
            health_checks: health_checks.clone(),
            stop: stop.clone(),
        };
        let name: Arc<str> = name.into();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let (name, seen, stop) = (name.clone(), seen.clone(), stop.clone());
                let (hs, hc) = (health_status.clone(), health_checks.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (name, seen, hs, hc) =
                            (name.clone(), seen.clone(), hs.clone(), hc.clone());
                        async move {
                            if req.uri().path() == "/health" {
                                hc.fetch_add(1, Ordering::SeqCst);
                                let status = StatusCode::from_u16(hs.load(Ordering::SeqCst))
                                    .unwrap_or(StatusCode::OK);
                                let mut resp = Response::new(full("health"));
                                *resp.status_mut() = status;
                                return Ok(resp);
                            }
                            handle(name, seen, req).await
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        up
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }

    /// Stops accepting and closes every connection: the port then refuses.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// An upstream that speaks only HTTP/2 with prior knowledge (h2c) and answers every request
/// with `VERSION AUTHORITY PATH` (`HTTP/2.0 app.test /x`), except `/stall`: `abc`, then
/// the stream stays open without another byte.
pub struct H2cUpstream {
    pub addr: SocketAddr,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
}

impl H2cUpstream {
    pub async fn start() -> H2cUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind h2c upstream");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        if req.uri().path() == "/stall" {
                            return Ok(Response::new(abc_then_nothing()));
                        }
                        let body = format!(
                            "{:?} {} {}",
                            req.version(),
                            req.uri().authority().map(|a| a.as_str()).unwrap_or("-"),
                            req.uri().path()
                        );
                        Ok::<_, Infallible>(Response::new(BodyExt::boxed(Full::new(Bytes::from(
                            body,
                        )))))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        H2cUpstream { addr, connections }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn handle(
    name: Arc<str>,
    seen: Arc<Mutex<Vec<Seen>>>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let mut record = Seen {
        method: req.method().to_string(),
        path: path.clone(),
        headers: req.headers().clone(),
        body_len: 0,
    };
    let route = req.uri().path().to_owned();

    if route == "/ws" {
        seen.lock().unwrap().push(record);
        let key = req
            .headers()
            .get("sec-websocket-key")
            .cloned()
            .unwrap_or(header::HeaderValue::from_static(""));
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if tx.send(msg).await.is_err() {
                            break;
                        }
                    } else if msg.is_close() {
                        break;
                    }
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap();
        return Ok(resp);
    }

    // Read the whole request body as it streams (never holding it).
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    record.body_len += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    let body_len = record.body_len;
    let is_slow = route == "/slow";
    let ms = query_num_from(&path, "ms");
    let big = query_num_from(&path, "bytes");
    seen.lock().unwrap().push(record);
    if is_slow {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let resp = match route.as_str() {
        "/upload" => Response::new(full(body_len.to_string())),
        "/stall" => Response::new(abc_then_nothing()),
        "/big" => {
            let chunks = futures_util::stream::unfold(big, |left| async move {
                if left == 0 {
                    return None;
                }
                let n = left.min(64 * 1024);
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; n as usize]))),
                    left - n,
                ))
            });
            Response::new(BodyExt::boxed(StreamBody::new(chunks)))
        }
        "/hop" => Response::builder()
            .header(header::CONNECTION, "x-hop-secret, keep-alive")
            .header("x-hop-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-end-to-end", "kept")
            .body(full(name.to_string()))
            .unwrap(),
        _ => Response::builder()
            .header("x-replica", name.to_string())
            .body(full(name.to_string()))
            .unwrap(),
    };
    Ok(resp)
}

/// A body of `abc` that then stays open without another byte (a stalled replica).
fn abc_then_nothing<E: Send + Sync + 'static>() -> BoxBody<Bytes, E> {
    let first = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(b"abc")))]);
    BodyExt::boxed(StreamBody::new(
        first.chain(futures_util::stream::pending()),
    ))
}

fn query_num_from(path: &str, key: &str) -> u64 {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// gangway running in-process on 127.0.0.1:0.
pub struct Gangway {
    pub addr: SocketAddr,
    /// The https listener, when the config has `listen.https`.
    pub https_addr: Option<SocketAddr>,
    /// The admin listener (on unless the config says `admin: off`).
    pub admin_addr: Option<SocketAddr>,
    pub stop: CancellationToken,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl Gangway {
    /// Starts with the system resolver (upstreams given as IP:port).
    pub async fn start(yaml: &str) -> Gangway {
        Self::start_with(yaml, Arc::new(SystemResolver::new())).await
    }

    pub async fn start_with(yaml: &str, resolver: Arc<dyn Resolve>) -> Gangway {
        Self::launch(yaml, resolver, None).await
    }

    /// Starts from a config file that gangway watches and reloads; `trigger` stands in for
    /// SIGHUP.
    pub async fn start_reloading(
        path: &std::path::Path,
        resolver: Arc<dyn Resolve>,
        trigger: Arc<tokio::sync::Notify>,
    ) -> Gangway {
        let yaml = std::fs::read_to_string(path).expect("config file");
        let source = gangway::server::ReloadSource {
            path: path.to_owned(),
            trigger,
        };
        Self::launch(&yaml, resolver, Some(source)).await
    }

    async fn launch(
        yaml: &str,
        resolver: Arc<dyn Resolve>,
        reload: Option<gangway::server::ReloadSource>,
    ) -> Gangway {
        let config = Config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        // A config with an https listener gets one on another free port.
        let https = match config.listen.https {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind https")),
            None => None,
        };
        let https_addr = https.as_ref().map(|l| l.local_addr().expect("addr"));
        let admin = match config.listen.admin {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind admin")),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let listeners = gangway::server::Listeners {
            http: listener,
            https,
            admin,
        };
        let task = tokio::spawn(gangway::server::run_with_reload(
            config,
            listeners,
            resolver,
            stop.clone(),
            reload,
        ));
        Gangway {
            addr,
            https_addr,
            admin_addr,
            stop,
            task,
        }
    }

    pub fn static_resolver() -> Arc<StaticResolver> {
        Arc::new(StaticResolver::default())
    }
}

impl Drop for Gangway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A config with one catch-all site over `ups`, plus extra top-level YAML.
pub fn catch_all(ups: &[&Upstream], extra: &str) -> String {
    let list: Vec<String> = ups.iter().map(|u| u.addr.to_string()).collect();
    format!(
        "{extra}\nsites:\n  - hosts: [\"*\"]\n    upstreams: [{}]\n",
        list.join(", ")
    )
}

/// A response read whole.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 client connection to gangway.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<BoxBody<Bytes, std::io::Error>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect to gangway");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Client { sender }
    }

    pub async fn send(&mut self, req: Request<BoxBody<Bytes, std::io::Error>>) -> Got {
        self.sender.ready().await.expect("connection ready");
        let resp = self.sender.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Got {
        self.send(request("GET", host, path, &[])).await
    }
}

/// A bodiless request with extra headers.
pub fn request(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Request<BoxBody<Bytes, std::io::Error>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Empty::new().map_err(|never| match never {}).boxed())
        .unwrap()
}

/// One request on a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Got {
    Client::connect(addr).await.get(host, path).await
}

/// An address on which nothing listens (connections are refused).
pub async fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    drop(l);
    a
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw `GET path` for `app.test`, read until gangway closes the connection (10 s at most):
/// the bytes as text, and how long it took.
pub async fn get_until_closed(addr: SocketAddr, path: &str) -> (String, Duration) {
    get_raw_for(addr, path, Duration::from_secs(10)).await
}

/// A raw `GET path` for `app.test`, read until gangway closes the connection or `limit`
/// passes: the bytes as text, and how long it took.
pub async fn get_raw_for(addr: SocketAddr, path: &str, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let req = format!("GET {path} HTTP/1.1\r\nhost: app.test\r\n\r\n");
    let raw = raw_exchange(addr, req.as_bytes(), limit).await;
    (
        String::from_utf8_lossy(&raw).into_owned(),
        started.elapsed(),
    )
}

/// Sends raw bytes and reads until the peer closes or `limit` passes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    out
}

/// What a client that sends its whole request body before it reads anything (as Python's
/// `http.client` and `requests` do) gets back: it writes a `POST /upload` for `host` with
/// `body`, then reads to the end of the connection. Panics, naming `round`, when a write
/// fails (the server reset the connection with the upload unread) or it all takes over 30 s.
pub async fn upload_whole_then_read<S>(s: &mut S, host: &str, body: &[u8], round: usize) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        s.write_all(head.as_bytes()).await.unwrap();
        if let Err(e) = s.write_all(body).await {
            panic!("round {round}: the upload was cut before the answer was read: {e}");
        }
        s.flush().await.unwrap();
        s.read_to_end(&mut got).await.unwrap();
    })
    .await
    .expect("the answer and the end of the connection");
    String::from_utf8_lossy(&got).into_owned()
}

/// The replica's early `413 Payload Too Large`, whole, as the upload tests' replicas send it.
pub fn assert_too_big(text: &str, round: usize) {
    assert!(
        text.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "round {round}: {text}"
    );
    assert!(text.ends_with("\r\n\r\ntoo big!"), "round {round}: {text}");
}
