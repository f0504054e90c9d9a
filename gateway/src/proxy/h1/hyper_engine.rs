//! The HTTP/1.1 path on hyper, for the parser A/B of issue 15 ("Choose the parser with numbers").
//!
//! Selected when the process starts with `PODGATE_H1_ENGINE=hyper` (a bench switch, read once
//! in [`Engine::new`]; see `benches/RESULTS.md`), instead of podgate's own parser in `mod.rs`.
//! Clients are served by `hyper::server::conn::http1`, Pods are asked through
//! `hyper::client::conn::http1`, with a per-thread pool of idle `SendRequest`s per Pod (as
//! `pool.rs` pools raw connections; the connections themselves are opened by the upstream's
//! [`Connector`](super::pool::Connector), plain or TLS). Routing, Pod selection, passive
//! ejection, retries, the header policy (hop-by-hop headers dropped, `X-Forwarded-*` and
//! `X-Request-Id` set, `strip_prefix`, `host_header`), metrics and the access log are the own
//! path's.
//!
//! Framing is hyper's on both sides: `Content-Length` and `Transfer-Encoding` are never copied
//! through; hyper writes the framing of each message from the body it is given (an exact length
//! or chunks). A `Connection` option never removes `Content-Length`, `Transfer-Encoding` or
//! `Host`.
//!
//! Differences from the own path (acceptable for the A/B, to be closed if this path is kept):
//! bad request heads are answered by hyper (plain 400/431, no JSON body, not counted in
//! metrics); the whole-head deadline is hyper's `header_read_timeout`; a small request body is
//! read under one deadline instead of one per read; a Pod's answer without length reaches an
//! HTTP/1.1 client chunked instead of ended by a close; hyper adds a `Date` header where the
//! Pod sent none.

/// Whether `PODGATE_H1_ENGINE=hyper` asks for this engine; says so in the log once, since it
/// lacks some of the own path's limits (see above).
pub fn chosen() -> bool {
    static CHOSEN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let on = std::env::var("PODGATE_H1_ENGINE").is_ok_and(|v| v == "hyper");
        if on {
            log::warn!(
                "PODGATE_H1_ENGINE=hyper: HTTP/1.1 runs on the hyper engine, a benchmark switch \
                 without all of the own path's limits; do not use it in production"
            );
        }
        on
    })
}

use super::{closing, Engine, BUFFERED_BODY};
use crate::proxy::routing::{normalize_host, Match};
use crate::proxy::{access_line, error_json, Gateway, GatewayRoute, LogFields};
use crate::telemetry::access_log::{self, AccessLog};
use crate::upstream::balance::Backend;
use crate::upstream::pool::IDLE_TIMEOUT;
use crate::upstream::Upstream;
use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The largest request head accepted, as on the own path. The header count stays at hyper's
/// default (100; the own path allows 128): above it hyper parses into a heap buffer, which
/// showed in the profile.
const MAX_HEAD: usize = 64 * 1024;
/// How long a client has to send a request head, or a small body.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle `SendRequest`s kept per Pod and worker thread.
const MAX_IDLE_PER_POD: usize = 256;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A request body toward a Pod: read whole (small, replayable) or streamed from the client.
type ReqBody = Either<Full<Bytes>, Incoming>;
/// An answer body toward a client: made here (errors) or relayed from a Pod.
type RespBody = Either<Full<Bytes>, Relay>;

impl<F> Engine<F> {
    /// Serves one HTTP/1.1 client connection on the engine chosen at start.
    pub(super) async fn serve_h1(
        &self,
        io: super::ClientIo,
        addr: Option<SocketAddr>,
        tls: bool,
        shutdown: &ShutdownWatch,
    ) {
        if self.hyper {
            // Boxed, so that the own path's connection tasks do not carry this one's state.
            let io = io.into_stream();
            Box::pin(serve(&self.gateway, io, addr, shutdown, self.linger)).await
        } else {
            self.serve(io, addr, tls, shutdown).await
        }
    }
}

/// What every request of one client connection shares.
struct Conn<'g> {
    gateway: &'g Gateway,
    client: Option<SocketAddr>,
    tls: bool,
}

async fn serve(
    gateway: &Gateway,
    io: Stream,
    client: Option<SocketAddr>,
    shutdown: &ShutdownWatch,
    linger: Duration,
) {
    let tls = io.get_ssl_digest().is_some();
    let conn = Conn {
        gateway,
        client,
        tls,
    };
    let conn = &conn;
    let service = hyper::service::service_fn(move |req| handle(conn, req));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_TIMEOUT)
        .max_buf_size(MAX_HEAD);
    let served = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(served);
    let mut shutdown = shutdown.clone();
    tokio::select! {
        biased;
        _ = served.as_mut() => {}
        _ = closing(&mut shutdown, linger) => {
            // Idle connections close now, busy ones after their answer.
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}

async fn handle(c: &Conn<'_>, req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let headers = req.headers();
    let given_id = headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 200);
    let request_id = match given_id {
        Some(id) => id.to_string(),
        None => access_log::request_id(),
    };
    let host = normalize_host(
        headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or(""),
    );
    if headers.get_all(HOST).iter().nth(1).is_some() {
        return Ok(c.unmatched(&req, &host, 400, None, &request_id, start));
    }
    let route = {
        let router = c.gateway.router.load();
        match router.find(&host, req.uri().path(), req.method()) {
            Match::Found(route) => route.clone(),
            Match::NotFound => return Ok(c.unmatched(&req, &host, 404, None, &request_id, start)),
            Match::MethodNotAllowed(allow) => {
                return Ok(c.unmatched(&req, &host, 405, Some(&allow), &request_id, start))
            }
        }
    };
    Ok(proxy(c, req, route, host, request_id, start).await)
}

impl Conn<'_> {
    /// Answers a request that reached no route, and counts it.
    fn unmatched(
        &self,
        req: &Request<Incoming>,
        host: &str,
        status: u16,
        allow: Option<&[Method]>,
        request_id: &str,
        start: Instant,
    ) -> Response<RespBody> {
        let took = start.elapsed();
        self.gateway.unmatched.observe(status, took);
        if self.gateway.access_log.enabled() {
            self.gateway.access_log.write(access_line(&LogFields {
                request_id,
                client: self.client,
                method: req.method().as_str(),
                host,
                path: req.uri().path(),
                route: None,
                backend: None,
                status,
                bytes: 0,
                took,
                first_byte: None,
                retries: 0,
            }));
        }
        // A 400 may leave unread bytes of a broken message: close.
        error_answer(status, allow, status == 400, request_id)
    }

    /// The access log fields known before the Pod answers; `None` while the log is off.
    fn log_line(&self, parts: &http::request::Parts, host: &str, id: &str) -> Option<Box<LogLine>> {
        self.gateway.access_log.enabled().then(|| {
            Box::new(LogLine {
                sink: self.gateway.access_log.clone(),
                request_id: id.to_string(),
                client: self.client,
                method: parts.method.clone(),
                host: host.to_string(),
                path: parts.uri.path().to_string(),
            })
        })
    }
}

/// An error answer: JSON body, fixed text per status.
fn error_answer(
    status: u16,
    allow: Option<&[Method]>,
    close: bool,
    request_id: &str,
) -> Response<RespBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(error_json(status)))));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(id) = HeaderValue::from_str(request_id) {
        h.insert(X_REQUEST_ID, id);
    }
    if let Some(methods) = allow {
        let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
        if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
            h.insert(ALLOW, v);
        }
    }
    if close {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Removes hop-by-hop headers: the standard ones and those named in `Connection`, except the
/// framing headers and `Host`, which no `Connection` option may remove.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let mut named: Vec<HeaderName> = Vec::new();
    for value in h.get_all(CONNECTION) {
        for token in value
            .as_bytes()
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
        {
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"keep-alive")
                || token.eq_ignore_ascii_case(b"upgrade")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                if name != CONTENT_LENGTH && name != TRANSFER_ENCODING && name != HOST {
                    named.push(name);
                }
            }
        }
    }
    for name in named {
        h.remove(name);
    }
    for name in [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER] {
        h.remove(name);
    }
    if !keep_upgrade {
        h.remove(UPGRADE);
    }
}

fn asks_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(UPGRADE)
        && h.get_all(CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
}

/// Sends a routed request to a Pod (retrying on others as the upstream allows) and returns the
/// answer, whose body is relayed as the client reads it.
async fn proxy(
    c: &Conn<'_>,
    req: Request<Incoming>,
    route: Arc<GatewayRoute>,
    host: String,
    request_id: String,
    start: Instant,
) -> Response<RespBody> {
    let upstream = &route.upstream.upstream;
    let conf = &upstream.conf;
    let (mut parts, body) = req.into_parts();
    // Owned: the request's parts are handed to the Pod connection below.
    let hash_key: Option<Vec<u8>> = {
        let hashed = crate::proxy::HashParts {
            headers: &parts.headers,
            path: parts.uri.path(),
            client: c.client.map(|a| a.ip()),
        };
        upstream.hash_key(&hashed).map(|k| k.as_bytes().to_vec())
    };
    let upgrading = asks_upgrade(&parts.headers);
    let client_upgrade = if upgrading {
        parts.extensions.remove::<OnUpgrade>()
    } else {
        None
    };
    parts.extensions = http::Extensions::new();
    let head_only = parts.method == Method::HEAD;
    let mut record = Record {
        log: c.log_line(&parts, &host, &request_id),
        route: route.clone(),
        start,
        status: 0,
        first_byte: None,
        retries: 0,
        backend: None,
        bytes: 0,
    };

    // Small bodies are read now, so that an idempotent request can go to another Pod even after
    // it was sent; larger and chunked ones stream.
    let idempotent = parts.method.is_idempotent();
    let (body, replayable) = match body.size_hint().exact() {
        Some(0) => (Either::Left(Full::new(Bytes::new())), idempotent),
        Some(n) if n <= BUFFERED_BODY => {
            match tokio::time::timeout(CLIENT_TIMEOUT, body.collect()).await {
                Ok(Ok(b)) => (Either::Left(Full::new(b.to_bytes())), idempotent),
                _ => {
                    record.status = 400;
                    return error_answer(400, None, true, &request_id);
                }
            }
        }
        _ => (Either::Right(body), false),
    };

    // The head for the Pod.
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let new_uri = match route.upstream_path(path_and_query) {
        // Unchanged, origin-form: the client's target goes on as it came.
        path if *path == *path_and_query && parts.uri.authority().is_none() => None,
        path => Some(path.parse::<Uri>()),
    };
    match new_uri {
        None => {}
        Some(Ok(uri)) => parts.uri = uri,
        Some(Err(_)) => {
            record.status = 400;
            return error_answer(400, None, true, &request_id);
        }
    }
    parts.version = Version::HTTP_11;
    let h = &mut parts.headers;
    strip_hop_by_hop(h, upgrading);
    // hyper frames the body itself; 100-continue was hyper's to answer.
    for name in [CONTENT_LENGTH, TRANSFER_ENCODING, EXPECT] {
        h.remove(name);
    }
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        h.insert(X_REQUEST_ID, id);
    }
    match &conf.host_header {
        Some(name) => {
            if let Ok(v) = HeaderValue::from_str(name) {
                h.insert(HOST, v);
            }
        }
        None if !h.contains_key(HOST) && !host.is_empty() => {
            if let Ok(v) = HeaderValue::from_str(&host) {
                h.insert(HOST, v);
            }
        }
        None => {}
    }
    match c.client.map(|a| a.ip()) {
        Some(ip) => {
            // Appended, as nginx's $proxy_add_x_forwarded_for does, so earlier hops stay visible.
            let ip = ip.to_string();
            let value = match h.get(X_FORWARDED_FOR).filter(|p| !p.is_empty()) {
                Some(prev) => {
                    let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
                    v.extend_from_slice(prev.as_bytes());
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(ip.as_bytes());
                    HeaderValue::from_bytes(&v)
                }
                None => HeaderValue::from_str(&ip),
            };
            if let Ok(v) = value {
                h.insert(X_FORWARDED_FOR, v);
            }
        }
        None => {
            h.remove(X_FORWARDED_FOR);
        }
    }
    let proto = if c.tls { "https" } else { "http" };
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match HeaderValue::from_str(&host) {
        Ok(v) if !host.is_empty() => {
            h.insert(X_FORWARDED_HOST, v);
        }
        _ => {
            h.remove(X_FORWARDED_HOST);
        }
    }
    if upgrading {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }

    // A copy for a retry after the request went out, only when one may happen.
    let spare = match &body {
        Either::Left(full) if replayable && conf.retries > 0 => Some((parts.clone(), full.clone())),
        _ => None,
    };
    let mut request = Some(Request::from_parts(parts, body));
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(2);
    let mut last_failure = 503;
    loop {
        let key = hash_key.as_deref().map(crate::upstream::policy::Key::Bytes);
        let Some((backend, _in_flight)) = upstream.pick(&tried, key) else {
            record.status = last_failure;
            return error_answer(last_failure, None, true, &request_id);
        };
        tried.push(backend.addr);
        record.retries = tried.len() - 1;
        record.backend = Some(backend.clone());
        let attempt = Instant::now();
        let failure = match sender(upstream, backend.addr).await {
            Err(e) => {
                log::warn!(
                    "upstream {}: cannot connect to {}: {e}",
                    conf.name,
                    backend.addr
                );
                (502, true)
            }
            Ok(mut tx) => {
                let req = match request.take() {
                    Some(r) => r,
                    None => match &spare {
                        Some((p, b)) => Request::from_parts(p.clone(), Either::Left(b.clone())),
                        None => {
                            record.status = last_failure;
                            return error_answer(last_failure, None, true, &request_id);
                        }
                    },
                };
                match tokio::time::timeout(conf.read_timeout, tx.try_send_request(req)).await {
                    Ok(Ok(resp)) => {
                        let took = attempt.elapsed();
                        record.first_byte = Some(took);
                        upstream.metrics.first_byte.observe(took.as_secs_f64());
                        let status = resp.status().as_u16();
                        upstream.record(&backend, status < 500);
                        record.status = status;
                        return answer(
                            resp,
                            tx,
                            backend.addr,
                            record,
                            &request_id,
                            head_only,
                            upgrading.then_some(client_upgrade).flatten(),
                        );
                    }
                    Ok(Err(mut e)) => {
                        log::warn!(
                            "upstream {}: no answer from {}: {}",
                            conf.name,
                            backend.addr,
                            e.error()
                        );
                        match e.take_message() {
                            // Never written: any request may go to another Pod.
                            Some(unsent) => {
                                request = Some(unsent);
                                (502, true)
                            }
                            None => (502, replayable),
                        }
                    }
                    Err(_) => {
                        log::warn!(
                            "upstream {}: no answer from {} within {:?}",
                            conf.name,
                            backend.addr,
                            conf.read_timeout
                        );
                        (504, replayable)
                    }
                }
            }
        };
        upstream.record(&backend, false);
        let (status, retry) = failure;
        last_failure = status;
        if retry && tried.len() <= conf.retries as usize {
            upstream.metrics.retries.inc();
            continue;
        }
        record.status = status;
        return error_answer(status, None, true, &request_id);
    }
}

/// The Pod's answer as sent to the client; its body returns the Pod connection to the pool
/// once it ended.
fn answer(
    mut resp: Response<Incoming>,
    tx: SendRequest<ReqBody>,
    addr: SocketAddr,
    record: Record,
    request_id: &str,
    head_only: bool,
    client_upgrade: Option<OnUpgrade>,
) -> Response<RespBody> {
    let status = resp.status().as_u16();
    let switching = status == 101 && client_upgrade.is_some();
    if switching {
        let pod = hyper::upgrade::on(&mut resp);
        if let Some(client) = client_upgrade {
            tokio::spawn(tunnel(client, pod));
        }
    }
    let (mut parts, body) = resp.into_parts();
    let h = &mut parts.headers;
    strip_hop_by_hop(h, switching);
    h.remove(TRANSFER_ENCODING);
    // hyper writes the length of what it relays, except where no body follows the head.
    if !(head_only || status == 304) {
        h.remove(CONTENT_LENGTH);
    }
    if !h.contains_key(X_REQUEST_ID) {
        if let Ok(id) = HeaderValue::from_str(request_id) {
            h.insert(X_REQUEST_ID, id);
        }
    }
    if switching {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    parts.version = Version::HTTP_11;
    let body = Relay {
        body,
        pod: (!switching).then_some((tx, addr)),
        ended: false,
        record,
    };
    Response::from_parts(parts, Either::Right(body))
}

/// After a 101: bytes flow both ways until either side closes.
async fn tunnel(client: OnUpgrade, pod: OnUpgrade) {
    let (Ok(client), Ok(pod)) = tokio::join!(client, pod) else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(pod)).await;
}

/// How one proxied request went: counted and logged when dropped, i.e. once its answer was
/// relayed (or given up).
struct Record {
    route: Arc<GatewayRoute>,
    start: Instant,
    status: u16,
    first_byte: Option<Duration>,
    retries: usize,
    backend: Option<Backend>,
    bytes: u64,
    log: Option<Box<LogLine>>,
}

struct LogLine {
    sink: AccessLog,
    request_id: String,
    client: Option<SocketAddr>,
    method: Method,
    host: String,
    path: String,
}

impl Drop for Record {
    fn drop(&mut self) {
        let took = self.start.elapsed();
        self.route.upstream.metrics.observe(self.status, took);
        if let Some(l) = self.log.take() {
            l.sink.write(access_line(&LogFields {
                request_id: &l.request_id,
                client: l.client,
                method: l.method.as_str(),
                host: &l.host,
                path: &l.path,
                route: Some(&*self.route),
                backend: self.backend.as_ref(),
                status: self.status,
                bytes: self.bytes,
                took,
                first_byte: self.first_byte,
                retries: self.retries,
            }));
        }
    }
}

/// A Pod's answer body on its way to the client.
struct Relay {
    body: Incoming,
    /// The Pod connection; back to the pool if the body ended cleanly.
    pod: Option<(SendRequest<ReqBody>, SocketAddr)>,
    ended: bool,
    record: Record,
}

impl Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.record.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => this.pod = None,
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.ended || self.body.is_end_stream() {
            if let Some((tx, addr)) = self.pod.take() {
                put_back(addr, tx, &self.record.route.upstream.upstream);
            }
        }
    }
}

// ===== The pool of idle `SendRequest`s, per worker thread (see `pool.rs` for the reasons).

/// A Pod address and the upstream (by identity) whose connection settings opened it.
type Key = (SocketAddr, usize);

fn key(addr: SocketAddr, upstream: &Arc<Upstream>) -> Key {
    // While any idle entry holds a `Weak` of the upstream, its allocation (and so this address)
    // cannot be reused by another upstream.
    (addr, Arc::as_ptr(upstream) as usize)
}

struct IdleSender {
    tx: SendRequest<ReqBody>,
    since: Instant,
    upstream: Weak<Upstream>,
}

struct Idle {
    by_pod: HashMap<Key, Vec<IdleSender>>,
    swept: Instant,
}

thread_local! {
    static IDLE: RefCell<Idle> = RefCell::new(Idle { by_pod: HashMap::new(), swept: Instant::now() });
}

/// A `SendRequest` to `addr`: an idle pooled one, or a new connection.
async fn sender(
    upstream: &Arc<Upstream>,
    addr: SocketAddr,
) -> std::io::Result<SendRequest<ReqBody>> {
    let key = key(addr, upstream);
    while let Some(mut tx) = take(key) {
        if tx.is_ready() {
            return Ok(tx);
        }
        // The connection's task may not have seen the end of the last answer yet: it will at
        // its next turn.
        let wait = tokio::time::timeout(upstream.conf.connect_timeout, tx.ready());
        if let Ok(Ok(())) = wait.await {
            return Ok(tx);
        }
    }
    let conn = upstream.connector.connect(addr).await?;
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, ReqBody>(TokioIo::new(conn.io))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            log::debug!("connection to {addr}: {e}");
        }
    });
    Ok(tx)
}

fn take(key: Key) -> Option<SendRequest<ReqBody>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.by_pod.get_mut(&key)?;
        let now = Instant::now();
        while let Some(entry) = list.pop() {
            if now.duration_since(entry.since) < IDLE_TIMEOUT && !entry.tx.is_closed() {
                return Some(entry.tx);
            }
        }
        None
    })
}

/// Keeps `tx` for a later request to `addr` while `addr` stays in `upstream`'s selection.
fn put_back(addr: SocketAddr, tx: SendRequest<ReqBody>, upstream: &Arc<Upstream>) {
    if tx.is_closed() {
        return;
    }
    let now = Instant::now();
    let entry = IdleSender {
        tx,
        since: now,
        upstream: Arc::downgrade(upstream),
    };
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.by_pod.entry(key(addr, upstream)).or_default();
        if list.len() < MAX_IDLE_PER_POD {
            list.push(entry);
        }
        if now.duration_since(idle.swept) >= SWEEP_EVERY {
            idle.swept = now;
            idle.by_pod.retain(|(addr, _), list| {
                list.retain(|e| {
                    now.duration_since(e.since) < IDLE_TIMEOUT
                        && !e.tx.is_closed()
                        && e.upstream
                            .upgrade()
                            .is_some_and(|up| up.selection().find(addr).is_some())
                });
                !list.is_empty()
            });
        }
    });
}
