//! gangway's own HTTP/1.1 upstream client (bodiless requests): how it reads what replicas
//! send, byte for byte, and when it reuses a connection. The replicas here are scripted TCP
//! servers, so each test controls the exact bytes on the wire.

mod common;

use common::{
    Client, Gangway, assert_too_big, get, get_raw_for, get_until_closed, raw_exchange, request,
    upload_whole_then_read,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What a scripted replica does after answering a request.
#[derive(Clone, Copy, PartialEq)]
enum After {
    KeepOpen,
    Close,
}

/// A replica that answers each request head with `answer(head)`; counts its connections,
/// reports each connection it closed on `closed` and each one gangway closed on `ended`.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    closed: mpsc::UnboundedReceiver<()>,
    ended: mpsc::UnboundedReceiver<()>,
}

impl Scripted {
    async fn start<F>(answer: F) -> Scripted
    where
        F: Fn(&str) -> (Vec<u8>, After) + Send + Sync + 'static,
    {
        Self::start_paced(answer, None).await
    }

    /// Like `start`, writing the answer in pieces of `piece` bytes, each sent on its own.
    async fn start_paced<F>(answer: F, piece: Option<usize>) -> Scripted
    where
        F: Fn(&str) -> (Vec<u8>, After) + Send + Sync + 'static,
    {
        Self::start_spaced(answer, piece, Duration::from_millis(1), false).await
    }

    /// Like `start_paced`, waiting `gap` after each piece; with `head_whole` the head goes
    /// in one piece and only the body is cut up.
    async fn start_spaced<F>(
        answer: F,
        piece: Option<usize>,
        gap: Duration,
        head_whole: bool,
    ) -> Scripted
    where
        F: Fn(&str) -> (Vec<u8>, After) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let answer = Arc::new(answer);
        let (tx, closed) = mpsc::unbounded_channel();
        let (end_tx, ended) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                let tx = tx.clone();
                let end_tx = end_tx.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await else {
                            let _ = end_tx.send(());
                            return;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let (bytes, after) = answer(&head);
                        let sent = match piece {
                            None => stream.write_all(&bytes).await,
                            Some(n) => {
                                let mut r = Ok(());
                                let split = match bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                                    Some(i) if head_whole => i + 4,
                                    _ => 0,
                                };
                                let (head, body) = bytes.split_at(split);
                                let head = (!head.is_empty()).then_some(head);
                                for p in head.into_iter().chain(body.chunks(n)) {
                                    r = stream.write_all(p).await;
                                    if r.is_err() {
                                        break;
                                    }
                                    tokio::time::sleep(gap).await;
                                }
                                r
                            }
                        };
                        if sent.is_err() || after == After::Close {
                            drop(stream);
                            let _ = tx.send(());
                            return;
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            connections,
            closed,
            ended,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    async fn gangway(&self) -> Gangway {
        self.gangway_with("").await
    }

    /// gangway in front of this replica, with more top-level config.
    async fn gangway_with(&self, extra: &str) -> Gangway {
        Gangway::start(&format!(
            "{extra}\nsites:\n  - hosts: [\"*\"]\n    upstreams: [{}]\n",
            self.addr
        ))
        .await
    }
}

fn keep(bytes: &[u8]) -> (Vec<u8>, After) {
    (bytes.to_vec(), After::KeepOpen)
}

fn closing(bytes: &[u8]) -> (Vec<u8>, After) {
    (bytes.to_vec(), After::Close)
}

#[tokio::test]
async fn a_chunked_response_is_relayed_whole_and_its_connection_reused() {
    // Chunk extensions and a trailer, which are read and dropped.
    let up = Scripted::start(|_| {
        keep(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-app: 1\r\n\r\n\
              5;name=value\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n",
        )
    })
    .await;
    let gw = up.gangway().await;
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..3 {
        let got = c.get("app.test", "/").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "hello, world");
        assert_eq!(got.headers["x-app"], "1");
    }
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn a_response_split_into_single_bytes_is_reassembled() {
    let up = Scripted::start_paced(
        |_| keep(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nx-app: slow\r\n\r\nhello world"),
        Some(1),
    )
    .await;
    let gw = up.gangway().await;
    let got = get(gw.addr, "app.test", "/").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "hello world");
    assert_eq!(got.headers["x-app"], "slow");
    let chunked = Scripted::start_paced(
        |_| {
            keep(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n")
        },
        Some(1),
    )
    .await;
    let gw = chunked.gangway().await;
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..2 {
        assert_eq!(c.get("app.test", "/").await.text(), "abc0123456789abcdef");
    }
    assert_eq!(chunked.connections(), 1);
}

#[tokio::test]
async fn a_response_without_length_is_read_to_the_close_and_not_reused() {
    let up = Scripted::start(|_| closing(b"HTTP/1.1 200 OK\r\nx-app: 1\r\n\r\nuntil close")).await;
    let gw = up.gangway().await;
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..2 {
        let got = c.get("app.test", "/").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "until close");
    }
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn connection_close_and_http_1_0_responses_are_not_reused() {
    // The replicas keep their connections open: gangway must not use them again.
    let close = Scripted::start(|_| {
        keep(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
    })
    .await;
    let old = Scripted::start(|_| keep(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")).await;
    let old_kept = Scripted::start(|_| {
        keep(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok")
    })
    .await;
    for (up, expected) in [(&close, 3), (&old, 3), (&old_kept, 1)] {
        let gw = up.gangway().await;
        let mut c = Client::connect(gw.addr).await;
        for _ in 0..3 {
            assert_eq!(c.get("app.test", "/").await.text(), "ok");
        }
        assert_eq!(up.connections(), expected);
    }
}

#[tokio::test]
async fn hop_by_hop_response_headers_never_reach_the_client() {
    // Two replicas: the usual `Connection: keep-alive`, and one whose `Connection` also
    // names a header of its own. Neither the fixed hop-by-hop headers nor the named one
    // reach the client, and both connections are kept.
    for answer in [
        &b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
           Proxy-Authenticate: Basic\r\nTrailer: x-sum\r\nX-App: 1\r\n\
           Content-Length: 2\r\n\r\nok"[..],
        b"HTTP/1.1 200 OK\r\nX-Secret: s\r\nConnection: keep-alive, X-Secret\r\n\
          Keep-Alive: timeout=5\r\nX-App: 1\r\nContent-Length: 2\r\n\r\nok",
    ] {
        let up = Scripted::start(move |_| keep(answer)).await;
        let gw = up.gangway().await;
        let mut c = Client::connect(gw.addr).await;
        for _ in 0..3 {
            let got = c.get("app.test", "/").await;
            assert_eq!(got.status, 200);
            assert_eq!(got.text(), "ok");
            assert_eq!(got.headers["x-app"], "1");
            for gone in [
                "connection",
                "keep-alive",
                "proxy-authenticate",
                "trailer",
                "x-secret",
            ] {
                assert!(got.headers.get(gone).is_none(), "{gone}: {:?}", got.headers);
            }
        }
        assert_eq!(up.connections(), 1);
    }
}

#[tokio::test]
async fn head_204_and_304_responses_have_no_body_and_keep_the_connection() {
    let up = Scripted::start(|head| {
        if head.starts_with("HEAD ") {
            keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        } else if head.starts_with("GET /204 ") {
            keep(b"HTTP/1.1 204 No Content\r\n\r\n")
        } else if head.starts_with("GET /304 ") {
            keep(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\netag: \"e\"\r\n\r\n")
        } else {
            keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        }
    })
    .await;
    let gw = up.gangway().await;
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..2 {
        let head = c.send(request("HEAD", "app.test", "/", &[])).await;
        assert_eq!(head.status, 200);
        assert_eq!(head.headers["content-length"], "5");
        assert!(head.body.is_empty());
        let none = c.get("app.test", "/204").await;
        assert_eq!((none.status.as_u16(), none.body.len()), (204, 0));
        let same = c.get("app.test", "/304").await;
        assert_eq!((same.status.as_u16(), same.body.len()), (304, 0));
        assert_eq!(same.headers["etag"], "\"e\"");
        assert_eq!(c.get("app.test", "/").await.text(), "hello");
    }
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let up = Scripted::start(|_| {
        keep(
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
              HTTP/1.1 100 Continue\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )
    })
    .await;
    let gw = up.gangway().await;
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..2 {
        let got = c.get("app.test", "/").await;
        assert_eq!((got.status.as_u16(), got.text().as_str()), (200, "ok"));
    }
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn broken_responses_are_502_and_never_reach_the_client() {
    let big_head = {
        let mut h = b"HTTP/1.1 200 OK\r\n".to_vec();
        // 20 headers (well under the count limit) of 3.5 KiB each.
        for i in 0..20 {
            h.extend_from_slice(format!("x-filler-{i}: {}\r\n", "f".repeat(3500)).as_bytes());
        }
        h.extend_from_slice(b"content-length: 2\r\n\r\nok");
        h
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not http", b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()),
        (
            "length and chunked",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "two lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!".to_vec(),
        ),
        ("bad length", b"HTTP/1.1 200 OK\r\ncontent-length: -2\r\n\r\nok".to_vec()),
        ("bad status", b"HTTP/1.1 20 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()),
        ("head of 70 KiB", big_head),
        (
            "101 headers",
            (0..101)
                .fold(b"HTTP/1.1 200 OK\r\n".to_vec(), |mut h, i| {
                    h.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
                    h
                })
                .into_iter()
                .chain(b"content-length: 2\r\n\r\nok".iter().copied())
                .collect(),
        ),
    ];
    for (what, bytes) in cases {
        let up = Scripted::start(move |_| (bytes.clone(), After::Close)).await;
        let gw = up.gangway().await;
        let got = get(gw.addr, "app.test", "/").await;
        assert_eq!(got.status, 502, "{what}");
        assert!(!got.text().contains("ok"), "{what}: {}", got.text());
    }
}

/// A replica whose response is broken gets the request again on another replica (a GET
/// may be resent): that one must see it whole, headers included, even though the first
/// response head was parsed (and failed) after the request went out.
#[tokio::test]
async fn a_request_retried_after_a_broken_response_reaches_the_next_replica_whole() {
    let broken_heads: [&[u8]; 2] = [
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!",
    ];
    for broken_head in broken_heads {
        let broken = Scripted::start(move |_| (broken_head.to_vec(), After::Close)).await;
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let heads = seen.clone();
        let good = Scripted::start(move |head| {
            heads.lock().unwrap().push(head.to_ascii_lowercase());
            keep(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        })
        .await;
        let gw = Gangway::start(&format!(
            "sites:\n  - hosts: [\"*\"]\n    upstreams: [{}, {}]\n",
            broken.addr, good.addr
        ))
        .await;
        let mut client = Client::connect(gw.addr).await;
        for _ in 0..4 {
            let got = client
                .send(request("GET", "app.test", "/x", &[("x-client", "kept")]))
                .await;
            assert_eq!(got.status, 200);
            assert_eq!(got.text(), "ok");
        }
        // Round robin sent two of the four to the broken replica first.
        assert!(
            broken.connections() >= 2,
            "the broken replica was not tried"
        );
        let heads = seen.lock().unwrap().clone();
        assert_eq!(heads.len(), 4);
        for head in heads {
            assert!(head.starts_with("get /x http/1.1\r\n"), "{head}");
            for line in [
                "\r\nhost: app.test",
                "\r\nx-client: kept",
                "\r\nx-forwarded-for: 127.0.0.1",
            ] {
                assert!(head.contains(line), "{line:?} missing in {head}");
            }
        }
    }
}

#[tokio::test]
async fn a_truncated_body_is_cut_short_for_the_client_too() {
    let up =
        Scripted::start(|_| closing(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")).await;
    let gw = up.gangway().await;
    let started = std::time::Instant::now();
    let raw = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nhost: app.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    // The connection was closed at once, not left hanging.
    assert!(started.elapsed() < Duration::from_secs(4));
    // The client never sees a complete response: hyper drops what it had not flushed, or
    // the client gets the length it was promised and fewer bytes.
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.is_empty()
            || (text.contains("content-length: 10\r\n") && text.ends_with("\r\n\r\nabc")),
        "{text:?}"
    );
}

#[tokio::test]
async fn a_body_that_stalls_longer_than_upstream_read_is_cut_and_its_connection_closed() {
    // Three of the ten bytes promised, then nothing: the replica keeps its socket open.
    let mut up =
        Scripted::start(|_| keep(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")).await;
    let gw = up.gangway_with("timeouts:\n  upstream_read: 400ms").await;
    for round in 1..=2 {
        let (text, took) = get_until_closed(gw.addr, "/").await;
        // The client got the head and the three bytes, then the connection was closed:
        // not before the limit, and long before the test's own 10 s.
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
        assert!(text.contains("content-length: 10\r\n"), "{text:?}");
        assert!(text.ends_with("\r\n\r\nabc"), "{text:?}");
        assert!(took >= Duration::from_millis(380), "cut after {took:?}");
        assert!(took < Duration::from_secs(3), "cut after {took:?}");
        // gangway closed its connection to the replica and never pooled it: each round
        // needs a new one.
        tokio::time::timeout(Duration::from_secs(5), up.ended.recv())
            .await
            .expect("gangway closed the stalled replica connection");
        assert_eq!(up.connections(), round);
    }
}

#[tokio::test]
async fn a_route_with_its_own_upstream_read_waits_longer() {
    // The same stalling replica behind two routes: `/events` allows 5 s of silence, every
    // other path the top-level 300 ms.
    let up = Scripted::start(|_| keep(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")).await;
    let gw = Gangway::start(&format!(
        "timeouts:\n  upstream_read: 300ms\nsites:\n  - hosts: [\"*\"]\n    routes:\n      \
         - path: /events\n        upstreams: [{a}]\n        timeouts: {{upstream_read: 5s}}\n      \
         - path: /\n        upstreams: [{a}]\n",
        a = up.addr
    ))
    .await;
    let (text, took) = get_until_closed(gw.addr, "/").await;
    assert!(text.ends_with("\r\n\r\nabc"), "{text:?}");
    assert!(took < Duration::from_secs(3), "/ cut after {took:?}");
    // /events is still open after 1.5 s (the client gives up then, not gangway).
    let (text, took) = get_raw_for(gw.addr, "/events", Duration::from_millis(1500)).await;
    assert!(
        took >= Duration::from_millis(1450),
        "/events cut after {took:?}"
    );
    assert!(text.ends_with("\r\n\r\nabc"), "{text:?}");
}

#[tokio::test]
async fn a_slow_body_that_keeps_sending_within_upstream_read_is_relayed_whole() {
    // Ten pieces 150 ms apart: 1.5 s in all, three times the limit, but never a pause of
    // 400 ms.
    let up = Scripted::start_spaced(
        |_| keep(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n0123456789abcdefghij"),
        Some(2),
        Duration::from_millis(150),
        true,
    )
    .await;
    let gw = up.gangway_with("timeouts:\n  upstream_read: 400ms").await;
    let started = std::time::Instant::now();
    let got = get(gw.addr, "app.test", "/").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "0123456789abcdefghij");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1300), "{took:?}");
}

#[tokio::test]
async fn an_idle_connection_the_replica_closed_is_not_used_for_a_request_that_cannot_be_resent() {
    // The replica closes each connection after its answer (without saying so). A bodiless
    // POST cannot be resent, so gangway must see the close before it writes.
    let mut up =
        Scripted::start(|_| closing(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")).await;
    let gw = up.gangway().await;
    for i in 0..3 {
        let post = request("POST", "app.test", "/", &[("content-length", "0")]);
        let got = Client::connect(gw.addr).await.send(post).await;
        assert_eq!(
            (got.status.as_u16(), got.text().as_str()),
            (200, "ok"),
            "request {i}"
        );
        tokio::time::timeout(Duration::from_secs(5), up.closed.recv())
            .await
            .expect("the replica closed its connection");
    }
    assert_eq!(up.connections(), 3);
}

/// A replica that echoes each request body back and records each request head; decodes a
/// chunked body itself, so the test sees exactly what gangway framed.
struct Echo {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: mpsc::UnboundedReceiver<String>,
}

async fn read_until(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    pat: &[u8],
) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(pat.len()).position(|w| w == pat) {
            return Some(i + pat.len());
        }
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn read_exact_buf(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    n: usize,
) -> Option<Vec<u8>> {
    while buf.len() < n {
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    Some(buf.drain(..n).collect())
}

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let (tx, heads) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await {
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        buf.drain(..end);
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        let body = if let Some(n) = length {
                            read_exact_buf(&mut stream, &mut buf, n).await
                        } else if head.contains("transfer-encoding: chunked") {
                            let mut body = Vec::new();
                            loop {
                                let Some(end) = read_until(&mut stream, &mut buf, b"\r\n").await
                                else {
                                    return;
                                };
                                let line = String::from_utf8_lossy(&buf[..end - 2]).into_owned();
                                buf.drain(..end);
                                let size =
                                    usize::from_str_radix(line.trim(), 16).expect("chunk size");
                                let Some(data) =
                                    read_exact_buf(&mut stream, &mut buf, size + 2).await
                                else {
                                    return;
                                };
                                if size == 0 {
                                    break;
                                }
                                body.extend_from_slice(&data[..size]);
                            }
                            Some(body)
                        } else {
                            Some(Vec::new())
                        };
                        let Some(body) = body else { return };
                        let _ = tx.send(head);
                        let mut out =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                                .into_bytes();
                        out.extend_from_slice(&body);
                        if stream.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Echo {
            addr,
            connections,
            heads,
        }
    }
}

fn upload(
    host: &str,
    body: Vec<u8>,
    chunked: bool,
) -> hyper::Request<http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>> {
    use http_body_util::BodyExt;
    let mut b = hyper::Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", host);
    if chunked {
        // Sent in three pieces of unknown total length: hyper frames them chunked.
        let pieces: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>> = body
            .chunks(body.len().div_ceil(3))
            .map(|c| Ok(hyper::body::Frame::data(bytes::Bytes::copy_from_slice(c))))
            .collect();
        let stream = futures_util::stream::iter(pieces);
        return b
            .body(http_body_util::StreamBody::new(stream).boxed())
            .unwrap();
    }
    b = b.header("content-length", body.len().to_string());
    b.body(
        http_body_util::Full::new(bytes::Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    )
    .unwrap()
}

#[tokio::test]
async fn request_bodies_reach_the_replica_exactly_with_length_or_chunked() {
    let mut up = Echo::start().await;
    let gw = Gangway::start(&format!(
        "sites:\n  - hosts: [\"*\"]\n    upstreams: [{}]\n",
        up.addr
    ))
    .await;
    let mut c = Client::connect(gw.addr).await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for chunked in [false, true, false] {
        let got = c.send(upload("app.test", body.clone(), chunked)).await;
        assert_eq!(got.status, 200);
        assert!(
            got.body == body,
            "chunked {chunked}: {} bytes back",
            got.body.len()
        );
        let head = up.heads.recv().await.expect("head");
        if chunked {
            assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
            assert!(!head.contains("content-length"), "{head}");
        } else {
            assert!(head.contains("content-length: 300000\r\n"), "{head}");
            assert!(!head.contains("transfer-encoding"), "{head}");
        }
    }
    // Each finished upload left its connection clean for the next request.
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_early_answer_to_an_upload_is_relayed_and_its_connection_dropped() {
    // The replica refuses the upload from its head, without reading the body.
    let up = Scripted::start(|head| {
        if head.starts_with("POST ") {
            keep(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!")
        } else {
            keep(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        }
    })
    .await;
    let gw = up.gangway().await;
    let body = vec![7u8; 8 * 1024 * 1024];
    let got = Client::connect(gw.addr)
        .await
        .send(upload("app.test", body, false))
        .await;
    assert_eq!(got.status, 413);
    assert_eq!(got.text(), "too big!");
    // That connection still holds the unread upload: the next request needs a new one.
    assert_eq!(get(gw.addr, "app.test", "/").await.text(), "ok");
    assert_eq!(up.connections(), 2);
}

/// A replica that refuses an upload from its head and closes at once, the body unread (its
/// kernel then resets the connection), in front of a client that sends its whole body before
/// it reads anything, as Python's `http.client` and `requests` do. Each of the two hops used
/// to lose the answer: gangway's upload to the replica failed with a broken pipe, often
/// before the runtime had seen the 413 arrive (a 502 instead), and gangway closed the
/// client's connection with the upload unread, so the client's own writes failed.
#[tokio::test]
async fn an_early_answer_reaches_a_client_that_sends_its_whole_body_before_reading() {
    let up = Scripted::start(|_| {
        closing(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!")
    })
    .await;
    let gw = up.gangway().await;
    let body = vec![7u8; 16 * 1024 * 1024];
    for round in 0..5 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let text = upload_whole_then_read(&mut s, "app.test", &body, round).await;
        assert_too_big(&text, round);
    }
    assert_eq!(up.connections(), 5, "one replica connection per upload");
}

#[tokio::test]
async fn bytes_a_replica_sends_right_after_its_101_reach_the_client() {
    let up = Scripted::start(|_| {
        keep(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: demo\r\nconnection: upgrade\r\n\r\nHELLO")
    })
    .await;
    let gw = up.gangway().await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: app.test\r\nconnection: upgrade\r\nupgrade: demo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            if buf.ends_with(b"HELLO") {
                return String::from_utf8_lossy(&buf).into_owned();
            }
        }
    })
    .await
    .expect("the 101 and the replica's first bytes");
    assert!(
        got.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{got}"
    );
    assert!(got.to_lowercase().contains("upgrade: demo\r\n"), "{got}");
}
