//! Long-lived and large traffic: WebSocket, big uploads and downloads, client timeouts,
//! malformed requests.
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn websocket_echoes_through_round_robin_replicas() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = Gangway::start(&catch_all(&[&a, &b], "")).await;
    for i in 0..4 {
        let url = format!("ws://{}/ws", gw.addr);
        let (mut ws, resp) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket handshake");
        assert_eq!(resp.status(), 101);
        for j in 0..3 {
            assert_echoes(&mut ws, &format!("hello {i}.{j}")).await;
        }
        ws.close(None).await.unwrap();
    }
    assert_eq!((a.hits(), b.hits()), (2, 2));
    assert_eq!(a.last().headers.get("upgrade").unwrap(), "websocket");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `text` and expects it back within 5 s.
async fn assert_echoes(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_owned())).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("stream open")
        .expect("frame");
    assert_eq!(echo.into_text().unwrap().as_str(), text);
}

/// Peak resident memory of this test process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[tokio::test]
async fn a_1_gib_upload_streams_with_bounded_memory() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 256 * 1024;
    let up = Upstream::start("sink").await;
    let gw = Gangway::start(&catch_all(&[&up], "")).await;
    let before = peak_rss();
    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    let stream = futures_util::stream::iter(
        (0..TOTAL / CHUNK as u64)
            .map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
    );
    let req = http::Request::post("/upload")
        .header("host", "x.test")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    let mut c = Client::connect(gw.addr).await;
    let got = c.send(req).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.text(),
        TOTAL.to_string(),
        "upstream received every byte"
    );
    assert_eq!(up.last().body_len, TOTAL);
    let grown = peak_rss().saturating_sub(before);
    assert!(
        grown < 128 << 20,
        "peak memory grew by {} MiB for a 1 GiB upload",
        grown >> 20
    );
}

#[tokio::test]
async fn a_large_download_streams_whole() {
    let up = Upstream::start("src").await;
    let gw = Gangway::start(&catch_all(&[&up], "")).await;
    let got = get(gw.addr, "x.test", "/big?bytes=50000000").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), 50_000_000);
    assert!(got.body.iter().all(|b| *b == b'x'));
}

#[tokio::test]
async fn malformed_requests_get_400_and_a_closed_connection() {
    let up = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&up], "")).await;
    let cases: [&[u8]; 3] = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
    ];
    for raw in cases {
        let out = raw_exchange(gw.addr, raw, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{:?} got {text:?}",
            String::from_utf8_lossy(raw)
        );
    }
    // HTTP/1.1 without Host.
    let out = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"));
    assert_eq!(up.hits(), 0, "nothing malformed reached the upstream");
}

#[tokio::test]
async fn slowloris_is_cut_at_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(
        &[&up],
        "timeouts:\n  client_header: 500ms\n  client_idle: 30s",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    // One header byte every 100 ms: each keeps the socket busy, none completes the head.
    let dripping = async {
        for b in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: "
            .iter()
            .chain(b"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz")
        {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), dripping).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(500),
        "closed after {took:?}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn idle_keep_alive_is_closed_but_busy_connections_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(
        &[&up],
        "timeouts:\n  client_header: 300ms\n  client_idle: 600ms",
    ))
    .await;

    // A request slower than both client timeouts still completes: they do not apply while
    // gangway is waiting for the upstream.
    let got = get(gw.addr, "x.test", "/slow?ms=1200").await;
    assert_eq!(got.status, 200);

    // An idle connection gets its idle time (longer than the header limit), then is closed.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(500),
        "closed too early: {idle:?}"
    );
    assert!(
        idle < Duration::from_millis(2000),
        "closed too late: {idle:?}"
    );
}

/// A connection's timer is not moved on every request: it stays armed for an earlier
/// deadline and is set again when it fires early. A kept-alive connection that sends a
/// request every 30 ms, under a 120 ms header limit and a 50 ms park delay, must be served
/// throughout (no early expiry is taken for a real one); one that then starts a request
/// head and stalls must be cut at the header limit counted from its first byte, not at the
/// park delay and not at the idle limit.
#[tokio::test]
async fn a_steady_connection_outlives_its_early_timers_and_a_stalled_head_is_cut_on_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(
        &[&up],
        "timeouts:\n  client_header: 120ms\n  client_idle: 30s",
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..15 {
        conn.write_all(format!("GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut conn, &mut buf).await,
            (200, "a".into()),
            "request {i}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(up.hits(), 15);
    // A last request; straight after its answer (before the park delay), half a head,
    // then silence.
    conn.write_all(b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut conn, &mut buf).await, (200, "a".into()));
    let started = Instant::now();
    conn.write_all(b"GET /stalled HTTP/1.1\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(100),
        "cut too early: {took:?}"
    );
    assert!(took < Duration::from_millis(1000), "cut too late: {took:?}");
    assert_eq!(up.hits(), 16, "the stalled head never reached the replica");
}

/// Reads one HTTP/1.1 response with a Content-Length body from a raw connection.
async fn read_response(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head[9..12].parse().expect("status code");
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                buf.drain(..end + 4 + len);
                return (status, body);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed while waiting for a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// gangway's count of parked connections, from its metrics.
async fn parked(gw: &Gangway) -> u64 {
    let got = get(gw.admin_addr.expect("admin listener"), "admin", "/metrics").await;
    let text = got.text();
    text.lines()
        .find_map(|l| l.strip_prefix("gangway_connections_parked "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no gangway_connections_parked in:\n{text}"))
}

/// Waits until exactly `n` connections are parked.
async fn wait_parked(gw: &Gangway, n: u64) {
    let ok = eventually(Duration::from_secs(5), || async { parked(gw).await == n }).await;
    assert!(
        ok,
        "{n} parked connections expected, metrics say {}",
        parked(gw).await
    );
}

/// An idle keep-alive connection gives up hyper's buffers after 50 ms (it is parked) and
/// must then serve exactly as before: a later request, two pipelined ones, and a request
/// head split across a pause all get their answers on the same connection. Parking also
/// drops the connection's cached forwarding headers: each request, under whichever Host,
/// must still reach the replica with exactly its own.
#[tokio::test]
async fn a_parked_keep_alive_connection_serves_on() {
    use tokio::io::AsyncWriteExt;
    let a = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&a], "")).await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    let host = |path: &str| match path {
        "/two" | "/four" => "two.test:8080",
        _ => "app.test",
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", host(path));

    conn.write_all(get("/one").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut conn, &mut buf).await, (200, "a".into()));
    wait_parked(&gw, 1).await;
    conn.write_all(get("/two").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut conn, &mut buf).await, (200, "a".into()));
    wait_parked(&gw, 1).await;
    conn.write_all(format!("{}{}", get("/three"), get("/four")).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut conn, &mut buf).await, (200, "a".into()));
    assert_eq!(read_response(&mut conn, &mut buf).await, (200, "a".into()));
    wait_parked(&gw, 1).await;
    let split = get("/five");
    conn.write_all(&split.as_bytes()[..10]).await.unwrap();
    // A deliberate pause in the middle of the head, longer than the park delay.
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.write_all(&split.as_bytes()[10..]).await.unwrap();
    assert_eq!(read_response(&mut conn, &mut buf).await, (200, "a".into()));

    let paths: Vec<String> = a
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(paths, ["/one", "/two", "/three", "/four", "/five"]);
    let seen = a.seen.lock().unwrap().clone();
    let mut ids = std::collections::HashSet::new();
    for s in &seen {
        let h = |name: &str| {
            let all: Vec<_> = s.headers.get_all(name).iter().collect();
            assert_eq!(all.len(), 1, "{}: {name} {all:?}", s.path);
            all[0].to_str().unwrap().to_string()
        };
        let host = host(&s.path);
        // The port of Host, else the one the client connected to.
        let port = match host.split_once(':') {
            Some((_, port)) => port.to_string(),
            None => gw.addr.port().to_string(),
        };
        assert_eq!(h("host"), host, "{}", s.path);
        assert_eq!(h("x-forwarded-for"), "127.0.0.1", "{}", s.path);
        assert_eq!(h("x-forwarded-proto"), "http", "{}", s.path);
        assert_eq!(h("x-forwarded-host"), host, "{}", s.path);
        assert_eq!(h("x-forwarded-port"), port, "{}", s.path);
        assert_eq!(
            h("forwarded"),
            // RFC 7239: quoted only when not a token (a port's colon).
            if host.contains(':') {
                format!("for=127.0.0.1;host=\"{host}\";proto=http")
            } else {
                format!("for=127.0.0.1;host={host};proto=http")
            },
            "{}",
            s.path
        );
        assert!(
            ids.insert(h("x-request-id")),
            "{}: a repeated request id",
            s.path
        );
    }
    assert_eq!(
        a.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection, reused throughout"
    );
    drop(conn);
    wait_parked(&gw, 0).await;
}

/// Every idle keep-alive connection is parked, a busy one is not, and each parked one
/// answers its next request.
#[tokio::test]
async fn idle_connections_are_parked_and_a_slow_response_is_not() {
    use tokio::io::AsyncWriteExt;
    const N: usize = 20;
    let a = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&a], "")).await;
    let host = |path: &str| match path {
        "/two" | "/four" => "two.test:8080",
        _ => "app.test",
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", host(path));
    let mut conns = Vec::new();
    for _ in 0..N {
        let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let mut buf = Vec::new();
        conn.write_all(get("/").as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut conn, &mut buf).await, (200, "a".into()));
        conns.push((conn, buf));
    }
    wait_parked(&gw, N as u64).await;

    // One connection waits 1.5 s for its upstream: it must stay unparked meanwhile.
    let (slow, slow_buf) = &mut conns[0];
    slow.write_all(get("/slow?ms=1500").as_bytes())
        .await
        .unwrap();
    wait_parked(&gw, N as u64 - 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        parked(&gw).await,
        N as u64 - 1,
        "a busy connection was parked"
    );
    assert_eq!(read_response(slow, slow_buf).await, (200, "a".into()));

    for (conn, buf) in &mut conns {
        conn.write_all(get("/again").as_bytes()).await.unwrap();
        assert_eq!(read_response(conn, buf).await, (200, "a".into()));
    }
    assert_eq!(a.hits(), 2 * N + 1);
    drop(conns);
    wait_parked(&gw, 0).await;
}

/// A WebSocket that stays silent for longer than the park delay is a tunnel, not an idle
/// HTTP connection: it must not be cut.
#[tokio::test]
async fn a_quiet_websocket_is_not_parked() {
    let a = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&a], "")).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .expect("websocket handshake");
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_echoes(&mut ws, &format!("after a pause {i}")).await;
    }
}
