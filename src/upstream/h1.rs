//! gangway's own HTTP/1.1 client connection to a replica.
//!
//! hyper's client runs each connection as a task of its own and hands requests, responses
//! and body chunks to it through channels: a proxied request then crosses between the client
//! connection's task and the upstream connection's task four times. Here the request's own
//! task writes the head, reads the response head and streams the body straight from the
//! socket, and an idle connection is only a socket and its buffer in the pool, with no task.
//!
//! A request body is streamed as it arrives (its own length, or chunked when it has none)
//! while the replica is watched for an early answer (a 413 before the upload ends): the
//! answer is relayed and the connection, its request unfinished, is not reused. A `101`
//! hands the socket and any bytes after the head to the caller for the tunnel.

use crate::deadline::Deadline;
use crate::proxy::headers::{
    Added, is_hop_by_hop, list_tokens, names_fixed_hop_by_hop, remove_hop_by_hop,
};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use smallvec::SmallVec;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A response head longer than this is refused (hyper's default is about 400 KiB; nginx's
/// `proxy_buffer_size` is 4–8 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// Response headers at most (hyper's default).
const MAX_HEADERS: usize = 100;
/// The least capacity of a response's header map. hyper's HTTP/1.1 server keeps the map of
/// the response it wrote and parses the client's next request into it; gangway then adds
/// up to [`ADDED_HEADERS`](crate::proxy::headers::ADDED_HEADERS) (9) to the request. A map
/// made for 13 holds 24, so a request of up to 15 headers takes them without growing: sized
/// for the response alone (6 headers from nginx), every request's map grew once, an
/// allocation and a reallocation each.
const RESPONSE_MAP_MIN: usize = 13;
/// How much is read at a time while no body length says more.
const READ_SIZE: usize = 8 * 1024;
/// The largest read for a long body.
const MAX_READ: usize = 64 * 1024;
/// An idle connection keeps buffers up to this size; larger ones (left by a long body or a
/// large head) are freed rather than pinned by the pool.
const KEEP_IDLE: usize = 16 * 1024;
/// The header line added to a request whose body has no Content-Length.
const TE_CHUNKED: &[u8] = b"transfer-encoding: chunked\r\n";
/// A chunk-size line (with extensions) or a trailer line longer than this is refused.
const MAX_LINE: usize = 4096;

/// One keep-alive connection: the socket and what was read from it beyond the last response.
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// Reused for each request head.
    out: Vec<u8>,
    /// The response-head deadline, kept from request to request (see [`Deadline`]).
    deadline: Option<Deadline>,
}

/// Why a request on a connection failed.
#[derive(Debug)]
pub enum SendError {
    /// Writing the request failed: the replica cannot have acted on it.
    Unsent(io::Error),
    /// The connection closed after the request was written, before any byte of a response
    /// (on a reused connection, the keep-alive race).
    Closed,
    /// The response was broken or could not be read.
    Broken(String),
    /// No final response head came within the limit given to [`Conn::send`].
    TimedOut,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Unsent(e) => write!(f, "request not sent: {e}"),
            SendError::Closed => f.write_str("connection closed before a response"),
            SendError::Broken(why) => f.write_str(why),
            SendError::TimedOut => f.write_str("no response head in time"),
        }
    }
}

/// How the response body is delimited (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the connection closes; the connection cannot be reused.
    Close,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            deadline: None,
        }
    }

    /// False when the replica closed the connection or sent something unasked while it was
    /// idle. Costs no system call unless the runtime saw it become readable.
    pub fn is_reusable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: a FIN or stray bytes, unless the readiness is stale.
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Frees buffers too large to keep while the connection is idle.
    pub fn trim(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > KEEP_IDLE {
            self.buf = BytesMut::new();
        }
        if self.out.capacity() > KEEP_IDLE {
            self.out = Vec::new();
        }
    }

    /// Sends a request and reads the response head; `body` is streamed after the head (it
    /// is only read from once the head is written, so on [`SendError::Unsent`] it is whole).
    /// All of it must be done within `limit` (the route's `upstream_header`), else
    /// [`SendError::TimedOut`]. The response body is read through the returned [`H1Body`],
    /// which gives the connection back when it can be reused.
    pub async fn send<B>(
        mut self,
        req: &http::request::Parts,
        added: Option<&Added>,
        body: Option<&mut B>,
        limit: Duration,
    ) -> Result<http::Response<H1Body>, SendError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        // One deadline per connection, not a `tokio::time::timeout` (a timer made, set and
        // removed) per request: see [`Deadline`].
        let due = Instant::now() + limit;
        let mut deadline = match self.deadline.take() {
            Some(mut d) => {
                d.set(due);
                d
            }
            None => Deadline::new(due),
        };
        let head = {
            let mut exchange = std::pin::pin!(self.exchange(req, added, body));
            std::future::poll_fn(|cx| match exchange.as_mut().poll(cx) {
                Poll::Ready(done) => Poll::Ready(done),
                Poll::Pending if deadline.poll_expired(cx) => Poll::Ready(Err(SendError::TimedOut)),
                Poll::Pending => Poll::Pending,
            })
            .await?
        };
        self.deadline = Some(deadline);
        let (head, framing, keep_alive) = head;
        Ok(self.respond(head, framing, keep_alive))
    }

    /// What [`Conn::send`] does, without its time limit.
    async fn exchange<B>(
        &mut self,
        req: &http::request::Parts,
        added: Option<&Added>,
        body: Option<&mut B>,
    ) -> Result<Head, SendError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let chunked = body.is_some() && !req.headers.contains_key(header::CONTENT_LENGTH);
        encode_head(&mut self.out, req, added, chunked);
        if let Err(e) = self.io.write_all(&self.out).await {
            return Err(SendError::Unsent(e));
        }
        if let Some(body) = body
            && let Some((head, framing, _)) = self.upload(body, chunked, &req.method).await?
        {
            // The replica answered before the request ended: relay its answer, and never
            // reuse a connection whose request is unfinished.
            return Ok((head, framing, false));
        }
        self.read_head(&req.method).await
    }

    fn respond(
        self,
        head: http::response::Parts,
        framing: Framing,
        keep_alive: bool,
    ) -> http::Response<H1Body> {
        let upgraded = head.status == StatusCode::SWITCHING_PROTOCOLS;
        let mut body = H1Body {
            conn: Some(self),
            framing,
            keep_alive: keep_alive && !upgraded,
        };
        // A 101's connection is kept for the tunnel, never pooled.
        if !upgraded {
            body.settle();
        }
        http::Response::from_parts(head, body)
    }

    /// Reads until a final response head is complete.
    async fn read_head(&mut self, method: &Method) -> Result<Head, SendError> {
        let mut received = !self.buf.is_empty();
        loop {
            if !self.buf.is_empty() {
                received = true;
                match parse_head(&mut self.buf, method)? {
                    Parsed::Final(head) => return Ok(head),
                    // An interim response (100 Continue, 103 Early Hints) was consumed.
                    Parsed::Interim => continue,
                    Parsed::Partial => {}
                }
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(SendError::Broken("response head too large".into()));
            }
            self.buf.reserve(READ_SIZE);
            match self.read().await {
                Ok(0) if !received => return Err(SendError::Closed),
                Ok(0) => {
                    return Err(SendError::Broken(
                        "connection closed in response head".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) if !received => {
                    return Err(match e.kind() {
                        io::ErrorKind::ConnectionReset => SendError::Closed,
                        _ => SendError::Broken(e.to_string()),
                    });
                }
                Err(e) => return Err(SendError::Broken(e.to_string())),
            }
        }
    }

    /// Streams `body` to the replica. Returns early with the replica's final response head
    /// when one arrives before the body ends; `None` once the whole body is written.
    async fn upload<B>(
        &mut self,
        body: &mut B,
        chunked: bool,
        method: &Method,
    ) -> Result<Option<Head>, SendError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut pending: Option<Outgoing> = None;
        let mut body_done = false;
        let uploaded = std::future::poll_fn(|cx| {
            loop {
                // Anything from the replica yet? An answer ends the upload.
                if self.buf.len() < MAX_HEAD {
                    self.buf.reserve(READ_SIZE);
                    match self.poll_read(cx) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(broken(
                                "replica closed the connection during the upload",
                            )));
                        }
                        Poll::Ready(Ok(_)) => match parse_head(&mut self.buf, method)? {
                            Parsed::Final(head) => return Poll::Ready(Ok(Upload::Answered(head))),
                            Parsed::Interim | Parsed::Partial => continue,
                        },
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(broken(e.to_string()))),
                        Poll::Pending => {}
                    }
                }
                if let Some(out) = pending.as_mut() {
                    match tokio_util::io::poll_write_buf(Pin::new(&mut self.io), cx, out) {
                        Poll::Ready(Ok(0)) => {
                            let why = "replica stopped reading the upload".to_owned();
                            return Poll::Ready(Ok(Upload::Cut(why)));
                        }
                        Poll::Ready(Ok(_)) => {
                            if !out.has_remaining() {
                                pending = None;
                            }
                            continue;
                        }
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Ok(Upload::Cut(format!("upload failed: {e}"))));
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                if body_done {
                    return Poll::Ready(Ok(Upload::Sent));
                }
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // Trailers are dropped: few replicas read them.
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            pending = Some(outgoing(data, chunked));
                        }
                    }
                    Poll::Ready(None) => {
                        body_done = true;
                        if chunked {
                            pending = Some(last_chunk());
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(broken(format!("client request body: {e}"))));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await?;
        let why = match uploaded {
            Upload::Sent => return Ok(None),
            Upload::Answered(head) => return Ok(Some(head)),
            Upload::Cut(why) => why,
        };
        // A replica that refuses a body from its head (a 413, a 401) may answer and close
        // without reading the rest; the write then fails, often before the runtime has seen
        // the answer arrive. What it sent is still there to read (a reset drops what was
        // queued to send, not what was received): relay it, or else the write's error.
        match self.read_head(method).await {
            Ok(head) => Ok(Some(head)),
            Err(_) => Err(broken(why)),
        }
    }

    async fn read(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read(cx)).await
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// The socket and any bytes read past the response head, for an upgraded connection.
    fn into_parts(self) -> (TcpStream, Bytes) {
        (self.io, self.buf.freeze())
    }
}

/// How an upload ended: the body all sent, an answer before it was, or the replica no longer
/// taking it (why), which may still have answered before it stopped.
enum Upload {
    Sent,
    Answered(Head),
    Cut(String),
}

/// A final response head, its body's framing and whether the connection stays open.
type Head = (http::response::Parts, Framing, bool);

/// Bytes of the request body on their way to the replica, with their chunk framing.
type Outgoing = bytes::buf::Chain<bytes::buf::Chain<Bytes, Bytes>, &'static [u8]>;

/// A piece of the request body, framed as a chunk when the body is chunked.
fn outgoing(data: Bytes, chunked: bool) -> Outgoing {
    if chunked {
        let size = Bytes::from(format!("{:x}\r\n", data.len()));
        size.chain(data).chain(&b"\r\n"[..])
    } else {
        Bytes::new().chain(data).chain(&b""[..])
    }
}

/// The end of a chunked body (no trailers).
fn last_chunk() -> Outgoing {
    Bytes::from_static(b"0\r\n\r\n")
        .chain(Bytes::new())
        .chain(&b""[..])
}

enum Parsed {
    Final(Head),
    Interim,
    Partial,
}

/// `GET /path HTTP/1.1\r\n`, the headers, and the blank line.
fn encode_head(
    out: &mut Vec<u8>,
    req: &http::request::Parts,
    added: Option<&Added>,
    chunked: bool,
) {
    out.clear();
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut size = req.method.as_str().len() + target.len() + 13 + TE_CHUNKED.len();
    size += added.map_or(0, Added::wire_len);
    for (name, value) in &req.headers {
        size += name.as_str().len() + value.len() + 4;
    }
    out.reserve(size);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &req.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(added) = added {
        added.write_to(out);
    }
    if chunked {
        out.extend_from_slice(TE_CHUNKED);
    }
    out.extend_from_slice(b"\r\n");
}

fn broken(why: impl Into<String>) -> SendError {
    SendError::Broken(why.into())
}

/// The header names an app's responses are mostly made of, as `http` names them, found
/// without [`HeaderName::from_bytes`]: that one lower-cases the name into a buffer and walks
/// its table of every standard header, about 140 instructions for each header of every
/// response (benches/instructions.py); this is a length match and a compare. `None` for any
/// other name, which the caller parses the usual way.
fn common_name(name: &[u8]) -> Option<HeaderName> {
    use header::*;
    let first = name.first()? | 0x20;
    let known = match (name.len(), first) {
        (3, b'a') => (eq_lowercase(name, b"age"), AGE),
        (3, b'v') => (eq_lowercase(name, b"via"), VIA),
        (4, b'd') => (eq_lowercase(name, b"date"), DATE),
        (4, b'e') => (eq_lowercase(name, b"etag"), ETAG),
        (4, b'l') => (eq_lowercase(name, b"link"), LINK),
        (4, b'v') => (eq_lowercase(name, b"vary"), VARY),
        (6, b's') => (eq_lowercase(name, b"server"), SERVER),
        (7, b'e') => (eq_lowercase(name, b"expires"), EXPIRES),
        (7, b'u') => (eq_lowercase(name, b"upgrade"), UPGRADE),
        (8, b'l') => (eq_lowercase(name, b"location"), LOCATION),
        (10, b'c') => (eq_lowercase(name, b"connection"), CONNECTION),
        (10, b's') => (eq_lowercase(name, b"set-cookie"), SET_COOKIE),
        (12, b'c') => (eq_lowercase(name, b"content-type"), CONTENT_TYPE),
        (13, b'a') => (eq_lowercase(name, b"accept-ranges"), ACCEPT_RANGES),
        (13, b'c') => (eq_lowercase(name, b"cache-control"), CACHE_CONTROL),
        (13, b'l') => (eq_lowercase(name, b"last-modified"), LAST_MODIFIED),
        (14, b'c') => (eq_lowercase(name, b"content-length"), CONTENT_LENGTH),
        (16, b'c') => (eq_lowercase(name, b"content-encoding"), CONTENT_ENCODING),
        (17, b't') => (eq_lowercase(name, b"transfer-encoding"), TRANSFER_ENCODING),
        _ => return None,
    };
    known.0.then_some(known.1)
}

/// Whether `name` is `lower` (lower-case letters and other bytes) with its letters in any
/// case: a letter matches either case of itself, any other byte only itself. Eight bytes at
/// a time (the last word overlapping the one before), with `lower` a constant the words and
/// case masks of which the compiler works out: a byte loop cost about as much as
/// `HeaderName::from_bytes`.
#[inline(always)]
fn eq_lowercase<const N: usize>(name: &[u8], lower: &[u8; N]) -> bool {
    let Ok(name) = <&[u8; N]>::try_from(name) else {
        return false;
    };
    let mut at = 0;
    loop {
        // Each word starts at `at`, the last one at N - 8 (or 0 when shorter).
        let start = at.min(N.saturating_sub(8));
        let width = N.min(8);
        let (got, want, fold) = (
            word(name, start, width),
            word(lower, start, width),
            fold(lower, start, width),
        );
        if got | fold != want {
            return false;
        }
        at = start + 8;
        if at >= N {
            return true;
        }
    }
}

/// `width` (up to 8) bytes of `bytes` from `at`, as one little-endian word.
#[inline(always)]
fn word<const N: usize>(bytes: &[u8; N], at: usize, width: usize) -> u64 {
    let mut w = [0u8; 8];
    w[..width].copy_from_slice(&bytes[at..at + width]);
    u64::from_le_bytes(w)
}

/// The case bit (0x20) at each letter of `lower` in the same word as [`word`].
#[inline(always)]
fn fold<const N: usize>(lower: &[u8; N], at: usize, width: usize) -> u64 {
    let mut w = [0u8; 8];
    for (m, &b) in w.iter_mut().zip(&lower[at..at + width]) {
        *m = if b.is_ascii_lowercase() { 0x20 } else { 0 };
    }
    u64::from_le_bytes(w)
}

/// Parses a response head at the start of `buf`, consuming it when complete.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Parsed, SendError> {
    // Uninitialised slots: zeroing 100 headers of 32 bytes for every response showed in
    // profiles.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(broken(format!("invalid response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| broken("invalid status code"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each name and value sits in the head, so the values can share its bytes. On the
    // stack up to 16 headers: a Vec here was one allocation per response.
    //
    // The framing and the keep-alive are read off the raw headers on the way, and the
    // hop-by-hop headers (RFC 9110 §7.6.1) are left out of the map: looking each of them up
    // in the map afterwards, and removing them from it, was a tenth of gangway's user-space
    // instructions per request (benches/instructions.py). A `101` keeps them all, for the
    // upgrade; so does a `Connection` that names other headers, which the general rule
    // removes after.
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let base = buf.as_ptr() as usize;
    let mut spans: SmallVec<[(HeaderName, usize, usize, bool); 16]> = SmallVec::new();
    let mut connection = ConnectionTokens::default();
    // Whether the last `Transfer-Encoding` ends with `chunked`; None without one.
    let mut chunked: Option<bool> = None;
    // Ok(None) while no Content-Length was seen.
    let mut length: Result<Option<u64>, SendError> = Ok(None);
    for h in resp.headers.iter() {
        let at = h.value.as_ptr() as usize - base;
        let name = match common_name(h.name.as_bytes()) {
            Some(name) => name,
            None => HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| broken(format!("invalid header name {:?}", h.name)))?,
        };
        let hop = is_hop_by_hop(&name);
        if name == header::CONTENT_LENGTH {
            if let Ok(found) = length {
                length = add_content_length(found, h.value);
            }
        } else if name == header::CONNECTION {
            connection.add(h.value);
        } else if name == header::TRANSFER_ENCODING {
            chunked = Some(last_coding_is_chunked(h.value));
        }
        spans.push((name, at, at + h.value.len(), hop));
    }
    let keep_all = switching || connection.names_others;
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len().max(RESPONSE_MAP_MIN));
    // Drained in place: moving the SmallVec into its iterator copied all 16 slots.
    for (name, start, end, hop) in spans.drain(..) {
        if hop && !keep_all {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| broken(format!("invalid value for header {name}")))?;
        headers.append(name, value);
    }
    if connection.names_others && !switching {
        remove_hop_by_hop(&mut headers, false);
    }
    let mut keep_alive = match version {
        Version::HTTP_10 => connection.keep_alive,
        _ => !connection.close,
    };
    let framing = if switching
        || method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if let Some(chunked) = chunked {
        // A length alongside a transfer coding is a smuggling attempt or a broken server.
        if !matches!(length, Ok(None)) {
            return Err(broken(
                "response has both Transfer-Encoding and Content-Length",
            ));
        }
        if chunked && version == Version::HTTP_11 {
            Framing::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else {
        match length? {
            Some(n) => Framing::Length(n),
            None => {
                keep_alive = false;
                Framing::Close
            }
        }
    };
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    // The version is the connection's: the client's connection is answered in its own.
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Ok(Parsed::Final((parts, framing, keep_alive)))
}

/// What a response's `Connection` headers say.
#[derive(Default)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    /// A token that names a header beyond the fixed hop-by-hop ones, to be removed too.
    names_others: bool,
}

impl ConnectionTokens {
    fn add(&mut self, value: &[u8]) {
        for token in list_tokens(value) {
            if token.eq_ignore_ascii_case("close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case("keep-alive") {
                self.keep_alive = true;
            } else if !names_fixed_hop_by_hop(token.as_bytes()) {
                self.names_others = true;
            }
        }
    }
}

/// Whether the last coding of a `Transfer-Encoding` value is `chunked`.
fn last_coding_is_chunked(value: &[u8]) -> bool {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.rsplit(',').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
}

/// Adds one `Content-Length` value to the length found so far: every value, and every
/// element of a list, must be the same number.
fn add_content_length(mut found: Option<u64>, value: &[u8]) -> Result<Option<u64>, SendError> {
    for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(broken("invalid Content-Length"));
        }
        let n = std::str::from_utf8(part)
            .ok()
            .and_then(|p| p.parse::<u64>().ok())
            .ok_or_else(|| broken("invalid Content-Length"))?;
        if found.is_some_and(|f| f != n) {
            return Err(broken("conflicting Content-Length values"));
        }
        found = Some(n);
    }
    Ok(found)
}

/// A response body read straight from its connection.
pub struct H1Body {
    /// None once the body is done (or broken).
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
}

/// What one step of the body decoder found.
enum Step {
    Data(Bytes),
    NeedMore,
    Done,
}

impl H1Body {
    /// The connection, when the body was read to its end and the replica keeps it open.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        if self.framing == Framing::Length(0) && self.keep_alive {
            self.conn.take()
        } else {
            None
        }
    }

    /// The socket and the bytes already read from it, after a `101 Switching Protocols`.
    pub fn into_upgraded(mut self) -> Option<(TcpStream, Bytes)> {
        self.conn.take().map(Conn::into_parts)
    }

    /// Marks a finished body (nothing left to read) as done at once.
    fn settle(&mut self) {
        if self.framing == Framing::Length(0) && !self.keep_alive {
            self.conn = None;
        }
    }

    fn step(&mut self) -> Result<Step, String> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Step::Done);
        };
        let buf = &mut conn.buf;
        loop {
            match &mut self.framing {
                Framing::Length(0) => return Ok(Step::Done),
                Framing::Length(rest) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = (*rest).min(buf.len() as u64) as usize;
                    *rest -= n as u64;
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Framing::Close => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Framing::Chunked(state) => match *state {
                    Chunk::Size => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Step::NeedMore);
                        };
                        let size = chunk_size(&line)?;
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(rest) => {
                        if buf.is_empty() {
                            return Ok(Step::NeedMore);
                        }
                        let n = rest.min(buf.len() as u64) as usize;
                        *state = if rest == n as u64 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(rest - n as u64)
                        };
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Step::NeedMore);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err("invalid chunk end".into());
                        }
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        // Trailer fields are read and dropped.
                        let Some(line) = take_line(buf)? else {
                            return Ok(Step::NeedMore);
                        };
                        if line.is_empty() {
                            self.framing = Framing::Length(0);
                        }
                    }
                },
            }
        }
    }
}

/// A line without its CRLF (or bare LF), consumed from `buf`; None until it is complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err("chunk line too long".into()),
        None => Ok(None),
    }
}

/// The size from a chunk-size line, extensions ignored.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err("invalid chunk size".into());
    }
    let mut n = 0u64;
    for &b in digits {
        let d = (b as char)
            .to_digit(16)
            .ok_or_else(|| "invalid chunk size".to_string())?;
        n = n * 16 + u64::from(d);
    }
    Ok(n)
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            match this.step() {
                Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Step::Done) => {
                    if !this.keep_alive {
                        this.conn = None;
                    }
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(why) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, why))));
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let want = match this.framing {
                Framing::Length(rest) => (rest as usize).clamp(READ_SIZE, MAX_READ),
                _ => READ_SIZE,
            };
            conn.buf.reserve(want);
            match ready!(conn.poll_read(cx)) {
                Ok(0) if this.framing == Framing::Close => {
                    this.framing = Framing::Length(0);
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection mid-body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_are_the_names_http_parses() {
        let known = [
            "age",
            "via",
            "date",
            "etag",
            "link",
            "vary",
            "server",
            "expires",
            "upgrade",
            "location",
            "connection",
            "set-cookie",
            "content-type",
            "accept-ranges",
            "cache-control",
            "last-modified",
            "content-length",
            "content-encoding",
            "transfer-encoding",
        ];
        for text in known {
            let parsed = HeaderName::from_bytes(text.as_bytes()).unwrap();
            for spelling in [
                text.to_string(),
                text.to_ascii_uppercase(),
                text.split('-')
                    .map(|w| w[..1].to_ascii_uppercase() + &w[1..])
                    .collect::<Vec<_>>()
                    .join("-"),
            ] {
                assert_eq!(
                    common_name(spelling.as_bytes()),
                    Some(parsed.clone()),
                    "{spelling}"
                );
            }
            // Every one-byte change, and one byte more or less, is another name (or not a
            // name): never taken for this one.
            for at in 0..text.len() {
                for b in 0..=255u8 {
                    let mut other = text.as_bytes().to_vec();
                    other[at] = b;
                    if other.eq_ignore_ascii_case(text.as_bytes()) {
                        continue;
                    }
                    if let Some(found) = common_name(&other) {
                        assert_eq!(
                            Some(found),
                            HeaderName::from_bytes(&other).ok(),
                            "{other:?}"
                        );
                    }
                }
            }
            assert_eq!(common_name(&text.as_bytes()[1..]), None);
            assert_eq!(common_name(format!("{text}s").as_bytes()), None);
        }
        for other in [
            "x-request-id",
            "keep-alive",
            "",
            "-",
            "content-md5",
            "dat\r",
        ] {
            assert_eq!(common_name(other.as_bytes()), None, "{other}");
        }
    }

    fn head(bytes: &[u8], method: Method) -> Result<Parsed, SendError> {
        parse_head(&mut BytesMut::from(bytes), &method)
    }

    fn framing(bytes: &[u8], method: Method) -> (Framing, bool) {
        match head(bytes, method) {
            Ok(Parsed::Final((_, framing, keep_alive))) => (framing, keep_alive),
            Ok(_) => panic!("no final head"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let get = || Method::GET;
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", get()),
            (Framing::Length(5), true)
        );
        // A list of equal lengths is one length.
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n", get()),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                get()
            ),
            (Framing::Chunked(Chunk::Size), true)
        );
        // A transfer coding that does not end in chunked: read to the close.
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", get()),
            (Framing::Close, false)
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\n\r\n", get()),
            (Framing::Close, false)
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Method::HEAD
            ),
            (Framing::Length(0), true)
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
                get()
            ),
            (Framing::Length(0), true)
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, Close\r\ncontent-length: 0\r\n\r\n",
                get()
            ),
            (Framing::Length(0), false)
        );
        assert_eq!(
            framing(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", get()),
            (Framing::Length(0), false)
        );
        assert!(matches!(
            head(b"HTTP/1.1 103 Early Hints\r\n\r\n", get()),
            Ok(Parsed::Interim)
        ));
        assert!(matches!(
            head(b"HTTP/1.1 200 OK\r\ncontent-le", get()),
            Ok(Parsed::Partial)
        ));
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        ] {
            assert!(
                head(bad, get()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn header_values_share_the_read_buffer_and_the_rest_stays() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nx-a: one\r\nX-B: two\r\ncontent-length: 3\r\n\r\nabcNEXT"[..],
        );
        let Ok(Parsed::Final((parts, framing, _))) = parse_head(&mut buf, &Method::GET) else {
            panic!("no head");
        };
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers["x-a"], "one");
        assert_eq!(parts.headers["x-b"], "two");
        assert_eq!(framing, Framing::Length(3));
        assert_eq!(&buf[..], b"abcNEXT");
    }

    fn final_headers(bytes: &[u8]) -> (HeaderMap, Framing, bool) {
        match head(bytes, Method::GET) {
            Ok(Parsed::Final((parts, framing, keep_alive))) => (parts.headers, framing, keep_alive),
            Ok(_) => panic!("no final head"),
            Err(e) => panic!("{e}"),
        }
    }

    fn names(map: &HeaderMap) -> Vec<&str> {
        map.keys().map(HeaderName::as_str).collect()
    }

    #[test]
    fn hop_by_hop_headers_stay_out_of_the_map() {
        // What nginx and most apps send: keep-alive, and a chunked body.
        let (map, framing, keep_alive) = final_headers(
            b"HTTP/1.1 200 OK\r\nServer: app\r\nConnection: keep-alive\r\n\
              Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\
              X-App: 1\r\n\r\n",
        );
        assert_eq!(names(&map), ["server", "x-app"]);
        assert_eq!((framing, keep_alive), (Framing::Chunked(Chunk::Size), true));

        // `Connection` naming another header: that one goes too, wherever it stands.
        let (map, framing, keep_alive) = final_headers(
            b"HTTP/1.1 200 OK\r\nX-Secret: s\r\nConnection: close, X-Secret\r\n\
              Proxy-Connection: x\r\nX-App: 1\r\nContent-Length: 3\r\n\r\n",
        );
        assert_eq!(names(&map), ["x-app", "content-length"]);
        assert_eq!((framing, keep_alive), (Framing::Length(3), false));

        // HTTP/1.0 keeps the connection only when asked to.
        let (map, _, keep_alive) = final_headers(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(keep_alive);
        assert_eq!(names(&map), ["content-length"]);

        // A 101 keeps everything: the upgrade is relayed as it came.
        let (map, framing, _) = final_headers(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\n\r\n",
        );
        assert_eq!(names(&map), ["upgrade", "connection"]);
        assert_eq!(framing, Framing::Length(0));

        // A value that is not visible ASCII names nothing (as `HeaderValue::to_str`).
        let (map, _, keep_alive) =
            final_headers(b"HTTP/1.1 200 OK\r\nConnection: close\xff\r\nContent-Length: 0\r\n\r\n");
        assert!(keep_alive);
        assert_eq!(names(&map), ["content-length"]);
    }

    #[test]
    fn a_response_map_takes_the_next_request_and_its_forwarding_headers_without_growing() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 204 No Content\r\nx-a: one\r\n\r\n"[..]);
        let Ok(Parsed::Final((parts, _, _))) = parse_head(&mut buf, &Method::GET) else {
            panic!("no head");
        };
        // What hyper's HTTP/1.1 server does with the map of the response it wrote: clears
        // it and parses the next request into it; then Proxy::route reserves room for the
        // headers gangway adds.
        let mut map = parts.headers;
        let capacity = map.capacity();
        map.clear();
        for i in 0..15 {
            map.insert(
                HeaderName::from_bytes(format!("x-request-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        map.reserve(crate::proxy::headers::ADDED_HEADERS);
        assert_eq!(map.capacity(), capacity, "the map grew");
    }

    #[test]
    fn chunk_lines_and_sizes() {
        let mut buf = BytesMut::from(&b"1a;ext=\"x\"\r\nrest"[..]);
        let line = take_line(&mut buf).unwrap().unwrap();
        assert_eq!(chunk_size(&line), Ok(26));
        assert_eq!(&buf[..], b"rest");
        let mut partial = BytesMut::from(&b"1a"[..]);
        assert_eq!(take_line(&mut partial), Ok(None));
        assert!(take_line(&mut BytesMut::from(&[b'1'; MAX_LINE + 1][..])).is_err());
        for bad in [&b""[..], b"x", b"-1", b"1234567890abcdef0"] {
            assert!(
                chunk_size(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(chunk_size(b"FFff"), Ok(0xffff));
    }

    #[tokio::test]
    async fn an_idle_connection_keeps_no_large_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let io = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut conn = Conn::new(io);
        conn.buf.reserve(MAX_READ);
        conn.out.reserve(KEEP_IDLE + 1);
        conn.trim();
        assert_eq!((conn.buf.capacity(), conn.out.capacity()), (0, 0));
        conn.buf.reserve(READ_SIZE);
        conn.out.reserve(1024);
        conn.trim();
        assert!(conn.buf.capacity() >= READ_SIZE && conn.out.capacity() >= 1024);
    }

    #[test]
    fn request_heads_are_written_whole() {
        let mut req = http::Request::post("/a?b=1")
            .header("host", "app.test")
            .header("x-one", "1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut out = Vec::new();
        encode_head(&mut out, &req, None, true);
        assert_eq!(
            out,
            b"POST /a?b=1 HTTP/1.1\r\nhost: app.test\r\nx-one: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        req.method = Method::GET;
        encode_head(&mut out, &req, None, false);
        assert_eq!(
            out,
            b"GET /a?b=1 HTTP/1.1\r\nhost: app.test\r\nx-one: 1\r\n\r\n"
        );
        // What gangway adds for an untrusted peer goes after the request's own headers,
        // and the size reserved for it is exact.
        let peer = crate::proxy::headers::PeerText::new("192.0.2.7".parse().unwrap(), 80);
        let added = Added {
            block: peer.forwarding_block(&http::HeaderValue::from_static("app.test"), "http", None),
            request_id: 0xfedc_ba98_7654_3210_0123_4567_89ab_cdef,
        };
        encode_head(&mut out, &req, Some(&added), false);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nhost: app.test\r\nx-one: 1\r\n\
             x-forwarded-for: 192.0.2.7\r\nx-real-ip: 192.0.2.7\r\nx-forwarded-port: 80\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: app.test\r\n\
             forwarded: for=192.0.2.7;host=app.test;proto=http\r\n\
             x-request-id: fedcba98765432100123456789abcdef\r\n\r\n"
        );
        let mut exact = Vec::new();
        added.write_to(&mut exact);
        assert_eq!(exact.len(), added.wire_len());
    }
}
