//! The dashboard in a real headless browser (Debian's chromium): it loads, shows every
//! replica, and its numbers move as traffic flows.
mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

/// Loads `url` in headless Chromium, lets its scripts run for `budget_ms` of virtual time,
/// and returns the DOM; also writes a screenshot when asked.
async fn chromium(url: String, budget_ms: u32, screenshot: Option<&Path>) -> Option<String> {
    let bin = ["chromium", "chromium-browser"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok()
    })?;
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        // Only loopback traffic: no background or update requests.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--no-first-run",
        "--no-pings",
        "--metrics-recording-only",
        "--window-size=1200,700",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--virtual-time-budget={budget_ms}"));
    match screenshot {
        Some(p) => args.push(format!("--screenshot={}", p.display())),
        None => args.push("--dump-dom".into()),
    }
    args.push(url);
    let out =
        tokio::task::spawn_blocking(move || std::process::Command::new(bin).args(args).output())
            .await
            .ok()?
            .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `data-requests` of each replica row, by address.
fn rows(dom: &str) -> Vec<(String, u64)> {
    dom.split("<tr class=\"replica\"")
        .skip(1)
        .filter_map(|row| {
            let addr = row
                .split("data-address=\"")
                .nth(1)?
                .split('"')
                .next()?
                .to_owned();
            let n = row
                .split("data-requests=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()?;
            Some((addr, n))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_replicas_and_follows_traffic() {
    if chromium("about:blank".into(), 10, None).await.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must install chromium (apt-get install chromium)"
        );
        eprintln!("dashboard test did not run: chromium is not installed");
        return;
    }
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let gw = Gangway::start(&catch_all(&[&ups[0], &ups[1], &ups[2]], "")).await;
    let url = format!("http://{}/", gw.admin_addr.expect("admin"));

    let mut c = Client::connect(gw.addr).await;
    for _ in 0..30 {
        c.get("app.test", "/").await;
    }
    let dom = chromium(url.clone(), 3000, None)
        .await
        .expect("chromium ran");
    let first = rows(&dom);
    let mut addrs: Vec<String> = first.iter().map(|(a, _)| a.clone()).collect();
    addrs.sort();
    let mut want: Vec<String> = ups.iter().map(|u| u.addr.to_string()).collect();
    want.sort();
    assert_eq!(addrs, want, "every replica has a row: {dom}");
    assert!(
        first.iter().all(|(_, n)| *n == 10),
        "30 requests, 10 each: {first:?}"
    );

    for _ in 0..60 {
        c.get("app.test", "/").await;
    }
    let second = rows(
        &chromium(url.clone(), 3000, None)
            .await
            .expect("chromium ran"),
    );
    assert!(
        second.iter().all(|(_, n)| *n == 30),
        "the bars follow traffic: {second:?}"
    );

    let shot = std::env::temp_dir().join(format!("gangway-dashboard-{}.png", std::process::id()));
    chromium(url, 3000, Some(&shot))
        .await
        .expect("chromium ran");
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    let _ = std::fs::copy(&shot, "target/dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let _ = Duration::ZERO;
}
