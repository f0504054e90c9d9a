//! The Pingora `ProxyHttp` service: route, pick a Pod, build the peer, map failures to answers.
//!
//! Error answers are small JSON bodies with a fixed text per status; nothing about Pods, addresses
//! or internal errors reaches the client (they go to the log). gRPC calls get theirs the gRPC way
//! instead (`h2/grpc.rs`): HTTP 200, then `grpc-status` and `grpc-message` in trailers.
//!
//! What still comes this way (`proxy/h2/serve.rs` decides): h2 streams that match no route
//! (answered 404/405 here, the gRPC way for gRPC calls), CONNECT, and gRPC calls routed to an
//! `http1` upstream. Streams for routed HTTP/1.1 and h2/h2c Pods are served by podgate's own h2
//! path (`proxy/h2/to_h1.rs`, `to_h2.rs`), and HTTP/1.x clients by `proxy/h1/`; toward Pods this
//! path now only speaks HTTP/1.1.

use super::h2::grpc;
use super::routing::{normalize_host, Match};
use super::{error_json, Gateway, GatewayRoute, LogFields};
use crate::config::Scheme;
use crate::telemetry::access_log;
use crate::upstream::balance::Backend;
use crate::upstream::Upstream;
use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// How long an idle pooled connection to a Pod is kept.
pub const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Per-request state.
pub struct Ctx {
    start: Instant,
    /// When the current attempt's Pod was chosen (for time to first byte).
    attempt_start: Option<Instant>,
    /// Time to the first response byte of the attempt that answered.
    first_byte: Option<std::time::Duration>,
    /// The client's X-Request-Id, or one made here; passed to the Pod and back to the client.
    request_id: String,
    /// A response header came from a Pod: from then on nothing may be retried.
    responded: bool,
    route: Option<Arc<GatewayRoute>>,
    /// The client's Host (normalised), passed on as X-Forwarded-Host.
    host: String,
    /// Backends tried so far, in order; the last one is the current attempt.
    tried: Vec<SocketAddr>,
    current: Option<Backend>,
    /// A gRPC call (`content-type: application/grpc…`): errors are answered the gRPC way.
    grpc: bool,
    /// The call's `grpc-timeout`, counted from `start`.
    deadline: Option<std::time::Duration>,
    /// The `grpc-status` the call ended with, as a metric label index (`h2/grpc.rs`).
    grpc_status: Option<usize>,
    /// Counts the current attempt in flight (least request) until the next attempt or the end.
    in_flight: Option<crate::upstream::policy::least::InFlight>,
}

impl Ctx {
    fn upstream(&self) -> Option<&Arc<Upstream>> {
        self.route.as_ref().map(|r| &r.upstream.upstream)
    }

    /// Tells the upstream how the current attempt went (passive ejection).
    fn record(&self, ok: bool) {
        if let (Some(b), Some(u)) = (self.current.as_ref(), self.upstream()) {
            u.record(b, ok);
        }
    }

    fn count_retry(&self, retry: bool) {
        if let (true, Some(u)) = (retry, self.upstream()) {
            u.metrics.retries.inc();
        }
    }

    /// Whether the upstream's retry budget allows another attempt.
    fn may_retry(&self) -> bool {
        let budget = self.upstream().map_or(0, |u| u.conf.retries as usize);
        self.tried.len() <= budget
    }
}

/// Answers a gRPC call that podgate fails itself: HTTP 200, then the gRPC status that `status`
/// maps to in trailers, which end the stream.
///
/// Not "Trailers-Only" (one HEADERS frame with the status and END_STREAM): Pingora's session
/// does not end an h2 stream on a head, and a stream left open is reset with CANCEL when
/// dropped, which gRPC's C core reports as CANCELLED instead of the status (grpcio 1.85).
async fn send_grpc_error(session: &mut Session, ctx: &mut Ctx, status: u16) -> Result<()> {
    let (code, message) = grpc::status_for(status);
    let mut resp = ResponseHeader::build(200, Some(2))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    if let Some(id) = crate::proxy::request_id_value(&ctx.request_id) {
        resp.insert_header("x-request-id", id)?;
    }
    ctx.grpc_status = Some(code as usize);
    session.write_response_header(Box::new(resp), false).await?;
    let mut trailers = http::HeaderMap::with_capacity(2);
    trailers.insert("grpc-status", http::HeaderValue::from(code));
    trailers.insert("grpc-message", http::HeaderValue::from_static(message));
    session.as_mut().write_response_trailers(trailers).await?;
    // Read what is left of the request, for a while, so that the stream closes both ways
    // rather than being reset.
    let _ = tokio::time::timeout(GRPC_DRAIN, session.as_mut().drain_request_body()).await;
    Ok(())
}

/// How long a gRPC error answer waits for the rest of the request before the stream ends.
const GRPC_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

async fn send_json_error(
    session: &mut Session,
    status: u16,
    allow: Option<&[Method]>,
    keepalive: bool,
) -> Result<()> {
    let body = Bytes::from(error_json(status));
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some(methods) = allow {
        let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
        resp.insert_header(http::header::ALLOW, list.join(", "))?;
    }
    if !keepalive {
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

pub fn request_host(req: &RequestHeader) -> String {
    let raw = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    normalize_host(raw)
}

fn is_tls(session: &Session) -> bool {
    session
        .as_downstream()
        .digest()
        .is_some_and(|d| d.ssl_digest.is_some())
}

/// The access log's `ended` for an exchange that failed with `e`: the client's side always, a
/// Pod's only once the answer had begun (before, podgate's own error answer says it).
fn ended(e: &Error, answer_begun: bool) -> Option<&'static str> {
    use crate::proxy::ended::*;
    match (e.esource(), e.etype()) {
        (ErrorSource::Downstream, ErrorType::WriteTimedout) => Some(CLIENT_WRITE_TIMEOUT),
        (ErrorSource::Downstream, ErrorType::ReadTimedout) => Some(CLIENT_READ_TIMEOUT),
        (ErrorSource::Downstream, _) => Some(CLIENT_CLOSED),
        (ErrorSource::Upstream, ErrorType::ReadTimedout) if answer_begun => Some(UPSTREAM_TIMEOUT),
        (ErrorSource::Upstream, _) if answer_begun => Some(UPSTREAM_CLOSED),
        _ => None,
    }
}

impl Gateway {
    fn log_line(&self, session: &Session, ctx: &Ctx, status: u16, e: Option<&Error>) {
        let req = session.req_header();
        self.access_log.log(&LogFields {
            request_id: &ctx.request_id,
            client: session
                .as_downstream()
                .client_addr()
                .and_then(|a| a.as_inet())
                .copied(),
            method: req.method.as_str(),
            host: &ctx.host,
            path: req.uri.path(),
            route: ctx.route.as_deref(),
            backend: ctx.current.as_ref(),
            status,
            bytes: session.as_downstream().body_bytes_sent() as u64,
            took: ctx.start.elapsed(),
            first_byte: ctx.first_byte,
            retries: ctx.tried.len().saturating_sub(1),
            grpc_status: ctx
                .grpc_status
                .map(|i| crate::telemetry::metrics::GRPC_STATUS_LABELS[i.min(17)]),
            ended: e.and_then(|e| ended(e, session.response_written().is_some())),
        });
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            attempt_start: None,
            first_byte: None,
            request_id: String::new(),
            responded: false,
            route: None,
            host: String::new(),
            tried: Vec::new(),
            current: None,
            grpc: false,
            deadline: None,
            grpc_status: None,
            in_flight: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.request_id = match session
            .req_header()
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
        {
            Some(id) if !id.is_empty() && id.len() <= 200 => id.to_string(),
            _ => {
                let id = access_log::request_id();
                session
                    .req_header_mut()
                    .insert_header("x-request-id", id.as_str())?;
                id
            }
        };
        let req = session.req_header();
        ctx.host = request_host(req);
        let field = |name: &str| req.headers.get(name).map(|v| v.as_bytes());
        ctx.grpc = grpc::is_grpc(field("content-type"));
        if ctx.grpc {
            ctx.deadline = field("grpc-timeout").and_then(grpc::parse_timeout);
        }
        let router = self.router.load();
        let outcome = match router.find(&ctx.host, req.uri.path(), &req.method) {
            Match::Found(route) => {
                ctx.route = Some(route.clone());
                return Ok(false);
            }
            Match::NotFound => (404, None),
            Match::MethodNotAllowed(allowed) => (405, Some(allowed)),
        };
        if ctx.grpc {
            send_grpc_error(session, ctx, outcome.0).await?;
        } else {
            send_json_error(session, outcome.0, outcome.1.as_deref(), true).await?;
        }
        Ok(true)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(upstream) = ctx.upstream().cloned() else {
            return Error::e_explain(ErrorType::InternalError, "no route in context");
        };
        ctx.in_flight = None;
        let req = session.req_header();
        let hashed = crate::proxy::HashParts {
            headers: &req.headers,
            path: req.uri.path(),
            client: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
        };
        let key = upstream.hash_key(&hashed);
        let Some((backend, in_flight)) = upstream.pick(&ctx.tried, key) else {
            return Error::e_explain(ErrorType::HTTPStatus(503), "upstream has no endpoint");
        };
        ctx.in_flight = in_flight;
        ctx.tried.push(backend.addr);
        let conf = &upstream.conf;
        let tls = conf.scheme == Scheme::Https;
        // With verification on, the config guarantees a name. Without one (verify: false) the
        // Pod IP stands in: rustls sends no SNI for an IP, whereas an empty name fails the
        // handshake (and in pingora would also turn verification off silently).
        let sni = match (tls, conf.sni()) {
            (false, _) => String::new(),
            (true, Some(name)) => name.to_string(),
            (true, None) => backend.addr.ip().to_string(),
        };
        let mut peer = HttpPeer::new(backend.addr, tls, sni);
        peer.options.connection_timeout = Some(conf.connect_timeout);
        // A gRPC deadline shortens the wait for the Pod: past it the call is answered
        // DEADLINE_EXCEEDED (the Pod gets `grpc-timeout` too and should give up as well).
        let read_timeout = match ctx.deadline {
            Some(d) => {
                let left = d.saturating_sub(ctx.start.elapsed());
                if left.is_zero() {
                    return Error::e_explain(ErrorType::HTTPStatus(504), "grpc-timeout passed");
                }
                left.min(conf.read_timeout)
            }
            None => conf.read_timeout,
        };
        peer.options.read_timeout = Some(read_timeout);
        // Idle pooled connections are dropped after this long, so none lingers toward a Pod
        // that left the set (a Pod that exits closes its side anyway, which the pool notices).
        peer.options.idle_timeout = Some(POOL_IDLE_TIMEOUT);
        if tls {
            peer.options.verify_cert = conf.tls.verify;
            peer.options.verify_hostname = conf.tls.verify;
            peer.options.ca = upstream.ca.clone();
            peer.group_key = upstream.pool_group;
        }
        ctx.current = Some(backend);
        ctx.attempt_start = Some(Instant::now());
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = ctx.route.as_ref() else {
            return Ok(());
        };
        if route.strip_prefix {
            let original = req
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string();
            let stripped = route.upstream_path(&original);
            if stripped != original {
                let uri: http::Uri = stripped
                    .parse()
                    .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "strip_prefix", e))?;
                req.set_uri(uri);
            }
        }
        if let Some(host) = &route.upstream.upstream.conf.host_header {
            req.insert_header(http::header::HOST, host.as_str())?;
        }
        if let Some(ip) = session
            .as_downstream()
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            // Append, as nginx's $proxy_add_x_forwarded_for does, so earlier hops stay visible.
            let xff = match req
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
                _ => ip.to_string(),
            };
            req.insert_header("x-forwarded-for", xff)?;
        }
        let proto = if is_tls(session) { "https" } else { "http" };
        req.insert_header("x-forwarded-proto", proto)?;
        // The Host as the client sent it, port included (nginx's $http_host), in lowercase.
        let client_host = {
            let r = session.req_header();
            r.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| r.uri.authority().map(|a| a.as_str()))
                .unwrap_or("")
                .to_ascii_lowercase()
        };
        if !client_host.is_empty() {
            req.insert_header("x-forwarded-host", client_host)?;
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.record(false);
        // Nothing was sent yet, so any method may go to another endpoint.
        let retry = ctx.may_retry();
        e.set_retry(retry);
        ctx.count_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        ctx.record(false);
        let mut e = e.more_context(format!("peer: {peer}"));
        // Only idempotent requests with an intact body buffer, within the budget. Pingora retries
        // those only on a reused pooled connection; we also retry them when a fresh connection
        // breaks before any response byte (a Pod killed mid-request): repeating a GET is safe,
        // and it is what keeps an abrupt Pod death invisible to clients.
        if !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
            || !ctx.may_retry()
            || ctx.responded
        {
            e.set_retry(false);
        } else if client_reused {
            e.retry.decide_reuse(true);
        } else {
            e.set_retry(true);
        }
        ctx.count_retry(e.retry());
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if !resp.status.is_informational() {
            ctx.responded = true;
            ctx.record(resp.status.as_u16() < 500);
            if ctx.grpc {
                // A Trailers-Only answer carries its status in the head.
                if let Some(v) = resp.headers.get("grpc-status") {
                    ctx.grpc_status = Some(grpc::status_index(v.as_bytes()));
                }
            }
        }
        if let Some(t) = ctx.attempt_start.take() {
            let took = t.elapsed();
            ctx.first_byte = Some(took);
            if let Some(u) = ctx.upstream() {
                u.metrics.first_byte.observe(took.as_secs_f64());
            }
        }
        Ok(())
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(v) = trailers.get("grpc-status") {
            ctx.grpc_status = Some(grpc::status_index(v.as_bytes()));
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (None, Some(id)) = (
            resp.headers.get("x-request-id"),
            crate::proxy::request_id_value(&ctx.request_id),
        ) {
            resp.insert_header("x-request-id", id)?;
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let m = ctx
            .route
            .as_ref()
            .map_or(&self.unmatched, |r| &r.upstream.metrics);
        m.observe(status, ctx.start.elapsed());
        if let Some(i) = ctx.grpc_status {
            m.observe_grpc(i);
        }
        if self.access_log.enabled() {
            self.log_line(session, ctx, status, e);
        }
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        use ErrorType::*;
        let code = match e.etype() {
            HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => match e.etype() {
                    ReadTimedout | WriteTimedout => 504,
                    _ => 502,
                },
                ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => match e.etype() {
                    ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError
                    | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert => 502,
                    ReadTimedout => 504,
                    _ => 500,
                },
            },
        };
        let written = session.response_written().is_some();
        if code > 0 && !written && ctx.grpc {
            if let Err(err) = send_grpc_error(session, ctx, code).await {
                log::debug!("could not send the gRPC error answer: {err}");
            }
        } else if code > 0 && !written {
            if let Err(err) = send_json_error(session, code, None, false).await {
                log::debug!("could not send the error answer: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}
