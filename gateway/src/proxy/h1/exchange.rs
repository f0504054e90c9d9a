//! One request on the HTTP/1.1 path: check its head, route it, send it to a Pod with a head
//! podgate wrote (framing included), and relay the answer under framing podgate writes too.
//!
//! Semantics (the same as the Pingora path, see `proxy/pingora.rs`): hop-by-hop headers are dropped;
//! `X-Forwarded-For/-Proto/-Host` and `X-Request-Id` are set; `strip_prefix` and `host_header`
//! apply; request bodies up to [`BUFFERED_BODY`] are read before the Pod is chosen (so that
//! idempotent requests can be retried on another Pod), larger and chunked ones are streamed;
//! `Expect: 100-continue` is answered here; upgrades (WebSocket; never h2c) are tunnelled after a
//! 101.
//!
//! What comes from a Pod is checked like what comes from a client: an answer whose framing is
//! ambiguous (RFC 9112 §6.3) is a 502 and its connection is not reused.

use super::body::{client_read_ended, read_more, relay, Chunked, Framing, Out, RelayError};
use super::head::{parse_response, BodyLength, HeadInfo, Request, Response};
use super::rewrite::{
    answer_framing, response_head, target, upstream_head, AnswerFraming, HashView, RequestCtx,
};
use super::{error_answer, Client, Engine, Outcome, BUFFERED_BODY};
use crate::proxy::routing::{normalize_host, Match};
use crate::proxy::LogFields;
use crate::telemetry::access_log;
use crate::upstream::pool;
use bytes::Bytes;
use http::Method;
use std::net::SocketAddr;

use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Why an attempt on one Pod failed.
enum Failure {
    /// Nothing was sent: any request may go to another Pod.
    Connect,
    /// The request may have reached the Pod; no usable response came back.
    AfterSend { timed_out: bool },
    /// The client went away; nothing more to answer.
    Client,
    /// The client's body broke its framing: 400, and the Pod never sees the request end.
    BadBody,
    /// The streamed request body could not be delivered to the Pod.
    Upstream,
}

impl<F> Engine<F> {
    /// Serves one request; returns whether the connection may carry another.
    pub(super) async fn exchange(&self, c: &mut Client, req: Request, stopping: bool) -> bool {
        let start = Instant::now();
        let info = HeadInfo::gather(req.headers());
        let request_id = match info.request_id.and_then(|v| std::str::from_utf8(v).ok()) {
            Some(id) if !id.is_empty() && id.len() <= 200 => id.to_string(),
            _ => access_log::request_id(),
        };
        let refuse = |status: u16, why: &str| {
            log::debug!("client {:?}: {status}: {why}", c.addr);
            status
        };
        let checked = match (target(req.target()), info.request_length(req.minor)) {
            // podgate tunnels nothing but upgrades (nginx answers CONNECT 405 too).
            _ if req.method == Method::CONNECT => Err(refuse(405, "CONNECT")),
            (_, Err(r)) => Err(refuse(r.status, r.why)),
            (None, _) => Err(refuse(400, "bad request target")),
            (_, _) if info.hosts > 1 => Err(refuse(400, "more than one Host")),
            (Some(t), _) if info.hosts == 0 && req.minor >= 1 && t.authority.is_none() => {
                Err(refuse(400, "HTTP/1.1 request without Host"))
            }
            (Some(t), Ok(len)) => Ok((t, len)),
        };
        let (target, length) = match checked {
            Ok(ok) => ok,
            Err(status) => {
                let answer = error_answer(status, None, false, false, &request_id);
                let _ = c.send(&answer, self.limits.body_timeout).await;
                self.gateway.unmatched.observe(status, start.elapsed());
                return false;
            }
        };
        let path_and_query = target.path_and_query;
        let path = path_and_query.split('?').next().unwrap_or("/");
        let host_raw: &[u8] = match (target.authority, info.host) {
            (Some(a), _) => a.as_bytes(),
            (None, Some(h)) => h,
            (None, None) => b"",
        };
        let host = normalize_host(std::str::from_utf8(host_raw).unwrap_or(""));
        let mut keep = !stopping
            && !self.limits.keepalive_timeout.is_zero()
            && if req.minor >= 1 {
                !info.close
            } else {
                info.keep_alive
            };
        let framing = match length {
            BodyLength::Chunked => Framing::Chunked(Chunked::default()),
            BodyLength::None | BodyLength::Length(0) => Framing::Empty,
            BodyLength::Length(n) => Framing::Length(n),
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
            ended: None,
        };
        let head_only = req.method == Method::HEAD;
        match &found {
            Match::Found(route) => outcome.route = Some(route),
            Match::NotFound => outcome.status = 404,
            Match::MethodNotAllowed(_) => outcome.status = 405,
        }
        if outcome.route.is_none() {
            // An unread body would be taken for the next request.
            keep &= framing == Framing::Empty;
            let allow = match &found {
                Match::MethodNotAllowed(m) => Some(m.as_slice()),
                _ => None,
            };
            let answer = error_answer(outcome.status, allow, keep, head_only, &request_id);
            keep &= c.send(&answer, self.limits.body_timeout).await.is_ok();
        } else {
            let ctx = RequestCtx {
                req: &req,
                info: &info,
                request_id: &request_id,
                host_raw,
                path_and_query,
                head_only,
                has_length: matches!(length, BodyLength::Length(_)),
                upgrading: info.upgrading(),
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
            self.gateway.access_log.log(&LogFields {
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
                grpc_status: None,
                ended: c.ended().or(outcome.ended),
            });
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
        let body_timeout = self.limits.body_timeout;

        // Small bodies are read now: a Pod that fails can then be replaced even after the
        // request went out. Larger ones stream once a Pod is connected.
        let expects_body = framing != Framing::Empty;
        if expects_body && ctx.info.expect_continue && ctx.req.minor >= 1 {
            c.send(b"HTTP/1.1 100 Continue\r\n\r\n", body_timeout)
                .await
                .map_err(|_| ())?;
        }
        let mut body = Bytes::new();
        let streaming = match framing {
            Framing::Length(n) if n <= BUFFERED_BODY => {
                while (c.buf.len() as u64) < n {
                    let read = read_more(&mut c.io, &mut c.buf, body_timeout).await;
                    if let Some(ended) = client_read_ended(&read) {
                        outcome.ended = Some(ended);
                        return Err(());
                    }
                }
                body = c.buf.split_to(n as usize).freeze();
                framing = Framing::Empty;
                false
            }
            Framing::Empty => false,
            _ => true,
        };
        if conf.protocol.is_h2() {
            return self.proxy_h2(c, ctx, body, framing, keep, outcome).await;
        }
        let mut head = upstream_head(ctx, route, c, &framing, body.len());
        head.extend_from_slice(&body);
        let replayable = !streaming && ctx.req.method.is_idempotent();

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
            let attempt = Instant::now();
            let result = self
                .attempt(
                    c,
                    ctx,
                    &backend,
                    &head,
                    &mut framing,
                    streaming,
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
            let (status, retry) = match failure {
                Failure::Connect => (502, true),
                Failure::AfterSend { timed_out } => (if timed_out { 504 } else { 502 }, replayable),
                Failure::Client => return Err(()),
                Failure::BadBody => {
                    outcome.status = 400;
                    let answer = error_answer(400, None, false, false, ctx.request_id);
                    let _ = c.send(&answer, body_timeout).await;
                    return Ok(false);
                }
                Failure::Upstream => (502, false),
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

    /// One attempt on `backend`. `Ok` once a usable response head came (the answer is then
    /// relayed, or the connection given up), with whether the client connection may be kept.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        c: &mut Client,
        ctx: &RequestCtx<'_>,
        backend: &crate::upstream::balance::Backend,
        head: &[u8],
        framing: &mut Framing,
        streaming: bool,
        keep: bool,
        outcome: &mut Outcome<'_>,
        attempt: Instant,
    ) -> Result<bool, Failure> {
        let upstream = &outcome.route.expect("routed").upstream.upstream;
        let conf = &upstream.conf;
        let body_timeout = self.limits.body_timeout;
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
        if streaming {
            let sent = relay(
                framing,
                Out::Chunked,
                &mut c.buf,
                &mut c.io,
                &mut up.io,
                body_timeout,
                Some(conf.read_timeout),
            )
            .await;
            if let Err(e) = &sent {
                outcome.ended = e.ended_request();
            }
            match sent {
                Ok(_) => {}
                Err(RelayError::Write(e)) => {
                    log::warn!(
                        "upstream {}: sending the body to {}: {e}",
                        conf.name,
                        backend.addr
                    );
                    return Err(Failure::Upstream);
                }
                Err(RelayError::Malformed(bad)) => {
                    log::debug!("client {:?}: request body: {}", c.addr, bad.0);
                    return Err(Failure::BadBody);
                }
                Err(RelayError::Read(_)) => return Err(Failure::Client),
            }
            let _ = up.io.flush().await;
        }

        // The response head; 1xx other than 101 are dropped (100-continue was answered here).
        let bad_answer = |why: &str| {
            log::warn!(
                "upstream {}: {} answered with {why}; not relayed",
                conf.name,
                backend.addr
            );
            Failure::AfterSend { timed_out: false }
        };
        let resp = match final_response(&mut up, conf, backend.addr, ctx.upgrading).await {
            Ok(resp) => resp,
            Err(NoHead::Malformed(why)) => return Err(bad_answer(&why)),
            Err(NoHead::Failed { timed_out }) => return Err(Failure::AfterSend { timed_out }),
        };
        let resp_info = HeadInfo::gather(resp.headers());
        let length = resp_info.response_length(resp.minor).map_err(bad_answer)?;
        let switching = resp.status == 101;
        let AnswerFraming {
            framing: mut resp_framing,
            how,
            declared,
            ends_with_close,
        } = answer_framing(resp.status, length, ctx.head_only, ctx.req.minor);
        let keep = keep && !switching && !ends_with_close;
        let mut out = response_head(&resp, &resp_info, ctx, keep, switching, declared);
        let head_len = out.len();
        let (take, done) = resp_framing
            .take_into(&up.buf, &mut out, how)
            .map_err(|bad| bad_answer(bad.0))?;
        let _ = up.buf.split_to(take);

        let took = attempt.elapsed();
        outcome.first_byte = Some(took);
        upstream.metrics.first_byte.observe(took.as_secs_f64());
        upstream.record(backend, resp.status < 500);
        outcome.status = resp.status;
        outcome.bytes = (out.len() - head_len) as u64;
        if c.send(&out, body_timeout).await.is_err() {
            return Ok(false);
        }
        if switching {
            tunnel(c, up, body_timeout).await;
            return Ok(false);
        }
        if !done {
            match relay(
                &mut resp_framing,
                how,
                &mut up.buf,
                &mut up.io,
                &mut c.io,
                conf.read_timeout,
                None,
            )
            .await
            {
                Ok(n) => outcome.bytes += n,
                Err(e) => {
                    outcome.ended = Some(e.ended_answer());
                    // Part of the answer went out: the client connection ends here, so the
                    // client sees a truncated answer rather than a wrong one.
                    log::debug!(
                        "upstream {}: relaying the answer of {}: {e:?}",
                        conf.name,
                        backend.addr
                    );
                    if let RelayError::Malformed(bad) = e {
                        log::warn!(
                            "upstream {}: {} sent a malformed chunked body: {}",
                            conf.name,
                            backend.addr,
                            bad.0
                        );
                    }
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
        if pod_keeps && up.buf.is_empty() && resp_framing != Framing::UntilClose {
            upstream.connector.put_back(backend.addr, up, upstream);
        }
        Ok(keep)
    }
}

/// Why no final answer head came from a Pod.
pub(crate) enum NoHead {
    /// What came is not a head podgate relays (it does not parse, or is an unasked-for 101).
    Malformed(String),
    /// The Pod closed, failed or was silent past its `read_timeout` (logged).
    Failed { timed_out: bool },
}

/// The Pod's final answer head, read on `up`: 1xx other than 101 are dropped (a 100-continue was
/// answered by podgate already); a 101 is one only when `upgrading`. Shared by the HTTP/1.1 and
/// h2 clients' paths to HTTP/1.1 Pods.
pub(crate) async fn final_response(
    up: &mut pool::Conn,
    conf: &crate::config::UpstreamConf,
    addr: SocketAddr,
    upgrading: bool,
) -> Result<Response, NoHead> {
    loop {
        let resp = match read_response(up, conf.read_timeout).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(NoHead::Malformed(e.to_string()))
            }
            Err(e) => {
                let timed_out = e.kind() == std::io::ErrorKind::TimedOut;
                log::warn!("upstream {}: no answer from {addr}: {e}", conf.name);
                return Err(NoHead::Failed { timed_out });
            }
        };
        if (100..200).contains(&resp.status) && resp.status != 101 {
            continue;
        }
        if resp.status == 101 && !upgrading {
            return Err(NoHead::Malformed(
                "101 to a request that asked for no upgrade".into(),
            ));
        }
        return Ok(resp);
    }
}

/// Reads a response head from the Pod, within `timeout` for each read. A head that does not
/// parse is `InvalidData`.
async fn read_response(up: &mut pool::Conn, timeout: Duration) -> std::io::Result<Response> {
    loop {
        if !up.buf.is_empty() {
            match parse_response(&mut up.buf) {
                Ok(Some(resp)) => return Ok(resp),
                Ok(None) => {}
                Err(why) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why)),
            }
        }
        if read_more(&mut up.io, &mut up.buf, timeout).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// After a 101: bytes flow both ways until either side closes.
async fn tunnel(c: &mut Client, mut up: pool::Conn, timeout: Duration) {
    if !up.buf.is_empty() && c.send(&up.buf, timeout).await.is_err() {
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
