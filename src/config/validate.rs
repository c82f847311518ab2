//! Raw config → typed config, collecting every problem instead of stopping at the first.

use super::locate::{Locator, Pos};
use super::raw::{RawConfig, RawRoute, RawSite, RawTls};
use super::*;
use serde::Deserialize;
use std::collections::HashMap;

struct Checker<'a> {
    loc: &'a Locator,
    issues: Vec<Issue>,
}

impl Checker<'_> {
    /// A problem with the value at `path`.
    fn bad(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.loc.value(path);
        self.issues.push(Issue {
            pos,
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, raw: Option<&str>, default: Duration) -> Duration {
        let Some(text) = raw else { return default };
        match parse_duration(text) {
            Some(d) if !d.is_zero() => d,
            Some(_) => {
                self.bad(path, "expected a duration above zero");
                default
            }
            None => {
                self.bad(
                    path,
                    format!("expected a duration such as 500ms, 10s, 5m or 1h, found {text:?}"),
                );
                default
            }
        }
    }
}

/// `500ms`, `10s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let value: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return None,
    };
    if !secs.is_finite() || secs > 1e9 {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
}

fn parse_listen(text: &str) -> Option<SocketAddr> {
    // `:80` means every IPv4 address, as in Go and Caddy.
    if let Some(port) = text.strip_prefix(':') {
        return port
            .parse::<u16>()
            .ok()
            .map(|p| SocketAddr::from(([0, 0, 0, 0], p)));
    }
    text.parse().ok()
}

fn parse_cidr(text: &str) -> Option<IpNet> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Some(net.trunc());
    }
    text.parse::<IpAddr>().ok().map(IpNet::from)
}

fn parse_host_pattern(text: &str) -> Result<HostPattern, String> {
    let host = text.trim().to_ascii_lowercase();
    if host == "*" {
        return Ok(HostPattern::Any);
    }
    let (name, wildcard) = match host.strip_prefix("*.") {
        Some(rest) => (rest, true),
        None => (host.as_str(), false),
    };
    // IP literals are valid hosts (`127.0.0.1`, `[::1]` or `::1`).
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if !wildcard && bare.parse::<IpAddr>().is_ok() {
        return Ok(HostPattern::Exact(bare.to_owned()));
    }
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(format!(
            "expected a host name such as app.example.com, *.example.com or *, found {text:?} \
             (no scheme, port or path; `*` only as the whole first label)"
        ));
    }
    Ok(if wildcard {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_owned())
    })
}

fn parse_upstream(text: &str) -> Result<UpstreamAddr, String> {
    let expected =
        || format!("expected host:port such as app:8000 or 10.0.0.5:8000, found {text:?}");
    let text = text.trim();
    if text.contains("://") || text.contains('/') {
        return Err(format!(
            "{}; write the address without a scheme or path",
            expected()
        ));
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(expected)?;
        (h, p)
    } else {
        text.rsplit_once(':').ok_or_else(expected)?
    };
    if host.is_empty() || host.contains(':') && host.parse::<IpAddr>().is_err() {
        return Err(expected());
    }
    let port: u16 = port.parse().map_err(|_| expected())?;
    if port == 0 {
        return Err(format!("port 0 is not a valid upstream port in {text:?}"));
    }
    Ok(UpstreamAddr {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn path_of(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_of(parent)),
        Path::Map { parent, key } => {
            let parent = path_of(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_of(parent),
    }
}

/// Parses and validates; returns every issue found.
pub fn parse(text: &str) -> Result<Config, Vec<Issue>> {
    let loc = Locator::new(text);
    let mut unknown: Vec<String> = Vec::new();
    let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_ignored::deserialize(de, |path| unknown.push(path_of(&path)))
    });
    let mut c = Checker {
        loc: &loc,
        issues: Vec::new(),
    };
    for path in &unknown {
        let pos = loc.key(path);
        c.issues.push(Issue {
            pos,
            path: path.clone(),
            message: "unknown key".into(),
        });
    }
    let raw: RawConfig = match parsed {
        Ok(raw) => raw,
        Err(e) => {
            let pos = e.location().map(|l| Pos {
                line: l.line() as usize,
                col: l.column() as usize,
            });
            let path = pos
                .and_then(|p| loc.path_at(p))
                .unwrap_or_default()
                .to_owned();
            c.issues.push(Issue {
                pos,
                path,
                message: first_line(&e.to_string()),
            });
            return Err(c.issues);
        }
    };
    let config = check(&mut c, raw);
    if c.issues.is_empty() {
        Ok(config)
    } else {
        c.issues.sort_by_key(|i| i.pos);
        Err(c.issues)
    }
}

/// serde-saphyr's message is "error: line L column C: message" plus a snippet; we print our
/// own position, so keep only the message.
fn first_line(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or(msg);
    let line = line.strip_prefix("error: ").unwrap_or(line);
    let line = match line.split_once(": ") {
        Some((head, rest)) if head.starts_with("line ") => rest,
        _ => line,
    };
    // A hint for developers embedding the parser, not for someone editing a config.
    line.trim_end_matches(", set DuplicateKeyPolicy in Options if acceptable")
        .to_owned()
}

fn check(c: &mut Checker<'_>, raw: RawConfig) -> Config {
    let defaults = Timeouts::default();
    let http = match raw.listen.http.as_deref() {
        None => SocketAddr::from(([0, 0, 0, 0], 80)),
        Some(text) => parse_listen(text).unwrap_or_else(|| {
            c.bad(
                "listen.http",
                format!("expected an address such as 0.0.0.0:80 or [::]:80, found {text:?}"),
            );
            SocketAddr::from(([0, 0, 0, 0], 80))
        }),
    };

    let https = raw.listen.https.as_deref().and_then(|text| {
        let addr = parse_listen(text);
        if addr.is_none() {
            c.bad(
                "listen.https",
                format!("expected an address such as 0.0.0.0:443 or [::]:443, found {text:?}"),
            );
        }
        addr
    });

    let mut trusted = Vec::new();
    for (i, text) in raw.trusted_proxies.iter().enumerate() {
        match parse_cidr(text) {
            Some(net) => trusted.push(net),
            None => c.bad(
                &format!("trusted_proxies[{i}]"),
                format!("expected an IP address or CIDR such as 10.0.0.0/8, found {text:?}"),
            ),
        }
    }

    let t = &raw.timeouts;
    let timeouts = Timeouts {
        client_header: c.duration(
            "timeouts.client_header",
            t.client_header.as_deref(),
            defaults.client_header,
        ),
        client_idle: c.duration(
            "timeouts.client_idle",
            t.client_idle.as_deref(),
            defaults.client_idle,
        ),
        upstream_connect: c.duration(
            "timeouts.upstream_connect",
            t.upstream_connect.as_deref(),
            defaults.upstream_connect,
        ),
        upstream_header: c.duration(
            "timeouts.upstream_header",
            t.upstream_header.as_deref(),
            defaults.upstream_header,
        ),
        grace: c.duration("timeouts.grace", t.grace.as_deref(), defaults.grace),
    };
    let resolve_every = c.duration(
        "resolve_every",
        raw.resolve_every.as_deref(),
        Duration::from_secs(5),
    );
    let access_log = match raw.access_log.as_deref() {
        None | Some("text") => AccessLog::Text,
        Some("json") => AccessLog::Json,
        Some("off") => AccessLog::Off,
        Some(other) => {
            c.bad(
                "access_log",
                format!("expected one of text, json, off, found {other:?}"),
            );
            AccessLog::Text
        }
    };

    let storage = PathBuf::from(raw.storage.as_deref().unwrap_or("/var/lib/gangway"));
    let hsts = raw.hsts.as_ref().and_then(|h| {
        if https.is_none() {
            c.bad("hsts", "hsts needs an https listener (listen.https)");
        }
        let max_age = h.max_age.unwrap_or(31_536_000);
        let value = if h.include_subdomains {
            format!("max-age={max_age}; includeSubDomains")
        } else {
            format!("max-age={max_age}")
        };
        http::HeaderValue::from_str(&value).ok()
    });

    if raw.sites.is_empty() {
        c.issues.push(Issue {
            pos: loc_or_none(c.loc, "sites"),
            path: "sites".into(),
            message: "expected at least one site".into(),
        });
    }
    let mut seen_hosts: HashMap<HostPattern, usize> = HashMap::new();
    let mut sites = Vec::new();
    for (i, site) in raw.sites.into_iter().enumerate() {
        sites.push(check_site(c, i, site, &mut seen_hosts, https.is_some()));
    }

    Config {
        listen: Listen { http, https },
        trusted_proxies: TrustedProxies(trusted),
        timeouts,
        resolve_every,
        access_log,
        storage,
        hsts,
        sites,
    }
}

fn loc_or_none(loc: &Locator, path: &str) -> Option<Pos> {
    loc.key(path)
}

fn check_site(
    c: &mut Checker<'_>,
    i: usize,
    site: RawSite,
    seen_hosts: &mut HashMap<HostPattern, usize>,
    https: bool,
) -> Site {
    let base = format!("sites[{i}]");
    if site.hosts.is_empty() {
        c.bad(
            &format!("{base}.hosts"),
            "expected a list of at least one host name (use [\"*\"] for a catch-all site)",
        );
    }
    let mut hosts = Vec::new();
    for (j, text) in site.hosts.iter().enumerate() {
        let path = format!("{base}.hosts[{j}]");
        match parse_host_pattern(text) {
            Ok(h) => {
                if let Some(prev) = seen_hosts.get(&h) {
                    c.bad(
                        &path,
                        format!("host {h} is already served by sites[{prev}]"),
                    );
                } else {
                    seen_hosts.insert(h.clone(), i);
                    hosts.push(h);
                }
            }
            Err(msg) => c.bad(&path, msg),
        }
    }

    let tls = check_tls(c, &base, site.tls, &hosts, https);
    let site_protocol = site.upstream_protocol;
    let mut routes = Vec::new();
    match (site.upstreams, site.routes) {
        (Some(_), Some(_)) => c.bad(
            &base,
            "a site has either `upstreams` (one route for every path) or `routes`, not both",
        ),
        (None, None) => c.bad(&base, "expected `upstreams` or `routes`"),
        (Some(ups), None) => {
            let raw = RawRoute {
                path: Some("/".into()),
                strip_prefix: false,
                upstreams: ups,
                upstream_protocol: site_protocol,
            };
            routes.push(check_route(c, &base, &format!("{base}.upstreams"), raw));
        }
        (None, Some(raw_routes)) => {
            if site_protocol.is_some() {
                c.bad(
                    &format!("{base}.upstream_protocol"),
                    "with `routes`, set upstream_protocol on each route",
                );
            }
            if raw_routes.is_empty() {
                c.bad(&format!("{base}.routes"), "expected at least one route");
            }
            let mut seen_paths: HashMap<String, usize> = HashMap::new();
            for (j, raw) in raw_routes.into_iter().enumerate() {
                let rbase = format!("{base}.routes[{j}]");
                let route = check_route(c, &rbase, &format!("{rbase}.upstreams"), raw);
                if let Some(prev) = seen_paths.insert(route.path.clone(), j) {
                    c.bad(
                        &format!("{rbase}.path"),
                        format!(
                            "path {} is already used by {base}.routes[{prev}]",
                            route.path
                        ),
                    );
                }
                routes.push(route);
            }
        }
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
    Site { hosts, tls, routes }
}

/// Names for which gangway's local CA is the sensible default (no public CA issues them).
fn is_local_name(host: &HostPattern) -> bool {
    let name = match host {
        HostPattern::Exact(n) => n.as_str(),
        HostPattern::Suffix(s) => s.as_str(),
        HostPattern::Any => return false,
    };
    name.parse::<IpAddr>().is_ok()
        || name == "localhost"
        || [".localhost", ".local", ".internal", ".home.arpa", ".test"]
            .iter()
            .any(|suffix| name.ends_with(suffix) || name == &suffix[1..])
}

fn check_tls(
    c: &mut Checker<'_>,
    base: &str,
    raw: Option<RawTls>,
    hosts: &[HostPattern],
    https: bool,
) -> TlsMode {
    let path = format!("{base}.tls");
    let mode = match raw {
        None if !https => return TlsMode::None,
        None if !hosts.is_empty() && hosts.iter().all(is_local_name) => TlsMode::Internal,
        None => {
            c.bad(
                base,
                "with an https listener every site needs a certificate source: add tls: internal,                  tls: {cert: FILE, key: FILE}, or tls: none to serve it over plain HTTP only                  (ACME is not available yet)",
            );
            return TlsMode::None;
        }
        Some(RawTls::Mode(m)) => match m.as_str() {
            "none" => return TlsMode::None,
            "internal" => TlsMode::Internal,
            "acme" => {
                c.bad(
                    &path,
                    "ACME is not available yet: use internal or {cert, key} for now",
                );
                return TlsMode::None;
            }
            other => {
                c.bad(
                    &path,
                    format!("expected acme, internal, none or {{cert: FILE, key: FILE}}, found {other:?}"),
                );
                return TlsMode::None;
            }
        },
        // Other keys inside are reported as unknown by serde_ignored, like everywhere else.
        Some(RawTls::Files { cert, key }) => {
            let (Some(cert), Some(key)) = (cert, key) else {
                c.bad(
                    &path,
                    "expected both cert (PEM chain) and key (PEM private key)",
                );
                return TlsMode::None;
            };
            let names: Vec<String> = hosts
                .iter()
                .filter(|h| **h != HostPattern::Any)
                .map(|h| h.to_string())
                .collect();
            let (cert, key) = (PathBuf::from(cert), PathBuf::from(key));
            match crate::tls::files::load(&crate::tls::provider(), &cert, &key, &names) {
                Ok(loaded) => TlsMode::Files { cert, key, loaded },
                Err(e) => {
                    c.bad(&format!("{path}.cert"), e);
                    return TlsMode::None;
                }
            }
        }
    };
    if !https {
        c.bad(
            &path,
            "a TLS site needs an https listener: set listen.https (e.g. 0.0.0.0:443)",
        );
    }
    if matches!(mode, TlsMode::Internal) && hosts.contains(&HostPattern::Any) {
        c.bad(
            &path,
            "the local CA cannot issue a certificate for `*`: list the names, or use cert files",
        );
    }
    mode
}

fn check_route(c: &mut Checker<'_>, base: &str, ups_path: &str, raw: RawRoute) -> Route {
    let path = match raw.path {
        None => {
            c.bad(base, "expected `path` (such as / or /api/)");
            "/".to_owned()
        }
        Some(p) if !p.starts_with('/') => {
            c.bad(
                &format!("{base}.path"),
                format!("expected a path starting with /, found {p:?}"),
            );
            "/".to_owned()
        }
        Some(p) if p.contains(['?', '#', ' ']) => {
            c.bad(
                &format!("{base}.path"),
                format!(
                    "expected a plain path prefix without query, fragment or spaces, found {p:?}"
                ),
            );
            "/".to_owned()
        }
        Some(p) => p,
    };
    if raw.upstreams.is_empty() {
        c.bad(ups_path, "expected at least one upstream such as app:8000");
    }
    let mut upstreams: Vec<UpstreamAddr> = Vec::new();
    for (k, text) in raw.upstreams.iter().enumerate() {
        match parse_upstream(text) {
            Ok(u) if upstreams.contains(&u) => c.bad(
                &format!("{ups_path}[{k}]"),
                format!("upstream {u} is listed twice"),
            ),
            Ok(u) => upstreams.push(u),
            Err(msg) => c.bad(&format!("{ups_path}[{k}]"), msg),
        }
    }
    let upstream_protocol = match raw.upstream_protocol.as_deref() {
        None | Some("http1") => UpstreamProtocol::Http1,
        Some("h2c") => UpstreamProtocol::H2c,
        Some(other) => {
            c.bad(
                &format!("{base}.upstream_protocol"),
                format!("expected http1 or h2c, found {other:?}"),
            );
            UpstreamProtocol::Http1
        }
    };
    Route {
        path,
        strip_prefix: raw.strip_prefix,
        upstreams,
        upstream_protocol,
    }
}

// `Deserialize` is needed in scope for `serde_ignored::deserialize`'s bound.
const _: fn() = || {
    fn assert_de<'de, T: Deserialize<'de>>() {}
    assert_de::<RawConfig>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(yaml: &str) -> Vec<String> {
        match parse(yaml) {
            Ok(_) => vec![],
            Err(v) => v
                .into_iter()
                .map(|i| match i.pos {
                    Some(p) => format!("{}:{} {}: {}", p.line, p.col, i.path, i.message),
                    None => format!("? {}: {}", i.path, i.message),
                })
                .collect(),
        }
    }

    #[test]
    fn the_issue_example_is_accepted() {
        let yaml = r#"
listen:
  http: 0.0.0.0:80
trusted_proxies: []            # CIDRs whose incoming X-Forwarded-*/Forwarded headers are kept
sites:
  - hosts: [app.example.com, "*.app.example.com"]
    upstreams: [app:8000]      # a name resolving to N addresses = N replicas (compose service)
  - hosts: [api.example.com]
    routes:
      - path: /v1/
        strip_prefix: true     # upstream sees /x for /v1/x, and X-Forwarded-Prefix: /v1
        upstreams: [api-v1:8000]
      - path: /
        upstreams: [api-1:8000, api-2:8000]
  - hosts: ["*"]               # catch-all site, optional; without one an unknown host gets 404
    upstreams: [127.0.0.1:9000]
"#;
        let cfg = parse(yaml).expect("valid");
        assert_eq!(cfg.sites.len(), 3);
        assert_eq!(
            cfg.sites[0].hosts,
            vec![
                HostPattern::Exact("app.example.com".into()),
                HostPattern::Suffix(".app.example.com".into())
            ]
        );
        assert_eq!(cfg.sites[1].routes[0].path, "/v1/");
        assert!(cfg.sites[1].routes[0].strip_prefix);
        assert_eq!(cfg.sites[2].hosts, vec![HostPattern::Any]);
        assert_eq!(cfg.listen.http, "0.0.0.0:80".parse().unwrap());
        assert_eq!(cfg.resolve_every, Duration::from_secs(5));
    }

    #[test]
    fn every_problem_is_listed_with_position_and_path() {
        let yaml = "listen:\n  htp: 0.0.0.0:80\ntrusted_proxies: [10.0.0.0/8, bogus]\ntimeouts:\n  grace: soon\nsites:\n  - hosts: [a.com]\n    upstreams: [app]\n  - hosts: [A.com]\n    routes:\n      - path: v1\n        upstreams: [x:1]\n        colour: red\n";
        assert_eq!(
            issues(yaml),
            vec![
                "2:3 listen.htp: unknown key",
                "3:31 trusted_proxies[1]: expected an IP address or CIDR such as 10.0.0.0/8, found \"bogus\"",
                "5:10 timeouts.grace: expected a duration such as 500ms, 10s, 5m or 1h, found \"soon\"",
                "8:17 sites[0].upstreams[0]: expected host:port such as app:8000 or 10.0.0.5:8000, found \"app\"",
                "9:13 sites[1].hosts[0]: host a.com is already served by sites[0]",
                "11:15 sites[1].routes[0].path: expected a path starting with /, found \"v1\"",
                "13:9 sites[1].routes[0].colour: unknown key",
            ]
        );
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let got = issues("sites:\n  - hosts: [a]\n    hosts: [b]\n    upstreams: [x:1]\n");
        assert_eq!(
            got,
            vec!["3:5 sites[0].hosts: duplicate mapping key: hosts"]
        );
        let got = issues("listen:\n  http: :80\nlisten:\n  http: :81\nsites: []\n");
        assert_eq!(got, vec!["3:1 listen: duplicate mapping key: listen"]);
    }

    #[test]
    fn type_errors_name_the_path() {
        let got = issues("sites:\n  - hosts: [a]\n    upstreams: [x:1]\n    routes: 5\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].starts_with("4:13 sites[0].routes: "), "{got:?}");
    }

    #[test]
    fn site_shapes() {
        assert_eq!(
            issues("sites:\n  - hosts: [a]\n"),
            vec!["2:5 sites[0]: expected `upstreams` or `routes`"]
        );
        assert_eq!(
            issues("sites: []\n"),
            vec!["1:1 sites: expected at least one site"]
        );
        let got = issues(
            "sites:\n  - hosts: [\"http://a\", \"a.*.com\", \"*\"]\n    upstreams: [\"http://x:1\", \"y:0\", \"[::1]:80\"]\n",
        );
        assert_eq!(got.len(), 4, "{got:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("2d"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn numbers_where_strings_are_expected() {
        let cfg =
            parse("timeouts:\n  grace: 3\nsites:\n  - hosts: [\"*\"]\n    upstreams: [x:1]\n")
                .expect("valid");
        assert_eq!(cfg.timeouts.grace, Duration::from_secs(3));
    }
}
