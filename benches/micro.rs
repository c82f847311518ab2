//! Micro-benchmarks of the per-request hot functions: route lookup, replica selection and
//! the forwarded-header rewrite. `cargo bench --bench micro`; see benches/README.md.
//!
//! Everything is built through the public API, from YAML the way the binary builds it.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use gangway::config::{Balance, Config};
use gangway::proxy::headers::{self, Forwarding, PeerText};
use gangway::proxy::router::Router;
use gangway::upstream::{Backend, PickCtx};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

fn parse(yaml: &str) -> Config {
    Config::parse(yaml, "micro.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// Ten sites: eight exact hosts (one with two names), two wildcards and a catch-all, with
/// two to five path routes each.
const ROUTING_YAML: &str = r#"
sites:
  - hosts: [app.example.com, www.example.com]
    routes:
      - {path: /api/, upstreams: ["app-api:8000"]}
      - {path: /static/, upstreams: ["app-static:8000"]}
      - {path: /ws, upstreams: ["app-ws:8000"]}
      - {path: /, upstreams: ["app:8000"]}
  - hosts: [api.example.com]
    routes:
      - {path: /v1/, strip_prefix: true, upstreams: ["api-v1:8000"]}
      - {path: /v2/, strip_prefix: true, upstreams: ["api-v2:8000"]}
      - {path: /v3/, strip_prefix: true, upstreams: ["api-v3:8000"]}
      - {path: /health, upstreams: ["api-v2:8000"]}
      - {path: /, upstreams: ["api-v2:8000"]}
  - hosts: [shop.example.com]
    routes:
      - {path: /cart/, upstreams: ["cart:8000"]}
      - {path: /checkout/, upstreams: ["checkout:8000"]}
      - {path: /images/, upstreams: ["images:8000"]}
      - {path: /, upstreams: ["shop:8000"]}
  - hosts: [blog.example.com]
    routes:
      - {path: /wp-admin/, upstreams: ["blog-admin:8000"]}
      - {path: /, upstreams: ["blog:8000"]}
  - hosts: [docs.example.com]
    routes:
      - {path: /search, upstreams: ["docs-search:8000"]}
      - {path: /, upstreams: ["docs:8000"]}
  - hosts: [admin.example.com]
    routes:
      - {path: /grafana/, strip_prefix: true, upstreams: ["grafana:3000"]}
      - {path: /prometheus/, strip_prefix: true, upstreams: ["prometheus:9090"]}
      - {path: /alerts/, strip_prefix: true, upstreams: ["alertmanager:9093"]}
  - hosts: [auth.example.com]
    routes:
      - {path: /oauth2/, upstreams: ["auth:9000"]}
      - {path: /, upstreams: ["auth:9000"]}
  - hosts: ["*.preview.example.com"]
    routes:
      - {path: /api/, upstreams: ["preview-api:8000"]}
      - {path: /, upstreams: ["preview:8000"]}
  - hosts: ["*.example.com"]
    routes:
      - {path: /assets/, upstreams: ["tenant-assets:8000"]}
      - {path: /api/, upstreams: ["tenant-api:8000"]}
      - {path: /, upstreams: ["tenant:8000"]}
  - hosts: ["*"]
    routes:
      - {path: /.well-known/, upstreams: ["fallback:8000"]}
      - {path: /, upstreams: ["fallback:8000"]}
"#;

fn route_lookup(c: &mut Criterion) {
    let config = parse(ROUTING_YAML);
    let router = Router::new(&config);
    // (bench name, host, path, the upstream the route must reach; None: no route)
    let cases: [(&str, &str, &str, Option<&str>); 5] = [
        (
            "exact_host",
            "api.example.com",
            "/v2/users/42",
            Some("api-v2"),
        ),
        (
            "wildcard_host",
            "tenant42.example.com",
            "/assets/app.js",
            Some("tenant-assets"),
        ),
        (
            "host_with_port",
            "shop.example.com:8443",
            "/cart/items",
            Some("cart"),
        ),
        (
            "miss_host_to_catch_all",
            "unknown.test",
            "/index.html",
            Some("fallback"),
        ),
        ("miss_path", "admin.example.com", "/login", None),
    ];
    let mut g = c.benchmark_group("route_lookup");
    for (name, host, path, want) in cases {
        let got = router
            .site(host)
            .and_then(|s| s.route(path))
            .map(|r| r.backend.upstreams[0].host.as_str());
        assert_eq!(got, want, "{host}{path}");
        g.bench_function(name, |b| {
            b.iter(|| {
                router
                    .site(black_box(host))
                    .and_then(|s| s.route(black_box(path)))
                    .is_some()
            })
        });
    }
    g.finish();
}

/// A backend with `replicas` members, weight 1, no active health check (all eligible).
fn backend(balance: &str, replicas: usize) -> Backend {
    let config = parse(&format!(
        "sites:\n  - hosts: [lb.example.com]\n    upstreams: [\"app:8000\"]\n    balance: {balance}\n"
    ));
    let route = &config.sites[0].routes[0];
    let backend = Backend::new(
        route.upstreams.clone(),
        route.upstream_protocol,
        route.policy.clone(),
    );
    let addrs = (0..replicas)
        .map(|i| {
            let addr: SocketAddr = format!("172.18.0.{}:8000", i + 2).parse().unwrap();
            (addr, 1)
        })
        .collect();
    backend.set_addrs(addrs);
    backend
}

fn replica_selection(c: &mut Criterion) {
    let ctx = PickCtx {
        client: "203.0.113.7".parse().unwrap(),
        sticky: None,
    };
    let cases = [
        ("round_robin_3", "round_robin", Balance::RoundRobin, 3),
        ("round_robin_32", "round_robin", Balance::RoundRobin, 32),
        ("least_conn_3", "least_conn", Balance::LeastConn, 3),
    ];
    let mut g = c.benchmark_group("replica_pick");
    for (name, balance, expect, n) in cases {
        let backend = backend(balance, n);
        assert_eq!(backend.policy.balance, expect);
        let members = backend.members();
        assert_eq!(members.replicas.len(), n);
        assert!(backend.pick(&members, &ctx, &[]).is_some());
        g.bench_function(name, |b| {
            b.iter(|| backend.pick(black_box(&members), black_box(&ctx), &[]))
        });
    }
    g.finish();
}

/// What a desktop browser sends on a page load (HTTP/1.1), plus `extra`.
fn browser_request(extra: &[(&'static str, &'static str)]) -> HeaderMap {
    let base: [(&'static str, &'static str); 17] = [
        ("host", "app.example.com"),
        ("connection", "keep-alive"),
        ("cache-control", "max-age=0"),
        (
            "sec-ch-ua",
            r#""Chromium";v="136", "Google Chrome";v="136", "Not.A/Brand";v="99""#,
        ),
        ("sec-ch-ua-mobile", "?0"),
        ("sec-ch-ua-platform", r#""Linux""#),
        ("upgrade-insecure-requests", "1"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
             Chrome/136.0.0.0 Safari/537.36",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,\
             image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
        ),
        ("sec-fetch-site", "same-origin"),
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-user", "?1"),
        ("sec-fetch-dest", "document"),
        ("referer", "https://app.example.com/dashboard"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("accept-language", "en-US,en;q=0.9,fr;q=0.8"),
        (
            "cookie",
            "session=4f1c2a9e8b7d6c5f4e3d2c1b0a998877; theme=dark; _ga=GA1.1.123456789.1700000000",
        ),
    ];
    let mut h = HeaderMap::new();
    for (k, v) in base.iter().chain(extra) {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn forwarded_headers(c: &mut Criterion) {
    let config = parse(
        "trusted_proxies: [10.0.0.0/8]\nsites:\n  - hosts: [\"*\"]\n    upstreams: [\"app:8000\"]\n",
    );
    let trusted = config.trusted_proxies.clone();
    let host = HeaderValue::from_static("app.example.com");
    struct Case {
        name: &'static str,
        peer: IpAddr,
        proto: &'static str,
        port: u16,
        request: HeaderMap,
        client: IpAddr,
    }
    let cases = [
        // A browser straight on gangway's HTTPS listener.
        Case {
            name: "untrusted_peer",
            peer: "203.0.113.7".parse().unwrap(),
            proto: "https",
            port: 443,
            request: browser_request(&[]),
            client: "203.0.113.7".parse().unwrap(),
        },
        // The same request through a trusted load balancer that terminated TLS.
        Case {
            name: "trusted_peer_with_xff",
            peer: "10.0.0.5".parse().unwrap(),
            proto: "http",
            port: 80,
            request: browser_request(&[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "app.example.com"),
            ]),
            client: "203.0.113.7".parse().unwrap(),
        },
    ];
    let mut g = c.benchmark_group("forwarded_headers");
    for case in &cases {
        // Made once per connection by the proxy, so outside the timing.
        let conn = PeerText::new(case.peer, case.port);
        let fwd = Forwarding {
            conn: &conn,
            proto: case.proto,
            host: &host,
            prefix: None,
        };
        let rewrite = |mut h: HeaderMap| {
            let upgrade = headers::is_upgrade(&h);
            headers::remove_hop_by_hop(&mut h, upgrade);
            let client = headers::set_forwarding(&mut h, &fwd, &trusted);
            (h, client)
        };
        let (out, client) = rewrite(case.request.clone());
        assert_eq!(client, case.client, "{}", case.name);
        assert!(!out.contains_key("connection"), "{}", case.name);
        assert_eq!(out["x-forwarded-proto"], "https", "{}", case.name);
        // Small fixed batches: with `BatchSize::SmallInput` a batch keeps thousands of maps
        // alive and the figure (about 3x higher, and unstable) measured cache misses and the
        // allocator rather than the rewrite.
        g.bench_function(case.name, |b| {
            b.iter_batched(
                || case.request.clone(),
                |h| rewrite(black_box(h)),
                BatchSize::NumIterations(64),
            )
        });
    }
    // What `Proxy::route` does instead for an untrusted peer's request to an HTTP/1.1
    // replica: the client's claims dropped, and the connection's forwarding block (made on
    // its first request, here before the timing) taken with a new request id.
    let conn = PeerText::new("203.0.113.7".parse().unwrap(), 443);
    let rewrite = |mut h: HeaderMap| {
        let upgrade = headers::is_upgrade(&h);
        headers::remove_hop_by_hop(&mut h, upgrade);
        headers::drop_claims(&mut h, true);
        let added = headers::Added {
            block: conn.forwarding_block(&host, "https", None),
            request_id: 7,
        };
        (h, added)
    };
    let (out, added) = rewrite(browser_request(&[("x-forwarded-for", "198.51.100.1")]));
    assert!(!out.contains_key("connection") && !out.contains_key("x-forwarded-for"));
    assert!(added.block.starts_with(b"x-forwarded-for: 203.0.113.7\r\n"));
    let request = browser_request(&[]);
    g.bench_function("untrusted_peer_http1_block", |b| {
        b.iter_batched(
            || request.clone(),
            |h| rewrite(black_box(h)),
            BatchSize::NumIterations(64),
        )
    });
    g.finish();
}

criterion_group!(benches, route_lookup, replica_selection, forwarded_headers);
criterion_main!(benches);
