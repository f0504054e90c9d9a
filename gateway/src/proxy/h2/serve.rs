//! h2 client connections (TLS with ALPN h2, or the h2 preface on `h2c: true` listeners): the
//! connection's task accepts streams and serves every one itself, all in that one task, through
//! the request pipeline (`client.rs` is the stream's side of it; `proxy/pipeline/`), whatever
//! the Pod speaks. Streams that match no route and CONNECT are answered there too (404, 405;
//! the gRPC way for gRPC calls), and gRPC calls to an `http1` upstream go to its Pods as HTTP/1.1.
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
//! `content-length`, ambiguous authority) apply to every stream. The `h2` crate
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

use super::client::{self, Conn};
use crate::proxy::in_flight;
use crate::proxy::write_deadline::WriteDeadline;
use crate::proxy::Gateway;
use futures::future::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use pingora_core::protocols::http::v2::server::{handshake, H2Accept, H2Options, HttpSession};
use pingora_core::protocols::{Digest, Stream};
use pingora_core::server::ShutdownWatch;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::sleep_until;

/// Streams a client may have open at once (nginx's `http2_max_concurrent_streams` default).
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// The largest decoded header list accepted (nginx's `large_client_header_buffers` total).
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams the client reset before they were accepted, pending at one time, beyond which the
/// connection is cut off with GOAWAY ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487; the `h2`
/// default). Streams reset after they were accepted stop their work (`client.rs`, the Pod codecs).
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

/// Serves one h2 client connection until it ends. `accepted` is when the connection came in: its
/// first stream must open within `client_header_timeout` of it (the TLS handshake and the h2
/// preface included), and once no stream is open it is closed with GOAWAY after
/// `keepalive_timeout`. Every write toward the client must make progress within
/// `client_body_timeout`, or the connection ends with all its streams (see
/// `proxy/write_deadline.rs`).
pub async fn connection(
    gateway: &Gateway,
    io: Stream,
    shutdown: &ShutdownWatch,
    limits: Timeouts,
    accepted: Instant,
) {
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
        if !streams.is_empty() {
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
        // A stream the client already cancelled (rapid reset) costs nothing more.
        let mut session = session;
        if session.idle().now_or_never().is_none() {
            streams.push(client::serve(cx, session, in_flight::busy()));
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
