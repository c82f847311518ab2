//! The config file as written: plain serde structs, every leaf optional or a string.
//!
//! Nothing here is checked beyond YAML types; `validate` turns this into [`super::Config`].
//! Unknown keys are not rejected by serde (that would stop at the first one): they are
//! collected through `serde_ignored` and reported together with every other problem.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    pub resolve_every: Option<String>,
    pub access_log: Option<String>,
    #[serde(default)]
    pub sites: Vec<RawSite>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawListen {
    pub http: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTimeouts {
    pub client_header: Option<String>,
    pub client_idle: Option<String>,
    pub upstream_connect: Option<String>,
    pub upstream_header: Option<String>,
    pub grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawSite {
    #[serde(default)]
    pub hosts: Vec<String>,
    pub upstreams: Option<Vec<String>>,
    pub routes: Option<Vec<RawRoute>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRoute {
    pub path: Option<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub upstreams: Vec<String>,
}
