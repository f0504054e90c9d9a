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
//! transport; `deadline.rs` keeps the deadlines of connections waiting for a head (keep-alive,
//! head, the stop) in per-thread lists, so that an idle connection's task holds no timer.
//!
//! Limits toward clients follow nginx: the TLS handshake (`proxy/tls_accept.rs`) and the whole
//! first request head must arrive within `server.client_header_timeout` of the accept (nginx
//! `client_header_timeout`), each read of a body within `server.client_body_timeout`, every
//! write toward the client must make progress within it too (nginx `send_timeout`,
//! `proxy/write_deadline.rs`), and an idle keep-alive connection is closed after
//! `server.keepalive_timeout`. A request counts as in flight for the stop
//! (`proxy/in_flight.rs`) from its head's first byte until its connection is idle or closed.
//! An idle connection holds no buffer and no timer (838 B measured, its task 512 B of it;
//! `benches/RESULTS.md`): it waits for readability, then reads the head into a 1 KiB buffer
//! that doubles as needed up to
//! [`head::MAX_HEAD`]; all buffers of connections still sending a head share one budget,
//! `server.header_memory`, beyond which a connection asking for more is answered 503 and closed.

pub mod body;
mod chunked;
mod client;
mod client_io;
mod deadline;
pub mod head;
mod limits;
pub(crate) mod pod;
#[cfg(test)]
mod props;
pub(crate) mod rewrite;
pub mod sniff;
pub mod spread;

use crate::proxy::tls_accept::{self, TlsListeners};
use crate::proxy::write_deadline::CLIENT_WRITE_TIMEOUT;
use crate::proxy::{error_json, in_flight, Gateway};
use async_trait::async_trait;
use bytes::BytesMut;
use client_io::{client_io, ClientIo, Transport};
use deadline::{Deadline, Kind};
use head::{parse_request, Request};
use http::Method;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use body::BUFFERED_BODY;
use limits::HeadHold;
pub use limits::{HeadMemory, Limits};
/// The first buffer for a request head (nginx's `client_header_buffer_size`).
const FIRST_HEAD_BUFFER: usize = 1024;

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
    /// The deadlines of connections waiting for a head, per thread (`deadline.rs`).
    timers: deadline::Timers,
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
            timers: deadline::Timers::new(linger),
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
                    // Registered with the target thread's poller from here, so that the task
                    // spawned there is `serve` itself: an async block around it would keep a
                    // second copy of everything it hands `serve` for the connection's life.
                    let tcp = {
                        let _there = there.enter();
                        tokio::net::TcpStream::from_std(tcp)
                    };
                    match tcp {
                        Ok(tcp) => {
                            let io = client_io(Transport::Tcp(tcp), self.limits.body_timeout);
                            let client = Client::new(io, addr, false);
                            there.spawn(self.clone().serve(
                                client,
                                shutdown.clone(),
                                accepted,
                                Some(open),
                            ));
                        }
                        Err(e) => log::warn!("cannot move a client connection: {e}"),
                    }
                    return None;
                }
            }
        }
        let open = self.spread.open_here();
        let addr = peer(&io);
        let tls = io.get_ssl_digest().is_some();
        let io = client_io(Transport::Pingora(io), self.limits.body_timeout);
        let client = Client::new(io, addr, tls);
        self.clone()
            .serve(client, shutdown.clone(), accepted, open)
            .await;
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
            let tcp = match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => tcp,
                Err(e) => return log::warn!("cannot move a client connection: {e}"),
            };
            let deadline = accepted + engine.limits.header_timeout;
            // Boxed: inline, the handshake's waits would size the task for the connection's
            // life.
            let shake = Box::pin(tls_accept::handshake(&acceptor, tcp, addr, deadline.into()));
            let stream = match shake.await {
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
                let _open = open;
                Box::pin(engine.serve_h2(stream, &shutdown, accepted)).await;
            } else {
                let io = client_io(Transport::Pingora(stream), engine.limits.body_timeout);
                let client = Client::new(io, addr, true);
                Box::pin(engine.serve(client, shutdown, accepted, open)).await;
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
    fn new(io: ClientIo, addr: Option<SocketAddr>, tls: bool) -> Self {
        Client {
            io,
            buf: BytesMut::new(),
            addr,
            tls,
            busy: None,
        }
    }

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

/// Closes the connection's sending side (a TLS close_notify), within `timeout`; boxed, as its
/// timer would otherwise size every connection's task.
fn close(
    client: &mut Client,
    timeout: Duration,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let _ = tokio::time::timeout(timeout, AsyncWriteExt::shutdown(&mut client.io)).await;
    })
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
    /// Serves one HTTP/1.1 client connection to its end: the future the connection's task
    /// runs. Its parts are owned, and used in place by the `async move` block (an `async fn`
    /// would keep each argument twice: as given and as its local binding), so that the whole
    /// task fits 512 B (`deadline.rs` has the measurements).
    // Not an `async fn` on purpose (see above): clippy's rewrite would double the task.
    #[allow(clippy::manual_async_fn)]
    fn serve(
        self: Arc<Self>,
        mut client: Client,
        shutdown: ShutdownWatch,
        accepted: Instant,
        open: Option<spread::Open>,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            let _open = &open;
            let mut first = true;
            // No await may come while the head (or the result it came in, 112 B) is still in
            // scope: the task would hold room for it for the connection's life.
            let refused = loop {
                let req = match self
                    .read_head(&mut client, &shutdown, first, accepted)
                    .await
                {
                    Ok(req) => req,
                    Err(NoHead::Done) => break None,
                    Err(NoHead::Answer(status)) => break Some(status),
                };
                first = false;
                let stopping = *shutdown.borrow();
                // Boxed: the exchange's state is large and only needed while a request is in
                // flight; inline, every idle connection would carry it.
                let exchange = Box::pin(self.exchange(&mut client, req, stopping));
                if !exchange.await {
                    break None;
                }
                // Idle again: nothing in flight until the next head begins.
                client.busy = None;
                if client.buf.is_empty() {
                    // Nothing pipelined: an idle connection keeps no buffer.
                    client.buf = BytesMut::new();
                }
            };
            if let Some(status) = refused {
                self.refuse(&mut client, status).await;
            }
            close(&mut client, self.limits.body_timeout).await;
        }
    }

    /// Answers a head refused before it reached the pipeline (boxed: rare, and inline its
    /// state would size every connection's task).
    fn refuse<'a>(
        &'a self,
        client: &'a mut Client,
        status: u16,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let id = if status == 503 {
                crate::proxy::pipeline::RequestId::Sent("")
            } else {
                crate::proxy::pipeline::request_id(None)
            };
            let answer = error_answer(status, None, false, false, &id);
            let _ = client.send(&answer, self.limits.body_timeout).await;
            crate::proxy::pipeline::record::refused(&self.gateway, status, Instant::now());
        })
    }

    /// The next request head. The first head of a connection must be complete
    /// `client_header_timeout` after the accept; a later one that long after its first byte.
    /// Before that first byte a keep-alive connection waits `keepalive_timeout`, or until
    /// `linger` after the stop. Every wait's deadline is an entry in this thread's list
    /// (`deadline.rs`), made only when a wait is taken: this future holds no timer.
    // Not an `async fn` on purpose (see above): clippy's rewrite would double the task.
    #[allow(clippy::manual_async_fn)]
    fn read_head<'a>(
        &'a self,
        c: &'a mut Client,
        shutdown: &'a ShutdownWatch,
        first: bool,
        accepted: Instant,
    ) -> impl Future<Output = Result<Request, NoHead>> + Send + 'a {
        // Not an `async fn`: it would keep every argument twice.
        async move {
            let limits = &self.limits;
            let mut waiting: Option<Deadline> = None;
            let deadline = if c.buf.is_empty() {
                let (kind, at) = if first {
                    (Kind::Head, accepted + limits.header_timeout)
                } else {
                    (Kind::Idle, Instant::now() + limits.keepalive_timeout)
                };
                let mut readable = std::pin::pin!(c.io.readable());
                let ready = poll_fn(|cx| {
                    if let Poll::Ready(r) = readable.as_mut().poll(cx) {
                        return Poll::Ready(r.is_ok());
                    }
                    let wait = waiting.get_or_insert_with(|| self.timers.start(kind, at, shutdown));
                    wait.poll_expired(cx).map(|()| false)
                })
                .await;
                if !ready {
                    return Err(NoHead::Done);
                }
                if first {
                    // The first head's deadline counts from the accept: the same entry goes on.
                    accepted + limits.header_timeout
                } else {
                    waiting = None;
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
                let mut reading = std::pin::pin!(c.io.read_buf(&mut c.buf));
                let read = poll_fn(|cx| {
                    if let Poll::Ready(r) = reading.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    let wait = waiting
                        .get_or_insert_with(|| self.timers.start(Kind::Head, deadline, shutdown));
                    wait.poll_expired(cx).map(|()| None)
                })
                .await;
                match read {
                    Some(Ok(0)) | Some(Err(_)) => return Err(NoHead::Done),
                    Some(Ok(_)) => {
                        c.busy.get_or_insert_with(in_flight::busy);
                    }
                    None if c.buf.is_empty() => return Err(NoHead::Done),
                    None => {
                        log::debug!("client {:?}: request head timed out", c.addr);
                        return Err(NoHead::Answer(408));
                    }
                }
            }
        }
    }
}
