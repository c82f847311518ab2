//! Host and path routing, compiled once per config.

use crate::config::{Config, HostPattern};
use crate::upstream::Backend;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

pub struct RouteEntry {
    /// As configured, e.g. `/v1/`.
    pub path: String,
    /// The part removed by `strip_prefix` (`/v1` for `/v1/`), when stripping.
    pub strip: Option<String>,
    pub backend: Arc<Backend>,
}

pub struct SiteEntry {
    /// The first configured host, for logs.
    pub name: String,
    /// Served over HTTPS: plain-HTTP requests are redirected.
    pub tls: bool,
    /// Longest path first.
    pub routes: Vec<RouteEntry>,
}

pub struct Router {
    sites: Vec<SiteEntry>,
    exact: HashMap<String, usize>,
    /// `(".example.com", site)`, longest suffix first.
    suffixes: Vec<(String, usize)>,
    any: Option<usize>,
}

impl Router {
    pub fn new(config: &Config) -> Router {
        let mut router = Router {
            sites: Vec::new(),
            exact: HashMap::new(),
            suffixes: Vec::new(),
            any: None,
        };
        for (i, site) in config.sites.iter().enumerate() {
            for host in &site.hosts {
                match host {
                    HostPattern::Exact(h) => {
                        router.exact.insert(h.clone(), i);
                    }
                    HostPattern::Suffix(s) => router.suffixes.push((s.clone(), i)),
                    HostPattern::Any => router.any = Some(i),
                }
            }
            let site_name = site
                .hosts
                .first()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let routes = site
                .routes
                .iter()
                .map(|r| RouteEntry {
                    path: r.path.clone(),
                    strip: r
                        .strip_prefix
                        .then(|| r.path.trim_end_matches('/').to_owned())
                        .filter(|p| !p.is_empty()),
                    backend: Arc::new(
                        Backend::new(r.upstreams.clone(), r.upstream_protocol, r.policy.clone())
                            .labeled(&site_name, &r.path),
                    ),
                })
                .collect();
            router.sites.push(SiteEntry {
                tls: site.tls.is_tls(),
                name: site
                    .hosts
                    .first()
                    .map(|h| h.to_string())
                    .unwrap_or_default(),
                routes,
            });
        }
        router
            .suffixes
            .sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        router
    }

    pub fn sites(&self) -> &[SiteEntry] {
        &self.sites
    }

    /// Every backend, for discovery.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.sites
            .iter()
            .flat_map(|s| s.routes.iter().map(|r| Arc::clone(&r.backend)))
            .collect()
    }

    /// The site for a request host (port and a trailing dot ignored, case-insensitive).
    pub fn site(&self, host: &str) -> Option<&SiteEntry> {
        let name = host_without_port(host);
        let name = name.strip_suffix('.').unwrap_or(name);
        let name: Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        let idx = self
            .exact
            .get(name.as_ref())
            .copied()
            .or_else(|| {
                self.suffixes
                    .iter()
                    .find(|(suffix, _)| name.ends_with(suffix.as_str()))
                    .map(|(_, i)| *i)
            })
            .or(self.any)?;
        self.sites.get(idx)
    }
}

impl SiteEntry {
    /// The longest route whose prefix matches `path` on a segment boundary: `/api` matches
    /// `/api` and `/api/x` but not `/apix`; `/v1/` also matches `/v1`.
    pub fn route(&self, path: &str) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| path_matches(&r.path, path))
    }
}

fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => prefix.strip_suffix('/') == Some(path),
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `::1`.
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h).unwrap_or(rest);
    }
    // On bytes: `rsplit_once(':')` and `contains(':')` went through the generic string
    // searcher, about 280 instructions for every request's `Host`.
    let bytes = host.as_bytes();
    match bytes.iter().rposition(|&b| b == b':') {
        // A bare IPv6 address has several colons and no port.
        Some(at)
            if !bytes[..at].contains(&b':') && bytes[at + 1..].iter().all(u8::is_ascii_digit) =>
        {
            &host[..at]
        }
        _ => host,
    }
}

/// The path the upstream sees after removing `strip` from `path` (never empty).
pub fn stripped<'a>(path: &'a str, strip: &str) -> &'a str {
    match path.strip_prefix(strip) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let cfg = Config::parse(
            r#"
sites:
  - hosts: [app.example.com, "*.app.example.com"]
    upstreams: [127.0.0.1:1]
  - hosts: ["*.example.com"]
    upstreams: [127.0.0.1:2]
  - hosts: [api.example.com]
    routes:
      - {path: /v1/, strip_prefix: true, upstreams: [127.0.0.1:3]}
      - {path: /api, upstreams: [127.0.0.1:4]}
      - {path: /, upstreams: [127.0.0.1:5]}
  - hosts: ["*"]
    upstreams: [127.0.0.1:6]
"#,
            "test.yaml",
        )
        .expect("valid");
        Router::new(&cfg)
    }

    fn port_for(r: &Router, host: &str, path: &str) -> Option<u16> {
        let route = r.site(host)?.route(path)?;
        Some(route.backend.upstreams[0].port)
    }

    #[test]
    fn hosts() {
        let r = router();
        let cases = [
            ("app.example.com", 1),
            ("APP.Example.com:8080", 1),
            ("app.example.com.", 1),
            ("x.app.example.com", 1),
            ("a.b.app.example.com", 1),
            ("other.example.com", 2),
            ("api.example.com", 5),
            ("example.com", 6),
            ("[::1]:80", 6),
        ];
        for (host, port) in cases {
            assert_eq!(port_for(&r, host, "/"), Some(port), "{host}");
        }
    }

    #[test]
    fn paths() {
        let r = router();
        let cases = [
            ("/v1/x", 3),
            ("/v1", 3),
            ("/v1x", 5),
            ("/api", 4),
            ("/api/users", 4),
            ("/apix", 5),
            ("/", 5),
        ];
        for (path, port) in cases {
            assert_eq!(port_for(&r, "api.example.com", path), Some(port), "{path}");
        }
    }

    #[test]
    fn strip() {
        assert_eq!(stripped("/v1/x", "/v1"), "/x");
        assert_eq!(stripped("/v1", "/v1"), "/");
        assert_eq!(stripped("/v1/", "/v1"), "/");
    }

    #[test]
    fn host_without_port_table() {
        for (host, name) in [
            ("a.com", "a.com"),
            ("a.com:80", "a.com"),
            ("a.com:", "a.com"),
            ("127.0.0.1:18080", "127.0.0.1"),
            ("a.com:8x", "a.com:8x"),
            ("a:b:80", "a:b:80"),
            ("::1", "::1"),
            ("[::1]:443", "::1"),
            ("[::1]", "::1"),
            ("[::1", "::1"),
            ("", ""),
            (":80", ""),
            ("é.com:80", "é.com"),
        ] {
            assert_eq!(host_without_port(host), name, "{host}");
        }
    }

    #[test]
    fn no_catch_all_means_no_site() {
        let cfg = Config::parse("sites:\n  - hosts: [a.com]\n    upstreams: [x:1]\n", "t").unwrap();
        let r = Router::new(&cfg);
        assert!(r.site("b.com").is_none());
        assert!(r.site("a.com").is_some());
    }
}
