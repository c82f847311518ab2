//! `gangway demo`: the proxy in front of built-in replicas, so a newcomer sees round robin
//! and the forwarded headers without any other program.

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Serves "whoami" answers on `listener` until `stop`: a JSON object naming the replica and
/// echoing the request it saw (method, path, headers).
pub async fn whoami(listener: TcpListener, name: String, stop: CancellationToken) {
    let name: std::sync::Arc<str> = name.into();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => continue,
            },
        };
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let body = whoami_body(&name, &req);
                async move {
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Request headers as a JSON object (for whoami answers: the demo's and gangway-whoami's).
pub fn headers_json(headers: &http::HeaderMap) -> serde_json::Map<String, serde_json::Value> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect()
}

fn whoami_body<B>(name: &str, req: &Request<B>) -> String {
    let headers = headers_json(req.headers());
    let doc = serde_json::json!({
        "replica": name,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "headers": headers,
    });
    format!("{doc:#}\n")
}

/// Starts `n` whoami replicas on loopback; returns their addresses.
pub async fn start_replicas(n: usize, stop: &CancellationToken) -> io::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::with_capacity(n);
    for i in 1..=n {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        tokio::spawn(whoami(listener, format!("replica-{i}"), stop.clone()));
    }
    Ok(addrs)
}

/// The demo's config: `localhost` over HTTPS with a certificate from gangway's local CA
/// (plain-HTTP requests for it are redirected), and every other host over plain HTTP, both
/// in front of the same replicas.
pub fn config_yaml(
    http: SocketAddr,
    https: SocketAddr,
    storage: &std::path::Path,
    replicas: &[SocketAddr],
) -> String {
    let ups: Vec<String> = replicas.iter().map(|a| a.to_string()).collect();
    let ups = ups.join(", ");
    format!(
        "listen:\n  http: {http}\n  https: {https}\nstorage: \"{}\"\nsites:\n  \
         - hosts: [localhost]\n    tls: internal\n    upstreams: [{ups}]\n  \
         - hosts: [\"*\"]\n    tls: none\n    upstreams: [{ups}]\n",
        storage.display()
    )
}

/// One GET through the proxy; returns the status and body.
pub async fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, Bytes)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, format!("{addr}"))
        .body(Empty::<Bytes>::new())
        .map_err(io::Error::other)?;
    let resp = sender.send_request(req).await.map_err(io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();
    Ok((status, body))
}
