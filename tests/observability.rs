//! Admin endpoints: health, Prometheus metrics and /status agree with what the replicas
//! received; the debug replica header; the dashboard page.
mod common;

use common::*;

async fn admin_get(gw: &Gangway, path: &str) -> Got {
    get(gw.admin_addr.expect("admin listener"), "admin", path).await
}

fn metric(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_and_status_match_what_each_replica_received() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dead = refused_addr().await;
    let yaml = format!(
        "sites:\n  - hosts: [\"*\"]\n    upstreams: [{}, {}, {}]\n",
        a.addr, dead, b.addr
    );
    let gw = Gangway::start(&yaml).await;
    let mut c = Client::connect(gw.addr).await;
    for i in 0..40 {
        let path = if i % 10 == 0 { "/missing-is-fine" } else { "/" };
        assert_eq!(c.get("app.test", path).await.status, 200);
    }
    let got = get(gw.addr, "app.test", "/slow?ms=1").await;
    assert_eq!(got.status, 200);

    let status = admin_get(&gw, "/status").await;
    assert_eq!(status.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&status.body).expect("JSON");
    let route = &doc["sites"][0]["routes"][0];
    assert_eq!(route["requests"], 41);
    let replicas = route["replicas"].as_array().unwrap();
    let by_addr = |addr: std::net::SocketAddr| {
        replicas
            .iter()
            .find(|r| r["address"] == addr.to_string())
            .unwrap_or_else(|| panic!("{addr} in {replicas:?}"))
    };
    assert_eq!(by_addr(a.addr)["requests"], a.hits() as u64);
    assert_eq!(by_addr(b.addr)["requests"], b.hits() as u64);
    assert_eq!(by_addr(dead)["requests"], 0);
    assert_eq!(by_addr(dead)["health"], "cooling down");
    assert!(by_addr(dead)["connect_failures"].as_u64().unwrap() >= 3);
    assert_eq!(a.hits() + b.hits(), 41);

    let metrics = admin_get(&gw, "/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    for up in [&a, &b] {
        let key = format!(
            "gangway_replica_requests_total{{site=\"*\",route=\"/\",replica=\"{}\",code=\"2xx\"}}",
            up.addr
        );
        assert_eq!(metric(&text, &key), Some(up.hits() as u64), "{key}\n{text}");
    }
    assert_eq!(
        metric(
            &text,
            "gangway_route_requests_total{site=\"*\",route=\"/\",code=\"2xx\"}"
        ),
        Some(41)
    );
    assert_eq!(
        metric(
            &text,
            &format!("gangway_replica_healthy{{site=\"*\",route=\"/\",replica=\"{dead}\"}}")
        ),
        Some(0)
    );
    assert!(
        text.contains(
            "gangway_route_latency_seconds_bucket{site=\"*\",route=\"/\",le=\"+Inf\"} 41"
        )
    );
    assert!(text.contains("gangway_build_info{version=\""));
}

#[tokio::test]
async fn healthz_and_the_debug_replica_header() {
    let a = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&a], "replica_header: true")).await;
    let health = admin_get(&gw, "/healthz").await;
    assert_eq!(
        (health.status.as_u16(), health.text().as_str()),
        (200, "ok\n")
    );
    let got = get(gw.addr, "app.test", "/").await;
    assert_eq!(
        got.headers.get("x-gangway-replica").unwrap(),
        a.addr.to_string().as_str()
    );
    // Off by default.
    let gw2 = Gangway::start(&catch_all(&[&a], "")).await;
    assert!(
        get(gw2.addr, "app.test", "/")
            .await
            .headers
            .get("x-gangway-replica")
            .is_none()
    );
    // The dashboard is one self-contained page.
    let page = admin_get(&gw, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>gangway</title>"));
    assert!(
        !page.text().contains("http://") && !page.text().contains("https://"),
        "no CDN"
    );
}

#[tokio::test]
async fn request_ids_are_generated_unless_a_trusted_proxy_sent_one() {
    let a = Upstream::start("a").await;
    let gw = Gangway::start(&catch_all(&[&a], "trusted_proxies: [10.0.0.0/8]")).await;
    let mut c = Client::connect(gw.addr).await;
    c.send(request(
        "GET",
        "app.test",
        "/",
        &[("x-request-id", "client-chosen")],
    ))
    .await;
    let id = a
        .last()
        .headers
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(id, "client-chosen", "an untrusted client cannot set the id");
    assert_eq!(id.len(), 32);
    let gw2 = Gangway::start(&catch_all(&[&a], "trusted_proxies: [127.0.0.1/32]")).await;
    get(gw2.addr, "app.test", "/").await;
    let mut c2 = Client::connect(gw2.addr).await;
    c2.send(request(
        "GET",
        "app.test",
        "/",
        &[("x-request-id", "lb-7f3a")],
    ))
    .await;
    assert_eq!(a.last().headers.get("x-request-id").unwrap(), "lb-7f3a");
}

/// Runs `gangway load` (the binary) and parses its JSON report.
async fn load_json(args: Vec<String>) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gangway"))
            .arg("load")
            .args(args)
            .output()
    })
    .await
    .unwrap()
    .expect("run gangway load");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_the_exact_distribution() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    // From the X-Gangway-Replica header.
    let gw = Gangway::start(&catch_all(
        &[&ups[0], &ups[1], &ups[2]],
        "replica_header: true",
    ))
    .await;
    let report = load_json(vec![
        format!("http://{}/", gw.addr),
        "-n".into(),
        "300".into(),
        "-c".into(),
        "4".into(),
        "--admin".into(),
        "off".into(),
        "--json".into(),
    ])
    .await;
    assert_eq!(report["requests"], 300);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["replicas_from"], "header");
    let shares = report["replicas"].as_array().unwrap();
    assert_eq!(shares.len(), 3);
    for s in shares {
        assert_eq!(s["requests"], 100, "{report}");
        assert_eq!(s["deviation_points"], 0.0);
    }
    assert_eq!(report["statuses"]["200"], 300);

    // Without the header: from the admin /status before and after.
    let gw2 = Gangway::start(&catch_all(&[&ups[0], &ups[1], &ups[2]], "")).await;
    let report = load_json(vec![
        format!("http://{}/", gw2.addr),
        "-n".into(),
        "150".into(),
        "-c".into(),
        "3".into(),
        "--admin".into(),
        gw2.admin_addr.unwrap().to_string(),
        "--json".into(),
    ])
    .await;
    assert_eq!(report["replicas_from"], "status");
    let counts: Vec<u64> = report["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["requests"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![50, 50, 50], "{report}");
}

#[tokio::test]
async fn answers_for_a_route_without_replicas_are_counted_in_its_traffic() {
    let resolver = Gangway::static_resolver();
    let yaml = "sites:\n  - hosts: [\"*\"]\n    upstreams: [app:8000]\n";
    let gw = Gangway::start_with(yaml, resolver).await;
    for _ in 0..2 {
        assert_eq!(get(gw.addr, "x.test", "/").await.status, 503);
    }
    let text = admin_get(&gw, "/metrics").await.text();
    assert_eq!(
        metric(
            &text,
            "gangway_route_requests_total{site=\"*\",route=\"/\",code=\"5xx\"}"
        ),
        Some(2),
        "{text}"
    );
}
