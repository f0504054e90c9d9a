//! podgate's own HTTP/1.1 proxy path.
//!
//! Pingora's generic proxy path cost about 2.5× nginx's CPU per request in our load benchmark
//! (`benches/RESULTS.md`), almost none of it in podgate's own logic. This module serves
//! HTTP/1.1 connections (plain, or TLS without h2) directly: parse the request head in place,
//! route, pick a Pod, write one rewritten head to a pooled connection, relay the answer, with a
//! lock-free per-thread connection pool and no task but the connection's own. h2 connections
//! (TLS with ALPN h2) go to Pingora's proxy, which shares routing, selection, metrics and the
//! access log with this path.
//!
//! Semantics (the same as the Pingora path, see `proxy.rs`): hop-by-hop headers are dropped;
//! `X-Forwarded-For/-Proto/-Host` and `X-Request-Id` are set; `strip_prefix` and `host_header`
//! apply; request bodies up to [`BUFFERED_BODY`] are read before the Pod is chosen (so that
//! idempotent requests can be retried on another Pod), larger and chunked ones are streamed;
//! `Expect: 100-continue` is answered here; upgrades (WebSocket) are tunnelled after a 101.

pub mod body;
pub mod hyper_engine;
pub mod pool;
pub mod spread;

use crate::access_log;
use crate::proxy::{access_line, error_json, Gateway, GatewayRoute, LogFields};
use crate::routing::{normalize_host, Match};
use async_trait::async_trait;
use body::{read_more, relay, Chunked, Framing, RelayError};
use bytes::{Bytes, BytesMut};
use http::Method;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Request bodies up to this size are read whole before the Pod is chosen.
pub const BUFFERED_BODY: u64 = 64 * 1024;
/// The largest request head accepted (431 beyond).
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// How long a client has to send a request head, or the next bytes of a body.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle keep-alive client connection is kept.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The proxy application of a listener: HTTP/1.1 here, h2 through Pingora's proxy.
pub struct Engine<F> {
    gateway: Gateway,
    h2: Arc<F>,
    /// How long idle connections stay open once the listeners closed (see `server.rs`).
    linger: Duration,
    /// Evens out connections over the request threads.
    spread: Arc<spread::Spread>,
    /// `PODGATE_H1_ENGINE=hyper`: HTTP/1.1 served by `hyper_engine.rs` (parser A/B bench switch).
    hyper: bool,
}

impl<F> Engine<F> {
    /// The application of a listening service running `threads` request threads.
    pub fn new(gateway: Gateway, h2: F, linger: Duration, threads: usize) -> Self {
        Engine {
            gateway,
            h2: Arc::new(h2),
            linger,
            spread: spread::Spread::new(threads),
            hyper: std::env::var("PODGATE_H1_ENGINE").is_ok_and(|v| v == "hyper"),
        }
    }
}

#[async_trait]
impl<F: ServerApp + Send + Sync + 'static> ServerApp for Engine<F> {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        if io.selected_alpn_proto() == Some(ALPN::H2) {
            let _open = self.spread.open_here();
            return self.h2.process_new(io, shutdown).await;
        }
        if spread::movable(&io) {
            if let Some((there, open)) = self.spread.elsewhere() {
                if let Some(tcp) = spread::detach(&io) {
                    // Pingora's copy leaves this thread's poller and closes; the socket stays
                    // open through the copy.
                    drop(io);
                    let (engine, shutdown) = (self.clone(), shutdown.clone());
                    there.spawn(async move {
                        let _open = open;
                        match spread::attach(tcp) {
                            Ok(io) => engine.serve_h1(io, &shutdown).await,
                            Err(e) => log::warn!("cannot move a client connection: {e}"),
                        }
                    });
                    return None;
                }
            }
        }
        let _open = self.spread.open_here();
        self.serve_h1(io, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        // Pingora drops h2 connections waiting for a request at once; give those accepted an
        // instant before the listeners closed the same time as HTTP/1.1 ones get.
        tokio::time::sleep(self.linger).await;
        self.h2.cleanup().await;
    }
}

/// A client connection.
struct Client {
    io: Stream,
    /// Bytes read and not yet used.
    buf: BytesMut,
    addr: Option<SocketAddr>,
    tls: bool,
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }
}

/// Waits until the server shuts down and then `linger` more.
async fn closing(shutdown: &mut ShutdownWatch, linger: Duration) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
    tokio::time::sleep(linger).await;
}

/// A parsed request head. Ranges point into `raw`.
struct Request {
    raw: Bytes,
    method: Method,
    target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    minor: u8,
    headers: Vec<(Range<usize>, Range<usize>)>,
}

impl Request {
    fn target(&self) -> &str {
        std::str::from_utf8(&self.raw[self.target.clone()]).unwrap_or("/")
    }

    fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (&self.raw[n.clone()], &self.raw[v.clone()]))
    }
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// Parses a request head at the start of `buf`: `Ok(None)` while incomplete.
fn parse_request(buf: &mut BytesMut) -> Result<Option<Request>, u16> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(431),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(431),
        Err(_) => return Err(400),
    };
    if len > MAX_HEAD {
        return Err(431);
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| 400u16)?;
    let target = offset(buf, req.path.unwrap_or("").as_bytes());
    let minor = req.version.unwrap_or(1);
    let headers = req
        .headers
        .iter()
        .map(|h| (offset(buf, h.name.as_bytes()), offset(buf, h.value)))
        .collect();
    Ok(Some(Request {
        raw: buf.split_to(len).freeze(),
        method,
        target,
        minor,
        headers,
    }))
}

/// What the proxy needs from a head's headers, gathered in one pass.
#[derive(Default)]
struct HeadInfo<'a> {
    host: Option<&'a [u8]>,
    content_length: Option<u64>,
    /// `Transfer-Encoding` present; whether its last coding is chunked.
    transfer_encoding: Option<bool>,
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
    upgrade: bool,
    expect_continue: bool,
    request_id: Option<&'a [u8]>,
    forwarded_for: Option<&'a [u8]>,
    /// Headers named in `Connection` (hop-by-hop), besides the standard tokens.
    named: Vec<&'a [u8]>,
}

impl<'a> HeadInfo<'a> {
    /// `Err` for framing that cannot be trusted (request smuggling shapes).
    fn gather(headers: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Result<Self, u16> {
        let mut i = HeadInfo::default();
        for (name, value) in headers {
            match name.len() {
                4 if name.eq_ignore_ascii_case(b"host") => {
                    if i.host.is_some() {
                        return Err(400);
                    }
                    i.host = Some(value);
                }
                14 if name.eq_ignore_ascii_case(b"content-length") => {
                    let n = std::str::from_utf8(value)
                        .ok()
                        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or(400u16)?;
                    if i.content_length.is_some_and(|m| m != n) {
                        return Err(400);
                    }
                    i.content_length = Some(n);
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    let last = value.rsplit(|b| *b == b',').next().unwrap_or(b"");
                    i.transfer_encoding = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                }
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                        if token.eq_ignore_ascii_case(b"close") {
                            i.close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            i.keep_alive = true;
                        } else if token.eq_ignore_ascii_case(b"upgrade") {
                            i.upgrade_token = true;
                        } else if !token.is_empty() {
                            i.named.push(token);
                        }
                    }
                }
                7 if name.eq_ignore_ascii_case(b"upgrade") => i.upgrade = true,
                6 if name.eq_ignore_ascii_case(b"expect") => {
                    i.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
                }
                12 if name.eq_ignore_ascii_case(b"x-request-id") => i.request_id = Some(value),
                15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => {
                    i.forwarded_for = Some(value)
                }
                _ => {}
            }
        }
        if i.transfer_encoding.is_some() && i.content_length.is_some() {
            return Err(400);
        }
        Ok(i)
    }

    /// Whether the header `name` must not be passed on (hop-by-hop, or set by podgate).
    fn drops(&self, name: &[u8], upgrading: bool) -> bool {
        const ALWAYS: [&[u8]; 10] = [
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"expect",
            b"x-forwarded-for",
            b"x-forwarded-proto",
            b"x-forwarded-host",
            b"x-request-id",
        ];
        ALWAYS.iter().any(|h| name.eq_ignore_ascii_case(h))
            || (!upgrading && name.eq_ignore_ascii_case(b"upgrade"))
            || self.named.iter().any(|h| name.eq_ignore_ascii_case(h))
    }
}

/// How one request went, for metrics and the access log.
struct Outcome<'r> {
    route: Option<&'r Arc<GatewayRoute>>,
    backend: Option<crate::balance::Backend>,
    status: u16,
    bytes: u64,
    first_byte: Option<Duration>,
    retries: usize,
}

/// An error answer: JSON body, fixed text per status.
fn error_answer(
    status: u16,
    allow: Option<&[Method]>,
    keep: bool,
    head_only: bool,
    request_id: &str,
) -> Vec<u8> {
    let body = error_json(status);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         x-request-id: {request_id}\r\n",
        body.len()
    );
    if let Some(methods) = allow {
        let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
        out.push_str(&format!("allow: {}\r\n", list.join(", ")));
    }
    if !keep {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&body);
    }
    out.into_bytes()
}

/// Why an attempt on one Pod failed.
enum Failure {
    /// Nothing was sent: any request may go to another Pod.
    Connect,
    /// The request may have reached the Pod; no response byte came back.
    AfterSend { timed_out: bool },
    /// The client went away or sent a broken body; nothing more to answer.
    Client,
    /// The streamed request body could not be delivered to the Pod.
    Upstream,
}

impl<F> Engine<F> {
    async fn serve(&self, io: Stream, shutdown: &ShutdownWatch) {
        let addr = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        let tls = io.get_ssl_digest().is_some();
        let mut client = Client {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            addr,
            tls,
        };
        let mut shutdown = shutdown.clone();
        let mut first = true;
        loop {
            let req = match self.read_head(&mut client, &mut shutdown, first).await {
                Ok(Some(req)) => req,
                Ok(None) => break,
                Err(status) => {
                    let id = access_log::request_id();
                    let answer = error_answer(status, None, false, false, &id);
                    let _ = client.send(&answer).await;
                    self.gateway
                        .unmatched
                        .observe(status, Duration::from_millis(0));
                    break;
                }
            };
            first = false;
            let stopping = *shutdown.borrow();
            if !self.exchange(&mut client, req, stopping).await {
                break;
            }
        }
        let _ = AsyncWriteExt::shutdown(&mut client.io).await;
    }

    /// The next request head; `Ok(None)` when the connection is done.
    async fn read_head(
        &self,
        c: &mut Client,
        shutdown: &mut ShutdownWatch,
        first: bool,
    ) -> Result<Option<Request>, u16> {
        loop {
            if !c.buf.is_empty() {
                if let Some(req) = parse_request(&mut c.buf)? {
                    return Ok(Some(req));
                }
            }
            let read = if c.buf.is_empty() && !first {
                tokio::select! {
                    biased;
                    r = read_more(&mut c.io, &mut c.buf, KEEPALIVE_TIMEOUT) => r,
                    _ = closing(shutdown, self.linger) => return Ok(None),
                }
            } else {
                read_more(&mut c.io, &mut c.buf, CLIENT_TIMEOUT).await
            };
            match read {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    /// Serves one request; returns whether the connection may carry another.
    async fn exchange(&self, c: &mut Client, req: Request, stopping: bool) -> bool {
        let start = Instant::now();
        let info = match HeadInfo::gather(req.headers()) {
            Ok(info) => info,
            Err(status) => {
                let id = access_log::request_id();
                let _ = c.send(&error_answer(status, None, false, false, &id)).await;
                self.gateway.unmatched.observe(status, start.elapsed());
                return false;
            }
        };
        let request_id = match info.request_id.and_then(|v| std::str::from_utf8(v).ok()) {
            Some(id) if !id.is_empty() && id.len() <= 200 => id.to_string(),
            _ => access_log::request_id(),
        };
        // Absolute-form targets (`GET http://host/path`) carry the authority themselves.
        let absolute = (!req.target().starts_with('/'))
            .then(|| req.target().parse::<http::Uri>().ok())
            .flatten();
        let path_and_query = match &absolute {
            Some(uri) => uri.path_and_query().map_or("/", |pq| pq.as_str()),
            None => req.target(),
        };
        let path = path_and_query.split('?').next().unwrap_or("/");
        let host = match (info.host, &absolute) {
            (Some(h), _) => normalize_host(std::str::from_utf8(h).unwrap_or("")),
            (None, Some(uri)) => normalize_host(uri.authority().map_or("", |a| a.as_str())),
            (None, None) => String::new(),
        };
        let mut keep = !stopping
            && if req.minor >= 1 {
                !info.close
            } else {
                info.keep_alive
            };
        let framing = match (info.transfer_encoding, info.content_length) {
            (Some(true), _) => Framing::Chunked(Chunked::default()),
            // Only chunked can be delimited: anything else is answered 501 below.
            (Some(false), _) => Framing::UntilClose,
            (None, Some(0)) | (None, None) => Framing::Empty,
            (None, Some(n)) => Framing::Length(n),
        };

        let router = self.gateway.router.load();
        let found = router.find(&host, path, &req.method);
        let mut outcome = Outcome {
            route: None,
            backend: None,
            status: 0,
            bytes: 0,
            first_byte: None,
            retries: 0,
        };
        let head_only = req.method == Method::HEAD;
        match (&found, &framing) {
            (_, Framing::UntilClose) => {
                outcome.status = 501;
                keep = false;
            }
            (Match::Found(route), _) => outcome.route = Some(route),
            (Match::NotFound, f) => {
                outcome.status = 404;
                // An unread body would be taken for the next request.
                keep &= *f == Framing::Empty;
            }
            (Match::MethodNotAllowed(_), f) => {
                outcome.status = 405;
                keep &= *f == Framing::Empty;
            }
        }
        if outcome.route.is_none() {
            let allow = match &found {
                Match::MethodNotAllowed(m) => Some(m.as_slice()),
                _ => None,
            };
            let answer = error_answer(outcome.status, allow, keep, head_only, &request_id);
            keep &= c.send(&answer).await.is_ok();
        } else {
            let ctx = RequestCtx {
                req: &req,
                info: &info,
                request_id: &request_id,
                host: &host,
                path_and_query,
                head_only,
            };
            keep = self
                .proxy(c, &ctx, framing, keep, &mut outcome)
                .await
                .unwrap_or(false);
        }

        let took = start.elapsed();
        let metrics = outcome
            .route
            .map_or(&self.gateway.unmatched, |r| &r.upstream.metrics);
        metrics.observe(outcome.status, took);
        if self.gateway.access_log.enabled() {
            self.gateway.access_log.write(access_line(&LogFields {
                request_id: &request_id,
                client: c.addr,
                method: req.method.as_str(),
                host: &host,
                path,
                route: outcome.route.map(|r| &**r),
                backend: outcome.backend.as_ref(),
                status: outcome.status,
                bytes: outcome.bytes,
                took,
                first_byte: outcome.first_byte,
                retries: outcome.retries,
            }));
        }
        keep
    }

    /// Sends a routed request to a Pod and relays the answer. `Err` ends the client connection
    /// without a (further) answer.
    async fn proxy(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        mut framing: Framing,
        keep: bool,
        outcome: &mut Outcome<'_>,
    ) -> Result<bool, ()> {
        let route = outcome.route.expect("routed");
        let upstream = &route.upstream.upstream;
        let conf = &upstream.conf;
        let upgrading = ctx.info.upgrade && ctx.info.upgrade_token;

        // Small bodies are read now: a Pod that fails can then be replaced even after the
        // request went out. Larger ones stream once a Pod is connected.
        let expects_body = framing != Framing::Empty;
        if expects_body && ctx.info.expect_continue && ctx.req.minor >= 1 {
            c.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|_| ())?;
        }
        let mut body = Bytes::new();
        let streaming = match framing {
            Framing::Length(n) if n <= BUFFERED_BODY => {
                while (c.buf.len() as u64) < n {
                    match read_more(&mut c.io, &mut c.buf, CLIENT_TIMEOUT).await {
                        Ok(0) | Err(_) => return Err(()),
                        Ok(_) => {}
                    }
                }
                body = c.buf.split_to(n as usize).freeze();
                framing = Framing::Empty;
                false
            }
            Framing::Empty => false,
            _ => true,
        };
        let mut head = upstream_head(ctx, route, c, upgrading);
        head.extend_from_slice(&body);
        let replayable = !streaming && ctx.req.method.is_idempotent();

        let mut tried: Vec<SocketAddr> = Vec::with_capacity(2);
        let mut last_failure = 503;
        loop {
            let Some(backend) = upstream.pick(&tried) else {
                outcome.status = last_failure;
                let answer = error_answer(last_failure, None, false, ctx.head_only, ctx.request_id);
                let _ = c.send(&answer).await;
                return Ok(false);
            };
            tried.push(backend.addr);
            outcome.retries = tried.len() - 1;
            let attempt = Instant::now();
            let result = self
                .attempt(
                    c,
                    ctx,
                    &backend,
                    &head,
                    &mut framing,
                    streaming,
                    upgrading,
                    keep,
                    outcome,
                    attempt,
                )
                .await;
            outcome.backend = Some(backend.clone());
            let failure = match result {
                Ok(keep) => return Ok(keep),
                Err(f) => f,
            };
            upstream.record(&backend, false);
            let (status, retry) = match failure {
                Failure::Connect => (502, true),
                Failure::AfterSend { timed_out } => (if timed_out { 504 } else { 502 }, replayable),
                Failure::Client => return Err(()),
                Failure::Upstream => (502, false),
            };
            last_failure = status;
            if retry && tried.len() <= conf.retries as usize {
                upstream.metrics.retries.inc();
                continue;
            }
            outcome.status = status;
            let answer = error_answer(status, None, false, ctx.head_only, ctx.request_id);
            let _ = c.send(&answer).await;
            return Ok(false);
        }
    }

    /// One attempt on `backend`. `Ok` once a response head came (the answer is then relayed, or
    /// the connection given up), with whether the client connection may be kept.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        backend: &crate::balance::Backend,
        head: &[u8],
        framing: &mut Framing,
        streaming: bool,
        upgrading: bool,
        keep: bool,
        outcome: &mut Outcome<'_>,
        attempt: Instant,
    ) -> Result<bool, Failure> {
        let upstream = &outcome.route.expect("routed").upstream.upstream;
        let conf = &upstream.conf;
        let (mut up, reused) = match upstream.connector.reuse(backend.addr) {
            Some(conn) => (conn, true),
            None => match upstream.connector.connect(backend.addr).await {
                Ok(conn) => (conn, false),
                Err(e) => {
                    log::warn!(
                        "upstream {}: cannot connect to {}: {e}",
                        conf.name,
                        backend.addr
                    );
                    return Err(Failure::Connect);
                }
            },
        };
        let sent = async {
            up.io.write_all(head).await?;
            up.io.flush().await
        }
        .await;
        if let Err(e) = sent {
            log::debug!("upstream {}: writing to {}: {e}", conf.name, backend.addr);
            // A pooled connection the Pod had closed: nothing reached it.
            return Err(if reused {
                Failure::Connect
            } else {
                Failure::AfterSend { timed_out: false }
            });
        }
        if streaming {
            match relay(framing, &mut c.buf, &mut c.io, &mut up.io, CLIENT_TIMEOUT).await {
                Ok(_) => {}
                Err(RelayError::Write(e)) => {
                    log::warn!(
                        "upstream {}: sending the body to {}: {e}",
                        conf.name,
                        backend.addr
                    );
                    return Err(Failure::Upstream);
                }
                Err(_) => return Err(Failure::Client),
            }
            let _ = up.io.flush().await;
        }

        // The response head; 1xx other than 101 are dropped (100-continue was answered here).
        let resp = loop {
            let parsed = read_response(&mut up, conf.read_timeout).await;
            let resp = match parsed {
                Ok(r) => r,
                Err(e) => {
                    let timed_out = e.kind() == std::io::ErrorKind::TimedOut;
                    log::warn!(
                        "upstream {}: no answer from {}: {e}",
                        conf.name,
                        backend.addr
                    );
                    return Err(Failure::AfterSend { timed_out });
                }
            };
            if (100..200).contains(&resp.status) && resp.status != 101 {
                continue;
            }
            break resp;
        };
        let resp_info = HeadInfo::gather(resp.headers()).unwrap_or_default();
        let took = attempt.elapsed();
        outcome.first_byte = Some(took);
        upstream.metrics.first_byte.observe(took.as_secs_f64());
        upstream.record(backend, resp.status < 500);
        outcome.status = resp.status;

        let mut resp_framing = if ctx.head_only || resp.status == 204 || resp.status == 304 {
            Framing::Empty
        } else {
            match (resp_info.transfer_encoding, resp_info.content_length) {
                // An HTTP/1.0 client cannot read chunks: it gets the data, ended by the close.
                (Some(true), _) if ctx.req.minor == 0 => Framing::Dechunk(Chunked::default()),
                (Some(true), _) => Framing::Chunked(Chunked::default()),
                (Some(false), _) | (None, None) => Framing::UntilClose,
                (None, Some(n)) => Framing::Length(n),
            }
        };
        let dechunk = matches!(resp_framing, Framing::Dechunk(_));
        let switching = resp.status == 101 && upgrading;
        let keep = keep && !switching && resp_framing != Framing::UntilClose && !dechunk;
        let mut out = response_head(&resp, &resp_info, ctx, keep, switching, dechunk);
        let head_len = out.len();
        let (take, done) = resp_framing
            .take_into(&up.buf, &mut out)
            .map_err(|_| Failure::AfterSend { timed_out: false })?;
        let _ = up.buf.split_to(take);
        outcome.bytes = (out.len() - head_len) as u64;
        if c.send(&out).await.is_err() {
            return Ok(false);
        }
        if switching {
            tunnel(c, up).await;
            return Ok(false);
        }
        if !done {
            match relay(
                &mut resp_framing,
                &mut up.buf,
                &mut up.io,
                &mut c.io,
                conf.read_timeout,
            )
            .await
            {
                Ok(n) => outcome.bytes += n,
                Err(e) => {
                    log::debug!(
                        "upstream {}: relaying the answer of {}: {e:?}",
                        conf.name,
                        backend.addr
                    );
                    return Ok(false);
                }
            }
            if c.io.flush().await.is_err() {
                return Ok(false);
            }
        }
        let pod_keeps = if resp.minor >= 1 {
            !resp_info.close
        } else {
            resp_info.keep_alive
        };
        if pod_keeps && up.buf.is_empty() && resp_framing != Framing::UntilClose && !switching {
            upstream.connector.put_back(backend.addr, up, upstream);
        }
        Ok(keep)
    }
}

/// The request as routed.
struct RequestCtx<'a> {
    req: &'a Request,
    info: &'a HeadInfo<'a>,
    request_id: &'a str,
    /// The client's host, normalised.
    host: &'a str,
    path_and_query: &'a str,
    head_only: bool,
}

/// The head sent to the Pod.
fn upstream_head(ctx: &RequestCtx, route: &GatewayRoute, c: &Client, upgrading: bool) -> Vec<u8> {
    let req = ctx.req;
    let conf = &route.upstream.upstream.conf;
    let mut out = Vec::with_capacity(req.raw.len() + 160);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(route.upstream_path(ctx.path_and_query).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let replace_host = conf.host_header.is_some();
    for (name, value) in req.headers() {
        if ctx.info.drops(name, upgrading) || (replace_host && name.eq_ignore_ascii_case(b"host")) {
            continue;
        }
        push_header(&mut out, name, value);
    }
    match (&conf.host_header, ctx.info.host) {
        (Some(h), _) => push_header(&mut out, b"host", h.as_bytes()),
        (None, None) if !ctx.host.is_empty() => push_header(&mut out, b"host", ctx.host.as_bytes()),
        _ => {}
    }
    if let Some(ip) = c.addr.map(|a| a.ip()) {
        // Appended, as nginx's $proxy_add_x_forwarded_for does, so earlier hops stay visible.
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = ctx.info.forwarded_for.filter(|p| !p.is_empty()) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ip.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let proto: &[u8] = if c.tls { b"https" } else { b"http" };
    push_header(&mut out, b"x-forwarded-proto", proto);
    if !ctx.host.is_empty() {
        push_header(&mut out, b"x-forwarded-host", ctx.host.as_bytes());
    }
    push_header(&mut out, b"x-request-id", ctx.request_id.as_bytes());
    if upgrading {
        push_header(&mut out, b"connection", b"upgrade");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head. Ranges point into `raw`.
struct Response {
    raw: Bytes,
    status: u16,
    minor: u8,
    reason: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
}

impl Response {
    fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (&self.raw[n.clone()], &self.raw[v.clone()]))
    }
}

/// Reads a response head from the Pod, within `timeout` for each read.
async fn read_response(up: &mut pool::Conn, timeout: Duration) -> std::io::Result<Response> {
    loop {
        if !up.buf.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut slots);
            match resp.parse(&up.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp.code.unwrap_or(502);
                    let minor = resp.version.unwrap_or(1);
                    let reason = offset(&up.buf, resp.reason.unwrap_or("").as_bytes());
                    let headers = resp
                        .headers
                        .iter()
                        .map(|h| (offset(&up.buf, h.name.as_bytes()), offset(&up.buf, h.value)))
                        .collect();
                    return Ok(Response {
                        raw: up.buf.split_to(len).freeze(),
                        status,
                        minor,
                        reason,
                        headers,
                    });
                }
                Ok(httparse::Status::Partial) if up.buf.len() <= MAX_HEAD => {}
                Ok(httparse::Status::Partial) | Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "malformed response head",
                    ))
                }
            }
        }
        if read_more(&mut up.io, &mut up.buf, timeout).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The head sent to the client.
fn response_head(
    resp: &Response,
    info: &HeadInfo,
    ctx: &RequestCtx,
    keep: bool,
    switching: bool,
    dechunk: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(resp.raw.len() + 96);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(resp.status).as_slice());
    out.push(b' ');
    out.extend_from_slice(&resp.raw[resp.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    let mut has_id = false;
    for (name, value) in resp.headers() {
        if name.eq_ignore_ascii_case(b"x-request-id") {
            has_id = true;
        } else if info.drops(name, switching)
            || (dechunk && name.eq_ignore_ascii_case(b"transfer-encoding"))
        {
            continue;
        }
        push_header(&mut out, name, value);
    }
    if !has_id {
        push_header(&mut out, b"x-request-id", ctx.request_id.as_bytes());
    }
    if switching {
        push_header(&mut out, b"connection", b"upgrade");
    } else if !keep {
        push_header(&mut out, b"connection", b"close");
    } else if ctx.req.minor == 0 {
        push_header(&mut out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn itoa3(n: u16) -> [u8; 3] {
    let n = n.min(999);
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// After a 101: bytes flow both ways until either side closes.
async fn tunnel(c: &mut Client, mut up: pool::Conn) {
    if !up.buf.is_empty() && c.send(&up.buf).await.is_err() {
        return;
    }
    if !c.buf.is_empty() {
        let early = c.buf.split();
        if up.io.write_all(&early).await.is_err() {
            return;
        }
    }
    let _ = tokio::io::copy_bidirectional(&mut c.io, &mut up.io).await;
}
