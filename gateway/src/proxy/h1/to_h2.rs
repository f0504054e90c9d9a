//! HTTP/1.1 clients to Pods of an `h2`/`h2c` upstream: the request goes out as one h2 stream on
//! a pooled, multiplexed connection (`upstream/h2_pool.rs`), and the answer comes back as
//! HTTP/1.1 under podgate's framing, without the Pod's trailers (HTTP/1.1 clients did not ask for
//! them). Upgrades get a 502.
//!
//! Bodies up to `BUFFERED_BODY` were read whole before the Pod was chosen, so the request can be
//! sent again to another Pod. Larger and chunked bodies stream: decoded from the client's
//! framing (chunk lines and trailers are not passed on: h2 frames its own DATA), and written as
//! the Pod's flow-control window allows, so a slow Pod holds at most one read of the client's
//! bytes in podgate, never the whole body.
//!
//! A Pod may refuse a stream without processing it: it sent GOAWAY with a lower last stream id
//! (a server rotating connections, e.g. gRPC's `MAX_CONNECTION_AGE`, or shutting down), or reset
//! it with REFUSED_STREAM (RFC 9113 §8.7). Such a request is sent again on a new connection to the
//! same Pod, once, for any method, and counts neither as a retry nor as a Pod failure; a second
//! refusal goes to another Pod like a connect failure.

use super::body::{read_more, Framing, Out};
use super::rewrite::{push_header, HashView, RequestCtx};
use super::{error_answer, Client, Engine, Outcome};
use crate::proxy::GatewayRoute;
use crate::upstream::balance::Backend;
use crate::upstream::h2_pool;
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Instant;

impl<F> Engine<F> {
    /// Sends a routed request to a Pod of an `h2`/`h2c` upstream and relays the answer as
    /// HTTP/1.1: chunked (HTTP/1.0: until close), without the Pod's trailers. `body` is the body
    /// read whole (maybe empty) and `framing` is [`Framing::Empty`]; or `body` is empty and
    /// `framing` says how the rest of the body, still with the client, is delimited. Retries go
    /// to another Pod while nothing reached one (connect failures, refused streams) and, for
    /// idempotent methods with a body read whole, while no answer came.
    pub(super) async fn proxy_h2(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        body: Bytes,
        mut framing: Framing,
        keep: bool,
        outcome: &mut Outcome<'_>,
    ) -> Result<bool, ()> {
        let route = outcome.route.expect("routed");
        let upstream = &route.upstream.upstream;
        let conf = &upstream.conf;
        let body_timeout = self.limits.body_timeout;
        if ctx.upgrading {
            log::debug!("client {:?}: upgrade to an h2 upstream: 502", c.addr);
            outcome.status = 502;
            let answer = error_answer(502, None, false, ctx.head_only, ctx.request_id);
            let _ = c.send(&answer, body_timeout).await;
            return Ok(false);
        }
        let streaming = framing != Framing::Empty;
        let length = match &framing {
            Framing::Length(n) => Some(*n),
            Framing::Chunked(_) | Framing::UntilClose => None,
            Framing::Empty => (!body.is_empty() || ctx.has_length).then_some(body.len() as u64),
        };
        let hashed = HashView::of(ctx, c.addr);
        let key = upstream.hash_key(&hashed);
        let mut tried: Vec<SocketAddr> = Vec::with_capacity(2);
        let mut last_failure = 503;
        loop {
            // `_in_flight` counts the attempt for least request until this iteration ends.
            let Some((backend, _in_flight)) = upstream.pick(&tried, key) else {
                outcome.status = last_failure;
                let answer = error_answer(last_failure, None, false, ctx.head_only, ctx.request_id);
                let _ = c.send(&answer, body_timeout).await;
                return Ok(false);
            };
            tried.push(backend.addr);
            outcome.retries = tried.len() - 1;
            outcome.backend = Some(backend.clone());
            let attempt = Instant::now();
            let sent = Sent {
                body: &body,
                framing: &mut framing,
                length,
            };
            let (status, retry) = match self
                .h2_attempt(c, ctx, &backend, sent, keep, outcome, attempt)
                .await
            {
                Ok(keep) => return Ok(keep),
                Err(H2Failure::Unrepresentable) => {
                    outcome.status = 400;
                    let answer = error_answer(400, None, false, ctx.head_only, ctx.request_id);
                    let _ = c.send(&answer, body_timeout).await;
                    return Ok(false);
                }
                Err(H2Failure::BadBody) => {
                    outcome.status = 400;
                    let answer = error_answer(400, None, false, false, ctx.request_id);
                    let _ = c.send(&answer, body_timeout).await;
                    return Ok(false);
                }
                Err(H2Failure::Client) => return Err(()),
                // Nothing reached the Pod, or it said it processed nothing: any method may go
                // to another Pod, unless part of a streamed body was already read.
                Err(H2Failure::Connect) => (502, true),
                Err(H2Failure::Refused) => (502, !streaming),
                Err(H2Failure::NoAnswer { timed_out }) => (
                    if timed_out { 504 } else { 502 },
                    !streaming && ctx.req.method.is_idempotent(),
                ),
            };
            upstream.record(&backend, false);
            last_failure = status;
            if retry && tried.len() <= conf.retries as usize {
                upstream.metrics.retries.inc();
                continue;
            }
            outcome.status = status;
            let answer = error_answer(status, None, false, ctx.head_only, ctx.request_id);
            let _ = c.send(&answer, body_timeout).await;
            return Ok(false);
        }
    }

    /// One attempt on `backend` over h2. `Ok` once an answer head came (it is then relayed).
    #[allow(clippy::too_many_arguments)]
    async fn h2_attempt(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        backend: &Backend,
        sent: Sent<'_>,
        keep: bool,
        outcome: &mut Outcome<'_>,
        attempt: Instant,
    ) -> Result<bool, H2Failure> {
        let route = outcome.route.expect("routed");
        let upstream = &route.upstream.upstream;
        let conf = &upstream.conf;
        let streaming = *sent.framing != Framing::Empty;
        let mut refused = false;
        // Whether the client's body was not read to its end (the Pod answered before it).
        let mut body_left = false;
        let resp = loop {
            let make = || h2_request(ctx, route, c, backend.addr, sent.length);
            let end = sent.body.is_empty() && !streaming;
            let (answer, mut stream) = h2_pool::open(upstream, backend.addr, make, end)
                .await
                .map_err(|e| match e {
                    h2_pool::NotOpened::Connect => H2Failure::Connect,
                    h2_pool::NotOpened::Unrepresentable => H2Failure::Unrepresentable,
                })?;
            if !sent.body.is_empty() {
                // At most BUFFERED_BODY bytes: h2 queues them and sends as the Pod's window allows.
                stream
                    .send_data(sent.body.clone(), !streaming)
                    .map_err(|_| H2Failure::NoAnswer { timed_out: false })?;
            }
            if streaming {
                match self.stream_body(c, sent.framing, &mut stream, conf).await {
                    Ok(()) => {}
                    // The Pod stopped taking the body: it may have answered already.
                    Err(H2Failure::NoAnswer { .. }) => body_left = true,
                    Err(e) => {
                        stream.send_reset(h2::Reason::CANCEL);
                        return Err(e);
                    }
                }
            }
            match tokio::time::timeout(conf.read_timeout, answer).await {
                Ok(Ok(resp)) => break resp,
                Ok(Err(e)) if h2_pool::refused(&e) => {
                    h2_pool::discard(&upstream.connector, backend.addr);
                    if !refused && !streaming {
                        log::debug!(
                            "upstream {}: {} refused a stream ({e}); again on a new connection",
                            conf.name,
                            backend.addr
                        );
                        refused = true;
                        continue;
                    }
                    log::warn!(
                        "upstream {}: {} refused the request: {e}",
                        conf.name,
                        backend.addr
                    );
                    return Err(H2Failure::Refused);
                }
                Ok(Err(e)) => {
                    log::warn!(
                        "upstream {}: no answer from {}: {e}",
                        conf.name,
                        backend.addr
                    );
                    return Err(H2Failure::NoAnswer { timed_out: false });
                }
                Err(_) => {
                    log::warn!(
                        "upstream {}: no answer from {}: timed out",
                        conf.name,
                        backend.addr
                    );
                    return Err(H2Failure::NoAnswer { timed_out: true });
                }
            }
        };
        let keep = keep && !body_left;
        let took = attempt.elapsed();
        outcome.first_byte = Some(took);
        upstream.metrics.first_byte.observe(took.as_secs_f64());
        let status = resp.status().as_u16();
        upstream.record(backend, status < 500);
        outcome.status = status;
        let (parts, mut recv) = resp.into_parts();
        let no_body =
            ctx.head_only || status == 204 || status == 304 || (100..200).contains(&status);
        let ended = no_body || recv.is_end_stream();
        // HTTP/1.0 clients know no chunked coding: their answer ends with the connection.
        let chunked = !ended && ctx.req.minor >= 1;
        let keep = keep && (ended || chunked);
        let mut out = Vec::with_capacity(256);
        let reason = parts.status.canonical_reason().unwrap_or("");
        out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
        let mut has_id = false;
        for (name, value) in &parts.headers {
            // h2 has no connection-specific fields; the length is podgate's to decide.
            if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
                continue;
            }
            has_id |= name.as_str() == "x-request-id";
            push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
        if !has_id {
            push_header(&mut out, b"x-request-id", ctx.request_id.as_bytes());
        }
        if chunked {
            push_header(&mut out, b"transfer-encoding", b"chunked");
        } else if ended && !ctx.head_only && status != 204 && status != 304 {
            push_header(&mut out, b"content-length", b"0");
        }
        push_header(
            &mut out,
            b"connection",
            if keep { b"keep-alive" } else { b"close" },
        );
        out.extend_from_slice(b"\r\n");
        let body_timeout = self.limits.body_timeout;
        if c.send(&out, body_timeout).await.is_err() {
            return Ok(false);
        }
        if ended {
            return Ok(keep);
        }
        loop {
            let chunk = match tokio::time::timeout(conf.read_timeout, recv.data()).await {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    log::debug!(
                        "upstream {}: relaying the answer of {}: {e}",
                        conf.name,
                        backend.addr
                    );
                    return Ok(false);
                }
                Err(_) => {
                    log::debug!(
                        "upstream {}: the answer of {} stalled",
                        conf.name,
                        backend.addr
                    );
                    return Ok(false);
                }
            };
            let _ = recv.flow_control().release_capacity(chunk.len());
            if chunk.is_empty() {
                continue;
            }
            outcome.bytes += chunk.len() as u64;
            let sent = if chunked {
                let mut framed = Vec::with_capacity(chunk.len() + 12);
                framed.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                framed.extend_from_slice(&chunk);
                framed.extend_from_slice(b"\r\n");
                c.send(&framed, body_timeout).await
            } else {
                c.send(&chunk, body_timeout).await
            };
            if sent.is_err() {
                return Ok(false);
            }
        }
        if chunked && c.send(b"0\r\n\r\n", body_timeout).await.is_err() {
            return Ok(false);
        }
        Ok(keep)
    }

    /// Moves the rest of the client's body, delimited by `framing`, into `stream` as the Pod's
    /// window allows, and ends the stream. `NoAnswer` when the Pod stopped taking it (reset or
    /// closed) or gave no window within its read timeout.
    async fn stream_body(
        &self,
        c: &mut Client,
        framing: &mut Framing,
        stream: &mut h2::SendStream<Bytes>,
        conf: &crate::config::UpstreamConf,
    ) -> Result<(), H2Failure> {
        let stopped = |timed_out| H2Failure::NoAnswer { timed_out };
        loop {
            let mut out = Vec::new();
            let (take, done) = framing
                .take_into(&c.buf, &mut out, Out::Plain)
                .map_err(|bad| {
                    log::debug!("client {:?}: request body: {}", c.addr, bad.0);
                    H2Failure::BadBody
                })?;
            let _ = c.buf.split_to(take);
            let mut data = Bytes::from(out);
            while !data.is_empty() {
                stream.reserve_capacity(data.len());
                let window = std::future::poll_fn(|cx| stream.poll_capacity(cx));
                match tokio::time::timeout(conf.read_timeout, window).await {
                    Ok(Some(Ok(0))) => {}
                    Ok(Some(Ok(n))) => {
                        let part = data.split_to(n.min(data.len()));
                        stream.send_data(part, false).map_err(|_| stopped(false))?;
                    }
                    Ok(Some(Err(_)) | None) => return Err(stopped(false)),
                    Err(_) => return Err(stopped(true)),
                }
            }
            if done {
                return stream
                    .send_data(Bytes::new(), true)
                    .map_err(|_| stopped(false));
            }
            match read_more(&mut c.io, &mut c.buf, self.limits.body_timeout).await {
                Ok(0) | Err(_) => return Err(H2Failure::Client),
                Ok(_) => {}
            }
        }
    }
}

/// What an attempt sends: a body read whole, or (`framing` not empty) one still with the client,
/// and the length to announce.
struct Sent<'a> {
    body: &'a Bytes,
    framing: &'a mut Framing,
    length: Option<u64>,
}

/// Why an h2 attempt got no answer head.
enum H2Failure {
    /// No stream could be opened: nothing reached the Pod.
    Connect,
    /// The Pod refused the stream unprocessed, twice (see the module comment).
    Refused,
    /// The request went out; no answer head came.
    NoAnswer { timed_out: bool },
    /// The request cannot be written as h2 (authority or a field): 400.
    Unrepresentable,
    /// The client's chunked body broke the grammar: 400.
    BadBody,
    /// The client went away or stalled while sending its body.
    Client,
}

/// The request for an h2 Pod: the client's fields minus hop-by-hop, framing and forwarding ones
/// (as for HTTP/1.1 Pods), then the forwarding fields; `Host` becomes `:authority`. `None` when
/// the authority or a field cannot be represented.
fn h2_request(
    ctx: &RequestCtx,
    route: &GatewayRoute,
    c: &Client,
    pod: SocketAddr,
    length: Option<u64>,
) -> Option<http::Request<()>> {
    let conf = &route.upstream.upstream.conf;
    let scheme = match conf.scheme {
        crate::config::Scheme::Https => "https",
        crate::config::Scheme::Http => "http",
    };
    let authority: String = match &conf.host_header {
        Some(h) => h.clone(),
        None if !ctx.host_raw.is_empty() => String::from_utf8(ctx.host_raw.to_vec()).ok()?,
        None => pod.to_string(),
    };
    let uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(route.upstream_path(ctx.path_and_query).as_ref())
        .build()
        .ok()?;
    let mut b = http::Request::builder()
        .method(ctx.req.method.clone())
        .uri(uri);
    for (name, value) in ctx.req.headers() {
        // `upgrade` too: h2 has no upgrades (those requests were answered 502 before).
        if ctx.info.drops(name, false) {
            continue;
        }
        b = b.header(
            http::HeaderName::from_bytes(name).ok()?,
            http::HeaderValue::from_bytes(value).ok()?,
        );
    }
    if let Some(ip) = c.addr.map(|a| a.ip()) {
        let xff = match ctx.info.forwarded_for.filter(|p| !p.is_empty()) {
            Some(prev) => format!("{}, {ip}", String::from_utf8_lossy(prev)),
            None => ip.to_string(),
        };
        b = b.header("x-forwarded-for", http::HeaderValue::from_str(&xff).ok()?);
    }
    b = b.header("x-forwarded-proto", if c.tls { "https" } else { "http" });
    if !ctx.host_raw.is_empty() {
        let host = ctx.host_raw.to_ascii_lowercase();
        b = b.header(
            "x-forwarded-host",
            http::HeaderValue::from_bytes(&host).ok()?,
        );
    }
    b = b.header(
        "x-request-id",
        crate::proxy::request_id_value(ctx.request_id)?,
    );
    if let Some(n) = length {
        b = b.header(http::header::CONTENT_LENGTH, n);
    }
    b.body(()).ok()
}
