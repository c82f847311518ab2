//! Raw config → typed config, collecting every problem instead of stopping at the first.

use super::locate::{Locator, Pos};
use super::raw::{RawConfig, RawRoute, RawSite, RawTls};
use super::*;
use serde::Deserialize;
use std::collections::HashMap;

struct Checker<'a> {
    loc: &'a Locator,
    issues: Vec<Issue>,
    /// The top-level `resolve_every`, the default of each route's.
    resolve_every: Duration,
    /// The top-level timeouts, the defaults of each route's upstream timeouts.
    timeouts: Timeouts,
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

/// Type errors reported at most per file: each costs one more parse.
const MAX_TYPE_ERRORS: usize = 50;

/// Parses and validates; returns every issue found.
///
/// serde stops at the first value of the wrong type. To report the others in the same run,
/// the entry at fault is blanked (replaced by spaces, so every position stays where it was)
/// and the text parsed again, until it parses. An entry whose blank does not fit either (an
/// item of a list) blanks its parent instead. Problems the blanks themselves cause (a
/// missing key) are not reported.
pub fn parse(text: &str) -> Result<Config, Vec<Issue>> {
    let loc = Locator::new(text);
    let mut c = Checker {
        loc: &loc,
        issues: Vec::new(),
        resolve_every: Duration::from_secs(5),
        timeouts: Timeouts::default(),
    };
    let mut source: Option<String> = None;
    let mut blanked: Vec<String> = Vec::new();
    let (parsed, unknown) = loop {
        let mut unknown: Vec<String> = Vec::new();
        let parsed =
            serde_saphyr::with_deserializer_from_str(source.as_deref().unwrap_or(text), |de| {
                serde_ignored::deserialize(de, |path| unknown.push(path_of(&path)))
            });
        let e = match parsed {
            Ok(raw) => break (Some(raw), unknown),
            Err(e) => e,
        };
        let pos = e.location().map(|l| Pos {
            line: l.line() as usize,
            col: l.column() as usize,
        });
        let path = pos
            .and_then(|p| loc.path_at(p))
            .unwrap_or_default()
            .to_owned();
        // Not reported: an error inside what was blanked, or about a value that blanking
        // emptied (a mapping whose only key was blanked).
        let emptied = source.as_deref().is_some_and(|now| {
            loc.value_extent(&path).is_some_and(|(start, end)| {
                let blank = |t: &str| {
                    t.chars()
                        .skip(start)
                        .take(end - start)
                        .all(char::is_whitespace)
                };
                blank(now) && !blank(text)
            })
        });
        if !emptied && !blanked.iter().any(|b| is_within(&path, b)) {
            c.issues.push(Issue {
                pos,
                path: path.clone(),
                message: first_line(&e.to_string()),
            });
        }
        // The entry to blank: the one at fault, else the nearest ancestor not yet blanked.
        let mut target = path.as_str();
        while blanked.iter().any(|b| b == target) {
            target = parent_path(target);
        }
        match loc.extent(target) {
            Some((start, end)) if !target.is_empty() && blanked.len() < MAX_TYPE_ERRORS => {
                let blank = blank_chars(source.as_deref().unwrap_or(text), start, end);
                source = Some(blank);
                blanked.push(target.to_owned());
            }
            // A syntax error, or no entry to blank: nothing further can be read.
            _ => break (None, unknown),
        }
    };
    for path in &unknown {
        let pos = loc.key(path);
        c.issues.push(Issue {
            pos,
            path: path.clone(),
            message: "unknown key".into(),
        });
    }
    let Some(raw) = parsed else {
        c.issues.sort_by_key(|i| i.pos);
        return Err(c.issues);
    };
    let before = c.issues.len();
    let config = check(&mut c, raw);
    if !blanked.is_empty() {
        // What was blanked is missing now; its own error was reported instead.
        let semantic = c.issues.split_off(before);
        c.issues.extend(
            semantic
                .into_iter()
                .filter(|i| !blanked.iter().any(|b| is_within(b, &i.path))),
        );
    }
    if c.issues.is_empty() {
        Ok(config)
    } else {
        c.issues.sort_by_key(|i| i.pos);
        Err(c.issues)
    }
}

/// Whether `path` is `ancestor` or lies inside it (`sites[0].hosts` is within `sites`, within
/// `sites[0]` and within the root, the empty path).
fn is_within(path: &str, ancestor: &str) -> bool {
    ancestor.is_empty()
        || path == ancestor
        || path
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// `sites[0].hosts[1]` → `sites[0].hosts` → `sites[0]` → `sites` → ``.
fn parent_path(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    }
}

/// `text` with the characters from `start` to `end` (character offsets) replaced by spaces,
/// line breaks kept: every other position in the text stays where it was.
fn blank_chars(text: &str, start: usize, end: usize) -> String {
    text.chars()
        .enumerate()
        .map(|(i, ch)| {
            if (start..end).contains(&i) && ch != '\n' && ch != '\r' {
                ' '
            } else {
                ch
            }
        })
        .collect()
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
    let line = line.trim_end_matches(", set DuplicateKeyPolicy in Options if acceptable");
    // The parser's words for the common type errors, in the words of someone editing YAML.
    match line {
        "expected string scalar" => "expected text, found a list or mapping",
        "expected sequence start" => "expected a list, such as [a, b] or - items",
        "expected mapping start" => "expected a mapping of keys to values",
        "invalid boolean" => "expected true or false",
        "invalid u32" | "invalid u64" | "invalid u16" => "expected a whole number, 0 or more",
        other => other,
    }
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

    let admin = match raw.listen.admin.as_deref() {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
        Some("off") => None,
        Some(text) => {
            let addr = parse_listen(text);
            if addr.is_none() {
                c.bad(
                    "listen.admin",
                    format!("expected an address such as 127.0.0.1:9090, or off, found {text:?}"),
                );
            }
            addr
        }
    };

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
        upstream_read: c.duration(
            "timeouts.upstream_read",
            t.upstream_read.as_deref(),
            defaults.upstream_read,
        ),
        grace: c.duration("timeouts.grace", t.grace.as_deref(), defaults.grace),
    };
    let resolve_every = c.duration(
        "resolve_every",
        raw.resolve_every.as_deref(),
        Duration::from_secs(5),
    );
    c.resolve_every = resolve_every;
    c.timeouts = timeouts;
    let access_log = match raw.access_log.as_deref() {
        None | Some("text") => AccessLog::Text,
        Some("common") => AccessLog::Common,
        Some("combined") => AccessLog::Combined,
        Some("json") => AccessLog::Json,
        Some("off") => AccessLog::Off,
        Some(other) => {
            c.bad(
                "access_log",
                format!("expected one of text, common, combined, json, off, found {other:?}"),
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
    let acme = raw
        .acme
        .map(|a| check_acme(c, a, &storage, https.is_some()));
    let mut seen_hosts: HashMap<HostPattern, usize> = HashMap::new();
    let mut sites = Vec::new();
    for (i, site) in raw.sites.into_iter().enumerate() {
        sites.push(check_site(
            c,
            i,
            site,
            &mut seen_hosts,
            https.is_some(),
            acme.is_some(),
        ));
    }

    Config {
        listen: Listen { http, https, admin },
        trusted_proxies: TrustedProxies(trusted),
        timeouts,
        resolve_every,
        access_log,
        replica_header: raw.replica_header.unwrap_or(false),
        storage,
        hsts,
        acme,
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
    acme: bool,
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

    let tls = check_tls(c, &base, site.tls, &hosts, https, acme);
    let site_protocol = site.upstream_protocol;
    let mut routes = Vec::new();
    let shorthand_only = [
        ("upstream_protocol", site_protocol.is_some()),
        ("balance", site.balance.is_some()),
        ("weights", site.weights.is_some()),
        ("health", site.health.is_some()),
        ("passive", site.passive.is_some()),
        ("retries", site.retries.is_some()),
        ("resolve_every", site.resolve_every.is_some()),
        ("timeouts", site.timeouts.is_some()),
    ];
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
                balance: site.balance,
                weights: site.weights,
                health: site.health,
                passive: site.passive,
                retries: site.retries,
                resolve_every: site.resolve_every,
                timeouts: site.timeouts,
            };
            routes.push(check_route(c, &base, &format!("{base}.upstreams"), raw));
        }
        (None, Some(raw_routes)) => {
            for (key, set) in shorthand_only {
                if set {
                    c.bad(
                        &format!("{base}.{key}"),
                        format!("with `routes`, set {key} on each route"),
                    );
                }
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

/// Why ACME (HTTP-01/TLS-ALPN-01) cannot issue a certificate for these hosts, if it cannot.
fn acme_cannot_issue(hosts: &[HostPattern]) -> Option<String> {
    hosts.iter().find_map(|h| match h {
        HostPattern::Any => {
            Some("ACME cannot issue a certificate for `*`: list the site's names".to_owned())
        }
        HostPattern::Suffix(_) => Some(format!(
            "ACME cannot issue a certificate for {h} (wildcards need DNS-01, which gangway \
             does not do): list the names"
        )),
        HostPattern::Exact(n) if n.parse::<IpAddr>().is_ok() => Some(format!(
            "ACME certificates for IP addresses ({n}) are not supported: use tls: internal"
        )),
        HostPattern::Exact(_) => None,
    })
}

/// Well-known ACME directories by short name.
const ACME_DIRECTORIES: [(&str, &str); 3] = [
    (
        "letsencrypt",
        "https://acme-v02.api.letsencrypt.org/directory",
    ),
    (
        "letsencrypt-staging",
        "https://acme-staging-v02.api.letsencrypt.org/directory",
    ),
    ("zerossl", "https://acme.zerossl.com/v2/DV90"),
];

fn check_acme(
    c: &mut Checker<'_>,
    raw: super::raw::RawAcme,
    storage: &Path,
    https: bool,
) -> AcmeConfig {
    use base64::Engine;
    if !https {
        c.bad(
            "acme",
            "ACME certificates are served on the https listener: set listen.https (e.g. 0.0.0.0:443)",
        );
    }
    let email = raw.email.and_then(|e| {
        let e = e.trim().trim_start_matches("mailto:").to_owned();
        let ok = e.split_once('@').is_some_and(|(user, domain)| {
            !user.is_empty() && domain.contains('.') && !domain.starts_with('.')
        }) && !e.contains(|ch: char| ch.is_whitespace() || ch == ',');
        if ok {
            Some(e)
        } else {
            c.bad(
                "acme.email",
                format!("expected an email address such as ops@example.com, found {e:?}"),
            );
            None
        }
    });
    let name = raw.directory.as_deref().unwrap_or("letsencrypt").trim();
    let directory = match ACME_DIRECTORIES.iter().find(|(n, _)| *n == name) {
        Some((_, url)) => (*url).to_owned(),
        None if name.starts_with("https://")
            && name
                .parse::<http::Uri>()
                .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty())) =>
        {
            name.to_owned()
        }
        None => {
            c.bad(
                "acme.directory",
                format!(
                    "expected letsencrypt, letsencrypt-staging, zerossl or an https:// \
                     directory URL, found {name:?}"
                ),
            );
            String::new()
        }
    };
    let challenge = match raw.challenge.as_deref() {
        None | Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
        Some("http-01") => AcmeChallenge::Http01,
        Some(other) => {
            c.bad(
                "acme.challenge",
                format!("expected tls-alpn-01 or http-01, found {other:?}"),
            );
            AcmeChallenge::TlsAlpn01
        }
    };
    let directory_ca = raw.directory_ca.map(PathBuf::from).filter(|p| {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let certs = CertificateDer::pem_file_iter(p)
            .map(|it| it.filter_map(Result::ok).count())
            .map_err(|e| format!("{e:?}"));
        match certs {
            Ok(n) if n > 0 => true,
            Ok(_) => {
                c.bad(
                    "acme.directory_ca",
                    format!("{}: no CERTIFICATE block found", p.display()),
                );
                false
            }
            Err(e) => {
                c.bad(
                    "acme.directory_ca",
                    format!("{}: cannot read a PEM certificate: {e}", p.display()),
                );
                false
            }
        }
    });
    let eab = raw.eab.and_then(|e| {
        let (Some(kid), Some(key)) = (e.kid, e.hmac_key) else {
            c.bad(
                "acme.eab",
                "expected both kid and hmac_key (as given by the CA)",
            );
            return None;
        };
        let key = key.trim().trim_end_matches('=');
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(key)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(key));
        match decoded {
            Ok(hmac_key) if !hmac_key.is_empty() => Some(AcmeEab { kid, hmac_key }),
            _ => {
                c.bad(
                    "acme.eab.hmac_key",
                    "expected the base64url key given by the CA",
                );
                None
            }
        }
    });
    if name == "zerossl" && eab.is_none() {
        c.bad(
            "acme",
            "ZeroSSL needs external account binding: add eab: {kid: ..., hmac_key: ...} \
             from the ZeroSSL dashboard",
        );
    }
    AcmeConfig {
        email,
        directory,
        challenge,
        storage: raw
            .storage
            .map(PathBuf::from)
            .unwrap_or_else(|| storage.to_owned()),
        directory_ca,
        eab,
    }
}

fn check_tls(
    c: &mut Checker<'_>,
    base: &str,
    raw: Option<RawTls>,
    hosts: &[HostPattern],
    https: bool,
    acme: bool,
) -> TlsMode {
    let path = format!("{base}.tls");
    let mode = match raw {
        None if !https => return TlsMode::None,
        None if !hosts.is_empty() && hosts.iter().all(is_local_name) => TlsMode::Internal,
        None if acme => {
            if let Some(why) = acme_cannot_issue(hosts) {
                c.bad(
                    base,
                    format!(
                        "{why}: give this site tls: {{cert: FILE, key: FILE}}, tls: internal \
                         or tls: none"
                    ),
                );
                return TlsMode::None;
            }
            TlsMode::Acme
        }
        None => {
            c.bad(
                base,
                "with an https listener every site needs a certificate source: add an acme: \
                 block (automatic certificates), tls: internal, tls: {cert: FILE, key: FILE}, \
                 or tls: none to serve it over plain HTTP only",
            );
            return TlsMode::None;
        }
        Some(RawTls::Mode(m)) => match m.as_str() {
            "none" => return TlsMode::None,
            "internal" => TlsMode::Internal,
            "acme" => {
                if !acme {
                    c.bad(
                        &path,
                        "tls: acme needs an acme: block at the top level (at least \
                         acme: {email: you@example.com})",
                    );
                    return TlsMode::None;
                }
                if let Some(why) = acme_cannot_issue(hosts) {
                    c.bad(&path, why);
                    return TlsMode::None;
                }
                TlsMode::Acme
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
    let path = match raw.path.clone() {
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
    let policy = check_policy(c, base, &raw, &upstreams);
    Route {
        path,
        strip_prefix: raw.strip_prefix,
        upstreams,
        upstream_protocol,
        policy,
    }
}

fn check_policy(
    c: &mut Checker<'_>,
    base: &str,
    raw: &RawRoute,
    upstreams: &[UpstreamAddr],
) -> Policy {
    let balance = match raw.balance.as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_conn") => Balance::LeastConn,
        Some("random") => Balance::Random,
        Some("ip_hash") => Balance::IpHash,
        Some("cookie") => Balance::Cookie,
        Some(other) => {
            c.bad(
                &format!("{base}.balance"),
                format!(
                    "expected one of round_robin, least_conn, random, ip_hash, cookie, found {other:?}"
                ),
            );
            Balance::RoundRobin
        }
    };
    let mut weights = vec![1u32; upstreams.len()];
    for (name, weight) in raw.weights.iter().flatten() {
        let path = format!("{base}.weights.{name}");
        let parsed = parse_upstream(name).ok();
        match parsed.and_then(|u| upstreams.iter().position(|x| *x == u)) {
            Some(i) if *weight > 0 && *weight <= 1000 => weights[i] = *weight,
            Some(_) => c.bad(&path, "expected a weight from 1 to 1000"),
            None => c.bad(
                &path,
                format!("{name:?} is not one of this route's upstreams"),
            ),
        }
    }
    let health = raw.health.as_ref().map(|h| {
        let hb = format!("{base}.health");
        let path = match h.path.as_deref() {
            Some(p) if p.starts_with('/') => p.to_owned(),
            Some(p) => {
                c.bad(
                    &format!("{hb}.path"),
                    format!("expected a path starting with /, found {p:?}"),
                );
                "/".to_owned()
            }
            None => {
                c.bad(
                    &hb,
                    "expected `path`, the URL path to check (such as /health)",
                );
                "/".to_owned()
            }
        };
        let interval = c.duration(
            &format!("{hb}.interval"),
            h.interval.as_deref(),
            Duration::from_secs(2),
        );
        let timeout = c.duration(
            &format!("{hb}.timeout"),
            h.timeout.as_deref(),
            Duration::from_secs(1),
        );
        let mut count = |key: &str, v: Option<u32>| match v {
            None => 2,
            Some(n) if (1..=100).contains(&n) => n,
            Some(_) => {
                c.bad(&format!("{hb}.{key}"), "expected a count from 1 to 100");
                2
            }
        };
        let healthy_after = count("healthy_after", h.healthy_after);
        let unhealthy_after = count("unhealthy_after", h.unhealthy_after);
        let expect = match h.expect_status.as_deref() {
            None => (200, 399),
            Some(text) => match parse_status_range(text) {
                Some(r) => r,
                None => {
                    c.bad(
                        &format!("{hb}.expect_status"),
                        format!(
                            "expected a status or range such as 200 or 200-399, found {text:?}"
                        ),
                    );
                    (200, 399)
                }
            },
        };
        HealthCheck {
            path,
            interval,
            timeout,
            healthy_after,
            unhealthy_after,
            expect,
        }
    });
    let passive = match &raw.passive {
        None => Some(Passive {
            failures: 3,
            cooldown: Duration::from_secs(10),
        }),
        Some(p) => {
            let cooldown = c.duration(
                &format!("{base}.passive.cooldown"),
                p.cooldown.as_deref(),
                Duration::from_secs(10),
            );
            match p.failures {
                Some(0) => None,
                f => Some(Passive {
                    failures: f.unwrap_or(3),
                    cooldown,
                }),
            }
        }
    };
    let mut retries = Retries::default();
    if let Some(r) = &raw.retries {
        match r.attempts {
            Some(n) if (1..=10).contains(&n) => retries.attempts = n,
            Some(_) => c.bad(
                &format!("{base}.retries.attempts"),
                "expected a number of tries from 1 (no retry) to 10",
            ),
            None => {}
        }
        if let Some(methods) = &r.methods {
            retries.methods.clear();
            for (i, m) in methods.iter().enumerate() {
                match m.to_ascii_uppercase().parse::<http::Method>() {
                    Ok(m) if m == http::Method::POST || m == http::Method::PATCH => c.bad(
                        &format!("{base}.retries.methods[{i}]"),
                        format!("{m} is not idempotent: retrying it could apply it twice"),
                    ),
                    Ok(m) => retries.methods.push(m),
                    Err(_) => c.bad(
                        &format!("{base}.retries.methods[{i}]"),
                        format!("expected an HTTP method, found {m:?}"),
                    ),
                }
            }
        }
    }
    let resolve_every = c.duration(
        &format!("{base}.resolve_every"),
        raw.resolve_every.as_deref(),
        c.resolve_every,
    );
    let route_timeouts = raw.timeouts.as_ref();
    let upstream_header = c.duration(
        &format!("{base}.timeouts.upstream_header"),
        route_timeouts.and_then(|t| t.upstream_header.as_deref()),
        c.timeouts.upstream_header,
    );
    let upstream_read = c.duration(
        &format!("{base}.timeouts.upstream_read"),
        route_timeouts.and_then(|t| t.upstream_read.as_deref()),
        c.timeouts.upstream_read,
    );
    Policy {
        balance,
        weights,
        health,
        passive,
        retries,
        resolve_every,
        upstream_header,
        upstream_read,
    }
}

/// `200`, `200-399`.
fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match text.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v: u16 = text.trim().parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&lo) && (lo..=599).contains(&hi)).then_some((lo, hi))
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
        // The duplicate is set aside and the rest still checked: `sites: []` is wrong too.
        assert_eq!(
            got,
            vec![
                "3:1 listen: duplicate mapping key: listen",
                "5:1 sites: expected at least one site"
            ]
        );
    }

    #[test]
    fn every_type_error_is_listed_with_the_other_problems() {
        let got = issues(
            "listen:\n  http: [1, 2]\nreplica_header: maybe\ntimeouts:\n  grace: {a: 1}\n  \
             client_idle: 5x\nsites:\n  - hosts: [a.example, {x: 1}]\n    upstreams: [app:8000]\n    \
             health:\n      healthy_after: lots\n  - hosts: b.example\n    upstreams: [app]\n    \
             retries: {attempts: -1}\n    typo_key: 1\n",
        );
        let paths: Vec<&str> = got
            .iter()
            .map(|i| i.split(' ').nth(1).unwrap_or_default())
            .collect();
        assert_eq!(
            paths,
            vec![
                "listen.http:",
                "replica_header:",
                "timeouts.grace:",
                "timeouts.client_idle:",
                "sites[0].hosts[1]:",
                "sites[0].health.healthy_after:",
                "sites[1].hosts:",
                "sites[1].upstreams[0]:",
                "sites[1].retries.attempts:",
                "sites[1].typo_key:",
            ],
            "{got:#?}"
        );
        assert_eq!(
            got[0],
            "2:9 listen.http: expected text, found a list or mapping"
        );
        assert_eq!(
            got[6],
            "12:12 sites[1].hosts: expected a list, such as [a, b] or - items"
        );
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

    #[test]
    fn upstream_read_defaults_to_a_minute_and_refuses_zero() {
        let site = "sites:\n  - hosts: [\"*\"]\n    upstreams: [x:1]\n";
        let cfg = parse(site).expect("valid");
        assert_eq!(cfg.timeouts.upstream_read, Duration::from_secs(60));
        let cfg = parse(&format!("timeouts:\n  upstream_read: 2m\n{site}")).expect("valid");
        assert_eq!(cfg.timeouts.upstream_read, Duration::from_secs(120));
        let got = issues(&format!("timeouts:\n  upstream_read: 0s\n{site}"));
        assert_eq!(
            got,
            vec!["2:18 timeouts.upstream_read: expected a duration above zero"],
            "{got:#?}"
        );
    }

    #[test]
    fn a_route_sets_its_own_upstream_timeouts_and_inherits_the_rest() {
        let yaml = "timeouts:\n  upstream_read: 30s\nsites:\n  - hosts: [a.test]\n    routes:\n      \
                    - path: /events\n        upstreams: [x:1]\n        timeouts: {upstream_read: 1h}\n      \
                    - path: /\n        upstreams: [x:1]\n  - hosts: [b.test]\n    upstreams: [x:1]\n    \
                    timeouts: {upstream_header: 5s}\n";
        let cfg = parse(yaml).expect("valid");
        let p = |site: usize, route: usize| {
            let policy = &cfg.sites[site].routes[route].policy;
            (policy.upstream_header, policy.upstream_read)
        };
        let s = Duration::from_secs;
        assert_eq!(p(0, 0), (s(60), s(3600)));
        assert_eq!(p(0, 1), (s(60), s(30)));
        assert_eq!(p(1, 0), (s(5), s(30)));
    }

    #[test]
    fn route_timeouts_are_checked_like_the_others() {
        let got = issues(
            "sites:\n  - hosts: [a.test]\n    timeouts: {upstream_read: 5s}\n    routes:\n      \
             - path: /\n        upstreams: [x:1]\n        timeouts: {upstream_read: 0s, client_idle: 5s}\n",
        );
        assert_eq!(
            got,
            vec![
                "3:15 sites[0].timeouts: with `routes`, set timeouts on each route",
                "7:35 sites[0].routes[0].timeouts.upstream_read: expected a duration above zero",
                "7:39 sites[0].routes[0].timeouts.client_idle: unknown key",
            ],
            "{got:#?}"
        );
    }

    const HTTPS: &str = "listen:\n  https: 127.0.0.1:443\nstorage: /srv/gw\n";

    #[test]
    fn acme_block_defaults_and_site_default() {
        let yaml = format!(
            "{HTTPS}acme:\n  email: ops@example.com\nsites:\n  - hosts: [app.example.com]\n    upstreams: [x:1]\n  - hosts: [localhost]\n    upstreams: [x:1]\n"
        );
        let cfg = parse(&yaml).expect("valid");
        let acme = cfg.acme.expect("acme");
        assert_eq!(
            acme.directory,
            "https://acme-v02.api.letsencrypt.org/directory"
        );
        assert_eq!(acme.challenge, AcmeChallenge::TlsAlpn01);
        assert_eq!(acme.storage, PathBuf::from("/srv/gw"));
        assert_eq!(acme.email.as_deref(), Some("ops@example.com"));
        // With an acme block, public names default to acme; local names stay internal.
        assert!(matches!(cfg.sites[0].tls, TlsMode::Acme));
        assert!(matches!(cfg.sites[1].tls, TlsMode::Internal));
    }

    #[test]
    fn acme_block_every_key() {
        let yaml = format!(
            "{HTTPS}acme:\n  directory: zerossl\n  challenge: http-01\n  storage: /acme\n  eab: {{kid: k1, hmac_key: aGVsbG8td29ybGQ}}\nsites:\n  - hosts: [app.example.com]\n    tls: acme\n    upstreams: [x:1]\n"
        );
        let acme = parse(&yaml).expect("valid").acme.expect("acme");
        assert_eq!(acme.directory, "https://acme.zerossl.com/v2/DV90");
        assert_eq!(acme.challenge, AcmeChallenge::Http01);
        assert_eq!(acme.storage, PathBuf::from("/acme"));
        let eab = acme.eab.expect("eab");
        assert_eq!(
            (eab.kid.as_str(), eab.hmac_key.as_slice()),
            ("k1", &b"hello-world"[..])
        );
        assert!(!format!("{eab:?}").contains("hello"));
    }

    #[test]
    fn acme_problems_are_listed() {
        let yaml = format!(
            "{HTTPS}acme:\n  email: nobody\n  directory: http://ca.example/dir\n  challenge: dns-01\n  directory_ca: /nonexistent/ca.pem\n  eab: {{kid: k}}\nsites:\n  - hosts: [\"*.example.com\"]\n    tls: acme\n    upstreams: [x:1]\n  - hosts: [\"*\"]\n    upstreams: [x:1]\n  - hosts: [10.0.0.1]\n    tls: acme\n    upstreams: [x:1]\n"
        );
        let got = issues(&yaml).join("\n");
        for expected in [
            "acme.email: expected an email address",
            "acme.directory: expected letsencrypt, letsencrypt-staging, zerossl or an https://",
            "acme.challenge: expected tls-alpn-01 or http-01, found \"dns-01\"",
            "acme.directory_ca: /nonexistent/ca.pem: cannot read",
            "acme.eab: expected both kid and hmac_key",
            "sites[0].tls: ACME cannot issue a certificate for *.example.com",
            "sites[1]: ACME cannot issue a certificate for `*`",
            "sites[2].tls: ACME certificates for IP addresses (10.0.0.1) are not supported",
        ] {
            assert!(got.contains(expected), "missing {expected:?} in\n{got}");
        }
    }

    #[test]
    fn tls_acme_needs_the_block_and_zerossl_needs_eab() {
        let got = issues(&format!(
            "{HTTPS}sites:\n  - hosts: [app.example.com]\n    tls: acme\n    upstreams: [x:1]\n  - hosts: [b.example.com]\n    upstreams: [x:1]\n"
        ));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].contains("sites[0].tls: tls: acme needs an acme: block"),
            "{got:?}"
        );
        assert!(got[1].contains("sites[1]: with an https listener every site needs a certificate source: add an acme: block"), "{got:?}");
        let got = issues(&format!(
            "{HTTPS}acme:\n  directory: zerossl\nsites:\n  - hosts: [a.example.com]\n    upstreams: [x:1]\n"
        ));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].contains("ZeroSSL needs external account binding"),
            "{got:?}"
        );
        let got = issues("acme: {}\nsites:\n  - hosts: [a.example.com]\n    upstreams: [x:1]\n");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].contains("acme: ACME certificates are served on the https listener"),
            "{got:?}"
        );
    }
}
