//! The request pipeline: what the gateway decides for every request, written once for every
//! client protocol (HTTP/1.1, TLS, h2, h2c, gRPC) and every Pod protocol (HTTP/1.1, h2, h2c).
//!
//! ```text
//! client codec ──Incoming──> route ──> policies ──> body limit ──> pick ──> attempt ──> answer ──> record
//!  (h1/client.rs,            (routing.rs) (Policies  (max_body)   (Upstream  (PodSide:     (relay.rs,  (record.rs:
//!   h2/client.rs)                          ::on_request)          ::pick)    h1/pod.rs,    answer.rs)  metrics,
//!                                                                   ↑  retry  h2/pod.rs)               access log)
//!                                                                   └─────────┘
//! ```
//!
//! A client codec parses its protocol's bytes into an [`Incoming`] (a borrowed view: nothing of
//! the head is copied) and hands it to [`exchange`] with a [`ClientSide`] to read the body from
//! and answer through. The pipeline finds the route (404, 405 with `Allow`, 405 for CONNECT,
//! which podgate never tunnels), runs the route's policies once (`policies/`: they may answer
//! the request themselves or edit it), refuses a declared body past `max_body` (413), reads a
//! small body whole so that a request can be sent again, picks a Pod, and has the Pod codec of
//! the upstream's protocol ([`PodSide`]) send the request ([`Forward`]: the path, `Host`, the
//! forwarding fields, `X-Request-Id`, the edits). A failed attempt goes to another Pod when that
//! is safe (nothing reached the Pod; or the Pod refused the stream unprocessed; or an idempotent
//! request whose whole body is still in hand got no answer), within `retries`. The answer's head
//! goes through the client codec, its body through [`relay::relay`]. Whatever happened is
//! recorded once: metrics, the access line, the Pod's health.
//!
//! Failures podgate answers itself are JSON (`answer.rs`), or gRPC statuses for gRPC calls;
//! the codecs only render them. Framing (RFC 9112 §6.3, RFC 9113 §8) is the codecs' alone.
//!
//! Everything is generic over the codecs, so each client × Pod pair compiles to its own code
//! without a dynamic call; the h2-Pod arm is boxed, as its state is larger and rarer.
//!
//! What Pingora's `ProxyHttp` (`proxy/pingora.rs`, removed with this pipeline) still served, and
//! where each now goes, with no second pipeline:
//! - h2 streams that match no route: answered here (`serve`: 404, or 405 with `Allow`; the
//!   gRPC way, a status in trailers, for gRPC calls), as over HTTP/1.1;
//! - CONNECT, over h2 or HTTP/1.1: answered here, 405 (podgate tunnels only upgrades, as nginx);
//! - gRPC calls routed to an `http1` upstream: through the pipeline like any request, to the
//!   HTTP/1.1 Pod codec (`proxy/h1/pod.rs`). `te: trailers` stays on the client's hop, so such
//!   a Pod sends no trailers and the call gets no `grpc-status`: gRPC needs h2/h2c upstreams
//!   (`tests/semantics.rs`, row `grpc-to-http1-pod`).
//!
//! Pingora now only accepts connections, terminates TLS and parses h2 frames
//! (`HttpSession::from_h2_conn`); its request hooks are not used.
//!
//! The deadlines of issue 21 live in the codecs and reach the record: every write toward a
//! client is under `proxy/write_deadline.rs` (its expiry is [`ClientSide::ended`]), a client
//! that keeps its h2 window shut is reset at `client_body_timeout`, request-body writes to a Pod
//! must progress within `read_timeout`, and why an exchange ended early is the record's `ended`.

pub(crate) mod answer;
pub(crate) mod body;
pub(crate) mod record;
pub(crate) mod relay;
pub(crate) mod request;
pub(crate) mod sides;
pub(crate) mod upload;

use crate::config::Protocol;
use crate::policies::{Edits, RequestView, Verdict};
use crate::proxy::h1::body::BUFFERED_BODY;
use crate::proxy::h1::pod::H1Pod;
use crate::proxy::h2::grpc;
use crate::proxy::h2::pod::H2Pod;
use crate::proxy::routing::{normalize_host, Match};
use crate::proxy::{Gateway, GatewayRoute};
use record::{Record, Seen};
use relay::Relayed;
pub(crate) use sides::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use upload::Upload;

/// Serves one request from `client` (see the module comment); `start` is when its head began
/// to count (its arrival).
pub(crate) fn exchange<'a, C: ClientSide>(
    gw: &'a Gateway,
    inc: &'a Incoming<'a>,
    client: &'a mut C,
    start: Instant,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    exchange_inner(gw, inc, client, start)
}

async fn exchange_inner<C: ClientSide>(
    gw: &Gateway,
    inc: &Incoming<'_>,
    client: &mut C,
    start: Instant,
) {
    let request_id = request_id(inc.request_id);
    let host = normalize_host(std::str::from_utf8(inc.authority).unwrap_or(""));
    let path = inc.path_and_query.split('?').next().unwrap_or("");
    let mut rec = Record::new(start);
    let mut edits = None;
    let route = serve(
        gw,
        inc,
        client,
        &request_id,
        &host,
        path,
        &mut rec,
        &mut edits,
    )
    .await;
    let seen = Seen {
        request_id: &request_id,
        client: inc.peer,
        method: inc.method.as_str(),
        host: &host,
        path,
    };
    // What the client's connection knows comes first: a write that ran out of time fails
    // whatever was being written then (the relay sees only "gone").
    rec.ended = client.ended().or(rec.ended);
    record::finish(gw, route.as_deref(), &seen, &rec);
}

/// The client's `X-Request-Id` when it is usable (1 to 200 bytes of text), else a new one.
pub(crate) fn request_id(sent: Option<&[u8]>) -> RequestId<'_> {
    match sent.and_then(|v| std::str::from_utf8(v).ok()) {
        Some(id) if !id.is_empty() && id.len() <= 200 => RequestId::Sent(id),
        _ => RequestId::Made(crate::telemetry::access_log::request_id()),
    }
}

/// A request's id, borrowed from its head or made inline: no allocation per request (one
/// `String` per request was ~90 instructions of malloc and free, callgrind, issue 25).
pub(crate) enum RequestId<'a> {
    Sent(&'a str),
    Made(crate::telemetry::access_log::MadeId),
}

impl std::ops::Deref for RequestId<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            RequestId::Sent(id) => id,
            RequestId::Made(id) => id,
        }
    }
}

/// Routes and serves the request; returns its route, if it had one.
#[allow(clippy::too_many_arguments)]
async fn serve<C: ClientSide>(
    gw: &Gateway,
    inc: &Incoming<'_>,
    client: &mut C,
    request_id: &str,
    host: &str,
    path: &str,
    rec: &mut Record,
    own_edits: &mut Option<Box<Edits>>,
) -> Option<Arc<GatewayRoute>> {
    if *inc.method == http::Method::CONNECT {
        // podgate tunnels nothing but upgrades (nginx answers CONNECT 405 too).
        let local = answer::error(405, inc.grpc, &[], request_id, &NO_EDITS, true);
        answer_local(client, rec, &local).await;
        return None;
    }
    let found = match gw.router.load().find(host, path, inc.method) {
        Match::Found(route) => Ok(route.clone()),
        Match::NotFound => Err((404, Vec::new())),
        Match::MethodNotAllowed(methods) => Err((405, answer::allow(&methods))),
    };
    let route = match found {
        Ok(route) => route,
        Err((status, fields)) => {
            let local = answer::error(status, inc.grpc, &fields, request_id, &NO_EDITS, false);
            answer_local(client, rec, &local).await;
            return None;
        }
    };
    let target = &route.upstream;
    if !route.lists(inc.method) && !is_preflight(inc) {
        // Only a CORS route's preflights pass the methods the route lists.
        let fields = answer::allow(&route.methods);
        let local = answer::error(405, inc.grpc, &fields, request_id, &NO_EDITS, false);
        answer_local(client, rec, &local).await;
        return Some(route);
    }
    let ip = inc.peer.map(|a| a.ip());
    let hashed = Hashed(RequestView {
        method: inc.method,
        host,
        path_and_query: inc.path_and_query,
        fields: inc.fields,
        peer: ip,
        client: crate::policies::client_of(ip, inc.fields, &target.trusted),
        tls: inc.tls,
        grpc: inc.grpc,
        content_length: inc.content_length,
    });
    let mut edits: &Edits = &NO_EDITS;
    if !target.policies.is_empty() {
        // Boxed: only requests of routes with policies have edits.
        let own = &mut **own_edits.insert(Box::default());
        // Boxed: a policy's state is only held by requests of routes that have policies.
        let verdict = Box::pin(target.policies.on_request(&hashed.0, own)).await;
        edits = own;
        rec.consumer = edits.consumer.clone();
        if let Verdict::Answer(a) = verdict {
            let local = answer::from_policy(&a, inc.grpc, request_id, edits);
            answer_local(client, rec, &local).await;
            return Some(route);
        }
    }
    let too_large = edits
        .max_body
        .zip(inc.content_length)
        .is_some_and(|(max, n)| n > max);
    let conf = &target.upstream.conf;
    if too_large || (inc.upgrade && conf.protocol.is_h2()) {
        // An upgrade to an h2 Pod: h2 has none.
        let status = if too_large { 413 } else { 502 };
        let local = answer::error(status, inc.grpc, &[], request_id, edits, true);
        answer_local(client, rec, &local).await;
        return Some(route);
    }
    let at = Run {
        inc,
        view: &hashed,
        route: &route,
        edits,
        request_id,
    };
    match conf.protocol {
        Protocol::Http1 => at.run::<C, H1Pod>(client, rec).await,
        Protocol::H2 | Protocol::H2c => Box::pin(at.run::<C, H2Pod>(client, rec)).await,
    }
    Some(route)
}

/// Edits of a route without policies (no allocation, nothing to drop).
static NO_EDITS: Edits = Edits {
    remove: Vec::new(),
    add: Vec::new(),
    path: None,
    consumer: None,
    response_remove: Vec::new(),
    response_add: Vec::new(),
    max_body: None,
};

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
fn is_preflight(inc: &Incoming<'_>) -> bool {
    *inc.method == http::Method::OPTIONS
        && inc.fields.values("origin").next().is_some()
        && inc
            .fields
            .values("access-control-request-method")
            .next()
            .is_some()
}

/// Sends an answer podgate made itself and notes it in the record.
async fn answer_local<C: ClientSide>(client: &mut C, rec: &mut Record, local: &Local<'_>) {
    match local.grpc {
        Some(g) => {
            rec.status = 200;
            rec.grpc_status = Some(g.code as usize);
        }
        None => rec.status = local.status,
    }
    // Boxed: the answer's state is only held by the requests podgate answers itself; inline, it
    // would add to every request's (a future is moved whole into its caller's).
    Box::pin(client.local(local)).await;
}

/// A routed request on its way to the upstream's Pods.
struct Run<'a> {
    inc: &'a Incoming<'a>,
    view: &'a Hashed<'a>,
    route: &'a GatewayRoute,
    edits: &'a Edits,
    request_id: &'a str,
}

impl Run<'_> {
    fn error(&self, status: u16, close: bool) -> Local<'_> {
        answer::error(
            status,
            self.inc.grpc,
            &[],
            self.request_id,
            self.edits,
            close,
        )
    }

    /// What a broken client side is answered: nothing to a client that is gone, else 400 or 413.
    async fn client_failed<C: ClientSide>(&self, f: ClientFail, client: &mut C, rec: &mut Record) {
        let status = match f {
            ClientFail::Gone(ended) => {
                rec.ended = Some(ended);
                return;
            }
            ClientFail::Bad => 400,
            ClientFail::TooLarge => 413,
        };
        answer_local(client, rec, &self.error(status, true)).await;
    }

    /// Picks Pods of the route's upstream and sends the request, again where safe, until one
    /// answers; relays that answer.
    async fn run<C: ClientSide, P: PodSide>(&self, client: &mut C, rec: &mut Record) {
        let inc = self.inc;
        let upstream = &self.route.upstream.upstream;
        let conf = &upstream.conf;
        let forward = Forward::new(inc, self.route, self.edits, self.request_id);
        let deadline = inc
            .grpc
            .then(|| inc.grpc_timeout.and_then(grpc::parse_timeout))
            .flatten()
            .map(|d| rec.start + d);
        let wait = Wait {
            read_timeout: conf.read_timeout,
            deadline,
        };
        let duplex = C::DUPLEX && P::DUPLEX;
        let mut upload = Upload::new(inc.content_length, self.edits.max_body, duplex);
        // A duplex pair streams the body, unless the client already ended it: the Pod then
        // gets a request without body (an h2 HEADERS frame that ends the stream), as sent.
        if !upload.ended() && (!duplex || client.body_done()) {
            // Small bodies are read now: a Pod that fails can then be replaced even after the
            // request went out.
            let limit = self
                .edits
                .max_body
                .map_or(BUFFERED_BODY, |m| m.min(BUFFERED_BODY));
            let started = match client.read_start(limit).await {
                Ok((bytes, complete)) => upload.start(bytes, complete),
                Err(f) => Err(f),
            };
            if let Err(f) = started {
                return self.client_failed(f, client, rec).await;
            }
        }
        let key = upstream.hash_key(self.view);
        let mut tried: smallvec::SmallVec<[SocketAddr; 2]> = smallvec::SmallVec::new();
        let mut last_failure = 503;
        loop {
            if wait.next().is_none() {
                // A gRPC call's deadline passed.
                return answer_local(client, rec, &self.error(504, true)).await;
            }
            // `_in_flight` counts the attempt for least request until this iteration ends.
            let Some((backend, _in_flight)) = upstream.pick(&tried, key) else {
                return answer_local(client, rec, &self.error(last_failure, true)).await;
            };
            tried.push(backend.addr);
            rec.retries = tried.len() - 1;
            let started = Instant::now();
            let at = Attempt {
                upstream,
                backend: &backend,
                forward: &forward,
                wait: &wait,
            };
            let result = P::attempt(&at, &mut upload, client).await;
            let failure = match result {
                Ok(mut answer) => match answer.take_first() {
                    Ok(first) => {
                        let took = started.elapsed();
                        rec.first_byte = Some(took);
                        upstream.metrics.first_byte.observe(took.as_secs_f64());
                        upstream.record(&backend, answer.status() < 500);
                        rec.backend = Some(backend.clone());
                        let answered = self
                            .answered(client, &mut answer, first, &mut upload, rec)
                            .await;
                        return match answered {
                            Answered::Done => answer.finish(true),
                            Answered::Broken => answer.finish(false),
                            Answered::Upgraded => {
                                if let Some(pod) = answer.into_tunnel() {
                                    Box::pin(client.tunnel(pod)).await;
                                }
                            }
                        };
                    }
                    Err(()) => {
                        answer.finish(false);
                        Failure::NoAnswer { timed_out: false }
                    }
                },
                Err(f) => f,
            };
            rec.backend = Some(backend.clone());
            let (status, retry) = match failure {
                Failure::Client(f) => return self.client_failed(f, client, rec).await,
                Failure::Unrepresentable => {
                    return answer_local(client, rec, &self.error(400, true)).await
                }
                // Nothing reached the Pod, or it said it processed nothing: any method may go
                // to another Pod, if the body is still whole.
                Failure::Connect | Failure::Refused => (502, upload.intact()),
                Failure::NoAnswer { timed_out } => (
                    if timed_out { 504 } else { 502 },
                    upload.intact() && inc.method.is_idempotent() && !inc.grpc,
                ),
                Failure::Upload(ended) => {
                    rec.ended = Some(ended);
                    (502, false)
                }
            };
            upstream.record(&backend, false);
            last_failure = status;
            if retry && tried.len() <= conf.retries as usize {
                upstream.metrics.retries.inc();
                continue;
            }
            return answer_local(client, rec, &self.error(status, true)).await;
        }
    }

    /// A Pod answered: its head, then its body, go to the client. (A plain function returning
    /// an `async move` block: an `async fn` would keep a second copy of its arguments in its
    /// state, and a future is moved whole into its caller's.)
    fn answered<'s, C: ClientSide, A: PodAnswer>(
        &'s self,
        client: &'s mut C,
        answer: &'s mut A,
        (first, end): (bytes::Bytes, Option<Option<Trailers>>),
        upload: &'s mut Upload,
        rec: &'s mut Record,
    ) -> impl std::future::Future<Output = Answered> + Send + 's {
        async move {
            let status = answer.status();
            rec.status = status;
            if self.inc.grpc {
                // A Trailers-Only answer carries its status in the head.
                if let Some(v) = answer.field("grpc-status") {
                    rec.grpc_status = Some(grpc::status_index(v));
                }
                if let Some(v) = end.as_ref().and_then(|t| t.as_ref()?.get("grpc-status")) {
                    rec.grpc_status = Some(grpc::status_index(v));
                }
            }
            let out = AnswerOut {
                request_id: self.request_id,
                edits: self.edits,
            };
            rec.bytes = first.len() as u64;
            let ended = end.is_some();
            if let Err(ended) = client.answer_head(&*answer, &out, first, end).await {
                rec.ended = Some(ended);
                answer.cancel();
                return Answered::Broken;
            }
            if status == 101 {
                return Answered::Upgraded;
            }
            if ended {
                return Answered::Done;
            }
            // Boxed: only answers that did not come whole with their head need the relay's
            // state (see `answer_local`).
            match Box::pin(relay::relay(client, answer, upload, rec, self.inc.grpc)).await {
                Relayed::Done => Answered::Done,
                Relayed::Broken => Answered::Broken,
            }
        }
    }
}

/// How relaying an answer ended.
enum Answered {
    Done,
    Broken,
    /// A `101`: the connection becomes a tunnel.
    Upgraded,
}

/// What consistent hashing reads from a request, whatever its protocol: the policies' view.
struct Hashed<'a>(RequestView<'a>);

impl crate::upstream::policy::RequestParts for Hashed<'_> {
    fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.0.header_values(name)
    }
    fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.0.client
    }
    fn path(&self) -> &str {
        self.0.path()
    }
}
