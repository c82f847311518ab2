//! Automatic certificates against a real ACME CA: pebble, started by each test on its own
//! ports with validation pointed at gangway's listeners (see `acme_support`).
mod acme_support;
mod common;

use acme_support::*;
use common::Upstream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ISSUE_LIMIT: Duration = Duration::from_secs(45);

const FAILING: &str = "gangway_certificate_renewal_failing";
const NEXT_RENEWAL: &str = "gangway_certificate_next_renewal_timestamp_seconds";
const EXPIRY: &str = "gangway_certificate_expiry_timestamp_seconds";

/// The instance's admin `/metrics` text.
async fn metrics_text(gw: &Instance) -> String {
    let got = common::get(gw.admin_addr.expect("admin listener"), "admin", "/metrics").await;
    assert_eq!(got.status, 200, "{}", got.text());
    got.text()
}

/// Whether `text` has exactly the sample line `line`.
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

fn site(names: &[&str], upstream: &Upstream) -> String {
    format!(
        "  - hosts: [{}]\n    tls: acme\n    upstreams: [{}]\n",
        names.join(", "),
        upstream.addr
    )
}

/// Every file under `<storage>/acme` is 0600 and every folder 0700; returns the file names.
#[cfg(unix)]
fn assert_private(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        let mode = meta.permissions().mode() & 0o777;
        let path = entry.path();
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            files.extend(assert_private(&path));
        } else {
            assert_eq!(mode, 0o600, "{}", path.display());
            files.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    files
}

/// What `gangway certs -c FILE` prints for `yaml`.
fn certs_output(dir: &Path, yaml: &str) -> String {
    let config_path = dir.join("gangway.yaml");
    std::fs::write(&config_path, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gangway"))
        .args(["certs", "-c"])
        .arg(&config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Holds for `window` that `check` stays true (used for "nothing more happens").
async fn stays(window: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + window;
    while Instant::now() < end {
        if !check() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

#[tokio::test]
async fn http01_issues_certificates_for_several_names_with_private_storage() {
    if !pebble_available() {
        return;
    }
    let up = Upstream::start("app").await;
    let bound = Bound::new().await;
    let pebble = Pebble::start(PebbleOptions {
        http_port: bound.http_addr.port(),
        // TLS-ALPN-01 cannot succeed: the certificates below come from HTTP-01.
        tls_port: 1,
        ..PebbleOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("state");
    let sites = site(&["a.example.com", "www.a.example.com"], &up) + &site(&["b.example.com"], &up);
    let yaml = config_yaml(&pebble, &storage, "http-01", &sites);
    let gw = Instance::start(&yaml, bound);

    let roots = roots(&[&pebble.root_pem]);
    let names = ["a.example.com", "www.a.example.com", "b.example.com"];
    let mut serials = Vec::new();
    let mut not_afters = Vec::new();
    for name in names {
        let leaf = until_served(&pebble, gw.https_addr, name, ISSUE_LIMIT).await;
        serials.push(serial(&leaf));
        not_afters.push(not_after(&leaf));
        // The chain verifies against pebble's root, and the site works over it.
        let (status, body) = https_get(gw.https_addr, name, "/hello", &roots)
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "app"));
    }
    // One certificate for both names of the first site, another for the second site.
    assert_eq!(serials[0], serials[1]);
    assert_ne!(serials[0], serials[2]);
    assert_eq!(pebble.orders(), 2, "{}", pebble.log());
    // Plain HTTP for an acme site still redirects (the challenge path aside).
    let got = common::get(gw.http_addr, "a.example.com", "/x").await;
    assert_eq!(got.status, 308);

    // The admin metrics: the renewal series are per certificate, labelled with the site's
    // first name; the expiry series per name. Wait until the manager has recorded the
    // renewal plan of both certificates (status.json is written after the certificate).
    let labels = ["a.example.com", "a.example.com", "b.example.com"];
    let complete = |text: &str| {
        names.iter().zip(labels).all(|(name, label)| {
            sample(text, NEXT_RENEWAL, label).is_some() && sample(text, EXPIRY, name).is_some()
        })
    };
    let scraped = poll(Duration::from_secs(10), || async {
        let text = metrics_text(&gw).await;
        complete(&text).then_some(text)
    })
    .await;
    let text = match scraped {
        Some(text) => text,
        None => panic!(
            "no renewal or expiry metrics for {names:?}:\n{}",
            metrics_text(&gw).await
        ),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for ((name, label), not_after) in names.iter().zip(labels).zip(&not_afters) {
        // Issued without error: the failing gauge is exactly 0.
        assert!(
            has_line(&text, &format!("{FAILING}{{name=\"{label}\"}} 0")),
            "{name}:\n{text}"
        );
        let next = sample(&text, NEXT_RENEWAL, label).unwrap();
        let expiry = sample(&text, EXPIRY, name).unwrap();
        // The expiry is the served certificate's notAfter.
        assert_eq!(expiry, *not_after as f64, "{name}:\n{text}");
        // Renewal is planned in the future, before the certificate expires.
        assert!(
            now < next && next < expiry,
            "{name}: now {now}, next renewal {next}, expiry {expiry}"
        );
        // And it is what storage records (what `gangway certs` prints).
        let recorded = status(&storage, &pebble, label).expect("status.json");
        assert_eq!(
            recorded["next_renewal"].as_f64(),
            Some(next),
            "{name}: {recorded}"
        );
    }

    #[cfg(unix)]
    {
        let files = assert_private(&storage.join("acme"));
        for expected in ["account.json", "certificate.pem", "status.json"] {
            assert!(files.iter().any(|f| f == expected), "{files:?}");
        }
        // Challenge responses were withdrawn after validation.
        let published = std::fs::read_dir(storage.join("acme/challenges/http-01"))
            .unwrap()
            .count();
        assert_eq!(published, 0, "{files:?}");
    }

    // `gangway certs` reports both from storage.
    let text = certs_output(dir.path(), &yaml);
    assert!(
        text.contains("a.example.com, www.a.example.com: valid"),
        "{text}"
    );
    assert!(text.contains("b.example.com: valid"), "{text}");
    assert!(
        text.contains("issuer        CN=Pebble Intermediate CA"),
        "{text}"
    );
    assert!(text.contains("expires"), "{text}");
    assert!(
        text.contains("next renewal") && text.contains("two thirds of the lifetime"),
        "{text}"
    );
    assert!(text.contains("last error    none"), "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn tls_alpn01_issues_a_certificate() {
    if !pebble_available() {
        return;
    }
    let up = Upstream::start("app").await;
    let bound = Bound::new().await;
    let pebble = Pebble::start(PebbleOptions {
        // HTTP-01 cannot succeed: the certificate comes from TLS-ALPN-01.
        http_port: 1,
        tls_port: bound.https_addr.port(),
        ..PebbleOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sites = site(&["alpn.example.com", "two.example.com"], &up);
    let yaml = config_yaml(&pebble, dir.path(), "tls-alpn-01", &sites);
    let gw = Instance::start(&yaml, bound);
    let a = until_served(&pebble, gw.https_addr, "alpn.example.com", ISSUE_LIMIT).await;
    let b = until_served(&pebble, gw.https_addr, "two.example.com", ISSUE_LIMIT).await;
    assert_eq!(serial(&a), serial(&b));
    assert_eq!(pebble.orders(), 1, "{}", pebble.log());
    let roots = roots(&[&pebble.root_pem]);
    let (status, body) = https_get(gw.https_addr, "two.example.com", "/", &roots)
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "app"));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_failing_challenge_type_falls_back_to_the_other() {
    if !pebble_available() {
        return;
    }
    let up = Upstream::start("app").await;
    let bound = Bound::new().await;
    let pebble = Pebble::start(PebbleOptions {
        http_port: bound.http_addr.port(),
        // TLS-ALPN-01, tried first, fails: nothing listens there.
        tls_port: 1,
        ..PebbleOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_yaml(
        &pebble,
        dir.path(),
        "tls-alpn-01",
        &site(&["fallback.example.com"], &up),
    );
    let gw = Instance::start(&yaml, bound);
    until_served(&pebble, gw.https_addr, "fallback.example.com", ISSUE_LIMIT).await;
    // The failed TLS-ALPN-01 order, then the HTTP-01 one.
    assert_eq!(pebble.orders(), 2, "{}", pebble.log());
    assert_eq!(pebble.issued(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_restart_with_stored_certificates_orders_nothing() {
    if !pebble_available() {
        return;
    }
    let up = Upstream::start("app").await;
    let bound = Bound::new().await;
    let pebble = Pebble::start(PebbleOptions {
        http_port: bound.http_addr.port(),
        tls_port: bound.https_addr.port(),
        ..PebbleOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_yaml(
        &pebble,
        dir.path(),
        "http-01",
        &site(&["restart.example.com"], &up),
    );
    let first = Instance::start(&yaml, bound);
    let before = until_served(
        &pebble,
        first.https_addr,
        "restart.example.com",
        ISSUE_LIMIT,
    )
    .await;
    assert_eq!(pebble.orders(), 1);
    first.shutdown().await;

    // A new process on the same storage (new listeners, as after a redeploy).
    let second = Instance::start(&yaml, Bound::new().await);
    let after = until_served(
        &pebble,
        second.https_addr,
        "restart.example.com",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(serial(&before), serial(&after));
    assert!(
        stays(Duration::from_secs(2), || pebble.orders() == 1).await,
        "a restart placed a new order:\n{}",
        pebble.log()
    );
    second.shutdown().await;
}

#[tokio::test]
async fn renewal_swaps_the_certificate_while_a_connection_stays_open() {
    if !pebble_available() {
        return;
    }
    let up = Upstream::start("app").await;
    let bound = Bound::new().await;
    let pebble = Pebble::start(PebbleOptions {
        http_port: bound.http_addr.port(),
        tls_port: bound.https_addr.port(),
        // Renewed at two thirds: after 6 s.
        validity: Some(9),
        ..PebbleOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_yaml(
        &pebble,
        dir.path(),
        "tls-alpn-01",
        &site(&["renew.example.com"], &up),
    );
    let gw = Instance::start(&yaml, bound);
    let first = until_served(&pebble, gw.https_addr, "renew.example.com", ISSUE_LIMIT).await;
    let roots = roots(&[&pebble.root_pem]);
    let cfg = client_config(&roots);
    let open = tls_connect(gw.https_addr, "renew.example.com", &cfg)
        .await
        .unwrap();
    let open_serial = serial(&leaf(&open));
    let mut conn = Http1::over(open).await.unwrap();
    assert_eq!(conn.get("renew.example.com", "/").await.unwrap().0, 200);

    let renewed = poll(Duration::from_secs(30), || {
        let cfg = cfg.clone();
        let first = serial(&first);
        async move {
            let s = tls_connect(gw.https_addr, "renew.example.com", &cfg)
                .await
                .ok()?;
            let now = serial(&leaf(&s));
            (now != first).then_some(now)
        }
    })
    .await
    .unwrap_or_else(|| panic!("no renewal within 30 s\n{}", pebble.log()));
    assert_ne!(renewed, open_serial);
    assert!(pebble.orders() >= 2);
    // The connection opened before the swap carries on.
    let (status, body) = conn.get("renew.example.com", "/again").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "app"));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_ca_error_backs_off_instead_of_looping() {
    if !pebble_available() {
        return;
    }
    let up = Upstream::start("app").await;
    let bound = Bound::new().await;
    let pebble = Pebble::start(PebbleOptions {
        http_port: bound.http_addr.port(),
        tls_port: bound.https_addr.port(),
        blocklist: vec!["blocked.example.com".into()],
        ..PebbleOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_yaml(
        &pebble,
        dir.path(),
        "http-01",
        &site(&["blocked.example.com"], &up),
    );
    let gw = Instance::start(&yaml, bound);
    let failed = poll(Duration::from_secs(20), || async {
        let s = status(dir.path(), &pebble, "blocked.example.com")?;
        s["last_error"].is_string().then_some(s)
    })
    .await
    .expect("the refusal is recorded");
    let error = failed["last_error"].as_str().unwrap();
    assert!(
        error.contains("rejectedIdentifier") || error.contains("blocked"),
        "{error}"
    );
    assert_eq!(failed["failures"], 1);
    let next = failed["next_attempt"].as_i64().unwrap();
    let last = failed["last_attempt"].as_i64().unwrap();
    assert!(
        next - last >= 45,
        "retries after about a minute, not at once: {failed}"
    );
    // The admin metrics report the failure, and no renewal time: there is no certificate.
    let failing = format!("{FAILING}{{name=\"blocked.example.com\"}} 1");
    let scraped = poll(Duration::from_secs(10), || async {
        let text = metrics_text(&gw).await;
        has_line(&text, &failing).then_some(text)
    })
    .await;
    let text = match scraped {
        Some(text) => text,
        None => panic!("no `{failing}`:\n{}", metrics_text(&gw).await),
    };
    assert_eq!(
        sample(&text, NEXT_RENEWAL, "blocked.example.com"),
        None,
        "{text}"
    );
    // No certificate: the handshake is refused, not answered with some other certificate.
    let cfg = client_config(&roots(&[&pebble.root_pem]));
    assert!(
        tls_connect(gw.https_addr, "blocked.example.com", &cfg)
            .await
            .is_err()
    );
    let text = certs_output(dir.path(), &yaml);
    assert!(
        text.contains("blocked.example.com: waiting for certificate"),
        "{text}"
    );
    assert!(
        text.contains("last error    ") && text.contains("next attempt  "),
        "{text}"
    );
    // Nothing more is tried during the backoff, not even by a restarted instance.
    gw.shutdown().await;
    let again = Instance::start(&yaml, Bound::new().await);
    assert!(
        stays(Duration::from_secs(3), || {
            status(dir.path(), &pebble, "blocked.example.com")
                .is_some_and(|s| s["failures"] == 1 && s["orders"] == 1)
        })
        .await,
        "retried during the backoff: {:?}",
        status(dir.path(), &pebble, "blocked.example.com")
    );
    assert_eq!(pebble.orders(), 0);
    // The restarted instance reports the failure from storage.
    let text = metrics_text(&again).await;
    assert!(has_line(&text, &failing), "{text}");
    again.shutdown().await;
}

#[tokio::test]
async fn two_instances_on_one_storage_place_one_order_per_name() {
    if !pebble_available() {
        return;
    }
    let up = Upstream::start("app").await;
    let a_bound = Bound::new().await;
    let b_bound = Bound::new().await;
    // pebble validates against instance A only: when B holds the lock and orders, A answers
    // the challenges from the shared storage.
    let pebble = Pebble::start(PebbleOptions {
        http_port: a_bound.http_addr.port(),
        tls_port: a_bound.https_addr.port(),
        ..PebbleOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sites = site(&["one.example.com"], &up) + &site(&["two.example.com"], &up);
    let a_yaml = config_yaml(&pebble, dir.path(), "http-01", &sites);
    let b_yaml = config_yaml(&pebble, dir.path(), "tls-alpn-01", &sites);
    let a = Instance::start(&a_yaml, a_bound);
    let b = Instance::start(&b_yaml, b_bound);
    for name in ["one.example.com", "two.example.com"] {
        let from_a = until_served(&pebble, a.https_addr, name, ISSUE_LIMIT).await;
        let from_b = until_served(&pebble, b.https_addr, name, ISSUE_LIMIT).await;
        assert_eq!(serial(&from_a), serial(&from_b), "{name}");
    }
    assert!(
        stays(Duration::from_secs(1), || pebble.orders() == 2).await,
        "expected one order per name:\n{}",
        pebble.log()
    );
    a.shutdown().await;
    b.shutdown().await;
}
