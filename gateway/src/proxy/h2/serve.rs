//! h2 client connections (TLS with ALPN h2, or the h2 preface on `h2c: true` listeners): the
//! connection's task accepts streams and serves those of routed requests itself, all in that
//! one task: to HTTP/1.1 Pods by `to_h1.rs`, to h2/h2c Pods (gRPC calls among them) by
//! `to_h2.rs`. Streams that match no route, CONNECT and gRPC calls routed to an `http1` upstream
//! go to Pingora's proxy (`proxy/pingora.rs`), one task each.
//!
//! Why not Pingora's h2 path for everything: measured with `benches/load/h2.sh` (h2load, 32
//! connections × 10 streams, one pinned worker), Pingora's path ran HTTP/1.1-bound h2 traffic at
//! 0.50–0.70× nginx (h2c) and 0.49–0.57× (TLS), at 1.5–2.4× nginx's CPU per request; perf put
//! the difference in its per-stream shape (a spawned task per stream whose large future is
//! moved, a session and header copy per request, its HTTP/1.1 client relay with zeroed
//! allocations), none of it in podgate's logic. Here the same requests cost no task, no
//! Pingora HTTP/1.1 session and no header map toward the Pod: podgate writes the HTTP/1.1 head
//! itself, over its own per-thread pool (`upstream/pool.rs`), with the HTTP/1.1 path's parsers for
//! the Pod's answer. Measured after the change, same bench (`benches/RESULTS.md`, "h2 and gRPC
//! clients"): h2c 1.18–1.26× nginx with 26.7 µs of CPU per request against nginx's 30.1; TLS
//! 0.92× on a quiet machine (24.4 against 22.3 µs per request), up from 0.49–0.57×; after four
//! costs found in its profile were removed (HPACK-indexed request ids, `tracing` span checks,
//! Pingora's per-piece body write, stream futures' size), TLS 1.06–1.09× with 14 % less CPU per
//! request than nginx.
//!
//! Accepting stays Pingora's (`HttpSession::from_h2_conn` on an `h2` crate connection built with
//! the limits below): its checks of each new stream (forbidden bytes in `:path`, conflicting
//! `content-length`, ambiguous authority) apply to both paths, and a stream it hands to
//! Pingora's proxy is exactly what Pingora's own accept loop would have spawned. The `h2` crate
//! itself refuses uppercase names, connection-specific fields, `te` other than `trailers`,
//! pseudo-headers after regular ones and values with CR, LF or NUL (malformed: stream error),
//! and checks DATA against `content-length`.
//!
//! Graceful shutdown: on Pingora's shutdown signal the connection sends GOAWAY and keeps serving
//! the streams it accepted (and those the client had already sent) until they end, within the
//! server's grace period; each stream counts as in flight for the stop (`proxy/in_flight.rs`).
//!
//! Deadlines: the first stream must open within `client_header_timeout` of the accept (TLS
//! handshake and preface included); with no stream open for `keepalive_timeout` the connection
//! gets GOAWAY (NO_ERROR) and closes; every write of its frames must make progress within
//! `client_body_timeout` (`proxy/write_deadline.rs` under the `h2` crate's transport), else the
//! connection ends with its streams, which log `"ended": "client_write_timeout"`.

use super::grpc;
use super::to_h1::{self, Conn};
use super::to_h2;
use crate::config::Protocol;
use crate::proxy::in_flight;
use crate::proxy::routing::Match;
use crate::proxy::write_deadline::WriteDeadline;
use crate::proxy::Gateway;
use futures::future::{Either, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};
use pingora_core::apps::HttpServerApp;
use pingora_core::protocols::http::v2::server::{handshake, H2Accept, H2Options, HttpSession};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Digest, Stream};
use pingora_core::server::ShutdownWatch;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::time::sleep_until;

/// Streams a client may have open at once (nginx's `http2_max_concurrent_streams` default).
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// The largest decoded header list accepted (nginx's `large_client_header_buffers` total).
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams the client reset before they were accepted, pending at one time, beyond which the
/// connection is cut off with GOAWAY ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487; the `h2`
/// default). Streams reset after they were accepted stop their work (`to_h1.rs`).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams podgate itself resets for protocol errors per connection before it ends the
/// connection (the `h2` default).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Flow-control windows offered to the client: RFC 9113's initial 64 KiB, so a client that is
/// never read from holds at most that much per stream and per connection.
const WINDOW: u32 = 65_535;
/// Streams Pingora's checks rejected (bad `:path`, conflicting lengths, authority) before the
/// connection is closed, as Pingora's own accept loop bounds them.
const MAX_MALFORMED_STREAMS: usize = 32;

/// The `h2` settings of client connections.
pub fn options() -> H2Options {
    let mut o = H2Options::default();
    o.max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW);
    o
}

/// The deadlines of a client connection (`server.client_header_timeout`,
/// `client_body_timeout`, `keepalive_timeout`), and how long after the listeners closed a
/// connection with no stream open may still receive one (`server.rs`, `LINGER`).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub header: Duration,
    pub body: Duration,
    pub keepalive: Duration,
    pub linger: Duration,
}

/// Streams handed to Pingora's proxy that are still running, for the idle timeout.
#[derive(Default)]
struct Elsewhere {
    open: AtomicUsize,
    ended: Notify,
}

/// One stream of [`Elsewhere`]; ended when dropped.
struct ElsewhereStream(Arc<Elsewhere>);

impl Drop for ElsewhereStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.ended.notify_one();
    }
}

/// Serves one h2 client connection until it ends. `app` is Pingora's proxy, which takes the
/// streams this path does not serve itself. `accepted` is when the connection came in: its
/// first stream must open within `client_header_timeout` of it (the TLS handshake and the h2
/// preface included), and once no stream is open it is closed with GOAWAY after
/// `keepalive_timeout`. Every write toward the client must make progress within
/// `client_body_timeout`, or the connection ends with all its streams (see
/// `proxy/write_deadline.rs`).
pub async fn connection<F>(
    gateway: &Gateway,
    app: &Arc<F>,
    io: Stream,
    shutdown: &ShutdownWatch,
    limits: Timeouts,
    accepted: Instant,
) where
    F: HttpServerApp + Send + Sync + 'static,
{
    let digest = Arc::new(Digest {
        ssl_digest: io.get_ssl_digest(),
        timing_digest: io.get_timing_digest(),
        proxy_digest: io.get_proxy_digest(),
        socket_digest: io.get_socket_digest(),
    });
    let expired_flag = Arc::new(AtomicBool::new(false));
    let fd = io.id();
    let io: Stream =
        Box::new(WriteDeadline::new(io, limits.body, fd).with_flag(expired_flag.clone()));
    let cx = Conn {
        gateway,
        client: digest
            .socket_digest
            .as_ref()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied()),
        tls: digest.ssl_digest.is_some(),
        body_timeout: limits.body,
        write_expired: &expired_flag,
    };
    let first_by = accepted + limits.header;
    let shake = tokio::time::timeout_at(first_by.into(), handshake(io, Some(options())));
    let mut conn = match shake.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            log::debug!("client {:?}: h2 handshake: {e}", cx.client);
            return;
        }
        Err(_) => {
            log::debug!("client {:?}: no h2 preface in time", cx.client);
            return;
        }
    };
    let mut shutdown = shutdown.clone();
    // 0: open; 1: GOAWAY sent (the client may still finish what it began); 2: closing now.
    let mut closing = 0u8;
    let mut stopping: Option<in_flight::Busy> = None;
    let mut malformed = 0usize;
    let mut streams = FuturesUnordered::new();
    let elsewhere = Arc::new(Elsewhere::default());
    // When the connection is closed for idleness: its first stream must come within the
    // header timeout, later ones within the keep-alive timeout of the last stream's end.
    let mut idle_until = Some(first_by);
    let cx = &cx;
    loop {
        if stopping.is_none() && *shutdown.borrow() {
            // GOAWAY (last stream id 2^31-1) and a PING: streams already on their way still
            // come in. Until the connection is closed and its last frames flushed, the stop
            // waits for it (an answer still in the `h2` crate's buffers is not delivered yet).
            conn.graceful_shutdown();
            closing = closing.max(1);
            stopping = Some(in_flight::busy());
            idle_until = idle_until.map(|t| t.min(Instant::now() + limits.linger));
        }
        let busy = !streams.is_empty() || elsewhere.open.load(Ordering::Relaxed) > 0;
        if busy {
            idle_until = None;
        } else if idle_until.is_none() {
            // After a GOAWAY the `h2` crate closes the connection itself once the client
            // answered its PING and the last frames are out; the linger bounds a client that
            // does not.
            let wait = if closing > 0 {
                limits.linger
            } else {
                limits.keepalive
            };
            idle_until = Some(Instant::now() + wait);
        }
        let accepted = tokio::select! {
            biased;
            _ = shutdown.changed(), if stopping.is_none() => continue,
            Some(()) = streams.next(), if !streams.is_empty() => continue,
            () = elsewhere.ended.notified(), if busy => continue,
            () = sleep_until(idle_until.unwrap_or(first_by).into()),
                if idle_until.is_some() && closing < 2 =>
            {
                if closing == 0 {
                    // Idle: GOAWAY (NO_ERROR) and a PING, as for a stop; the connection closes
                    // once the client answered and everything is flushed.
                    log::debug!("client {:?}: h2 connection idle; closing", cx.client);
                    conn.graceful_shutdown();
                    closing = 1;
                    idle_until = Some(Instant::now() + limits.linger);
                } else {
                    // The client did not answer: the final GOAWAY now, then the close.
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    closing = 2;
                }
                continue;
            }
            // Cancel-safe: polled again on the next turn. Polling it is also what moves the
            // connection's frames both ways for the streams served here.
            a = HttpSession::from_h2_conn(&mut conn, digest.clone()) => a,
        };
        let session = match accepted {
            Ok(Some(H2Accept::Session(s))) => s,
            Ok(Some(H2Accept::Rejected)) => {
                malformed += 1;
                if malformed >= MAX_MALFORMED_STREAMS {
                    log::warn!(
                        "client {:?}: {malformed} malformed h2 requests; closing",
                        cx.client
                    );
                    break;
                }
                continue;
            }
            // The client closed, or after GOAWAY the last stream ended.
            Ok(None) => break,
            Err(e) => {
                log::debug!("client {:?}: h2 connection: {e}", cx.client);
                break;
            }
        };
        match dispatch(cx, session) {
            Dispatch::Here(session, route, host) => {
                let counted = in_flight::busy();
                streams.push(Either::Left(async move {
                    let _counted = counted;
                    to_h1::serve(cx, session, route, host).await
                }))
            }
            Dispatch::ToH2(session, route, host) => {
                let counted = in_flight::busy();
                // Boxed: its future (3.9 KB) would otherwise set the size of every stream's,
                // which is moved and allocated once per stream.
                streams.push(Either::Right(Box::pin(async move {
                    let _counted = counted;
                    to_h2::serve(cx, session, route, host).await
                })))
            }
            Dispatch::Pingora(mut session) => {
                // Pingora's proxy waits for the client's flow-control window without a limit
                // otherwise.
                session.set_write_timeout(Some(limits.body));
                elsewhere.open.fetch_add(1, Ordering::Relaxed);
                let open = (ElsewhereStream(elsewhere.clone()), in_flight::busy());
                let (app, shutdown) = (app.clone(), shutdown.clone());
                pingora_runtime::current_handle().spawn(async move {
                    let _open = open;
                    app.process_new_http(ServerSession::new_http2(session), &shutdown)
                        .await;
                });
            }
            Dispatch::Gone => {}
        }
    }
    // The connection failed or closed: what is left of its streams cannot reach the client.
    // Dropped, the connection tells them so; they end at once and write their log lines, which
    // say why (a write that ran out of time, or the client gone).
    drop(conn);
    if !streams.is_empty() {
        let finish = async { while streams.next().await.is_some() {} };
        let _ = tokio::time::timeout(STREAMS_END_WITHIN, finish).await;
    }
}

/// How long the streams of a connection that ended are given to see it and log.
const STREAMS_END_WITHIN: Duration = Duration::from_secs(1);

/// Where a stream goes.
enum Dispatch {
    /// To an HTTP/1.1 Pod, served in the connection's task.
    Here(HttpSession, Arc<crate::proxy::GatewayRoute>, String),
    /// To an h2/h2c Pod (gRPC calls among them), served in the connection's task.
    ToH2(HttpSession, Arc<crate::proxy::GatewayRoute>, String),
    /// To Pingora's proxy: CONNECT, requests that match no route (answered there, the gRPC
    /// way for gRPC calls), and gRPC calls routed to an `http1` upstream.
    Pingora(HttpSession),
    /// The client reset it before it was looked at.
    Gone,
}

fn dispatch(cx: &Conn<'_>, mut session: HttpSession) -> Dispatch {
    // A stream the client already cancelled (rapid reset) costs nothing more.
    if session.idle().now_or_never().is_some() {
        return Dispatch::Gone;
    }
    let req = session.req_header();
    if req.method == http::Method::CONNECT {
        return Dispatch::Pingora(session);
    }
    let grpc = grpc::is_grpc(req.headers.get("content-type").map(|v| v.as_bytes()));
    let host = crate::proxy::pingora::request_host(req);
    let router = cx.gateway.router.load();
    let route = match router.find(&host, req.uri.path(), &req.method) {
        Match::Found(route) => route.clone(),
        _ => return Dispatch::Pingora(session),
    };
    match route.upstream.upstream.conf.protocol {
        Protocol::H2 | Protocol::H2c => Dispatch::ToH2(session, route, host),
        Protocol::Http1 if !grpc => Dispatch::Here(session, route, host),
        Protocol::Http1 => Dispatch::Pingora(session),
    }
}
