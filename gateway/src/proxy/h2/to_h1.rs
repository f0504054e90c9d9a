//! One h2 stream sent to an HTTP/1.1 Pod, served inside the client connection's task
//! (`serve.rs`): route and Pod as the other paths choose them, an HTTP/1.1 head that podgate
//! writes itself over its own per-thread pool (`upstream/pool.rs`), and the Pod's answer read with
//! the HTTP/1.1 path's parsers (`proxy/h1/head.rs`, `body.rs`) and sent back as h2.
//!
//! The same semantics as the other paths (`proxy/h1/exchange.rs`, `proxy/pingora.rs`):
//! `X-Forwarded-For/-Proto/-Host` and `X-Request-Id` are set, `strip_prefix` and `host_header`
//! apply, hop-by-hop fields stay on their hop; bodies up to [`BUFFERED_BODY`] are read first so
//! that an idempotent request can go to another Pod after a failure, larger ones stream; retries
//! within the upstream's budget, only when safe; outcomes go to the Pod's health, the metrics and
//! the access log.
//!
//! h2 → HTTP/1.1 (RFC 9113 §8.2.2, §8.3.1): `:authority` becomes `Host` (unless `host_header`
//! replaces it), `cookie` fields are joined with "; " into one line, `te: trailers` is dropped
//! (hop-by-hop), and the body's framing is podgate's: `content-length` when the length is known
//! (checked against the DATA received: a mismatch is a stream error and the Pod connection is
//! closed, never reused, so no byte of the stream can be read by the Pod as a next request), else
//! podgate's own chunked coding. Request trailers are not passed on.

use crate::proxy::h1::body::{read_more, Framing, Out, BUFFERED_BODY};
use crate::proxy::h1::exchange::{final_response, NoHead};
use crate::proxy::h1::head::{BodyLength, HeadInfo};
use crate::proxy::h1::rewrite::{answer_framing, push_header, AnswerFraming, Declared};
use crate::proxy::{error_json, GatewayRoute, HashParts, LogFields};
use crate::telemetry::access_log;
use crate::upstream::balance::Backend;
use crate::upstream::{pool, Upstream};
use bytes::{Bytes, BytesMut};
use http::Method;
use pingora_core::protocols::http::v2::server::HttpSession;
use pingora_http::ResponseHeader;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// What every stream of one client connection shares.
pub(super) struct Conn<'a> {
    pub(super) gateway: &'a crate::proxy::Gateway,
    pub(super) client: Option<SocketAddr>,
    pub(super) tls: bool,
    /// `server.client_body_timeout`: each read of a request body, each write of an answer.
    pub(super) body_timeout: Duration,
    /// Set when a write toward the client ran out of time: the connection ends (`serve.rs`).
    pub(super) write_expired: &'a std::sync::atomic::AtomicBool,
}

impl Conn<'_> {
    /// Why a stream ended early, as far as the connection knows.
    pub(super) fn ended(&self) -> Option<&'static str> {
        let expired = self
            .write_expired
            .load(std::sync::atomic::Ordering::Relaxed);
        expired.then_some(crate::proxy::ended::CLIENT_WRITE_TIMEOUT)
    }
}

/// How one stream went, for metrics and the access log.
#[derive(Default)]
struct Outcome {
    backend: Option<Backend>,
    status: u16,
    bytes: u64,
    first_byte: Option<Duration>,
    retries: usize,
    /// Why the stream ended early, if it did (the access log's `ended`).
    ended: Option<&'static str>,
}

/// Why an attempt on one Pod failed.
enum Failure {
    /// Nothing was sent: any request may go to another Pod.
    Connect,
    /// The request may have reached the Pod; no usable answer came back.
    AfterSend { timed_out: bool },
    /// The client reset the stream or stopped sending; nothing more to answer.
    Client,
    /// The client's body disagreed with its `content-length`: 400.
    BadBody,
    /// The streamed body could not be delivered to the Pod.
    Upstream,
}

/// The request body as far as it was read before a Pod was chosen.
enum Body {
    /// All of it (possibly nothing).
    Whole(Bytes),
    /// The first bytes of a larger body; the rest streams from the client.
    Started(BytesMut),
}

/// Serves one stream routed to `route` (an HTTP/1.1 upstream); `host` is its normalised host.
pub(super) async fn serve(
    cx: &Conn<'_>,
    mut s: HttpSession,
    route: Arc<GatewayRoute>,
    host: String,
) {
    let start = Instant::now();
    s.set_write_timeout(Some(cx.body_timeout));
    let mut out = Outcome::default();
    let req = s.req_header();
    let request_id = request_id_of(req);
    let method = req.method.clone();
    let path = req.uri.path().to_string();
    let head_only = method == Method::HEAD;
    let hop = Hop {
        client: cx.client,
        tls: cx.tls,
        host_header: route.upstream.upstream.conf.host_header.as_deref(),
        request_id: &request_id,
    };
    let head = request_head(s.req_header(), |p| route.upstream_path(p), &hop);
    match head {
        Ok((head, length)) => {
            proxy(cx, &mut s, &route, head, length, &request_id, &mut out).await;
        }
        Err(why) => {
            log::debug!("client {:?}: h2 request refused: {why}", cx.client);
            out.status = 400;
            answer_error(&mut s, 400, &request_id, head_only, cx.body_timeout).await;
        }
    }

    let took = start.elapsed();
    let metrics = &route.upstream.metrics;
    metrics.observe(out.status, took);
    if cx.gateway.access_log.enabled() {
        cx.gateway.access_log.log(&LogFields {
            request_id: &request_id,
            client: cx.client,
            method: method.as_str(),
            host: &host,
            path: &path,
            route: Some(&route),
            backend: out.backend.as_ref(),
            status: out.status,
            bytes: out.bytes,
            took,
            first_byte: out.first_byte,
            retries: out.retries,
            grpc_status: None,
            ended: cx.ended().or(out.ended),
        });
    }
}

/// What the head for the Pod says about this hop.
struct Hop<'a> {
    client: Option<SocketAddr>,
    tls: bool,
    /// The upstream's `host_header`, which replaces the client's.
    host_header: Option<&'a str>,
    request_id: &'a str,
}

/// The client's `X-Request-Id` when it is usable (1 to 200 bytes of text), else a new one.
pub(super) fn request_id_of(req: &pingora_http::RequestHeader) -> String {
    match req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        Some(id) if !id.is_empty() && id.len() <= 200 => id.to_string(),
        _ => access_log::request_id(),
    }
}

/// The HTTP/1.1 head for the Pod up to its framing fields (the caller adds those and the final
/// CRLF), and the body length the client declared. `upstream_path` applies the route's
/// `strip_prefix`. `Err` for a request that cannot be written as HTTP/1.1 without ambiguity.
fn request_head<'p>(
    req: &'p http::request::Parts,
    upstream_path: impl FnOnce(&'p str) -> std::borrow::Cow<'p, str>,
    hop: &Hop<'_>,
) -> Result<(Vec<u8>, BodyLength), &'static str> {
    let path_and_query = req.uri.path_and_query().map_or("/", |p| p.as_str());
    // The `h2` crate and Pingora's acceptance already refuse control bytes here; a space, DEL
    // or any control byte would break the request line, so check once more where it matters.
    if path_and_query.is_empty() || !path_and_query.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err("a byte in :path that has no place in a request line");
    }
    let fields = || {
        req.headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
    };
    let info = HeadInfo::gather(fields());
    let length = info.request_length(1).map_err(|r| r.why)?;
    let mut out = Vec::with_capacity(256 + req.headers.len() * 32);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(upstream_path(path_and_query).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut cookies = 0usize;
    for (name, value) in fields() {
        // A field value is a `HeaderValue`, which cannot hold CR, LF or NUL; checked anyway,
        // since a line break here would be a second header (or request) to the Pod.
        if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err("CR, LF or NUL in a field value");
        }
        if name == b"cookie" {
            cookies += 1;
            continue;
        }
        if !info.drops(name, false) {
            push_header(&mut out, name, value);
        }
    }
    if cookies > 0 {
        // h2 may split a cookie into one field per crumb; HTTP/1.1 wants one line.
        out.extend_from_slice(b"cookie: ");
        for (i, v) in req.headers.get_all(http::header::COOKIE).iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    let host_raw: &[u8] = match (req.uri.authority(), info.host) {
        (Some(a), _) => a.as_str().as_bytes(),
        (None, Some(h)) => h,
        (None, None) => b"",
    };
    match hop.host_header {
        Some(h) => push_header(&mut out, b"host", h.as_bytes()),
        None if !host_raw.is_empty() => push_header(&mut out, b"host", host_raw),
        None => {}
    }
    if let Some(ip) = hop.client.map(|a| a.ip()) {
        // Appended, as nginx's $proxy_add_x_forwarded_for does, so earlier hops stay visible.
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = info.forwarded_for.filter(|p| !p.is_empty()) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        let _ = std::io::Write::write_fmt(&mut out, format_args!("{ip}"));
        out.extend_from_slice(b"\r\n");
    }
    let proto: &[u8] = if hop.tls { b"https" } else { b"http" };
    push_header(&mut out, b"x-forwarded-proto", proto);
    if !host_raw.is_empty() {
        push_header(
            &mut out,
            b"x-forwarded-host",
            &host_raw.to_ascii_lowercase(),
        );
    }
    push_header(&mut out, b"x-request-id", hop.request_id.as_bytes());
    Ok((out, length))
}

/// Reads the body up to [`BUFFERED_BODY`]; `None` if the client reset the stream, failed or was
/// too slow.
async fn read_start(s: &mut HttpSession, timeout: Duration) -> Option<Body> {
    if s.is_body_done() {
        return Some(Body::Whole(Bytes::new()));
    }
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(timeout, s.read_body_bytes()).await {
            Ok(Ok(Some(data))) if buf.is_empty() && s.is_body_done() => {
                return Some(Body::Whole(data));
            }
            Ok(Ok(Some(data))) => {
                buf.extend_from_slice(&data);
                if buf.len() as u64 > BUFFERED_BODY {
                    return Some(Body::Started(buf));
                }
            }
            Ok(Ok(None)) => return Some(Body::Whole(buf.freeze())),
            Ok(Err(e)) => {
                log::debug!("h2 client: reading the request body: {e}");
                return None;
            }
            Err(_) => return None,
        }
    }
}

/// Sends the request to a Pod (retrying where safe) and relays the answer.
async fn proxy(
    cx: &Conn<'_>,
    s: &mut HttpSession,
    route: &GatewayRoute,
    mut head: Vec<u8>,
    length: BodyLength,
    request_id: &str,
    out: &mut Outcome,
) {
    let upstream = &route.upstream.upstream;
    let conf = &upstream.conf;
    let head_only = s.req_header().method == Method::HEAD;
    let Some(body) = read_start(s, cx.body_timeout).await else {
        return;
    };
    let declared = match length {
        BodyLength::Length(n) => Some(n),
        _ => None,
    };
    let replayable;
    match &body {
        Body::Whole(data) => {
            if declared.is_some_and(|n| n != data.len() as u64) {
                log::debug!(
                    "client {:?}: h2 body length differs from content-length",
                    cx.client
                );
                out.status = 400;
                answer_error(s, 400, request_id, head_only, cx.body_timeout).await;
                return;
            }
            if !data.is_empty() || declared.is_some() {
                push_header(
                    &mut head,
                    b"content-length",
                    data.len().to_string().as_bytes(),
                );
            }
            replayable = s.req_header().method.is_idempotent();
        }
        Body::Started(_) => {
            match declared {
                Some(n) => push_header(&mut head, b"content-length", n.to_string().as_bytes()),
                None => push_header(&mut head, b"transfer-encoding", b"chunked"),
            }
            replayable = false;
        }
    }
    head.extend_from_slice(b"\r\n");
    let mut body = Some(body);

    let mut tried: Vec<SocketAddr> = Vec::with_capacity(2);
    let mut last_failure = 503;
    loop {
        let picked = {
            let req = s.req_header();
            let parts = HashParts {
                headers: &req.headers,
                path: req.uri.path(),
                client: cx.client.map(|a| a.ip()),
            };
            upstream.pick(&tried, upstream.hash_key(&parts))
        };
        // `_in_flight` counts the attempt for least request until this iteration ends.
        let Some((backend, _in_flight)) = picked else {
            out.status = last_failure;
            answer_error(s, last_failure, request_id, head_only, cx.body_timeout).await;
            return;
        };
        tried.push(backend.addr);
        out.retries = tried.len() - 1;
        let result = attempt(
            cx, s, upstream, &backend, &head, &mut body, declared, head_only, request_id, out,
        )
        .await;
        out.backend = Some(backend.clone());
        let failure = match result {
            Ok(()) => return,
            Err(f) => f,
        };
        let (status, retry) = match failure {
            Failure::Connect => (502, true),
            Failure::AfterSend { timed_out } => (if timed_out { 504 } else { 502 }, replayable),
            Failure::Client => return,
            Failure::BadBody => {
                out.status = 400;
                answer_error(s, 400, request_id, head_only, cx.body_timeout).await;
                return;
            }
            Failure::Upstream => (502, false),
        };
        upstream.record(&backend, false);
        last_failure = status;
        if retry && body.is_some() && tried.len() <= conf.retries as usize {
            upstream.metrics.retries.inc();
            continue;
        }
        out.status = status;
        answer_error(s, status, request_id, head_only, cx.body_timeout).await;
        return;
    }
}

/// One attempt on `backend`: `Ok` once a usable answer head came (its body is then relayed as
/// far as it goes). `body` is taken when a streamed body starts going out (no retry after).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    cx: &Conn<'_>,
    s: &mut HttpSession,
    upstream: &Arc<Upstream>,
    backend: &Backend,
    head: &[u8],
    body: &mut Option<Body>,
    declared: Option<u64>,
    head_only: bool,
    request_id: &str,
    out: &mut Outcome,
) -> Result<(), Failure> {
    let conf = &upstream.conf;
    let started = Instant::now();
    let (mut up, reused) = match upstream.connector.reuse(backend.addr) {
        Some(conn) => (conn, true),
        // Boxed: a connect's future is 1.4 KB, and inline it set the size of every stream's
        // future, which is moved and allocated per stream (most streams reuse a connection).
        None => match Box::pin(upstream.connector.connect(backend.addr)).await {
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
    let whole: &[u8] = match body.as_ref() {
        Some(Body::Whole(data)) => data,
        _ => &[],
    };
    let sent = async {
        if whole.is_empty() {
            up.io.write_all(head).await?;
        } else {
            let mut one = Vec::with_capacity(head.len() + whole.len());
            one.extend_from_slice(head);
            one.extend_from_slice(whole);
            up.io.write_all(&one).await?;
        }
        up.io.flush().await
    };
    let sent = match tokio::time::timeout(conf.read_timeout, sent).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    };
    if let Err(e) = sent {
        log::debug!("upstream {}: writing to {}: {e}", conf.name, backend.addr);
        // A pooled connection the Pod had closed: nothing reached it.
        return Err(if reused {
            Failure::Connect
        } else {
            Failure::AfterSend { timed_out: false }
        });
    }
    if matches!(body, Some(Body::Started(_))) {
        let Some(Body::Started(first)) = body.take() else {
            return Err(Failure::Upstream);
        };
        stream_body(cx, s, &mut up, first, declared, conf.read_timeout).await?;
    }

    let bad_answer = |why: &str| {
        log::warn!(
            "upstream {}: {} answered with {why}; not relayed",
            conf.name,
            backend.addr
        );
        Failure::AfterSend { timed_out: false }
    };
    // A client that resets the stream meanwhile ends the wait (and the Pod connection): work
    // for a cancelled stream stops with it (rapid reset against a slow Pod).
    let read = tokio::select! {
        r = final_response(&mut up, conf, backend.addr, false) => r,
        _ = s.idle() => return Err(Failure::Client),
    };
    let resp = match read {
        Ok(resp) => resp,
        Err(NoHead::Malformed(why)) => return Err(bad_answer(&why)),
        Err(NoHead::Failed { timed_out }) => return Err(Failure::AfterSend { timed_out }),
    };
    let info = HeadInfo::gather(resp.headers());
    let length = info.response_length(resp.minor).map_err(bad_answer)?;
    let AnswerFraming {
        mut framing,
        declared: said,
        ..
    } = answer_framing(resp.status, length, head_only, 1);

    let mut answer = ResponseHeader::build_no_case(resp.status, Some(resp.headers.len() + 2))
        .map_err(|_| bad_answer("a status h2 cannot carry"))?;
    let mut has_id = false;
    for (n, v) in &resp.headers {
        let name = &resp.raw[n.clone()];
        if name.eq_ignore_ascii_case(b"x-request-id") {
            has_id = true;
        } else if info.drops(name, false) {
            continue;
        }
        // The value shares the head's buffer (checked, not copied).
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_maybe_shared(resp.raw.slice(v.clone())),
        ) else {
            continue;
        };
        let value = crate::proxy::unindexed_id(name.as_str().as_bytes(), value);
        let _ = answer.append_header(name, value);
    }
    if let (false, Some(id)) = (has_id, crate::proxy::request_id_value(request_id)) {
        let _ = answer.append_header("x-request-id", id);
    }
    if let Declared::Length(n) = said {
        let _ = answer.insert_header(http::header::CONTENT_LENGTH, n);
    }

    let took = started.elapsed();
    out.first_byte = Some(took);
    upstream.metrics.first_byte.observe(took.as_secs_f64());
    upstream.record(backend, resp.status < 500);
    out.status = resp.status;

    let mut data = take(&mut framing, &mut up.buf).map_err(bad_answer)?;
    let mut done = data.1;
    let ended_at_once = done && data.0.is_empty();
    if s.write_response_header(Box::new(answer), ended_at_once)
        .is_err()
    {
        return Ok(());
    }
    if !ended_at_once {
        loop {
            if !data.0.is_empty() || done {
                out.bytes += data.0.len() as u64;
                let sent = if done {
                    send_last(s, data.0, cx.body_timeout).await
                } else {
                    let sent = s.write_body(data.0, false).await;
                    sent.map_err(|e| crate::proxy::ended::of_h2_write(&e))
                };
                if let Err(ended) = sent {
                    out.ended = Some(ended);
                    return Ok(());
                }
            }
            if done {
                break;
            }
            let read = tokio::select! {
                r = read_more(&mut up.io, &mut up.buf, conf.read_timeout) => r,
                // The client reset the stream: stop reading an answer nobody will get.
                _ = s.idle() => {
                    out.ended = Some(crate::proxy::ended::CLIENT_CLOSED);
                    return Ok(());
                }
            };
            match read {
                Ok(0) if framing == Framing::UntilClose => {
                    data = (Bytes::new(), true);
                    done = true;
                    continue;
                }
                Ok(0) | Err(_) => {
                    out.ended = Some(crate::proxy::ended::of_pod_read(&read));
                    // Part of the answer went out: the stream is reset (the session is dropped
                    // unfinished), so the client sees a truncated answer, never a wrong one.
                    log::debug!(
                        "upstream {}: the answer of {} ended early",
                        conf.name,
                        backend.addr
                    );
                    return Ok(());
                }
                Ok(_) => {}
            }
            data = match take(&mut framing, &mut up.buf) {
                Ok(d) => d,
                Err(why) => {
                    log::warn!(
                        "upstream {}: {} sent a malformed body: {why}",
                        conf.name,
                        backend.addr
                    );
                    return Ok(());
                }
            };
            done = data.1;
        }
    }
    let pod_keeps = if resp.minor >= 1 {
        !info.close
    } else {
        info.keep_alive
    };
    if pod_keeps && up.buf.is_empty() && framing != Framing::UntilClose {
        upstream.connector.put_back(backend.addr, up, upstream);
    }
    Ok(())
}

/// Sends `data` as the last of an answer's body, straight on the `h2` stream: at once when the
/// stream's flow-control window takes it (nearly always: an answer read whole is smaller than
/// the windows), else piece by piece as the client opens its window, within `timeout` as
/// `HttpSession::write_body` would. Pingora's `write_body` arms two timers and reserves capacity
/// in a loop for every piece; measured (`benches/load/h2.py tls`, perf) it was 2.7 % of
/// podgate's time, most answers being one piece. `Err` when the client is gone or too slow,
/// with the access log's `ended` for it.
async fn send_last(
    s: &mut HttpSession,
    mut data: Bytes,
    timeout: Duration,
) -> Result<(), &'static str> {
    use crate::proxy::ended::{CLIENT_CLOSED, CLIENT_WRITE_TIMEOUT};
    let Some(mut w) = s.take_response_body_writer() else {
        return Err(CLIENT_CLOSED);
    };
    if !data.is_empty() {
        w.reserve_capacity(data.len());
    }
    if w.capacity() >= data.len() {
        return w.send_data(data, true).map_err(|_| CLIENT_CLOSED);
    }
    let rest = async {
        loop {
            let room = match w.capacity() {
                0 => match std::future::poll_fn(|cx| w.poll_capacity(cx)).await {
                    Some(Ok(n)) => n,
                    _ => return false,
                },
                n => n,
            };
            let piece = data.split_to(room.min(data.len()));
            let last = data.is_empty();
            if w.send_data(piece, last).is_err() {
                return false;
            }
            if last {
                return true;
            }
            w.reserve_capacity(data.len());
        }
    };
    match tokio::time::timeout(timeout, rest).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(CLIENT_CLOSED),
        Err(_) => Err(CLIENT_WRITE_TIMEOUT),
    }
}

/// The body bytes at the start of `buf` as `framing` delimits them (chunked bodies decoded),
/// and whether the body ended there.
fn take(framing: &mut Framing, buf: &mut BytesMut) -> Result<(Bytes, bool), &'static str> {
    match framing {
        Framing::Empty => Ok((Bytes::new(), true)),
        Framing::Length(left) => {
            let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
            *left -= n as u64;
            Ok((buf.split_to(n).freeze(), *left == 0))
        }
        Framing::UntilClose => Ok((buf.split().freeze(), false)),
        Framing::Chunked(_) => {
            let mut plain = Vec::new();
            let (n, done) = framing
                .take_into(buf, &mut plain, Out::Plain)
                .map_err(|bad| bad.0)?;
            let _ = buf.split_to(n);
            Ok((Bytes::from(plain), done))
        }
    }
}

/// Sends a body larger than [`BUFFERED_BODY`] to the Pod as it arrives: `first` (already read),
/// then the client's DATA, with `content-length` (`declared`, checked against what arrives) or
/// chunked.
async fn stream_body(
    cx: &Conn<'_>,
    s: &mut HttpSession,
    up: &mut pool::Conn,
    first: BytesMut,
    declared: Option<u64>,
    write_timeout: Duration,
) -> Result<(), Failure> {
    let mut sent = 0u64;
    let mut next = Some(first.freeze());
    loop {
        let data = match next.take() {
            Some(d) => d,
            None => match tokio::time::timeout(cx.body_timeout, s.read_body_bytes()).await {
                Ok(Ok(Some(d))) => d,
                Ok(Ok(None)) => break,
                Ok(Err(_)) | Err(_) => return Err(Failure::Client),
            },
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if declared.is_some_and(|n| sent > n) {
            // Never write past the declared length: the excess would be the Pod's next request.
            return Err(Failure::BadBody);
        }
        let write = async {
            if declared.is_none() {
                up.io
                    .write_all(format!("{:x}\r\n", data.len()).as_bytes())
                    .await?;
                up.io.write_all(&data).await?;
                up.io.write_all(b"\r\n").await
            } else {
                up.io.write_all(&data).await
            }
        };
        match tokio::time::timeout(write_timeout, write).await {
            Ok(Ok(())) => {}
            _ => return Err(Failure::Upstream),
        }
    }
    if declared.is_some_and(|n| sent != n) {
        return Err(Failure::BadBody);
    }
    let end = async {
        if declared.is_none() {
            up.io.write_all(b"0\r\n\r\n").await?;
        }
        up.io.flush().await
    };
    match tokio::time::timeout(write_timeout, end).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Failure::Upstream),
    }
}

/// An error answer podgate makes itself: the JSON body of the other paths.
async fn answer_error(
    s: &mut HttpSession,
    status: u16,
    request_id: &str,
    head_only: bool,
    timeout: Duration,
) {
    if s.response_written().is_some() {
        return;
    }
    let body = error_json(status);
    let Ok(mut resp) = ResponseHeader::build_no_case(status, Some(3)) else {
        return;
    };
    let _ = resp.append_header(http::header::CONTENT_TYPE, "application/json");
    let _ = resp.append_header(http::header::CONTENT_LENGTH, body.len());
    if let Some(id) = crate::proxy::request_id_value(request_id) {
        let _ = resp.append_header("x-request-id", id);
    }
    if s.write_response_header(Box::new(resp), head_only).is_ok() && !head_only {
        let _ = send_last(s, Bytes::from(body), timeout).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Field names an h2 client may send, the ones the translation treats specially included.
    fn name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"cookie".to_vec()),
            Just(b"te".to_vec()),
            Just(b"host".to_vec()),
            Just(b"content-length".to_vec()),
            Just(b"x-forwarded-for".to_vec()),
            Just(b"x-request-id".to_vec()),
            Just(b"expect".to_vec()),
            Just(b"x-a".to_vec()),
            proptest::collection::vec(any::<u8>(), 1..12),
        ]
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"trailers".to_vec()),
            Just(b"5".to_vec()),
            Just(b"a=1".to_vec()),
            Just(b"\tx y\xff".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..16),
        ]
    }

    proptest! {
        /// Whatever fields and path an h2 request carries (as far as the `http` types hold
        /// them), the head podgate writes for an HTTP/1.1 Pod is one complete request head to
        /// a strict parser, with exactly one Host, one X-Forwarded-For, at most one framing
        /// field and cookie line, and no hop-by-hop field.
        #[test]
        fn heads_for_http1_pods_parse_as_exactly_one_request(
            path in proptest::collection::vec(any::<u8>(), 0..24),
            fields in proptest::collection::vec((name(), value()), 0..10),
            host_header in any::<bool>(),
            tls in any::<bool>(),
        ) {
            let mut pq = b"/".to_vec();
            pq.extend_from_slice(&path);
            let Ok(pq) = http::uri::PathAndQuery::try_from(pq) else {
                return Ok(());
            };
            let uri = http::Uri::builder()
                .scheme("http")
                .authority("a.test:80")
                .path_and_query(pq)
                .build()
                .unwrap();
            let (mut parts, ()) = http::Request::builder()
                .method("POST")
                .uri(uri)
                .body(())
                .unwrap()
                .into_parts();
            for (n, v) in &fields {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(n),
                    http::HeaderValue::from_bytes(v),
                ) {
                    parts.headers.append(n, v);
                }
            }
            let hop = Hop {
                client: Some(SocketAddr::from(([127, 0, 0, 1], 5000))),
                tls,
                host_header: host_header.then_some("pod.internal"),
                request_id: "id",
            };
            let Ok((mut head, length)) = request_head(&parts, |p| p.into(), &hop) else {
                return Ok(());
            };
            if let BodyLength::Length(n) = length {
                push_header(&mut head, b"content-length", n.to_string().as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut slots);
            let parsed = req.parse(&head);
            prop_assert!(
                matches!(parsed, Ok(httparse::Status::Complete(n)) if n == head.len()),
                "{:?}: {}", parsed, String::from_utf8_lossy(&head)
            );
            let count = |name: &str| req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
            prop_assert_eq!(count("host"), 1);
            prop_assert_eq!(count("x-forwarded-for"), 1);
            prop_assert_eq!(count("x-request-id"), 1);
            prop_assert!(count("content-length") + count("transfer-encoding") <= 1);
            prop_assert!(count("cookie") <= 1);
            for hop_field in ["te", "connection", "keep-alive", "upgrade", "expect", "trailer"] {
                prop_assert_eq!(count(hop_field), 0, "{} went on", hop_field);
            }
            if host_header {
                let host = req.headers.iter().find(|h| h.name == "host").unwrap();
                prop_assert_eq!(host.value, b"pod.internal");
            }
        }
    }
}
