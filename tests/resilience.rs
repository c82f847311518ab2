//! Replicas that come and go: failover under load, health gating, balancing policies,
//! hot reload.
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// A client loop that sends GETs until stopped and counts every outcome.
struct Load {
    ok: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, path: &'static str) -> Load {
        let ok = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s) = (ok.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut client = Client::connect(addr).await;
            while !s.load(Ordering::SeqCst) {
                let got = client.get("app.test", path).await;
                if got.status == 200 {
                    o.fetch_add(1, Ordering::SeqCst);
                } else {
                    errors.push(format!("{} {}", got.status, got.text()));
                }
            }
            errors
        });
        Load { ok, stop, task }
    }

    async fn wait_for(&self, n: usize) {
        let ok = self.ok.clone();
        let reached = eventually(Duration::from_secs(10), || {
            let ok = ok.clone();
            async move { ok.load(Ordering::SeqCst) >= n }
        })
        .await;
        assert!(reached, "load never reached {n} responses");
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.task.await.expect("load task");
        (self.ok.load(Ordering::SeqCst), errors)
    }
}

fn yaml_for(ups: &[&Upstream], route_extra: &str) -> String {
    let list: Vec<String> = ups.iter().map(|u| u.addr.to_string()).collect();
    format!(
        "sites:\n  - hosts: [\"*\"]\n    upstreams: [{}]\n{route_extra}",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_under_load_fails_no_request() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let gw = Gangway::start(&yaml_for(&[&ups[0], &ups[1], &ups[2]], "")).await;
    let loads: Vec<Load> = (0..4).map(|_| Load::start(gw.addr, "/slow?ms=5")).collect();
    for l in &loads {
        l.wait_for(20).await;
    }
    ups[1].stop();
    for l in &loads {
        let n = l.ok.load(Ordering::SeqCst);
        l.wait_for(n + 50).await;
    }
    let mut total = 0;
    for l in loads {
        let (ok, errors) = l.finish().await;
        assert!(errors.is_empty(), "failed requests: {errors:?}");
        total += ok;
    }
    assert!(total > 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_gating_keeps_traffic_off_unhealthy_replicas_and_readmits_them() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    b.health_status.store(503, Ordering::SeqCst);
    let extra = "    health: {path: /health, interval: 100ms, timeout: 500ms, healthy_after: 2, unhealthy_after: 2}\n";
    let gw = Gangway::start(&yaml_for(&[&a, &b], extra)).await;
    // a becomes healthy after two checks; b never does.
    let up = eventually(Duration::from_secs(5), || async {
        get(gw.addr, "app.test", "/").await.status == 200
    })
    .await;
    assert!(up, "no replica became healthy");
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..20 {
        assert_eq!(c.get("app.test", "/").await.text(), "a");
    }
    assert_eq!(b.hits(), 0, "the unhealthy replica got traffic");
    assert!(b.health_checks.load(Ordering::SeqCst) >= 2);

    // b recovers: it joins after healthy_after passing checks.
    b.health_status.store(200, Ordering::SeqCst);
    let joined = eventually(Duration::from_secs(5), || async {
        get(gw.addr, "app.test", "/").await.text() == "b"
    })
    .await;
    assert!(joined, "b never rejoined");
    let (a0, b0) = (a.hits(), b.hits());
    for _ in 0..10 {
        c.get("app.test", "/").await;
    }
    assert_eq!(
        (a.hits() - a0, b.hits() - b0),
        (5, 5),
        "exact round robin once both are healthy"
    );

    // a fails its checks: after unhealthy_after failures it gets nothing.
    a.health_status.store(500, Ordering::SeqCst);
    let gone = eventually(Duration::from_secs(5), || async {
        let a0 = a.hits();
        for _ in 0..4 {
            get(gw.addr, "app.test", "/").await;
        }
        a.hits() == a0
    })
    .await;
    assert!(gone, "a kept traffic while failing its checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_rejoins_after_its_checks() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let b_addr = b.addr;
    let extra = "    health: {path: /health, interval: 100ms, timeout: 300ms, healthy_after: 2, unhealthy_after: 1}\n";
    let gw = Gangway::start(&yaml_for(&[&a, &b], extra)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(gw.addr, "app.test", "/").await.text() == "b"
        })
        .await
    );
    let load = Load::start(gw.addr, "/");
    load.wait_for(20).await;
    b.stop();
    drop(b);
    let n = load.ok.load(Ordering::SeqCst);
    load.wait_for(n + 100).await;
    // Restart b on the same port.
    let listener = tokio::net::TcpListener::bind(b_addr)
        .await
        .expect("rebind b");
    let b2 = Upstream::serve("b", listener);
    let rejoined = eventually(Duration::from_secs(5), || async { b2.hits() > 0 }).await;
    assert!(rejoined, "restarted b never got traffic");
    assert!(
        b2.health_checks.load(Ordering::SeqCst) >= 2,
        "b took traffic before passing its checks"
    );
    let (_, errors) = load.finish().await;
    assert!(errors.is_empty(), "failed requests: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_replica_drains_its_slow_request() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let resolver = Gangway::static_resolver();
    resolver.set("app", vec![a.addr, b.addr]);
    let yaml = "sites:\n  - hosts: [\"*\"]\n    upstreams: [app:80]\n    resolve_every: 100ms\n";
    let gw = Gangway::start_with(yaml, resolver.clone()).await;
    // Round robin: the first request goes to a, which is slow.
    let slow = tokio::spawn(get(gw.addr, "app.test", "/slow?ms=1500"));
    let sent = eventually(Duration::from_secs(5), || async { a.hits() == 1 }).await;
    assert!(sent);
    resolver.set("app", vec![b.addr]);
    let gone = eventually(Duration::from_secs(5), || async {
        let a0 = a.hits();
        for _ in 0..4 {
            get(gw.addr, "app.test", "/").await;
        }
        a.hits() == a0
    })
    .await;
    assert!(gone, "a still gets new requests after leaving DNS");
    let got = slow.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.text(),
        "a",
        "the request in flight on the removed replica finished"
    );
}

#[tokio::test]
async fn weights_are_exact_over_a_cycle() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let extra = format!("    weights: {{\"{}\": 3}}\n", a.addr);
    let gw = Gangway::start(&yaml_for(&[&a, &b], &extra)).await;
    let mut c = Client::connect(gw.addr).await;
    let mut order = String::new();
    for _ in 0..8 {
        order.push_str(&c.get("app.test", "/").await.text());
    }
    assert_eq!((a.hits(), b.hits()), (6, 2));
    assert_eq!(order, "aabaaaba", "smooth weighted order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_prefers_the_idle_replica() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = Gangway::start(&yaml_for(&[&a, &b], "    balance: least_conn\n")).await;
    // Occupy one replica with slow requests.
    let slow: Vec<_> = (0..3)
        .map(|_| tokio::spawn(get(gw.addr, "app.test", "/slow?ms=1500")))
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.hits() + b.hits() == 3
        })
        .await
    );
    let busy = if a.hits() >= 2 { "a" } else { "b" };
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..10 {
        let got = c.get("app.test", "/").await;
        assert_ne!(got.text(), busy, "a request went to the busy replica");
    }
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn ip_hash_keeps_each_client_on_one_replica() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let yaml = format!(
        "trusted_proxies: [127.0.0.1/32]\n{}",
        yaml_for(&[&ups[0], &ups[1], &ups[2]], "    balance: ip_hash\n")
    );
    let gw = Gangway::start(&yaml).await;
    let mut c = Client::connect(gw.addr).await;
    let mut seen = std::collections::HashSet::new();
    for i in 1..=30u8 {
        let client_ip = format!("198.51.100.{i}");
        let first = c
            .send(request(
                "GET",
                "app.test",
                "/",
                &[("x-forwarded-for", client_ip.as_str())],
            ))
            .await
            .text();
        for _ in 0..3 {
            let again = c
                .send(request(
                    "GET",
                    "app.test",
                    "/",
                    &[("x-forwarded-for", client_ip.as_str())],
                ))
                .await
                .text();
            assert_eq!(again, first, "client {client_ip} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "30 clients spread over all three replicas");
}

#[tokio::test]
async fn cookie_stickiness_and_failover() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = Gangway::start(&yaml_for(&[&a, &b], "    balance: cookie\n")).await;
    let mut c = Client::connect(gw.addr).await;
    let first = c.get("app.test", "/").await;
    let set = first
        .headers
        .get("set-cookie")
        .expect("a sticky cookie")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(set.starts_with("gw_sticky="), "{set}");
    assert!(set.contains("HttpOnly") && set.contains("Path=/"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let who = first.text();
    for _ in 0..10 {
        let got = c
            .send(request(
                "GET",
                "app.test",
                "/",
                &[("cookie", cookie.as_str())],
            ))
            .await;
        assert_eq!(got.text(), who);
        assert!(
            got.headers.get("set-cookie").is_none(),
            "no new cookie while sticky"
        );
    }
    // Its replica goes away: the request goes elsewhere and gets a new cookie.
    let (gone, other) = if who == "a" { (&a, "b") } else { (&b, "a") };
    gone.stop();
    let got = c
        .send(request(
            "GET",
            "app.test",
            "/",
            &[("cookie", cookie.as_str())],
        ))
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), other);
    assert!(got.headers.get("set-cookie").is_some());
}

#[tokio::test]
async fn all_replicas_down_is_a_503_with_retry_after() {
    let a = Upstream::start("a").await;
    a.health_status.store(503, Ordering::SeqCst);
    let extra = "    health: {path: /health, interval: 100ms, timeout: 300ms}\n";
    let gw = Gangway::start(&yaml_for(&[&a], extra)).await;
    let got = get(gw.addr, "app.test", "/").await;
    assert_eq!(got.status, 503);
    assert_eq!(got.text(), "503 no healthy replica\n");
    assert_eq!(got.headers.get("retry-after").unwrap(), "1");
}

/// A loopback address that was free a moment ago (for a listener gangway binds itself).
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// gangway reloading `path` when the file changes (no SIGHUP stand-in needed).
async fn watching(path: &std::path::Path) -> Gangway {
    Gangway::start_reloading(
        path,
        Gangway::static_resolver(),
        Arc::new(tokio::sync::Notify::new()),
    )
    .await
}

fn write_config(path: &std::path::Path, yaml: &str) {
    // Replace by rename, as compose and Kubernetes do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_by_file_adds_a_replica_and_rejects_a_bad_edit_without_dropping_anything() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gangway.yaml");
    write_config(&path, &yaml_for(&[&a], ""));
    let trigger = Arc::new(tokio::sync::Notify::new());
    let gw = Gangway::start_reloading(&path, Gangway::static_resolver(), trigger).await;
    assert_eq!(get(gw.addr, "app.test", "/").await.text(), "a");

    // A WebSocket and a slow request opened before the reload.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();
    let slow = tokio::spawn(get(gw.addr, "app.test", "/slow?ms=1500"));
    let load = Load::start(gw.addr, "/");
    load.wait_for(10).await;

    write_config(&path, &yaml_for(&[&a, &b], ""));
    let started = std::time::Instant::now();
    let joined = eventually(Duration::from_secs(1), || async { b.hits() > 0 }).await;
    assert!(
        joined,
        "b got no traffic within 1 s of the edit ({:?})",
        started.elapsed()
    );

    // An invalid edit is rejected: the old config keeps serving both replicas.
    write_config(
        &path,
        "sites:\n  - hosts: [\"*\"]\n    upstreams: [nope]\n    colour: red\n",
    );
    tokio::time::sleep(Duration::from_millis(600)).await; // let the watcher see and reject it
    let (a0, b0) = (a.hits(), b.hits());
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..10 {
        assert_eq!(c.get("app.test", "/").await.status, 200);
    }
    assert!(a.hits() > a0 && b.hits() > b0, "both replicas still serve");

    ws.send(Message::text("still here")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "still here");
    assert_eq!(slow.await.unwrap().status, 200);
    let (_, errors) = load.finish().await;
    assert!(
        errors.is_empty(),
        "requests failed across the reloads: {errors:?}"
    );
}

#[tokio::test]
async fn a_reload_applies_a_routes_new_upstream_timeout() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gangway.yaml");
    write_config(&path, &yaml_for(&[&a], ""));
    let gw = watching(&path).await;
    assert_eq!(get(gw.addr, "app.test", "/slow?ms=800").await.status, 200);
    write_config(
        &path,
        &yaml_for(&[&a], "    timeouts: {upstream_header: 300ms}\n"),
    );
    let applied = eventually(Duration::from_secs(5), || async {
        get(gw.addr, "app.test", "/slow?ms=800").await.status == 504
    })
    .await;
    assert!(applied, "the route's new upstream_header never took effect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_on_trigger_keeps_health_state_and_websockets() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    b.health_status.store(503, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gangway.yaml");
    let health = "    health: {path: /health, interval: 100ms, timeout: 300ms, healthy_after: 1}\n";
    // Write without changing the file's identity later: the trigger (SIGHUP) must do it.
    std::fs::write(&path, yaml_for(&[&a, &b], health)).unwrap();
    let trigger = Arc::new(tokio::sync::Notify::new());
    let gw = Gangway::start_reloading(&path, Gangway::static_resolver(), trigger.clone()).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(gw.addr, "app.test", "/").await.text() == "a"
        })
        .await
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();

    // Reload with a second site added; b stays unhealthy across the reload.
    let c = Upstream::start("c").await;
    let yaml = format!(
        "{}  - hosts: [other.test]\n    upstreams: [{}]\n",
        yaml_for(&[&a, &b], health),
        c.addr
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, yaml.as_bytes()).unwrap();
    drop(f);
    trigger.notify_one();
    assert!(
        eventually(Duration::from_secs(2), || async {
            get(gw.addr, "other.test", "/").await.text() == "c"
        })
        .await,
        "the new site never appeared"
    );
    for _ in 0..10 {
        assert_eq!(
            get(gw.addr, "app.test", "/").await.text(),
            "a",
            "b is still unhealthy"
        );
    }
    ws.send(Message::text("after reload")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "after reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_listen_address_is_rebound_and_the_old_one_drains() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gangway.yaml");
    let with_listen =
        |listen: &str| format!("listen: {{http: \"{listen}\"}}\n{}", yaml_for(&[&a], ""));
    write_config(&path, &with_listen("127.0.0.1:0"));
    let gw = watching(&path).await;
    assert_eq!(get(gw.addr, "app.test", "/").await.text(), "a");
    // A request in flight on the old listener while it is replaced.
    let slow = tokio::spawn(get(gw.addr, "app.test", "/slow?ms=1500"));
    assert!(eventually(Duration::from_secs(5), || async { a.hits() == 2 }).await);

    let new_addr = free_addr();
    write_config(&path, &with_listen(&new_addr.to_string()));
    let moved = eventually(Duration::from_secs(5), || async {
        match tokio::net::TcpStream::connect(new_addr).await {
            Ok(_) => get(new_addr, "app.test", "/").await.text() == "a",
            Err(_) => false,
        }
    })
    .await;
    assert!(moved, "the new address never served");
    let closed = eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(gw.addr).await.is_err()
    })
    .await;
    assert!(closed, "the old listener still accepts");
    assert_eq!(
        slow.await.unwrap().text(),
        "a",
        "the request on the old listener finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_admin_address_is_rebound_and_admin_off_closes_it() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gangway.yaml");
    let with_admin = |admin: &str| {
        format!(
            "listen: {{http: \"127.0.0.1:0\", admin: \"{admin}\"}}\n{}",
            yaml_for(&[&a], "")
        )
    };
    write_config(&path, &with_admin("127.0.0.1:0"));
    let gw = watching(&path).await;
    let old_admin = gw.admin_addr.expect("admin listener");
    assert_eq!(get(old_admin, "admin", "/healthz").await.status, 200);

    let new_admin = free_addr();
    write_config(&path, &with_admin(&new_admin.to_string()));
    let moved = eventually(Duration::from_secs(5), || async {
        match tokio::net::TcpStream::connect(new_admin).await {
            Ok(_) => get(new_admin, "admin", "/healthz").await.status == 200,
            Err(_) => false,
        }
    })
    .await;
    assert!(moved, "the admin endpoint never served on its new address");
    let closed = eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(old_admin).await.is_err()
    })
    .await;
    assert!(closed, "the old admin listener still accepts");
    // The proxy itself never stopped serving.
    assert_eq!(get(gw.addr, "app.test", "/").await.text(), "a");

    write_config(
        &path,
        &format!(
            "listen: {{http: \"127.0.0.1:0\", admin: off}}\n{}",
            yaml_for(&[&a], "")
        ),
    );
    let off = eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(new_admin).await.is_err()
    })
    .await;
    assert!(off, "admin: off left the admin endpoint listening");
    assert_eq!(get(gw.addr, "app.test", "/").await.text(), "a");
}

/// A replica that closes a kept-alive connection just as the next request arrives (what a
/// replica shutting down does): the request is sent again on a new connection, and the
/// client gets its answer, even with no other replica to retry on.
#[tokio::test]
async fn a_request_that_meets_a_closing_keep_alive_connection_is_resent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // Answers the first request, reads the second and closes without a word.
                let mut buf = Vec::new();
                for answered in [true, false] {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    if answered {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let gw = Gangway::start(&format!(
        "sites:\n  - hosts: [\"*\"]\n    upstreams: [{addr}]\n"
    ))
    .await;
    for i in 0..5 {
        let got = get(gw.addr, "app.test", &format!("/{i}")).await;
        assert_eq!(got.status, 200, "request {i}: {}", got.text());
        assert_eq!(got.text(), "ok");
    }
    // Each request after the first met the pooled connection closing, then got a new one.
    assert_eq!(connections.load(Ordering::SeqCst), 5);
}
