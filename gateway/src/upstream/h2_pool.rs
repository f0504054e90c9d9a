//! h2 connections to Pods when an upstream's `protocol` is h2 or h2c, for every client protocol:
//! the request pipeline's h2 Pod codec (`proxy/h2/pod.rs`) opens its streams here.
//!
//! One multiplexed connection per Pod and worker thread, kept in a thread-local map like
//! `pool.rs` keeps HTTP/1.1 connections: no lock, and the connection's driver task runs on the
//! thread whose requests use it. A connection the Pod closed (or sent GOAWAY on) is found
//! unusable when next asked for, and replaced; the map is swept of such entries whenever a new
//! connection is added.
//!
//! A Pod that leaves its upstream (EndpointSlice removal, not ready any more) has its
//! connections drained at once, not after an idle timeout: each connection's driver task wakes on
//! every change of the upstream's selection ([`Members::changes`]) and, once the Pod is no longer
//! a member, takes the connection out of the map. With that last shared handle gone, the h2 crate
//! lets the streams still running finish, then sends GOAWAY (NO_ERROR) and closes: the Pod sees
//! a graceful close, never a reset.

use super::pool::{Connector, Members};
use bytes::Bytes;
use h2::client::SendRequest;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use tokio::sync::Notify;

/// Flow-control window offered to a Pod per stream: what one call may have in flight toward
/// podgate before podgate reads it (then the window opens again at once).
const STREAM_WINDOW: u32 = 256 * 1024;
/// The window for all streams of one connection. Also sets how many small DATA frames (a gRPC
/// answer's message) may wait unread at once: the `h2` crate (0.4.20) closes a connection with
/// ENHANCE_YOUR_CALM once their framing overhead (256 bytes less the payload, per frame) passes
/// half the connection window. The default 64 KiB allowed about 140, about what a busy Pod
/// connection carries in unary calls at once: in the gRPC load bench 12,011 of 147,257 calls
/// failed that way; with this window none of 227,917.
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// A pooled connection: its handle, and a number that tells it from a later one to the same Pod.
struct Kept {
    id: u64,
    send: SendRequest<Bytes>,
}

/// This thread's connection to one Pod.
enum Slot {
    Open(Kept),
    /// A request is opening it; the others wait to be told, rather than each opening their own
    /// (a burst of calls to a new Pod opened one connection per call: 100 in a test).
    Opening(Arc<Notify>),
}

thread_local! {
    static CONNS: RefCell<super::PodMap<(SocketAddr, u64), Slot>> = RefCell::new(Default::default());
}

/// Marks a connection being opened; when dropped (opened, failed or given up) it clears the mark
/// unless the connection took its place, and wakes the requests that wait for it.
struct Opening {
    key: (SocketAddr, u64),
    done: Arc<Notify>,
}

impl Drop for Opening {
    fn drop(&mut self) {
        CONNS.with(|c| {
            let mut c = c.borrow_mut();
            if matches!(c.get(&self.key), Some(Slot::Opening(n)) if Arc::ptr_eq(n, &self.done)) {
                c.remove(&self.key);
            }
        });
        self.done.notify_waiters();
    }
}

fn h2_error(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

/// Whether `send` can still open streams, without waiting: a closed connection answers at once.
fn usable(send: &mut SendRequest<Bytes>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    !matches!(send.poll_ready(&mut cx), Poll::Ready(Err(_)))
}

/// Whether a Pod refused a stream without processing it (RFC 9113 §8.7), so that the request may
/// go again, whatever its method: the stream was past the last stream id of the Pod's GOAWAY (a
/// server rotating its connections, e.g. gRPC's `MAX_CONNECTION_AGE`, or shutting down), or was
/// reset with REFUSED_STREAM.
pub fn refused(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// Takes the connection `id` to `key` out of this thread's map (not a newer one to that Pod).
fn forget(key: (SocketAddr, u64), id: u64) {
    CONNS.with(|c| {
        let mut c = c.borrow_mut();
        if matches!(c.get(&key), Some(Slot::Open(k)) if k.id == id) {
            c.remove(&key);
        }
    });
}

/// Takes this thread's connection to `addr` out of the pool, so that the next [`ready`] opens a
/// new one: for a Pod that refused a stream on it (GOAWAY, REFUSED_STREAM). Streams still
/// running on it finish.
pub fn discard(connector: &Connector, addr: SocketAddr) {
    let key = (addr, connector.pool_id());
    CONNS.with(|c| {
        let mut c = c.borrow_mut();
        if matches!(c.get(&key), Some(Slot::Open(_))) {
            c.remove(&key);
        }
    });
}

/// A handle to open a stream to `addr` of `upstream` within its `connect_timeout`, or `None`
/// (logged) when no connection could be had.
async fn connect(upstream: &Arc<super::Upstream>, addr: SocketAddr) -> Option<SendRequest<Bytes>> {
    let conf = &upstream.conf;
    let ready = ready(&upstream.connector, addr, upstream);
    match tokio::time::timeout(conf.connect_timeout, ready).await {
        Ok(Ok(send)) => Some(send),
        Ok(Err(e)) => {
            log::warn!("upstream {}: cannot connect to {addr}: {e}", conf.name);
            None
        }
        Err(_) => {
            log::warn!(
                "upstream {}: cannot connect to {addr}: timed out",
                conf.name
            );
            None
        }
    }
}

/// Why [`open`] opened no stream.
pub enum NotOpened {
    /// No connection to the Pod could be had, or it took no stream: nothing reached the Pod.
    Connect,
    /// The request cannot be written as h2 (`make` gave `None`).
    Unrepresentable,
}

/// Opens a stream to `addr` of `upstream` for the request `make` builds (`end`: without a body),
/// on this thread's pooled connection, or on a new one when that one takes no more streams (the
/// Pod closed it or sent GOAWAY), once.
pub async fn open(
    upstream: &Arc<super::Upstream>,
    addr: SocketAddr,
    make: impl Fn() -> Option<http::Request<()>>,
    end: bool,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), NotOpened> {
    let mut again = false;
    loop {
        let mut send = connect(upstream, addr).await.ok_or(NotOpened::Connect)?;
        let req = make().ok_or(NotOpened::Unrepresentable)?;
        match send.send_request(req, end) {
            Ok(opened) => return Ok(opened),
            Err(e) => {
                log::debug!(
                    "upstream {}: opening a stream to {addr}: {e}",
                    upstream.conf.name
                );
                discard(&upstream.connector, addr);
                if again {
                    return Err(NotOpened::Connect);
                }
                again = true;
            }
        }
    }
}

/// A handle to open a stream to `addr`, on this thread's connection to it or a new one
/// (connected within the connector's timeout, over TLS for `scheme: https`). A new connection
/// is drained once `addr` leaves `members` (see the module comment).
pub async fn ready<M: Members + 'static>(
    connector: &Connector,
    addr: SocketAddr,
    members: &Arc<M>,
) -> io::Result<SendRequest<Bytes>> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let key = (addr, connector.pool_id());
    let opening = loop {
        /// What this thread's map holds for the Pod.
        enum Found {
            Open(u64, SendRequest<Bytes>),
            /// Being opened: wait until told (created under the map's borrow, so no wake-up
            /// is missed).
            Wait(tokio::sync::futures::OwnedNotified),
            /// Nothing: this request opens it.
            Mine(Opening),
        }
        let found = CONNS.with(|c| {
            let mut c = c.borrow_mut();
            match c.get(&key) {
                Some(Slot::Open(k)) => Found::Open(k.id, k.send.clone()),
                Some(Slot::Opening(n)) => Found::Wait(n.clone().notified_owned()),
                None => {
                    let done = Arc::new(Notify::new());
                    c.insert(key, Slot::Opening(done.clone()));
                    Found::Mine(Opening { key, done })
                }
            }
        });
        match found {
            Found::Open(id, send) => match send.ready().await {
                Ok(send) => return Ok(send),
                Err(_) => forget(key, id),
            },
            Found::Wait(told) => told.await,
            Found::Mine(opening) => break opening,
        }
    };
    let conn = connector.connect(addr).await?;
    let (send, driver) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake(conn.io)
        .await
        .map_err(h2_error)?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let members: Weak<dyn Members> = Arc::downgrade(members) as Weak<dyn Members>;
    let changes = members.upgrade().map(|m| m.changes());
    tokio::spawn(drive(driver, key, id, members, changes));
    CONNS.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|_, slot| match slot {
            Slot::Open(k) => usable(&mut k.send),
            Slot::Opening(_) => true,
        });
        c.insert(
            key,
            Slot::Open(Kept {
                id,
                send: send.clone(),
            }),
        );
    });
    drop(opening);
    send.ready().await.map_err(h2_error)
}

/// Runs connection `id` to `key.0` until it ends; takes it out of the pool as soon as the Pod is
/// no longer one of `members` (or the upstream is gone), which starts its graceful close.
async fn drive<T>(
    driver: h2::client::Connection<T, Bytes>,
    key: (SocketAddr, u64),
    id: u64,
    members: Weak<dyn Members>,
    mut changes: Option<tokio::sync::watch::Receiver<()>>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let addr = key.0;
    tokio::pin!(driver);
    loop {
        let changed = async {
            match changes.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ended = &mut driver => {
                if let Err(e) = ended {
                    log::debug!("h2 connection to {addr} ended: {e}");
                }
                forget(key, id);
                return;
            }
            alive = changed => {
                let member = alive && members.upgrade().is_some_and(|m| m.has(&addr));
                if !member {
                    log::debug!("h2 connection to {addr}: the Pod left its upstream; draining");
                    forget(key, id);
                    changes = None;
                }
            }
        }
    }
}
