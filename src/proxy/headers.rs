//! Header rules: hop-by-hop removal and the forwarding headers the app behind us relies on.
//!
//! This is security code. A peer outside `trusted_proxies` cannot make the app believe in
//! another client address, scheme, host or prefix: every such header it sent is dropped and
//! rebuilt from what gangway itself saw.

use crate::config::{TrustedProxies, canonical_ip};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::fmt::Write;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_SSL: HeaderName = HeaderName::from_static("x-forwarded-ssl");
static X_FORWARDED_SCHEME: HeaderName = HeaderName::from_static("x-forwarded-scheme");
static X_FORWARDED_SERVER: HeaderName = HeaderName::from_static("x-forwarded-server");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Where `Connection` stands in [`fixed_hop_by_hop`].
const CONNECTION_AT: usize = 0;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, plus the
/// Proxy-* pair that RFC 2616 listed and proxies still strip).
fn fixed_hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &header::CONNECTION,
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ]
}

/// Whether a header describes one connection only (see [`fixed_hop_by_hop`]). A match on
/// the name's text (its length first), not nine comparisons: it runs for every header of
/// every response.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

/// Whether a `Connection` token names one of the fixed hop-by-hop headers.
pub(crate) fn names_fixed_hop_by_hop(token: &[u8]) -> bool {
    fixed_hop_by_hop()
        .iter()
        .any(|h| token.eq_ignore_ascii_case(h.as_str().as_bytes()))
}

/// Is this an HTTP/1.1 upgrade (WebSocket) request or response?
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| connection_tokens(v).any(|t| t.eq_ignore_ascii_case("upgrade")))
}

/// The tokens of one `Connection` value (`keep-alive`, `close`, header names).
pub(crate) fn connection_tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    list_tokens(v.as_bytes())
}

/// The elements of a comma-separated header value, trimmed, empty ones skipped. As with
/// `HeaderValue::to_str`, a value that is not visible ASCII (tab allowed) has none.
pub(crate) fn list_tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    let visible = value
        .iter()
        .all(|&b| b == b'\t' || (b' '..0x7f).contains(&b));
    std::str::from_utf8(value)
        .ok()
        .filter(|_| visible)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers, including every header named in `Connection`. When `upgrade`
/// is set the `Upgrade` header is kept and `Connection: upgrade` is sent on.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none, or only `Connection: keep-alive`: one pass over the names
    // (cheap comparisons of standard names) finds them, instead of a hashed removal for
    // each of the nine candidates.
    let fixed = fixed_hop_by_hop();
    let mut found = [false; 9];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = fixed.iter().position(|h| *h == name) {
            found[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // `Connection: keep-alive` (or `close`) is what nearly every message carries: its tokens
    // name no header beyond the fixed ones, which the loop below removes anyway, so the
    // per-token hashed removals and the copy of the values are skipped.
    let names_others = found[CONNECTION_AT]
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(connection_tokens)
            .any(|t| {
                !t.eq_ignore_ascii_case("close")
                    && !fixed.iter().any(|h| t.eq_ignore_ascii_case(h.as_str()))
            });
    if names_others && let header::Entry::Occupied(entry) = headers.entry(header::CONNECTION) {
        let (_, values) = entry.remove_entry_mult();
        let values: Vec<HeaderValue> = values.collect();
        for token in values.iter().flat_map(connection_tokens) {
            let keep = upgrade && token.eq_ignore_ascii_case("upgrade");
            if !keep && !token.eq_ignore_ascii_case("close") {
                // Removal by &str looks the name up without allocating it.
                headers.remove(token);
            }
        }
    }
    let upgrade_value = if upgrade {
        headers.remove(header::UPGRADE)
    } else {
        None
    };
    for (name, present) in fixed.into_iter().zip(found) {
        if present {
            headers.remove(name);
        }
    }
    if let Some(v) = upgrade_value {
        headers.insert(header::UPGRADE, v);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// What gangway says about a connection's peer and listener in forwarding headers, made once
/// per connection rather than formatted for every request.
#[derive(Debug)]
pub struct PeerText {
    /// The peer, IPv4-mapped addresses unwrapped.
    pub ip: IpAddr,
    /// `ip` as text.
    pub ip_value: HeaderValue,
    /// The RFC 7239 node for `ip`: `for=192.0.2.1` or `for="[2001:db8::1]"`.
    forwarded_for: Box<str>,
    /// The listener's port.
    pub port: u16,
    port_value: HeaderValue,
    /// The forwarding headers as written to an HTTP/1.1 replica, for the host, scheme and
    /// prefix they were last made for (see [`PeerText::forwarding_block`]). Kept while the
    /// connection is parked: making them again cost the first request after every idle
    /// spell 4,700 instructions (benches/instructions.py), for about 250 bytes per parked
    /// connection. Locked only to look, never across an await.
    block: Mutex<Option<Block>>,
}

/// A connection's forwarding headers on the wire, and what they were made for: one
/// allocation per connection (about 200 bytes).
#[derive(Debug)]
struct Block {
    /// `name: value\r\n` for each header.
    bytes: Arc<[u8]>,
    /// Where the host they were made for is in `bytes`: X-Forwarded-Host's value.
    host: Range<usize>,
    proto: &'static str,
    prefix: Option<Box<str>>,
}

impl PeerText {
    pub fn new(peer: IpAddr, port: u16) -> PeerText {
        let ip = canonical_ip(peer);
        let text = ip.to_string();
        let forwarded_for = match ip {
            IpAddr::V4(_) => format!("for={text}"),
            IpAddr::V6(_) => format!("for=\"[{text}]\""),
        };
        PeerText {
            ip,
            ip_value: HeaderValue::from_maybe_shared(Bytes::from(text))
                .unwrap_or(HeaderValue::from_static("unknown")),
            forwarded_for: forwarded_for.into_boxed_str(),
            port,
            port_value: HeaderValue::from(port),
            block: Mutex::new(None),
        }
    }

    /// What [`set_forwarding`] sets for a request from this peer when it is not a trusted
    /// proxy (X-Forwarded-For/-Real-IP/-Port/-Proto/-Host/-Prefix and Forwarded), as `name:
    /// value` lines for an HTTP/1.1 replica. Made once per connection for the host, scheme and
    /// prefix its requests name (another one gets its own, each time): from an untrusted peer
    /// these headers depend on nothing else, and inserting seven headers into every request's
    /// map, to write them out again, was 8 % of gangway's instructions per request.
    pub fn forwarding_block(
        &self,
        host: &HeaderValue,
        proto: &'static str,
        prefix: Option<&str>,
    ) -> Arc<[u8]> {
        if let Some(b) = self
            .block
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            && b.bytes.get(b.host.clone()) == Some(host.as_bytes())
            && b.proto == proto
            && b.prefix.as_deref() == prefix
        {
            return Arc::clone(&b.bytes);
        }
        let mut map = HeaderMap::new();
        let fwd = Forwarding {
            conn: self,
            proto,
            host,
            prefix,
        };
        set_forwarding(&mut map, &fwd, &TrustedProxies::default());
        let mut out = Vec::with_capacity(256);
        let mut at = None;
        for (name, value) in &map {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            if name == X_FORWARDED_HOST {
                at = Some(out.len()..out.len() + value.len());
            }
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let bytes: Arc<[u8]> = out.into();
        if let Some(host) = at {
            *self.block.lock().unwrap_or_else(PoisonError::into_inner) = Some(Block {
                bytes: Arc::clone(&bytes),
                host,
                proto,
                prefix: prefix.map(Into::into),
            });
        }
        bytes
    }
}

/// Appends this hop's `Forwarded` element: the peer, the host (quoted unless it is a token;
/// left out if it cannot be quoted) and the scheme (RFC 7239 §4).
fn push_forwarded_element(out: &mut String, conn: &PeerText, host: &HeaderValue, proto: &str) {
    let host = host.to_str().ok();
    out.reserve(conn.forwarded_for.len() + host.map_or(0, str::len) + 24);
    out.push_str(&conn.forwarded_for);
    if let Some(host) = host {
        if host.bytes().all(is_tchar) {
            out.push_str(";host=");
            out.push_str(host);
        } else if !host.contains(['"', '\\']) {
            out.push_str(";host=\"");
            out.push_str(host);
            out.push('"');
        }
    }
    out.push_str(";proto=");
    out.push_str(proto);
}

/// What gangway knows about the request it is forwarding.
pub struct Forwarding<'a> {
    /// The TCP peer and the listener's port (used when Host names none).
    pub conn: &'a PeerText,
    /// `http` or `https`, as seen by gangway's listener.
    pub proto: &'static str,
    /// The request's host as the client sent it (Host or :authority), port included.
    pub host: &'a HeaderValue,
    /// The path prefix removed by `strip_prefix`, if any.
    pub prefix: Option<&'a str>,
}

/// Is this a header a client could use to claim another address, scheme, host or prefix?
fn is_forwarding_header(name: &HeaderName) -> bool {
    name == header::FORWARDED || name == X_REAL_IP || name.as_str().starts_with("x-forwarded-")
}

/// Removes every forwarding header a peer that is not a trusted proxy sent, and its
/// `X-Request-Id` when `request_id` is set (gangway then makes its own). One pass over the
/// names first: most requests carry none.
pub fn drop_claims(headers: &mut HeaderMap, request_id: bool) {
    if !headers
        .keys()
        .any(|n| is_forwarding_header(n) || (request_id && n == X_REQUEST_ID))
    {
        return;
    }
    for name in [
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_HOST,
        &X_FORWARDED_PORT,
        &X_FORWARDED_PREFIX,
        &X_FORWARDED_SSL,
        &X_FORWARDED_SCHEME,
        &X_FORWARDED_SERVER,
        &X_REAL_IP,
        &header::FORWARDED,
    ] {
        headers.remove(name);
    }
    if request_id {
        headers.remove(&X_REQUEST_ID);
    }
}

/// What gangway adds to a request from a peer that is not a trusted proxy, sent to an
/// HTTP/1.1 replica: written after the request's own headers, never put in its map.
#[derive(Debug)]
pub struct Added {
    /// The connection's forwarding headers ([`PeerText::forwarding_block`]).
    pub block: Arc<[u8]>,
    /// The request's id, sent as `X-Request-Id`.
    pub request_id: u128,
}

impl Added {
    /// How many bytes [`Added::write_to`] writes.
    pub fn wire_len(&self) -> usize {
        self.block.len() + X_REQUEST_ID.as_str().len() + 2 + 32 + 2
    }

    /// Writes the headers, each line ending in CRLF.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.block);
        out.extend_from_slice(X_REQUEST_ID.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&request_id_text(self.request_id));
        out.extend_from_slice(b"\r\n");
    }
}

/// `X-Request-Id`, which gangway sets on every request it forwards.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// 128 bits as 32 lowercase hex digits: a request id. Two digits per byte, from its 16
/// bytes, big-endian.
pub fn request_id_text(bits: u128) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    for (pair, byte) in text.chunks_exact_mut(2).zip(bits.to_be_bytes()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    text
}

/// A request id as a header value.
pub fn request_id_value(bits: u128) -> HeaderValue {
    HeaderValue::from_bytes(&request_id_text(bits)).unwrap_or(HeaderValue::from_static("-"))
}

/// How many headers gangway may add to a request it forwards: Host (from an HTTP/2
/// request's :authority), the seven of [`set_forwarding`] (X-Forwarded-For, -Proto, -Host,
/// -Port and -Prefix, X-Real-IP, Forwarded) and X-Request-Id. `Proxy::route` reserves room
/// for them at once, so the request's header map grows once at most, not at each insert.
pub(crate) const ADDED_HEADERS: usize = 9;

/// Sets X-Forwarded-For/Proto/Host/Port/Prefix, X-Real-IP and Forwarded.
///
/// From a trusted peer the chains are extended and the peer's Proto/Host/Port kept; from any
/// other peer every incoming forwarding header is discarded first. Returns the client address
/// the app will see (for logs and `ip_hash`).
pub fn set_forwarding(
    headers: &mut HeaderMap,
    fwd: &Forwarding<'_>,
    trusted: &TrustedProxies,
) -> IpAddr {
    let peer = fwd.conn.ip;
    let from_trusted = trusted.contains(peer);
    // Up to seven headers are added: one growth of the map, not several (a no-op when the
    // caller reserved ADDED_HEADERS already, as Proxy::route does).
    headers.reserve(7);
    if !from_trusted {
        drop_claims(headers, false);
    }

    let client = if from_trusted {
        // X-Forwarded-For: previous hops (only those a trusted peer vouches for), then the peer.
        let mut xff = String::with_capacity(64);
        for v in headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(s) = v.to_str() {
                for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    if !xff.is_empty() {
                        xff.push_str(", ");
                    }
                    xff.push_str(part);
                }
            }
        }
        let client = client_address(&xff, peer, trusted);
        if xff.is_empty() {
            headers.insert(&X_FORWARDED_FOR, fwd.conn.ip_value.clone());
        } else {
            xff.push_str(", ");
            let _ = write!(xff, "{peer}");
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
                headers.insert(&X_FORWARDED_FOR, v);
            }
        }
        if client == peer {
            headers.insert(&X_REAL_IP, fwd.conn.ip_value.clone());
        } else if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(client.to_string())) {
            headers.insert(&X_REAL_IP, v);
        }
        client
    } else {
        // Nothing of the client's survives: the chain is the peer alone.
        headers.insert(&X_FORWARDED_FOR, fwd.conn.ip_value.clone());
        headers.insert(&X_REAL_IP, fwd.conn.ip_value.clone());
        peer
    };

    // From an untrusted peer none of the headers below is left, so no lookup is needed.
    if !from_trusted || !headers.contains_key(&X_FORWARDED_PORT) {
        // The port the client connected to: explicit in Host when not the default (a
        // published 8443 mapped to gangway's 443 shows here), else the default port of a
        // trusted proxy's scheme, else our listener's port.
        let port = match host_port(fwd.host) {
            // Most clients name the port they connected to: the text made once per connection.
            Some(p) if p == fwd.conn.port => fwd.conn.port_value.clone(),
            Some(p) => HeaderValue::from(p),
            None if !from_trusted => fwd.conn.port_value.clone(),
            None => match headers.get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
                Some(b"https") => HeaderValue::from_static("443"),
                Some(b"http") => HeaderValue::from_static("80"),
                _ => fwd.conn.port_value.clone(),
            },
        };
        headers.insert(&X_FORWARDED_PORT, port);
    }
    if !from_trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(fwd.proto));
    }
    if !from_trusted || !headers.contains_key(&X_FORWARDED_HOST) {
        headers.insert(&X_FORWARDED_HOST, fwd.host.clone());
    }
    if let Some(prefix) = fwd.prefix {
        // An outer trusted proxy may have stripped a prefix of its own: ours comes after it.
        let combined = match headers
            .get(&X_FORWARDED_PREFIX)
            .and_then(|v| v.to_str().ok())
        {
            Some(outer) => format!("{}{prefix}", outer.trim_end_matches('/')),
            None => prefix.to_owned(),
        };
        if let Ok(v) = HeaderValue::from_str(&combined) {
            headers.insert(&X_FORWARDED_PREFIX, v);
        }
    }

    // RFC 7239 Forwarded: one element for this hop, appended to a trusted peer's list.
    let mut list = String::new();
    if from_trusted {
        for v in headers.get_all(header::FORWARDED) {
            if let Ok(s) = v.to_str().map(str::trim)
                && !s.is_empty()
            {
                list.push_str(s);
                list.push_str(", ");
            }
        }
    }
    push_forwarded_element(&mut list, fwd.conn, fwd.host, fwd.proto);
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(list)) {
        headers.insert(header::FORWARDED, v);
    }
    client
}

/// The explicit port of a Host value (`example.com:8443`, `[::1]:8443`), if any.
fn host_port(host: &HeaderValue) -> Option<u16> {
    let h = host.to_str().ok()?;
    let (name, port) = h.rsplit_once(':')?;
    if name.contains(':') && !name.ends_with(']') {
        return None; // a bare IPv6 address
    }
    port.parse().ok()
}

/// RFC 9110 token characters. A `match`, which compiles to a range check and a bit test: the
/// slice search it replaced was a `memchr` call for every `.` and `:` of a Host, once per
/// request (1 % of gangway's instructions per request, benches/instructions.py).
fn is_tchar(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'!' | b'#' | b'$' | b'%' | b'&'
        | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// The original client: walking the chain right to left from the peer, the first address that
/// is not a trusted proxy. A chain made only of trusted proxies yields its leftmost entry.
fn client_address(chain: &str, peer: IpAddr, trusted: &TrustedProxies) -> IpAddr {
    if !trusted.contains(peer) {
        return peer;
    }
    let mut client = peer;
    for part in chain.rsplit(',').map(str::trim) {
        match parse_chain_ip(part) {
            Some(ip) => {
                client = ip;
                if !trusted.contains(ip) {
                    return ip;
                }
            }
            // An entry we cannot read ("unknown", garbage): stop at what we know.
            None => return client,
        }
    }
    client
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:80`.
fn parse_chain_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical_ip(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok().map(canonical_ip);
    }
    let (ip, _port) = s.rsplit_once(':')?;
    ip.parse().ok().map(canonical_ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies(nets.iter().map(|n| n.parse::<IpNet>().unwrap()).collect())
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.to_str().unwrap())
    }

    struct Case {
        name: &'static str,
        peer: &'static str,
        trusted: &'static [&'static str],
        incoming: &'static [(&'static str, &'static str)],
        prefix: Option<&'static str>,
        expect: &'static [(&'static str, Option<&'static str>)],
    }

    #[test]
    fn forwarding_table() {
        let cases = [
            Case {
                name: "untrusted peer, clean request",
                peer: "203.0.113.7",
                trusted: &[],
                incoming: &[],
                prefix: None,
                expect: &[
                    ("x-forwarded-for", Some("203.0.113.7")),
                    ("x-real-ip", Some("203.0.113.7")),
                    ("x-forwarded-proto", Some("http")),
                    ("x-forwarded-host", Some("app.example.com")),
                    ("x-forwarded-port", Some("8080")),
                    ("x-forwarded-prefix", None),
                    (
                        "forwarded",
                        Some("for=203.0.113.7;host=app.example.com;proto=http"),
                    ),
                ],
            },
            Case {
                name: "untrusted peer spoofing everything",
                peer: "203.0.113.7",
                trusted: &["10.0.0.0/8"],
                incoming: &[
                    ("x-forwarded-for", "1.1.1.1"),
                    ("x-real-ip", "1.1.1.1"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "evil.com"),
                    ("x-forwarded-port", "443"),
                    ("x-forwarded-prefix", "/admin"),
                    ("x-forwarded-ssl", "on"),
                    ("forwarded", "for=1.1.1.1;proto=https"),
                ],
                prefix: None,
                expect: &[
                    ("x-forwarded-for", Some("203.0.113.7")),
                    ("x-real-ip", Some("203.0.113.7")),
                    ("x-forwarded-proto", Some("http")),
                    ("x-forwarded-host", Some("app.example.com")),
                    ("x-forwarded-port", Some("8080")),
                    ("x-forwarded-prefix", None),
                    ("x-forwarded-ssl", None),
                    (
                        "forwarded",
                        Some("for=203.0.113.7;host=app.example.com;proto=http"),
                    ),
                ],
            },
            Case {
                name: "trusted peer extends the chain and keeps proto/host/port",
                peer: "10.0.0.2",
                trusted: &["10.0.0.0/8"],
                incoming: &[
                    ("x-forwarded-for", "198.51.100.1, 10.0.0.9"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "www.example.com"),
                    ("x-forwarded-port", "443"),
                    ("forwarded", "for=198.51.100.1;proto=https"),
                ],
                prefix: None,
                expect: &[
                    ("x-forwarded-for", Some("198.51.100.1, 10.0.0.9, 10.0.0.2")),
                    ("x-real-ip", Some("198.51.100.1")),
                    ("x-forwarded-proto", Some("https")),
                    ("x-forwarded-host", Some("www.example.com")),
                    ("x-forwarded-port", Some("443")),
                    (
                        "forwarded",
                        Some(
                            "for=198.51.100.1;proto=https, for=10.0.0.2;host=app.example.com;proto=http",
                        ),
                    ),
                ],
            },
            Case {
                name: "trusted peer's empty Forwarded value adds no empty element",
                peer: "10.0.0.2",
                trusted: &["10.0.0.0/8"],
                incoming: &[("forwarded", "for=198.51.100.1"), ("forwarded", " ")],
                prefix: None,
                expect: &[(
                    "forwarded",
                    Some("for=198.51.100.1, for=10.0.0.2;host=app.example.com;proto=http"),
                )],
            },
            Case {
                name: "trusted peer, client spoofed the left of the chain",
                peer: "10.0.0.2",
                trusted: &["10.0.0.0/8"],
                incoming: &[("x-forwarded-for", "6.6.6.6, 198.51.100.1")],
                prefix: None,
                expect: &[
                    ("x-forwarded-for", Some("6.6.6.6, 198.51.100.1, 10.0.0.2")),
                    ("x-real-ip", Some("198.51.100.1")),
                ],
            },
            Case {
                name: "trusted peer without headers",
                peer: "10.0.0.2",
                trusted: &["10.0.0.0/8"],
                incoming: &[],
                prefix: None,
                expect: &[
                    ("x-forwarded-for", Some("10.0.0.2")),
                    ("x-real-ip", Some("10.0.0.2")),
                    ("x-forwarded-proto", Some("http")),
                ],
            },
            Case {
                name: "ipv6 peer is quoted in Forwarded",
                peer: "2001:db8::1",
                trusted: &[],
                incoming: &[],
                prefix: None,
                expect: &[
                    ("x-forwarded-for", Some("2001:db8::1")),
                    (
                        "forwarded",
                        Some("for=\"[2001:db8::1]\";host=app.example.com;proto=http"),
                    ),
                ],
            },
            Case {
                name: "v4-mapped peer is shown as v4",
                peer: "::ffff:192.0.2.9",
                trusted: &[],
                incoming: &[],
                prefix: None,
                expect: &[
                    ("x-forwarded-for", Some("192.0.2.9")),
                    ("x-real-ip", Some("192.0.2.9")),
                ],
            },
            Case {
                name: "trusted proxy sent a scheme but no port: the scheme's default port",
                peer: "10.0.0.2",
                trusted: &["10.0.0.0/8"],
                incoming: &[("x-forwarded-proto", "https")],
                prefix: None,
                expect: &[
                    ("x-forwarded-port", Some("443")),
                    ("x-forwarded-proto", Some("https")),
                ],
            },
            Case {
                name: "strip prefix sets X-Forwarded-Prefix",
                peer: "203.0.113.7",
                trusted: &[],
                incoming: &[("x-forwarded-prefix", "/evil")],
                prefix: Some("/v1"),
                expect: &[("x-forwarded-prefix", Some("/v1"))],
            },
            Case {
                name: "prefix after a trusted proxy's prefix",
                peer: "10.1.1.1",
                trusted: &["10.0.0.0/8"],
                incoming: &[("x-forwarded-prefix", "/app/")],
                prefix: Some("/v1"),
                expect: &[("x-forwarded-prefix", Some("/app/v1"))],
            },
        ];
        for case in cases {
            let mut h = map(case.incoming);
            let host = HeaderValue::from_static("app.example.com");
            let conn = PeerText::new(case.peer.parse().unwrap(), 8080);
            let fwd = Forwarding {
                conn: &conn,
                proto: "http",
                host: &host,
                prefix: case.prefix,
            };
            set_forwarding(&mut h, &fwd, &trusted(case.trusted));
            for (name, want) in case.expect {
                assert_eq!(get(&h, name), *want, "{}: header {name}", case.name);
            }
        }
    }

    #[test]
    fn host_with_port_is_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        let host = HeaderValue::from_static("app.example.com:8443");
        let conn = PeerText::new("192.0.2.1".parse().unwrap(), 443);
        let fwd = Forwarding {
            conn: &conn,
            proto: "https",
            host: &host,
            prefix: None,
        };
        set_forwarding(&mut h, &fwd, &TrustedProxies::default());
        assert_eq!(
            get(&h, "forwarded"),
            Some("for=192.0.2.1;host=\"app.example.com:8443\";proto=https")
        );
        assert_eq!(get(&h, "x-forwarded-host"), Some("app.example.com:8443"));
        assert_eq!(
            get(&h, "x-forwarded-port"),
            Some("8443"),
            "the port the client used"
        );
    }

    #[test]
    fn forwarded_follows_each_requests_host_and_scheme() {
        // One connection whose requests name different hosts and schemes.
        let conn = PeerText::new("192.0.2.1".parse().unwrap(), 443);
        for (host, proto, want) in [
            (
                "a.example.com",
                "https",
                "for=192.0.2.1;host=a.example.com;proto=https",
            ),
            (
                "b.example.com:8443",
                "https",
                "for=192.0.2.1;host=\"b.example.com:8443\";proto=https",
            ),
            (
                "a.example.com",
                "https",
                "for=192.0.2.1;host=a.example.com;proto=https",
            ),
            (
                "a.example.com",
                "http",
                "for=192.0.2.1;host=a.example.com;proto=http",
            ),
            (
                "a.example.com",
                "https",
                "for=192.0.2.1;host=a.example.com;proto=https",
            ),
        ] {
            let mut h = HeaderMap::new();
            let host = HeaderValue::from_static(host);
            let fwd = Forwarding {
                conn: &conn,
                proto,
                host: &host,
                prefix: None,
            };
            set_forwarding(&mut h, &fwd, &TrustedProxies::default());
            assert_eq!(get(&h, "forwarded"), Some(want));
        }
    }

    #[test]
    fn a_connections_forwarding_block_follows_host_scheme_and_prefix() {
        // Each call is a request on one connection; the block is kept for the last one.
        let conn = PeerText::new("2001:db8::7".parse().unwrap(), 443);
        let block = |host: &'static str, proto, prefix| {
            let b = conn.forwarding_block(&HeaderValue::from_static(host), proto, prefix);
            String::from_utf8(b.to_vec()).unwrap()
        };
        let plain = "x-forwarded-for: 2001:db8::7\r\nx-real-ip: 2001:db8::7\r\n\
                     x-forwarded-port: 443\r\nx-forwarded-proto: https\r\n\
                     x-forwarded-host: a.example.com\r\n\
                     forwarded: for=\"[2001:db8::7]\";host=a.example.com;proto=https\r\n";
        let other = "x-forwarded-for: 2001:db8::7\r\nx-real-ip: 2001:db8::7\r\n\
                     x-forwarded-port: 8443\r\nx-forwarded-proto: https\r\n\
                     x-forwarded-host: b.example.com:8443\r\nx-forwarded-prefix: /api\r\n\
                     forwarded: for=\"[2001:db8::7]\";host=\"b.example.com:8443\";proto=https\r\n";
        assert_eq!(block("a.example.com", "https", None), plain);
        assert_eq!(block("b.example.com:8443", "https", Some("/api")), other);
        assert_eq!(
            block("a.example.com", "https", None),
            plain,
            "the first one is kept"
        );
        assert!(
            block("a.example.com", "https", Some("/api")).contains("x-forwarded-prefix: /api\r\n")
        );
        assert!(block("a.example.com", "http", None).contains("x-forwarded-proto: http\r\n"));
        assert_eq!(block("a.example.com", "https", None), plain);
        assert_eq!(block("b.example.com:8443", "https", Some("/api")), other);
        assert_eq!(block("a.example.com", "https", None), plain);
    }

    #[test]
    fn token_characters_are_rfc_9110s() {
        for b in 0..=255u8 {
            let listed = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(is_tchar(b), listed, "{b:#x}");
        }
    }

    #[test]
    fn is_hop_by_hop_names_the_fixed_list_and_nothing_else() {
        for name in fixed_hop_by_hop() {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            "x-kept",
            "content-length",
            "connections",
            "tee",
            "host",
            "upgrade-x",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn hop_by_hop_table() {
        strips_all_but_x_kept(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eA=="),
            ("x-kept", "yes"),
        ]);
    }

    /// After hop-by-hop removal only `x-kept: yes` is left.
    fn strips_all_but_x_kept(pairs: &[(&str, &str)]) {
        let mut h = map(pairs);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(get(&h, "x-kept"), Some("yes"));
    }

    #[test]
    fn connection_is_where_connection_at_says() {
        assert_eq!(fixed_hop_by_hop()[CONNECTION_AT], header::CONNECTION);
    }

    #[test]
    fn connection_naming_only_fixed_headers_takes_the_short_path_and_still_strips() {
        // Only fixed names and `close`: every hop-by-hop header goes, the rest stays.
        strips_all_but_x_kept(&[
            ("connection", "Keep-Alive, TE"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ]);
        // A second Connection value naming another header still has that header removed.
        strips_all_but_x_kept(&[
            ("connection", "keep-alive"),
            ("connection", "X-Secret"),
            ("x-secret", "1"),
            ("x-kept", "yes"),
        ]);
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = map(&[
            ("connection", "Upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("sec-websocket-key", "abc"),
        ]);
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(get(&h, "upgrade"), Some("websocket"));
        assert_eq!(get(&h, "connection"), Some("upgrade"));
        assert_eq!(get(&h, "x-secret"), None);
        assert_eq!(get(&h, "sec-websocket-key"), Some("abc"));
    }

    #[test]
    fn chain_entries() {
        assert_eq!(
            parse_chain_ip("1.2.3.4:99"),
            Some("1.2.3.4".parse().unwrap())
        );
        assert_eq!(
            parse_chain_ip("[2001:db8::1]:99"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(parse_chain_ip("unknown"), None);
    }
}
