//! podgate's own HTTP/1.1 codec: client connections, their limits, and reading heads; the
//! request itself is the pipeline's (`proxy/pipeline/`).
//!
//! Pingora's generic proxy path cost about 2.5× nginx's CPU per request in our load benchmark
//! (`benches/RESULTS.md`), almost none of it in podgate's own logic. This module serves
//! HTTP/1.1 connections (plain, or TLS without h2) directly: parse the request head in place and
//! hand it to the pipeline as a view over the head's bytes (`client.rs`), which routes, picks a
//! Pod and has `pod.rs` write one head that podgate framed itself to a pooled connection; the
//! answer is relayed under framing podgate writes itself, with a lock-free per-thread connection
//! pool and no task but the connection's own. h2 connections (TLS with ALPN h2, or the preface
//! on `h2c: true` listeners) go to `proxy/h2/serve.rs`, whose streams go through the same
//! pipeline.
//!
//! Files: `head.rs` parses heads and decides body lengths (pure, fuzzed); `body.rs` decodes and
//! re-frames and moves bodies (`chunked.rs`: the chunked coding); `rewrite.rs` writes heads
//! (pure); `client.rs` is the client side of one request for the pipeline (`proxy/pipeline/`),
//! `pod.rs` the HTTP/1.1 Pod side for every client protocol; `sniff.rs` tells h2c from
//! HTTP/1.x; `spread.rs` evens connections over threads; `client_io.rs` is the client's
//! transport.
//!
//! Limits toward clients follow nginx: the TLS handshake (`proxy/tls_accept.rs`) and the whole
//! first request head must arrive within `server.client_header_timeout` of the accept (nginx
//! `client_header_timeout`), each read of a body within `server.client_body_timeout`, every
//! write toward the client must make progress within it too (nginx `send_timeout`,
//! `proxy/write_deadline.rs`), and an idle keep-alive connection is closed after
//! `server.keepalive_timeout`. A request counts as in flight for the stop
//! (`proxy/in_flight.rs`) from its head's first byte until its connection is idle or closed.
//! An idle connection holds no buffer: it waits for readability with an empty read, then reads the head into a 1 KiB buffer that doubles as needed up to
//! [`head::MAX_HEAD`]; all buffers of connections still sending a head share one budget,
//! `server.header_memory`, beyond which a connection asking for more is answered 503 and closed.

pub mod body;
mod chunked;
mod client;
mod client_io;
pub mod head;
pub(crate) mod pod;
#[cfg(test)]
mod props;
pub(crate) mod rewrite;
pub mod sniff;
pub mod spread;

use crate::config::ServerSettings;
use crate::proxy::tls_accept::{self, TlsListeners};
use crate::proxy::write_deadline::CLIENT_WRITE_TIMEOUT;
use crate::proxy::{error_json, in_flight, lazy_timeout, Gateway};
use async_trait::async_trait;
use bytes::BytesMut;
use client_io::{client_io, ClientIo, Transport};
use head::{parse_request, Request};
use http::Method;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use body::BUFFERED_BODY;
/// The first buffer for a request head (nginx's `client_header_buffer_size`).
const FIRST_HEAD_BUFFER: usize = 1024;

/// Deadlines and memory bounds toward clients (see the module comment).
#[derive(Clone, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive_timeout: Duration,
    /// Shared by all connections of the process that are reading a head.
    pub header_memory: Arc<HeadMemory>,
}

impl Limits {
    pub fn new(s: &ServerSettings) -> Self {
        Limits {
            header_timeout: s.client_header_timeout,
            body_timeout: s.client_body_timeout,
            keepalive_timeout: s.keepalive_timeout,
            header_memory: Arc::new(HeadMemory::new(s.header_memory)),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(60),
            header_memory: Arc::new(HeadMemory::new(128 << 20)),
        }
    }
}

/// The budget of bytes that connections hold for heads not yet complete.
#[derive(Debug)]
pub struct HeadMemory {
    held: AtomicUsize,
    limit: usize,
}

impl HeadMemory {
    pub fn new(limit: usize) -> Self {
        HeadMemory {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `n` bytes from the budget, if that many are left.
    fn take(&self, n: usize) -> bool {
        let before = self.held.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.limit {
            self.held.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn give(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// The proxy application of a listener: HTTP/1.1 here, h2 in `proxy/h2/serve.rs`.
pub struct Engine {
    gateway: Gateway,
    /// How long idle connections stay open once the listeners closed (see `server.rs`).
    linger: Duration,
    /// Evens out connections over the request threads.
    spread: Arc<spread::Spread>,
    limits: Limits,
    /// An `h2c: true` listener: plain connections may open with the h2 preface (`sniff.rs`).
    h2c: bool,
    /// The service's TLS listeners: their connections are handshaken here (`tls_accept.rs`).
    tls: TlsListeners,
}

impl Engine {
    /// The application of a listening service running `threads` request threads.
    pub fn new(gateway: Gateway, linger: Duration, threads: usize) -> Self {
        Engine {
            gateway,
            linger,
            spread: spread::Spread::new(threads),
            limits: Limits::default(),
            h2c: false,
            tls: TlsListeners::default(),
        }
    }

    /// The same, handshaking connections to these TLS listeners.
    pub fn with_tls(mut self, tls: TlsListeners) -> Self {
        self.tls = tls;
        self
    }

    /// The same, with these client limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

#[async_trait]
impl ServerApp for Engine {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let accepted = Instant::now();
        if let Some(acceptor) = self.tls_of(&io) {
            self.accept_tls(io, acceptor, accepted, shutdown);
            return None;
        }
        if self.h2c {
            match sniff::sniff(&io, self.limits.header_timeout).await {
                sniff::Sniffed::H2 => {
                    let _open = self.spread.open_here();
                    self.serve_h2(io, shutdown, accepted).await;
                    return None;
                }
                sniff::Sniffed::Http1 => {}
                sniff::Sniffed::Gone => return None,
            }
        }
        // Every plain-TCP connection continues in a task of its own on the least busy thread,
        // and Pingora's task for it ends here: that task carries a TLS handshake's state inline
        // (8.8 KB measured), which an idle keep-alive connection would otherwise hold for ever.
        if spread::movable(&io) {
            if let Some((there, open)) = self.spread.least() {
                let addr = peer(&io);
                if let Some(tcp) = spread::detach(&io) {
                    // Pingora's copy leaves this thread's poller and closes; the socket stays
                    // open through the copy.
                    drop(io);
                    let (engine, shutdown) = (self.clone(), shutdown.clone());
                    there.spawn(async move {
                        let _open = open;
                        match tokio::net::TcpStream::from_std(tcp) {
                            Ok(tcp) => {
                                let io = client_io(Transport::Tcp(tcp), engine.limits.body_timeout);
                                engine.serve(io, addr, false, &shutdown, accepted).await
                            }
                            Err(e) => log::warn!("cannot move a client connection: {e}"),
                        }
                    });
                    return None;
                }
            }
        }
        let _open = self.spread.open_here();
        let addr = peer(&io);
        let tls = io.get_ssl_digest().is_some();
        let io = client_io(Transport::Pingora(io), self.limits.body_timeout);
        self.serve(io, addr, tls, shutdown, accepted).await;
        None
    }

    async fn cleanup(&self) {
        // Give connections accepted an instant before the listeners closed the same time to
        // send their first request as idle ones get (see `server.rs`).
        tokio::time::sleep(self.linger).await;
    }
}

impl Engine {
    /// An h2 connection: its streams are served in its task (`proxy/h2/serve.rs`).
    async fn serve_h2(&self, io: Stream, shutdown: &ShutdownWatch, accepted: Instant) {
        crate::proxy::h2::serve::connection(
            &self.gateway,
            io,
            shutdown,
            crate::proxy::h2::serve::Timeouts {
                header: self.limits.header_timeout,
                body: self.limits.body_timeout,
                keepalive: self.limits.keepalive_timeout,
                linger: self.linger,
            },
            accepted,
        )
        .await
    }

    /// The acceptor of the TLS listener `io` came in on, if it did on one.
    fn tls_of(&self, io: &Stream) -> Option<Arc<pingora_core::listeners::tls::Acceptor>> {
        if self.tls.is_empty() {
            return None;
        }
        let local = io
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())?;
        self.tls.for_local(local).cloned()
    }

    /// A connection to a TLS listener: moved to the least busy thread before its handshake
    /// begins (Pingora's task for it ends here), then handshaken and served there.
    fn accept_tls(
        self: &Arc<Self>,
        io: Stream,
        acceptor: Arc<pingora_core::listeners::tls::Acceptor>,
        accepted: Instant,
        shutdown: &ShutdownWatch,
    ) {
        let addr = peer(&io);
        let Some(tcp) = spread::detach(&io) else {
            log::warn!("client {addr:?}: cannot take the TLS connection over; closing it");
            return;
        };
        drop(io);
        let (there, open) = match self.spread.least() {
            Some((there, open)) => (there, Some(open)),
            None => (tokio::runtime::Handle::current(), None),
        };
        let (engine, shutdown) = (self.clone(), shutdown.clone());
        there.spawn(async move {
            let _open = open;
            let tcp = match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => tcp,
                Err(e) => return log::warn!("cannot move a client connection: {e}"),
            };
            let deadline = accepted + engine.limits.header_timeout;
            let stream = match tls_accept::handshake(&acceptor, tcp, addr, deadline.into()).await {
                Ok(stream) => stream,
                Err(tls_accept::NoSession::TimedOut) => {
                    return log::debug!("client {addr:?}: TLS handshake timed out")
                }
                Err(tls_accept::NoSession::Failed(why)) => {
                    return log::debug!("client {addr:?}: TLS handshake: {why}")
                }
            };
            // Boxed, both: inline, the larger of the two (an h2 connection's state) would size
            // the task of every connection still waiting for its ClientHello.
            if stream.selected_alpn_proto() == Some(ALPN::H2) {
                Box::pin(engine.serve_h2(stream, &shutdown, accepted)).await;
            } else {
                let io = client_io(Transport::Pingora(stream), engine.limits.body_timeout);
                Box::pin(engine.serve(io, addr, true, &shutdown, accepted)).await;
            }
        });
    }
}

/// The client's address, as Pingora's accept recorded it.
fn peer(io: &Stream) -> Option<SocketAddr> {
    io.get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied())
}

/// A client connection.
struct Client {
    io: ClientIo,
    /// Bytes read and not yet used; no allocation while the connection is idle.
    buf: BytesMut,
    addr: Option<SocketAddr>,
    tls: bool,
    /// Counts the request in flight, from its head's first byte until the connection is idle
    /// again or closed (`proxy/in_flight.rs`).
    busy: Option<in_flight::Busy>,
}

impl Client {
    /// Writes `bytes` and flushes them; each write must make progress within `timeout`
    /// (the connection's [`WriteDeadline`](crate::proxy::write_deadline::WriteDeadline)), so a
    /// slow client that keeps reading gets even a large head, and one that stopped does not
    /// hold the connection.
    async fn send(&mut self, bytes: &[u8], timeout: Duration) -> std::io::Result<()> {
        self.io.set_limit(timeout);
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Why the exchange ended early, as far as the client connection knows: a write toward the
    /// client that ran out of time ends the exchange and the connection.
    fn ended(&self) -> Option<&'static str> {
        self.io.expired().then_some(CLIENT_WRITE_TIMEOUT)
    }
}

/// Waits until the server shuts down and then `linger` more.
async fn closing(shutdown: &mut ShutdownWatch, linger: Duration) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
    tokio::time::sleep(linger).await;
}

/// Why no request head came.
enum NoHead {
    /// The connection is done (closed, idle too long, shutting down): close quietly.
    Done,
    /// Answer this status, then close.
    Answer(u16),
}

/// An error answer: JSON body, fixed text per status.
fn error_answer(
    status: u16,
    allow: Option<&[Method]>,
    keep: bool,
    head_only: bool,
    request_id: &str,
) -> Vec<u8> {
    let body = match status {
        503 if request_id.is_empty() => {
            "{\"error\":\"busy\",\"status\":503,\"message\":\"the gateway has no memory left for \
             request heads\"}\n"
                .to_string()
        }
        _ => error_json(status),
    };
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !request_id.is_empty() {
        out.push_str(&format!("x-request-id: {request_id}\r\n"));
    }
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

impl Engine {
    async fn serve(
        &self,
        io: ClientIo,
        addr: Option<SocketAddr>,
        tls: bool,
        shutdown: &ShutdownWatch,
        accepted: Instant,
    ) {
        let mut client = Client {
            io,
            buf: BytesMut::new(),
            addr,
            tls,
            busy: None,
        };
        let mut shutdown = shutdown.clone();
        let mut first = true;
        loop {
            let req = match self
                .read_head(&mut client, &mut shutdown, first, accepted)
                .await
            {
                Ok(req) => req,
                Err(NoHead::Done) => break,
                Err(NoHead::Answer(status)) => {
                    let id = if status == 503 {
                        String::new()
                    } else {
                        crate::proxy::pipeline::request_id(None)
                    };
                    let answer = error_answer(status, None, false, false, &id);
                    let _ = client.send(&answer, self.limits.body_timeout).await;
                    crate::proxy::pipeline::record::refused(&self.gateway, status, Instant::now());
                    break;
                }
            };
            first = false;
            let stopping = *shutdown.borrow();
            // Boxed: the exchange's state is large and only needed while a request is in
            // flight; inline, every idle connection would carry it.
            if !Box::pin(self.exchange(&mut client, req, stopping)).await {
                break;
            }
            // Idle again: nothing in flight until the next head begins.
            client.busy = None;
            if client.buf.is_empty() {
                // Nothing pipelined: an idle connection keeps no buffer.
                client.buf = BytesMut::new();
            }
        }
        let _ = tokio::time::timeout(
            self.limits.body_timeout,
            AsyncWriteExt::shutdown(&mut client.io),
        )
        .await;
    }

    /// The next request head. The first head of a connection must be complete
    /// `client_header_timeout` after the accept; a later one that long after its first byte.
    async fn read_head(
        &self,
        c: &mut Client,
        shutdown: &mut ShutdownWatch,
        first: bool,
        accepted: Instant,
    ) -> Result<Request, NoHead> {
        let limits = &self.limits;
        let deadline = if c.buf.is_empty() {
            let (wait, started) = if first {
                (limits.header_timeout, accepted)
            } else {
                (limits.keepalive_timeout, Instant::now())
            };
            let ready = tokio::select! {
                biased;
                r = tokio::time::timeout_at((started + wait).into(), c.io.readable()) => r,
                _ = closing(shutdown, self.linger), if !first => return Err(NoHead::Done),
            };
            match ready {
                Ok(Ok(())) => {}
                _ => return Err(NoHead::Done),
            }
            if first {
                accepted + limits.header_timeout
            } else {
                Instant::now() + limits.header_timeout
            }
        } else {
            // Pipelined bytes: the next head started when the previous request ended.
            Instant::now() + limits.header_timeout
        };
        let mut held = HeadHold {
            memory: &limits.header_memory,
            bytes: 0,
        };
        if !c.buf.is_empty() {
            c.busy.get_or_insert_with(in_flight::busy);
        }
        loop {
            if !c.buf.is_empty() {
                match parse_request(&mut c.buf) {
                    Ok(Some(req)) => return Ok(req),
                    Ok(None) => {}
                    Err(refused) => {
                        log::debug!("client {:?}: {}", c.addr, refused.why);
                        return Err(NoHead::Answer(refused.status));
                    }
                }
            }
            if c.buf.capacity() == c.buf.len() {
                let before = c.buf.capacity();
                let want = (before * 2).clamp(FIRST_HEAD_BUFFER, head::MAX_HEAD + 1024);
                let more = want.saturating_sub(before).max(FIRST_HEAD_BUFFER);
                if !held.grow(more) {
                    log::warn!(
                        "client {:?}: connections sending request heads hold {} bytes, the \
                         limit of server.header_memory; closing this one",
                        c.addr,
                        limits.header_memory.held()
                    );
                    return Err(NoHead::Answer(503));
                }
                c.buf.reserve(more);
            }
            let read = lazy_timeout::until(deadline, c.io.read_buf(&mut c.buf)).await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(NoHead::Done),
                Ok(Ok(_)) => {
                    c.busy.get_or_insert_with(in_flight::busy);
                }
                Err(_) if c.buf.is_empty() => return Err(NoHead::Done),
                Err(_) => {
                    log::debug!("client {:?}: request head timed out", c.addr);
                    return Err(NoHead::Answer(408));
                }
            }
        }
    }
}

/// Bytes of [`HeadMemory`] one connection holds while it reads a head; given back when dropped.
struct HeadHold<'a> {
    memory: &'a HeadMemory,
    bytes: usize,
}

impl HeadHold<'_> {
    fn grow(&mut self, n: usize) -> bool {
        let ok = self.memory.take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for HeadHold<'_> {
    fn drop(&mut self) {
        self.memory.give(self.bytes);
    }
}
