//! The Pods of the semantic table: hyper servers on `127.0.0.1:0` that speak HTTP/1.1 and h2c on
//! one port (so one Pod serves both kinds of upstream) and write down what reached them, keyed
//! by the request's `x-case` field, in a log the table reads after each request.
//!
//! What they answer is chosen by the request: `?answer=N` is N bytes of [`pattern`] with a
//! length, `?answer=N&chunked` the same streamed in 64 KiB pieces without one; a gRPC call
//! (`content-type: application/grpc`) gets a gRPC answer (`grpc-status` 0 echoing the message,
//! or 5 NOT_FOUND for the message `fail`); anything else `hello from NAME`.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

pub type AnyBody = BoxBody<Bytes, Infallible>;

/// One request as a Pod received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub pod: String,
    /// `HTTP/1.1` or `HTTP/2.0`: which protocol podgate spoke to the Pod.
    pub version: String,
    pub method: String,
    /// Path and query.
    pub target: String,
    /// `:authority` for h2, else `Host`.
    pub authority: String,
    /// Every field but `host`, names lowercase, in order.
    pub fields: Vec<(String, String)>,
    /// `length N`, `streamed` (chunked, or h2 DATA without a length) or `none`.
    pub framing: String,
    pub body: Vec<u8>,
}

/// What all Pods received, by `x-case`.
pub type Log = Arc<Mutex<HashMap<String, Vec<Seen>>>>;

/// A running Pod; stops when dropped.
pub struct EchoPod {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoPod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The bytes of a body of `n` bytes in tests: not all alike, so a lost or moved piece shows.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

/// FNV-1a (64 bit): a short name for a large body in a failure message.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A gRPC length-prefixed message (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut f = vec![0];
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    f
}

pub async fn start(name: &str, log: Log) -> EchoPod {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name: Arc<str> = name.into();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            while connections.try_join_next().is_some() {}
            let (name, log) = (name.clone(), log.clone());
            connections.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (name, log) = (name.clone(), log.clone());
                    async move { Ok::<_, Infallible>(answer(&name, &log, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    EchoPod { addr, task }
}

async fn answer(name: &str, log: &Log, req: http::Request<Incoming>) -> http::Response<AnyBody> {
    let (parts, body) = req.into_parts();
    let text = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let framing = match parts.headers.get("content-length") {
        Some(n) => format!("length {}", text(n)),
        None if body.is_end_stream() => "none".into(),
        None => "streamed".into(),
    };
    let body = match body.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) => format!("<body broke: {e}>").into_bytes(),
    };
    let seen = Seen {
        pod: name.to_string(),
        version: format!("{:?}", parts.version),
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map_or(String::new(), |p| p.to_string()),
        authority: match parts.uri.authority() {
            Some(a) => a.to_string(),
            None => parts.headers.get("host").map(text).unwrap_or_default(),
        },
        fields: parts
            .headers
            .iter()
            .filter(|(n, _)| *n != "host")
            .map(|(n, v)| (n.to_string(), text(v)))
            .collect(),
        framing,
        body,
    };
    let case = parts.headers.get("x-case").map(text).unwrap_or_default();
    let grpc_message = seen.body.get(5..).unwrap_or_default().to_vec();
    log.lock().unwrap().entry(case).or_default().push(seen);

    let builder = http::Response::builder().header("x-pod", name);
    let is_grpc = parts
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        let mut trailers = http::HeaderMap::new();
        let data = if grpc_message == b"fail" {
            trailers.insert("grpc-status", "5".parse().unwrap());
            trailers.insert("grpc-message", "no such thing".parse().unwrap());
            Vec::new()
        } else {
            trailers.insert("grpc-status", "0".parse().unwrap());
            let mut m = format!("{name}:").into_bytes();
            m.extend_from_slice(&grpc_message);
            grpc_frame(&m)
        };
        let frames = [Frame::data(Bytes::from(data)), Frame::trailers(trailers)];
        let body = StreamBody::new(futures::stream::iter(frames.map(Ok)));
        return builder
            .header("content-type", "application/grpc")
            .body(BodyExt::boxed(body))
            .unwrap();
    }
    let query = parts.uri.query().unwrap_or("");
    let size = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("answer="))
        .and_then(|n| n.parse::<usize>().ok());
    let Some(size) = size else {
        let hello = Full::new(Bytes::from(format!("hello from {name}\n")));
        return builder
            .header("content-type", "text/plain")
            .body(hello.boxed())
            .unwrap();
    };
    let bytes = Bytes::from(pattern(size));
    let body = if query.split('&').any(|kv| kv == "chunked") {
        let pieces: Vec<Bytes> = (0..size)
            .step_by(64 * 1024)
            .map(|at| bytes.slice(at..(at + 64 * 1024).min(size)))
            .collect();
        let frames = pieces.into_iter().map(|p| Ok(Frame::data(p)));
        BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
    } else {
        Full::new(bytes).boxed()
    };
    builder
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap()
}
