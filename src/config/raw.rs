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
    pub replica_header: Option<bool>,
    pub storage: Option<String>,
    pub hsts: Option<RawHsts>,
    pub acme: Option<RawAcme>,
    #[serde(default)]
    pub sites: Vec<RawSite>,
}

/// The `acme:` block (automatic certificates).
#[derive(Debug, Default, Deserialize)]
pub struct RawAcme {
    pub email: Option<String>,
    pub directory: Option<String>,
    pub challenge: Option<String>,
    pub storage: Option<String>,
    pub directory_ca: Option<String>,
    pub eab: Option<RawEab>,
}

/// External account binding: `{kid, hmac_key}`.
#[derive(Debug, Default, Deserialize)]
pub struct RawEab {
    pub kid: Option<String>,
    pub hmac_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawHsts {
    pub max_age: Option<u64>,
    #[serde(default)]
    pub include_subdomains: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawListen {
    pub http: Option<String>,
    pub https: Option<String>,
    pub admin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTimeouts {
    pub client_header: Option<String>,
    pub client_idle: Option<String>,
    pub upstream_connect: Option<String>,
    pub upstream_header: Option<String>,
    pub upstream_read: Option<String>,
    pub grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawSite {
    #[serde(default)]
    pub hosts: Vec<String>,
    pub upstreams: Option<Vec<String>>,
    pub upstream_protocol: Option<String>,
    pub routes: Option<Vec<RawRoute>>,
    pub tls: Option<RawTls>,
    // Balancing options of the `upstreams` shorthand (with `routes`, set them per route).
    pub balance: Option<String>,
    pub weights: Option<std::collections::BTreeMap<String, u32>>,
    pub health: Option<RawHealth>,
    pub passive: Option<RawPassive>,
    pub retries: Option<RawRetries>,
    pub resolve_every: Option<String>,
    pub timeouts: Option<RawRouteTimeouts>,
}

/// A route's own upstream timeouts (the top-level `timeouts` are their defaults).
#[derive(Debug, Default, Deserialize)]
pub struct RawRouteTimeouts {
    pub upstream_header: Option<String>,
    pub upstream_read: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawHealth {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_after: Option<u32>,
    pub unhealthy_after: Option<u32>,
    pub expect_status: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawPassive {
    pub failures: Option<u32>,
    pub cooldown: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRetries {
    pub attempts: Option<u32>,
    pub methods: Option<Vec<String>>,
}

/// `tls: acme | internal | none` or `tls: {cert: FILE, key: FILE}`.
#[derive(Debug)]
pub enum RawTls {
    Mode(String),
    Files {
        cert: Option<String>,
        key: Option<String>,
    },
}

impl<'de> Deserialize<'de> for RawTls {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawTls;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("acme, internal, none, or {cert: FILE, key: FILE}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawTls, E> {
                Ok(RawTls::Mode(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawTls, A::Error> {
                let (mut cert, mut key) = (None, None);
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "cert" => cert = Some(map.next_value::<String>()?),
                        "key" => key = Some(map.next_value::<String>()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(RawTls::Files { cert, key })
            }
        }
        de.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRoute {
    pub path: Option<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub upstreams: Vec<String>,
    pub upstream_protocol: Option<String>,
    pub balance: Option<String>,
    pub weights: Option<std::collections::BTreeMap<String, u32>>,
    pub health: Option<RawHealth>,
    pub passive: Option<RawPassive>,
    pub retries: Option<RawRetries>,
    pub resolve_every: Option<String>,
    pub timeouts: Option<RawRouteTimeouts>,
}
