//! One h2 stream sent to a Pod of an `h2`/`h2c` upstream (gRPC services, or any h2 server),
//! served inside the client connection's task (`serve.rs`) like `to_h1.rs`: the call becomes a
//! stream on podgate's pooled, multiplexed connection to the Pod (`upstream/h2_pool.rs`), and
//! both directions flow at once, each as the receiver's flow-control window allows, so server-,
//! client- and bidirectional-streaming calls relay message by message, never buffered whole.
//!
//! Why not Pingora's proxy for these streams, as before: its pool cannot be told that a Pod
//! left, so an idle connection to a removed Pod only got its GOAWAY when it timed out; here the
//! pool drains it as soon as the Pod leaves its upstream (see `h2_pool.rs`). The streams also
//! skip the per-stream task and session relay that `serve.rs` measured as the cost of Pingora's
//! h2 path (the gRPC figures are in `benches/RESULTS.md`).
//!
//! The same rules as Pingora's path (`proxy/pingora.rs`) and the HTTP/1.1 bridge: the Host
//! becomes `:authority` (or `host_header`), `strip_prefix` applies, `X-Forwarded-For/-Proto/-Host`
//! and `X-Request-Id` are set, `te: trailers` passes (gRPC servers require it); trailers come
//! back as sent. gRPC calls (`grpc.rs`): `grpc-timeout` caps podgate's waits for the Pod, and
//! failures podgate answers itself are gRPC answers (HTTP 200, `grpc-status` in trailers).
//! Retries: connect failures go to another Pod within the retry budget; a stream the Pod refused
//! unprocessed (GOAWAY, REFUSED_STREAM) goes again to it on a new connection, once; and an
//! idempotent request whose body (at most `BUFFERED_BODY`) is still held may go to another Pod
//! while no answer came. Request trailers are not passed on.

use super::grpc;
use super::to_h1::{request_id_of, Conn};
use crate::config::Scheme;
use crate::proxy::h1::body::BUFFERED_BODY;
use crate::proxy::{error_json, GatewayRoute, HashParts, LogFields};
use crate::upstream::balance::Backend;
use crate::upstream::{h2_pool, Upstream};
use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::Method;
use pingora_core::protocols::http::v2::server::HttpSession;
use pingora_http::ResponseHeader;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a gRPC error answer waits for the rest of the request, so that the stream closes
/// both ways rather than being reset (as on Pingora's path).
const GRPC_DRAIN: Duration = Duration::from_secs(1);

/// How one call went, for metrics and the access log.
#[derive(Default)]
struct Outcome {
    backend: Option<Backend>,
    status: u16,
    bytes: u64,
    first_byte: Option<Duration>,
    retries: usize,
    /// The `grpc-status` the call ended with, as a metric label index.
    grpc_status: Option<usize>,
    /// Why the call ended early, if it did (the access log's `ended`).
    ended: Option<&'static str>,
}

/// What one call needs to know about itself.
struct Call<'a> {
    cx: &'a Conn<'a>,
    route: &'a GatewayRoute,
    request_id: String,
    grpc: bool,
    /// The `grpc-timeout` deadline, counted from `start`.
    deadline: Option<Duration>,
    start: Instant,
    head_only: bool,
}

/// Why an attempt got no answer head.
enum Failure {
    /// Nothing reached the Pod: any request may go to another one.
    Connect,
    /// The Pod refused the stream unprocessed, twice.
    Refused,
    /// The request (or part of it) went out; no answer head came.
    NoAnswer { timed_out: bool },
    /// The client reset the stream or stopped sending: nothing more to answer.
    Client,
    /// The request cannot be written as an h2 request to the Pod: 400.
    Unrepresentable,
}

/// Serves one stream routed to `route` (an `h2`/`h2c` upstream); `host` is its normalised host.
pub(super) async fn serve(
    cx: &Conn<'_>,
    mut s: HttpSession,
    route: Arc<GatewayRoute>,
    host: String,
) {
    s.set_write_timeout(Some(cx.body_timeout));
    let req = s.req_header();
    let field = |n: &str| req.headers.get(n).map(|v| v.as_bytes());
    let grpc = grpc::is_grpc(field("content-type"));
    let call = Call {
        cx,
        route: &route,
        request_id: request_id_of(req),
        grpc,
        deadline: if grpc {
            field("grpc-timeout").and_then(grpc::parse_timeout)
        } else {
            None
        },
        start: Instant::now(),
        head_only: req.method == Method::HEAD,
    };
    let method = req.method.clone();
    let path = req.uri.path().to_string();
    let mut out = Outcome::default();
    call.proxy(&mut s, &mut out).await;

    let took = call.start.elapsed();
    let metrics = &route.upstream.metrics;
    metrics.observe(out.status, took);
    if let Some(i) = out.grpc_status {
        metrics.observe_grpc(i);
    }
    if cx.gateway.access_log.enabled() {
        cx.gateway.access_log.log(&LogFields {
            request_id: &call.request_id,
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
            grpc_status: out
                .grpc_status
                .map(|i| crate::telemetry::metrics::GRPC_STATUS_LABELS[i.min(17)]),
            ended: cx.ended().or(out.ended),
        });
    }
}

impl Call<'_> {
    /// How long podgate may still wait for the Pod: `read_timeout`, capped by the deadline.
    /// `None` once the deadline passed.
    fn read_wait(&self) -> Option<Duration> {
        let conf = &self.route.upstream.upstream.conf;
        match self.deadline {
            Some(d) => {
                let left = d.saturating_sub(self.start.elapsed());
                (!left.is_zero()).then(|| left.min(conf.read_timeout))
            }
            None => Some(conf.read_timeout),
        }
    }

    /// Picks Pods, sends the call (again where safe) and relays the answer.
    async fn proxy(&self, s: &mut HttpSession, out: &mut Outcome) {
        let upstream = &self.route.upstream.upstream;
        let conf = &upstream.conf;
        // What went to the Pod of the body so far, while it is small enough to send again.
        let mut held = Some(Held::default());
        let mut tried: Vec<SocketAddr> = Vec::with_capacity(2);
        let mut last_failure = 503;
        loop {
            if self.read_wait().is_none() {
                return self.answer_error(s, 504, out).await;
            }
            let picked = {
                let req = s.req_header();
                let parts = HashParts {
                    headers: &req.headers,
                    path: req.uri.path(),
                    client: self.cx.client.map(|a| a.ip()),
                };
                upstream.pick(&tried, upstream.hash_key(&parts))
            };
            // `_in_flight` counts the attempt for least request until this iteration ends.
            let Some((backend, _in_flight)) = picked else {
                return self.answer_error(s, last_failure, out).await;
            };
            tried.push(backend.addr);
            out.retries = tried.len() - 1;
            out.backend = Some(backend.clone());
            let failure = match self.attempt(s, upstream, &backend, &mut held, out).await {
                Ok(()) => return,
                Err(f) => f,
            };
            let replayable = held.is_some();
            let (status, retry) = match failure {
                Failure::Client => return,
                Failure::Unrepresentable => return self.answer_error(s, 400, out).await,
                Failure::Connect => (502, true),
                Failure::Refused => (502, replayable),
                Failure::NoAnswer { timed_out } => (
                    if timed_out { 504 } else { 502 },
                    replayable && !self.grpc && s.req_header().method.is_idempotent(),
                ),
            };
            upstream.record(&backend, false);
            last_failure = status;
            if retry && tried.len() <= conf.retries as usize {
                upstream.metrics.retries.inc();
                continue;
            }
            return self.answer_error(s, status, out).await;
        }
    }

    /// One attempt on `backend`: `Ok` once an answer head came (the call is then relayed to its
    /// end). `held` is what of the body went out so far; `None` once it grew too large to send
    /// again.
    async fn attempt(
        &self,
        s: &mut HttpSession,
        upstream: &Arc<Upstream>,
        backend: &Backend,
        held: &mut Option<Held>,
        out: &mut Outcome,
    ) -> Result<(), Failure> {
        let conf = &upstream.conf;
        let attempt = Instant::now();
        let mut refused = false;
        let (resp, mut to_pod) = loop {
            let Some(replay) = held.as_ref().map(|h| h.bytes.clone().freeze()) else {
                // Part of the body is gone and cannot be sent again.
                return Err(Failure::NoAnswer { timed_out: false });
            };
            let client_done = held.as_ref().is_some_and(|h| h.done) || s.is_body_done();
            let ends_now = client_done && replay.is_empty();
            let make = || pod_request(s, self.route, self.cx, &self.request_id, backend.addr);
            let (answer, tx) = h2_pool::open(upstream, backend.addr, make, ends_now)
                .await
                .map_err(|e| match e {
                    h2_pool::NotOpened::Connect => Failure::Connect,
                    h2_pool::NotOpened::Unrepresentable => Failure::Unrepresentable,
                })?;
            let mut to_pod = Outgoing::new(tx, replay, client_done, ends_now);
            match self.await_head(s, answer, &mut to_pod, held).await {
                Ok(resp) => break (resp, to_pod),
                Err(Head::Refused(e)) => {
                    h2_pool::discard(&upstream.connector, backend.addr);
                    if !refused && held.is_some() {
                        log::debug!(
                            "upstream {}: {} refused a stream ({e}); again on a new connection",
                            conf.name,
                            backend.addr
                        );
                        refused = true;
                        continue;
                    }
                    log::warn!(
                        "upstream {}: {} refused the call: {e}",
                        conf.name,
                        backend.addr
                    );
                    return Err(Failure::Refused);
                }
                Err(Head::Failed(f)) => {
                    if let Failure::NoAnswer { timed_out } = f {
                        let why = if timed_out {
                            "timed out"
                        } else {
                            "stream failed"
                        };
                        log::warn!(
                            "upstream {}: no answer from {}: {why}",
                            conf.name,
                            backend.addr
                        );
                    }
                    return Err(f);
                }
            }
        };

        let took = attempt.elapsed();
        out.first_byte = Some(took);
        upstream.metrics.first_byte.observe(took.as_secs_f64());
        let status = resp.status().as_u16();
        upstream.record(backend, status < 500);
        out.status = status;
        let (parts, recv) = resp.into_parts();
        if let Some(v) = parts.headers.get("grpc-status") {
            // A Trailers-Only answer carries its status in the head.
            out.grpc_status = Some(grpc::status_index(v.as_bytes()));
        }
        let Ok(mut answer) = ResponseHeader::build(parts.status, Some(parts.headers.len() + 1))
        else {
            return Ok(());
        };
        for (name, value) in &parts.headers {
            let value = crate::proxy::unindexed_id(name.as_str().as_bytes(), value.clone());
            let _ = answer.append_header(name.clone(), value);
        }
        if let (false, Some(id)) = (
            parts.headers.contains_key("x-request-id"),
            crate::proxy::request_id_value(&self.request_id),
        ) {
            let _ = answer.insert_header("x-request-id", id);
        }
        let ended = recv.is_end_stream() || self.head_only;
        if s.write_response_header(Box::new(answer), ended).is_err() || ended {
            return Ok(());
        }
        let Some(tx) = s.take_response_body_writer() else {
            return Ok(());
        };
        let to_client = Outgoing::new(tx, Bytes::new(), false, false);
        self.relay(s, recv, to_client, &mut to_pod, out).await;
        Ok(())
    }

    /// Sends the client's body to the Pod while waiting for the Pod's answer head.
    async fn await_head(
        &self,
        s: &mut HttpSession,
        answer: h2::client::ResponseFuture,
        to_pod: &mut Outgoing,
        held: &mut Option<Held>,
    ) -> Result<http::Response<RecvStream>, Head> {
        let wait = self.read_wait().unwrap_or_default();
        let mut answer = pin!(answer);
        let timer = pin!(tokio::time::sleep(wait));
        let mut timer = timer;
        let mut stopped = false;
        loop {
            let read = to_pod.wants_more() && !stopped;
            tokio::select! {
                r = &mut answer => return match r {
                    Ok(resp) => Ok(resp),
                    Err(e) if h2_pool::refused(&e) => Err(Head::Refused(e)),
                    Err(e) => {
                        log::debug!("h2 answer head: {e}");
                        Err(Head::Failed(Failure::NoAnswer { timed_out: false }))
                    }
                },
                () = &mut timer => {
                    to_pod.tx.send_reset(h2::Reason::CANCEL);
                    return Err(Head::Failed(Failure::NoAnswer { timed_out: true }));
                }
                r = to_pod.push(), if to_pod.busy() && !stopped => {
                    // The Pod stopped taking the body: its answer (or reset) will say why.
                    stopped = r.is_err();
                }
                r = client_event(s, self.cx.body_timeout, read) => {
                    let Some(data) = r else {
                        to_pod.tx.send_reset(h2::Reason::CANCEL);
                        return Err(Head::Failed(Failure::Client));
                    };
                    if let Some(h) = held.as_mut() {
                        if h.bytes.len() + data.len() > BUFFERED_BODY as usize {
                            *held = None;
                        } else {
                            h.bytes.extend_from_slice(&data);
                            h.done = s.is_body_done();
                        }
                    }
                    to_pod.take(data, s.is_body_done());
                    // Progress: the Pod's time to answer counts from the last byte sent.
                    timer.as_mut().reset(tokio::time::Instant::now() + wait);
                }
            }
        }
    }

    /// Relays the rest of the call both ways until the Pod's answer ended (trailers included)
    /// and reached the client.
    async fn relay(
        &self,
        s: &mut HttpSession,
        mut recv: RecvStream,
        mut to_client: Outgoing,
        to_pod: &mut Outgoing,
        out: &mut Outcome,
    ) {
        let conf = &self.route.upstream.upstream.conf;
        let wait = self.read_wait().unwrap_or(conf.read_timeout);
        let mut timer = pin!(tokio::time::sleep(wait));
        let mut answer_done = false;
        let mut trailers: Option<http::HeaderMap> = None;
        let mut pod_stopped = false;
        // The client must take what waits for it within client_body_timeout of no progress
        // (it may keep its window shut after the Pod's answer ended).
        let client_wait = self.cx.body_timeout;
        let mut stall = pin!(tokio::time::sleep(client_wait));
        let mut stalled = false;
        loop {
            if to_client.busy() && !stalled {
                stall
                    .as_mut()
                    .reset(tokio::time::Instant::now() + client_wait);
                stalled = true;
            }
            if answer_done && !to_client.busy() {
                if let Some(t) = trailers.take() {
                    if let Some(v) = t.get("grpc-status") {
                        out.grpc_status = Some(grpc::status_index(v.as_bytes()));
                    }
                    let _ = to_client.tx.send_trailers(t);
                }
                return;
            }
            let read = to_pod.wants_more() && !pod_stopped;
            tokio::select! {
                d = recv.data(), if !answer_done && to_client.wants_more() => match d {
                    Some(Ok(data)) => {
                        let _ = recv.flow_control().release_capacity(data.len());
                        out.bytes += data.len() as u64;
                        to_client.take(data, false);
                        timer.as_mut().reset(tokio::time::Instant::now() + wait);
                    }
                    None => {
                        answer_done = true;
                        match std::future::poll_fn(|cx| recv.poll_trailers(cx)).await {
                            Ok(Some(t)) => trailers = Some(t),
                            Ok(None) => to_client.end = true,
                            Err(e) => {
                                log::debug!("upstream {}: answer trailers: {e}", conf.name);
                                to_client.tx.send_reset(h2::Reason::INTERNAL_ERROR);
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        // Part of the answer went out: the client's stream is reset, so it sees
                        // a broken call, never a complete-looking wrong one.
                        log::debug!("upstream {}: relaying an answer: {e}", conf.name);
                        to_client.tx.send_reset(h2::Reason::INTERNAL_ERROR);
                        return;
                    }
                },
                r = deliver(&mut to_client) => {
                    if r.is_err() {
                        // The client went away or reset the stream: so does the call.
                        out.ended = Some(crate::proxy::ended::CLIENT_CLOSED);
                        to_pod.tx.send_reset(h2::Reason::CANCEL);
                        return;
                    }
                    stalled = false;
                }
                () = &mut stall, if stalled && to_client.busy() => {
                    log::debug!("h2 client: took nothing of the answer in {client_wait:?}");
                    out.ended = Some(crate::proxy::ended::CLIENT_WRITE_TIMEOUT);
                    to_pod.tx.send_reset(h2::Reason::CANCEL);
                    to_client.tx.send_reset(h2::Reason::CANCEL);
                    return;
                }
                r = to_pod.push(), if to_pod.busy() && !pod_stopped => pod_stopped = r.is_err(),
                r = read_body(s, self.cx.body_timeout), if read => {
                    match r {
                        Some(data) => to_pod.take(data, s.is_body_done()),
                        None => {
                            to_pod.tx.send_reset(h2::Reason::CANCEL);
                            to_client.tx.send_reset(h2::Reason::CANCEL);
                            return;
                        }
                    }
                }
                () = &mut timer, if !answer_done => {
                    log::debug!("upstream {}: the answer stalled", conf.name);
                    to_pod.tx.send_reset(h2::Reason::CANCEL);
                    to_client.tx.send_reset(h2::Reason::INTERNAL_ERROR);
                    return;
                }
            }
        }
    }

    /// Answers a failure podgate decided itself: the gRPC way for gRPC calls, else JSON.
    async fn answer_error(&self, s: &mut HttpSession, status: u16, out: &mut Outcome) {
        if s.response_written().is_some() {
            return;
        }
        if !self.grpc {
            out.status = status;
            let body = error_json(status);
            let Ok(mut resp) = ResponseHeader::build(status, Some(3)) else {
                return;
            };
            let _ = resp.append_header(http::header::CONTENT_TYPE, "application/json");
            let _ = resp.append_header(http::header::CONTENT_LENGTH, body.len());
            if let Some(id) = crate::proxy::request_id_value(&self.request_id) {
                let _ = resp.append_header("x-request-id", id);
            }
            if s.write_response_header(Box::new(resp), self.head_only)
                .is_ok()
                && !self.head_only
            {
                let _ = s.write_body(Bytes::from(body), true).await;
            }
            return;
        }
        // Not Trailers-Only: a head, then the status in trailers that end the stream, as on
        // Pingora's path (`send_grpc_error`).
        let (code, message) = grpc::status_for(status);
        out.status = 200;
        out.grpc_status = Some(code as usize);
        let Ok(mut resp) = ResponseHeader::build(200, Some(2)) else {
            return;
        };
        let _ = resp.insert_header(http::header::CONTENT_TYPE, "application/grpc");
        if let Some(id) = crate::proxy::request_id_value(&self.request_id) {
            let _ = resp.insert_header("x-request-id", id);
        }
        if s.write_response_header(Box::new(resp), false).is_err() {
            return;
        }
        let mut trailers = http::HeaderMap::with_capacity(2);
        trailers.insert("grpc-status", http::HeaderValue::from(code));
        trailers.insert("grpc-message", http::HeaderValue::from_static(message));
        let _ = s.write_trailers(trailers);
        let _ = tokio::time::timeout(GRPC_DRAIN, s.drain_request_body()).await;
    }
}

/// How waiting for the answer head ended, other than with one.
enum Head {
    Refused(h2::Error),
    Failed(Failure),
}

/// The body as far as it went to the Pod, kept to send it again.
#[derive(Default)]
struct Held {
    bytes: BytesMut,
    /// Whether that is all of it.
    done: bool,
}

/// The next piece of the client's body when `read`, else nothing until the client resets the
/// stream; `None` when it reset the stream, failed or was silent for `timeout`. So a cancelled
/// call stops its Pod stream too, also while no byte moves (a unary call waiting for its answer,
/// a quiet server stream).
///
/// Only before the answer head: after it, the session's reset watch fails at once (the `h2`
/// crate's `PollResetAfterSendResponse`), and [`deliver`] watches the answer's stream instead.
async fn client_event(s: &mut HttpSession, timeout: Duration, read: bool) -> Option<Bytes> {
    if read {
        return read_body(s, timeout).await;
    }
    let reason = s.idle().await;
    log::debug!("h2 client: the stream was reset ({reason:?})");
    None
}

/// Sends what `out` holds as its receiver's window allows; with nothing to send, waits until the
/// receiver resets the stream. `Err` when it did, or the stream failed.
async fn deliver(out: &mut Outgoing) -> Result<(), ()> {
    if out.busy() {
        return out.push().await.map_err(drop);
    }
    let reason = std::future::poll_fn(|cx| out.tx.poll_reset(cx)).await;
    log::debug!("h2 client: the stream was reset ({reason:?})");
    Err(())
}

/// The next piece of the client's body; `None` when the client reset the stream, failed or was
/// silent for `timeout`. An ended body gives an empty piece (see `HttpSession::is_body_done`).
async fn read_body(s: &mut HttpSession, timeout: Duration) -> Option<Bytes> {
    match tokio::time::timeout(timeout, s.read_body_bytes()).await {
        Ok(Ok(data)) => Some(data.unwrap_or_default()),
        Ok(Err(e)) => {
            log::debug!("h2 client: reading the request body: {e}");
            None
        }
        Err(_) => None,
    }
}

/// Most bytes waiting for one receiver's window before the sender is read no further.
const GATHER: usize = 64 * 1024;

/// Bytes on their way into an h2 stream, sent as its flow-control window allows.
struct Outgoing {
    tx: SendStream<Bytes>,
    pending: Bytes,
    /// End the stream once `pending` is sent.
    end: bool,
    ended: bool,
}

impl Outgoing {
    fn new(tx: SendStream<Bytes>, pending: Bytes, end: bool, ended: bool) -> Self {
        Outgoing {
            tx,
            pending,
            end,
            ended,
        }
    }

    /// Whether something is left to send (bytes, or the end of the stream).
    fn busy(&self) -> bool {
        !self.ended && (!self.pending.is_empty() || self.end)
    }

    /// Whether it can take another piece: what waits for the receiver's window is gathered up to
    /// [`GATHER`], so that the sender's DATA frames are read as they come (the `h2` crate closes
    /// a connection on which too many small frames wait unread) and go on in fewer, larger ones.
    fn wants_more(&self) -> bool {
        !self.end && !self.ended && self.pending.len() < GATHER
    }

    fn take(&mut self, data: Bytes, end: bool) {
        if self.pending.is_empty() {
            self.pending = data;
        } else if !data.is_empty() {
            let mut joined = BytesMut::with_capacity(self.pending.len() + data.len());
            joined.extend_from_slice(&self.pending);
            joined.extend_from_slice(&data);
            self.pending = joined.freeze();
        }
        self.end = end;
    }

    /// Sends what the window allows of `pending` (waiting for window), and the end after it.
    /// Cancel-safe: dropped while waiting, nothing is lost.
    async fn push(&mut self) -> Result<(), h2::Error> {
        if self.pending.is_empty() {
            self.tx.send_data(Bytes::new(), true)?;
            self.ended = true;
            return Ok(());
        }
        self.tx.reserve_capacity(self.pending.len());
        match std::future::poll_fn(|cx| self.tx.poll_capacity(cx)).await {
            Some(Ok(n)) => {
                let part = self.pending.split_to(n.min(self.pending.len()));
                let last = self.pending.is_empty() && self.end;
                self.tx.send_data(part, last)?;
                self.ended = last;
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(h2::Error::from(h2::Reason::STREAM_CLOSED)),
        }
    }
}

/// The request for the Pod: the client's fields but those podgate sets, then the forwarding
/// fields; `:authority` is the client's (or `host_header`). `None` when it cannot be built.
fn pod_request(
    s: &HttpSession,
    route: &GatewayRoute,
    cx: &Conn<'_>,
    request_id: &str,
    pod: SocketAddr,
) -> Option<http::Request<()>> {
    let req = s.req_header();
    let conf = &route.upstream.upstream.conf;
    let scheme = match conf.scheme {
        Scheme::Https => "https",
        Scheme::Http => "http",
    };
    let client_host = req
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let authority = match conf.host_header.as_deref() {
        Some(h) => h.to_string(),
        None if !client_host.is_empty() => client_host.to_string(),
        None => pod.to_string(),
    };
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(route.upstream_path(path).as_ref())
        .build()
        .ok()?;
    let mut out = http::Request::builder()
        .method(req.method.clone())
        .uri(uri)
        .body(())
        .ok()?;
    let headers = out.headers_mut();
    for (name, value) in &req.headers {
        // Set below, or carried by `:authority`. The `h2` crate already refused
        // connection-specific fields and any `te` but `trailers`.
        if matches!(
            name.as_str(),
            "host" | "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "x-request-id"
        ) {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if let Some(ip) = cx.client.map(|a| a.ip()) {
        // Appended, as nginx's $proxy_add_x_forwarded_for does, so earlier hops stay visible.
        let xff = match req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
            _ => ip.to_string(),
        };
        headers.insert("x-forwarded-for", http::HeaderValue::from_str(&xff).ok()?);
    }
    let proto = if cx.tls { "https" } else { "http" };
    headers.insert("x-forwarded-proto", http::HeaderValue::from_static(proto));
    if !client_host.is_empty() {
        let host = client_host.to_ascii_lowercase();
        headers.insert("x-forwarded-host", http::HeaderValue::from_str(&host).ok()?);
    }
    headers.insert("x-request-id", crate::proxy::request_id_value(request_id)?);
    Some(out)
}
