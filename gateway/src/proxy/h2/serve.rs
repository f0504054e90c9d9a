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
//! `content-length`, ambiguous authority) apply to both paths, and a stream it hands to
//! Pingora's proxy is exactly what Pingora's own accept loop would have spawned. The `h2` crate
//! itself refuses uppercase names, connection-specific fields, `te` other than `trailers`,
//! pseudo-headers after regular ones and values with CR, LF or NUL (malformed: stream error),
//! and checks DATA against `content-length`.
//!
//! Graceful shutdown: on Pingora's shutdown signal the connection sends GOAWAY and keeps serving
//! the streams it accepted (and those the client had already sent) until they end, within the
//! server's grace period.

use super::client::{self, Conn};
use crate::proxy::Gateway;
use futures::future::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use pingora_core::protocols::http::v2::server::{handshake, H2Accept, H2Options, HttpSession};
use pingora_core::protocols::{Digest, Stream};
use pingora_core::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;

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

/// Serves one h2 client connection until it ends.
pub async fn connection(
    gateway: &Gateway,
    io: Stream,
    shutdown: &ShutdownWatch,
    body_timeout: Duration,
) {
    let digest = Arc::new(Digest {
        ssl_digest: io.get_ssl_digest(),
        timing_digest: io.get_timing_digest(),
        proxy_digest: io.get_proxy_digest(),
        socket_digest: io.get_socket_digest(),
    });
    let cx = Conn {
        gateway,
        client: digest
            .socket_digest
            .as_ref()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied()),
        tls: digest.ssl_digest.is_some(),
        body_timeout,
    };
    let mut conn = match handshake(io, Some(options())).await {
        Ok(c) => c,
        Err(e) => {
            log::debug!("client {:?}: h2 handshake: {e}", cx.client);
            return;
        }
    };
    let mut shutdown = shutdown.clone();
    let mut draining = false;
    let mut malformed = 0usize;
    let mut streams = FuturesUnordered::new();
    loop {
        if !draining && *shutdown.borrow() {
            conn.graceful_shutdown();
            draining = true;
        }
        let accepted = tokio::select! {
            biased;
            _ = shutdown.changed(), if !draining => continue,
            Some(()) = streams.next(), if !streams.is_empty() => continue,
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
            streams.push(client::serve(&cx, session));
        }
    }
    // The connection failed or closed: what is left of its streams cannot reach the client.
    drop(streams);
}
