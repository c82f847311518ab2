mod common;

use common::*;

#[tokio::test]
async fn round_robin_is_exact() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let gw = Gangway::start(&catch_all(&[&ups[0], &ups[1], &ups[2]], "")).await;
    let mut client = Client::connect(gw.addr).await;
    for _ in 0..301 {
        let got = client.get("app.test", "/").await;
        assert_eq!(got.status, 200);
    }
    let mut hits: Vec<usize> = ups.iter().map(|u| u.hits()).collect();
    hits.sort();
    assert_eq!(hits, vec![100, 100, 101]);
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_client_are_rebuilt() {
    let up = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&up], "trusted_proxies: [10.0.0.0/8]")).await;
    let mut c = Client::connect(gw.addr).await;
    let spoofed = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-ssl", "on"),
        ("forwarded", "for=6.6.6.6;proto=https"),
    ];
    let got = c
        .send(request("GET", "App.Example.com:8080", "/p?q=1", &spoofed))
        .await;
    assert_eq!(got.status, 200);
    let seen = up.last();
    assert_eq!(seen.path, "/p?q=1");
    assert_eq!(
        header(&seen, "host"),
        Some("App.Example.com:8080"),
        "original Host kept"
    );
    assert_eq!(header(&seen, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(header(&seen, "x-real-ip"), Some("127.0.0.1"));
    assert_eq!(header(&seen, "x-forwarded-proto"), Some("http"));
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        Some("App.Example.com:8080")
    );
    // The port the client connected to, as its Host says.
    assert_eq!(header(&seen, "x-forwarded-port"), Some("8080"));
    assert_eq!(header(&seen, "x-forwarded-prefix"), None);
    assert_eq!(header(&seen, "x-forwarded-ssl"), None);
    assert_eq!(
        header(&seen, "forwarded"),
        Some("for=127.0.0.1;host=\"App.Example.com:8080\";proto=http")
    );
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_proxy_are_extended() {
    let up = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&up], "trusted_proxies: [127.0.0.0/8]")).await;
    let mut c = Client::connect(gw.addr).await;
    let from_lb = [
        ("x-forwarded-for", "203.0.113.9, 127.0.0.5"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example.com"),
        ("x-forwarded-port", "443"),
        ("forwarded", "for=203.0.113.9;proto=https"),
    ];
    c.send(request("GET", "shop.internal", "/", &from_lb)).await;
    let seen = up.last();
    assert_eq!(
        header(&seen, "x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.5, 127.0.0.1")
    );
    assert_eq!(header(&seen, "x-real-ip"), Some("203.0.113.9"));
    assert_eq!(header(&seen, "x-forwarded-proto"), Some("https"));
    assert_eq!(header(&seen, "x-forwarded-host"), Some("shop.example.com"));
    assert_eq!(header(&seen, "x-forwarded-port"), Some("443"));
    assert_eq!(
        header(&seen, "forwarded"),
        Some("for=203.0.113.9;proto=https, for=127.0.0.1;host=shop.internal;proto=http")
    );
}

#[tokio::test]
async fn strip_prefix_and_longest_prefix_routing() {
    let v1 = Upstream::start("v1").await;
    let root = Upstream::start("root").await;
    let yaml = format!(
        "sites:\n  - hosts: [api.example.com]\n    routes:\n      - path: /v1/\n        strip_prefix: true\n        upstreams: [{}]\n      - path: /\n        upstreams: [{}]\n",
        v1.addr, root.addr
    );
    let gw = Gangway::start(&yaml).await;
    let mut c = Client::connect(gw.addr).await;

    let got = c.get("api.example.com", "/v1/users/7?x=1").await;
    assert_eq!(got.text(), "v1");
    let seen = v1.last();
    assert_eq!(seen.path, "/users/7?x=1");
    assert_eq!(header(&seen, "x-forwarded-prefix"), Some("/v1"));

    assert_eq!(c.get("api.example.com", "/v1").await.text(), "v1");
    assert_eq!(v1.last().path, "/");

    assert_eq!(c.get("api.example.com", "/v1x").await.text(), "root");
    assert_eq!(root.last().path, "/v1x");
    assert_eq!(header(&root.last(), "x-forwarded-prefix"), None);

    // No catch-all site: an unknown host is a 404, never another site's upstream.
    // Without a port in Host, X-Forwarded-Port is the listener's.
    let port = gw.addr.port().to_string();
    assert_eq!(
        header(&root.last(), "x-forwarded-port"),
        Some(port.as_str())
    );

    let got = c.get("other.example.com", "/").await;
    assert_eq!(got.status, 404);
    assert_eq!(got.text(), "404 no site for this host\n");
    assert_eq!(v1.hits() + root.hits(), 3);
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let up = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&up], "")).await;
    let mut c = Client::connect(gw.addr).await;
    let got = c
        .send(request(
            "GET",
            "a.test",
            "/hop",
            &[
                ("connection", "x-client-secret"),
                ("x-client-secret", "1"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic eA=="),
                ("x-kept", "yes"),
            ],
        ))
        .await;
    assert_eq!(got.status, 200);
    let seen = up.last();
    for h in ["x-client-secret", "te", "proxy-authorization"] {
        assert_eq!(header(&seen, h), None, "{h} reached the upstream");
    }
    assert_eq!(header(&seen, "x-kept"), Some("yes"));
    // hyper's client adds its own keep-alive framing; nothing of the client's Connection.
    assert!(header(&seen, "connection").is_none_or(|v| !v.contains("x-client-secret")));
    for h in ["x-hop-secret", "keep-alive", "proxy-authenticate"] {
        assert!(got.headers.get(h).is_none(), "{h} reached the client");
    }
    assert_eq!(got.headers.get("x-end-to-end").unwrap(), "kept");
}

#[tokio::test]
async fn refused_replica_is_skipped_without_client_errors() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dead = refused_addr().await;
    let yaml = format!(
        "sites:\n  - hosts: [\"*\"]\n    upstreams: [{}, {}, {}]\n",
        a.addr, dead, b.addr
    );
    let gw = Gangway::start(&yaml).await;
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..30 {
        assert_eq!(c.get("x.test", "/").await.status, 200);
    }
    assert_eq!(a.hits() + b.hits(), 30);
    // The dead replica's turns go to the replica after it until passive health takes it
    // out (3 failures), then a and b alternate.
    assert_eq!((a.hits(), b.hits()), (14, 16));
}

#[tokio::test]
async fn every_replica_refusing_is_a_502() {
    let dead1 = refused_addr().await;
    let dead2 = refused_addr().await;
    let yaml = format!("sites:\n  - hosts: [\"*\"]\n    upstreams: [{dead1}, {dead2}]\n");
    let gw = Gangway::start(&yaml).await;
    let got = get(gw.addr, "x.test", "/").await;
    assert_eq!(got.status, 502);
    assert_eq!(got.text(), "502 no replica reachable\n");
    assert_eq!(
        got.headers.get("content-type").unwrap(),
        "text/plain; charset=utf-8"
    );
}

#[tokio::test]
async fn a_name_without_addresses_is_a_503_until_it_resolves() {
    let up = Upstream::start("late").await;
    let resolver = Gangway::static_resolver();
    let yaml = "resolve_every: 100ms\nsites:\n  - hosts: [\"*\"]\n    upstreams: [app:8000]\n";
    let gw = Gangway::start_with(yaml, resolver.clone()).await;
    let got = get(gw.addr, "x.test", "/").await;
    assert_eq!(got.status, 503);
    assert_eq!(got.headers.get("retry-after").unwrap(), "1");
    assert_eq!(got.text(), "503 no replica available\n");

    resolver.set("app", vec![up.addr]);
    let ok = eventually(std::time::Duration::from_secs(5), || async {
        get(gw.addr, "x.test", "/").await.status == 200
    })
    .await;
    assert!(ok, "the route never picked up the resolved replica");
}

#[tokio::test]
async fn replicas_appearing_and_disappearing_are_picked_up() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let resolver = Gangway::static_resolver();
    resolver.set("app", vec![a.addr]);
    let yaml = "resolve_every: 100ms\nsites:\n  - hosts: [\"*\"]\n    upstreams: [app:8000]\n";
    let gw = Gangway::start_with(yaml, resolver.clone()).await;
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..4 {
        assert_eq!(c.get("x.test", "/").await.text(), "a");
    }
    resolver.set("app", vec![a.addr, b.addr]);
    let joined = eventually(std::time::Duration::from_secs(5), || async {
        get(gw.addr, "x.test", "/").await.text() == "b"
    })
    .await;
    assert!(joined, "b never got traffic");
    // Both now share exactly.
    let (a0, b0) = (a.hits(), b.hits());
    for _ in 0..10 {
        c.get("x.test", "/").await;
    }
    assert_eq!((a.hits() - a0, b.hits() - b0), (5, 5));

    resolver.set("app", vec![b.addr]);
    let left = eventually(std::time::Duration::from_secs(5), || async {
        let a0 = a.hits();
        for _ in 0..4 {
            get(gw.addr, "x.test", "/").await;
        }
        a.hits() == a0
    })
    .await;
    assert!(left, "a still gets traffic after leaving DNS");
}

#[tokio::test]
async fn slow_upstream_header_is_a_504() {
    let up = Upstream::start("slow").await;
    let gw = Gangway::start(&catch_all(&[&up], "timeouts:\n  upstream_header: 300ms")).await;
    let started = std::time::Instant::now();
    let got = get(gw.addr, "x.test", "/slow?ms=3000").await;
    assert_eq!(got.status, 504);
    assert_eq!(got.text(), "504 upstream did not answer in time\n");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

/// An upstream connection keeps its response-head timer from one request to the next and
/// moves it only when a deadline comes nearer: armed for the first request's deadline, it
/// fires during the second, which must get its full limit (set again, not a 504); and a
/// request longer than the limit, sent while the timer is still armed for an earlier
/// request's deadline, must be cut at its own limit (the timer set again when it fires).
#[tokio::test]
async fn a_reused_upstream_connection_gives_each_request_its_full_header_limit() {
    use std::time::{Duration, Instant};
    let up = Upstream::start("slow").await;
    let gw = Gangway::start(&catch_all(&[&up], "timeouts:\n  upstream_header: 300ms")).await;
    let mut c = Client::connect(gw.addr).await;
    assert_eq!(c.get("x.test", "/").await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Its deadline is 300 ms from now; the timer is still armed for the first one's.
    let got = c.get("x.test", "/slow?ms=250").await;
    assert_eq!((got.status.as_u16(), got.text().as_str()), (200, "slow"));
    assert_eq!(
        up.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "both requests went over one upstream connection"
    );
    // The timer stays armed for the slow request's deadline, about 50 ms away.
    assert_eq!(c.get("x.test", "/").await.status, 200);
    let started = Instant::now();
    let got = c.get("x.test", "/slow?ms=900").await;
    let took = started.elapsed();
    assert_eq!(got.status, 504);
    assert!(
        took >= Duration::from_millis(250),
        "cut too early: {took:?}"
    );
    assert!(took < Duration::from_millis(800), "cut too late: {took:?}");
}

#[tokio::test]
async fn a_route_with_its_own_upstream_header_answers_504_sooner() {
    let up = Upstream::start("slow").await;
    let gw = Gangway::start(&format!(
        "sites:\n  - hosts: [\"*\"]\n    routes:\n      - path: /api/\n        strip_prefix: true\n        \
         upstreams: [{a}]\n        timeouts: {{upstream_header: 300ms}}\n      - path: /\n        upstreams: [{a}]\n",
        a = up.addr
    ))
    .await;
    let started = std::time::Instant::now();
    let got = get(gw.addr, "x.test", "/api/slow?ms=3000").await;
    assert_eq!(got.status, 504);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    // The other route keeps the top-level 60 s.
    let got = get(gw.addr, "x.test", "/slow?ms=600").await;
    assert_eq!((got.status.as_u16(), got.text().as_str()), (200, "slow"));
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let up = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&up], "")).await;
    let mut c = Client::connect(gw.addr).await;
    for _ in 0..50 {
        assert_eq!(c.get("x.test", "/").await.status, 200);
    }
    for _ in 0..10 {
        assert_eq!(
            get(gw.addr, "x.test", "/big?bytes=100000").await.body.len(),
            100_000
        );
    }
    assert_eq!(up.hits(), 60);
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}
