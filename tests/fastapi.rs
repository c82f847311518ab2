//! A real FastAPI app under uvicorn (`--proxy-headers --forwarded-allow-ips='*'`) behind
//! gangway: the app must see the real client address, the original scheme and host, and build
//! absolute URLs (`url_for`, the trailing-slash redirect) that point back at the client's URL.
//!
//! Needs `python3` with `fastapi` and `uvicorn`. Without them the tests say so on stderr and
//! return, except under CI (`CI=true`), where they fail.

mod common;

use common::*;
use http::header;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long uvicorn may take to import FastAPI and print its port.
const STARTUP: Duration = Duration::from_secs(30);

/// The uvicorn process; killed and reaped on drop. Its stdin is a pipe we hold: the app exits
/// by itself when the pipe closes, so it cannot outlive this test process even if we are killed.
struct App {
    port: u16,
    child: Child,
    _stdin: Option<ChildStdin>,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `Some(reason)` when python3 cannot import fastapi and uvicorn.
fn missing_python_deps() -> Option<String> {
    match Command::new("python3")
        .args(["-c", "import fastapi, uvicorn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`python3 -c \"import fastapi, uvicorn\"` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run python3: {e}")),
    }
}

/// Starts the app, or returns `None` (after saying why) when its Python packages are missing
/// outside CI.
fn start_app(test: &str) -> Option<App> {
    if let Some(why) = missing_python_deps() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "{test}: {why}\nCI must install the app's packages: pip install fastapi uvicorn"
            );
        }
        // Written straight to stderr so that libtest's capture does not hide it.
        let _ = writeln!(
            std::io::stderr().lock(),
            "{test}: did not run: {why} (pip install fastapi uvicorn)"
        );
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/fastapi_app.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn python3 {}: {e}", script.display()));
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("piped stdout");
    // Guard first, so the process is killed however the wait below ends.
    let mut app = App {
        port: 0,
        child,
        _stdin: stdin,
    };

    // Read stdout on a thread (it keeps draining so the app never blocks on a full pipe) and
    // wait for the port line with a deadline.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let port = loop {
        match rx.recv_timeout(STARTUP) {
            Ok(line) => {
                if let Some(p) = line.strip_prefix("PORT ") {
                    break p
                        .trim()
                        .parse::<u16>()
                        .unwrap_or_else(|e| panic!("bad port line {line:?}: {e}"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("fastapi app printed no PORT line within {STARTUP:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = app.child.wait().ok();
                panic!("fastapi app exited before printing its port (status {status:?})")
            }
        }
    };
    app.port = port;
    Some(app)
}

fn config(app: &App, trusted: &str) -> String {
    format!(
        "trusted_proxies: {trusted}\nsites:\n  - hosts: [\"*\"]\n    upstreams: [127.0.0.1:{}]\n",
        app.port
    )
}

/// `GET /info` through gangway, parsed.
async fn info(client: &mut Client, host: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let got = client.send(request("GET", host, "/info", headers)).await;
    assert_eq!(got.status, 200, "GET /info: {}", got.text());
    serde_json::from_slice(&got.body)
        .unwrap_or_else(|e| panic!("GET /info: not JSON ({e}): {}", got.text()))
}

/// `GET /items` through gangway: FastAPI's slash redirect; returns its Location.
async fn items_redirect(client: &mut Client, host: &str, headers: &[(&str, &str)]) -> String {
    let got = client.send(request("GET", host, "/items", headers)).await;
    assert_eq!(got.status, 307, "GET /items: {}", got.text());
    got.headers
        .get(header::LOCATION)
        .expect("307 has a Location")
        .to_str()
        .expect("ASCII Location")
        .to_owned()
}

#[tokio::test]
async fn trusted_proxy_headers_reach_the_app() {
    let Some(app) = start_app("trusted_proxy_headers_reach_the_app") else {
        return;
    };
    let gw = Gangway::start(&config(&app, "[127.0.0.1/32]")).await;
    let mut client = Client::connect(gw.addr).await;
    let sent = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-proto", "https"),
    ];

    let got = info(&mut client, "shop.example.com", &sent).await;
    assert_eq!(got["client_host"], "203.0.113.9", "{got}");
    assert_eq!(got["scheme"], "https", "{got}");
    assert_eq!(got["host"], "shop.example.com", "{got}");
    assert_eq!(got["url"], "https://shop.example.com/info", "{got}");
    assert_eq!(got["url_for"], "https://shop.example.com/info", "{got}");
    // gangway appended its peer (this test, on 127.0.0.1) to the chain it was handed.
    assert_eq!(got["x_forwarded_for"], "203.0.113.9, 127.0.0.1", "{got}");
    assert_eq!(got["forwarded_prefix"], serde_json::Value::Null, "{got}");

    let location = items_redirect(&mut client, "shop.example.com", &sent).await;
    assert_eq!(location, "https://shop.example.com/items/");
}

#[tokio::test]
async fn untrusted_client_cannot_spoof_address_or_scheme() {
    let Some(app) = start_app("untrusted_client_cannot_spoof_address_or_scheme") else {
        return;
    };
    let gw = Gangway::start(&config(&app, "[]")).await;
    let mut client = Client::connect(gw.addr).await;
    let spoofed = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-prefix", "/evil"),
    ];

    let got = info(&mut client, "shop.example.com", &spoofed).await;
    assert_eq!(got["client_host"], "127.0.0.1", "{got}");
    assert_eq!(got["scheme"], "http", "{got}");
    assert_eq!(got["host"], "shop.example.com", "{got}");
    assert_eq!(got["url"], "http://shop.example.com/info", "{got}");
    assert_eq!(got["url_for"], "http://shop.example.com/info", "{got}");
    // The spoofed chain was dropped, not extended: only gangway's own view reaches the app.
    assert_eq!(got["x_forwarded_for"], "127.0.0.1", "{got}");
    assert_eq!(got["forwarded_prefix"], serde_json::Value::Null, "{got}");

    let location = items_redirect(&mut client, "shop.example.com", &spoofed).await;
    assert_eq!(location, "http://shop.example.com/items/");
}

#[tokio::test]
async fn host_port_survives_into_absolute_urls() {
    let Some(app) = start_app("host_port_survives_into_absolute_urls") else {
        return;
    };
    let gw = Gangway::start(&config(&app, "[127.0.0.1/32]")).await;
    let mut client = Client::connect(gw.addr).await;
    let sent = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-proto", "https"),
    ];

    let got = info(&mut client, "shop.example.com:8443", &sent).await;
    assert_eq!(got["client_host"], "203.0.113.9", "{got}");
    assert_eq!(got["host"], "shop.example.com:8443", "{got}");
    assert_eq!(
        got["url_for"], "https://shop.example.com:8443/info",
        "{got}"
    );

    let location = items_redirect(&mut client, "shop.example.com:8443", &sent).await;
    assert_eq!(location, "https://shop.example.com:8443/items/");

    // Without a trusted peer the port is kept too, with the scheme gangway itself saw.
    let gw = Gangway::start(&config(&app, "[]")).await;
    let mut client = Client::connect(gw.addr).await;
    let got = info(&mut client, "shop.example.com:8443", &sent).await;
    assert_eq!(got["client_host"], "127.0.0.1", "{got}");
    assert_eq!(got["url_for"], "http://shop.example.com:8443/info", "{got}");
    let location = items_redirect(&mut client, "shop.example.com:8443", &sent).await;
    assert_eq!(location, "http://shop.example.com:8443/items/");
}
