//! Keeps client connections spread evenly over the request threads.
//!
//! Pingora hands each accepted connection to one of its request threads at random. With many
//! short connections that evens out; with a few long keep-alive ones (a load balancer in front of
//! podgate holds a handful) it often does not: 8 connections on 2 threads land 6:2 or worse one
//! time in three, and the busier thread then caps the whole process while the other idles. The
//! same problem made Envoy add its `exact_balance` listener option.
//!
//! So every new plain-TCP connection is served on the thread holding the fewest open
//! connections (this one on a tie): the socket is duplicated ([`detach`]), registered with that
//! thread's runtime, and Pingora's copy is closed. Moving every such connection, not only the
//! ones that land on a busier thread, also frees Pingora's per-connection task (see
//! `proxy/h1/mod.rs`). TLS connections move too, before their handshake begins (podgate runs it,
//! `proxy/tls_accept.rs`). The target's runtime is one of the same listening service's
//! runtimes, so shutdown treats a moved connection like any other.

use crate::telemetry::metrics;
use pingora_core::protocols::Stream;
use prometheus::IntGauge;
use std::cell::RefCell;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::runtime::Handle;

/// The request threads of one listening service, as they become known.
pub struct Spread {
    id: u64,
    threads: Box<[Thread]>,
    /// Threads registered so far (indexes into `threads`).
    known: AtomicUsize,
    /// Whether the other threads were asked to register.
    probed: std::sync::atomic::AtomicBool,
}

struct Thread {
    handle: OnceLock<Handle>,
    open: AtomicUsize,
    gauge: OnceLock<IntGauge>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's index in each [`Spread`] that knows it, by spread id.
    static MINE: RefCell<Vec<(u64, usize)>> = const { RefCell::new(Vec::new()) };
}

/// An open connection counted on a thread (and in the process' count the stop reads,
/// `proxy/in_flight.rs`); uncounted when dropped.
pub struct Open {
    spread: Arc<Spread>,
    /// `u32`, not `usize`: the guard lives in every connection's task, and so fits 16 B.
    thread: u32,
    _counted: crate::proxy::in_flight::Connection,
}

impl Drop for Open {
    fn drop(&mut self) {
        let t = &self.spread.threads[self.thread as usize];
        let now = t.open.fetch_sub(1, Ordering::Relaxed) - 1;
        if let Some(g) = t.gauge.get() {
            g.set(now as i64);
        }
    }
}

impl Spread {
    /// For a service running `threads` request threads.
    pub fn new(threads: usize) -> Arc<Self> {
        Arc::new(Spread {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            threads: (0..threads)
                .map(|_| Thread {
                    handle: OnceLock::new(),
                    open: AtomicUsize::new(0),
                    gauge: OnceLock::new(),
                })
                .collect(),
            known: AtomicUsize::new(0),
            probed: Default::default(),
        })
    }

    /// This thread's index, registering it (and, the first time, asking every other request
    /// thread to register too); `None` beyond the expected number of threads.
    fn here(self: &Arc<Self>) -> Option<usize> {
        let found = MINE.with(|m| {
            m.borrow()
                .iter()
                .find(|(id, _)| *id == self.id)
                .map(|(_, i)| *i)
        });
        if let Some(i) = found {
            return Some(i);
        }
        let i = self.known.fetch_add(1, Ordering::AcqRel);
        let thread = self.threads.get(i)?;
        let _ = thread.handle.set(Handle::current());
        let gauge = metrics::client_connections(i);
        gauge.set(thread.open.load(Ordering::Relaxed) as i64);
        let _ = thread.gauge.set(gauge);
        MINE.with(|m| m.borrow_mut().push((self.id, i)));
        if !self.probed.swap(true, Ordering::AcqRel) {
            // Pingora hands out a random thread's runtime: asking a few times per thread
            // reaches every one of them with near certainty (2 threads: all but 1 in 2^15).
            for _ in 0..self.threads.len() * 16 {
                let me = self.clone();
                pingora_runtime::current_handle().spawn(async move {
                    me.here();
                });
            }
        }
        Some(i)
    }

    /// Counts a connection served on `thread` until the result is dropped.
    fn count(self: &Arc<Self>, thread: usize) -> Open {
        let t = &self.threads[thread];
        let now = t.open.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(g) = t.gauge.get() {
            g.set(now as i64);
        }
        Open {
            spread: self.clone(),
            thread: thread as u32,
            _counted: crate::proxy::in_flight::connection(),
        }
    }

    /// Counts a connection served on this thread (not at all on a thread beyond the expected
    /// number).
    pub fn open_here(self: &Arc<Self>) -> Option<Open> {
        self.here().map(|i| self.count(i))
    }

    /// The runtime of the thread with the fewest open connections (this one when it has no
    /// more than any other), with the connection counted on it.
    pub fn least(self: &Arc<Self>) -> Option<(Handle, Open)> {
        let here = self.here()?;
        let known = self.known.load(Ordering::Acquire).min(self.threads.len());
        let open = |i: usize| self.threads[i].open.load(Ordering::Relaxed);
        let least = (0..known)
            .filter(|i| self.threads[*i].handle.get().is_some())
            .min_by_key(|i| open(*i))
            .filter(|i| open(*i) < open(here))
            .unwrap_or(here);
        let handle = match self.threads[least].handle.get() {
            Some(h) => h.clone(),
            None => Handle::current(),
        };
        Some((handle, self.count(least)))
    }
}

/// A second handle on the plain TCP socket under `io`, to be registered with another runtime;
/// `None` for anything but a plain TCP connection. Pingora's stream must be dropped (closing its
/// descriptor and leaving its runtime's poller) before the copy is used.
pub fn detach(io: &Stream) -> Option<std::net::TcpStream> {
    if !movable(io) {
        return None;
    }
    let fd: RawFd = io.id();
    // Close-on-exec like the original: a binary upgrade must not hand client sockets on.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return None;
    }
    // SAFETY: `copy` is a descriptor this process just created and owns alone.
    let tcp = unsafe { std::net::TcpStream::from_raw_fd(copy) };
    tcp.set_nonblocking(true).ok()?;
    Some(tcp)
}

/// Whether `io` is a plain TCP connection (the kind [`detach`] can move).
pub fn movable(io: &Stream) -> bool {
    io.get_ssl_digest().is_none()
        && io.get_proxy_digest().is_none()
        && io
            .get_socket_digest()
            .is_some_and(|d| d.peer_addr().is_some_and(|a| a.as_inet().is_some()))
}
