//! h2 connections to Pods for podgate's own HTTP/1.1 path, when an upstream's `protocol` is h2
//! or h2c (h2 clients go through Pingora's connector instead, see `proxy/pingora.rs`).
//!
//! One multiplexed connection per Pod and worker thread, kept in a thread-local map like
//! `pool.rs` keeps HTTP/1.1 connections: no lock, and the connection's driver task runs on the
//! thread whose requests use it. A connection the Pod closed (or sent GOAWAY on) is found
//! unusable when next asked for, and replaced; the map is swept of such entries whenever a new
//! connection is added, so Pods that left do not pile up.

use super::pool::Connector;
use bytes::Bytes;
use h2::client::SendRequest;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};

thread_local! {
    static CONNS: RefCell<HashMap<(SocketAddr, u64), SendRequest<Bytes>>> =
        RefCell::new(HashMap::new());
}

fn h2_error(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

/// Whether `send` can still open streams, without waiting: a closed connection answers at once.
fn usable(send: &mut SendRequest<Bytes>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    !matches!(send.poll_ready(&mut cx), Poll::Ready(Err(_)))
}

/// A handle to open a stream to `addr`, on this thread's connection to it or a new one
/// (connected within the connector's timeout, over TLS for `scheme: https`).
pub async fn ready(connector: &Connector, addr: SocketAddr) -> io::Result<SendRequest<Bytes>> {
    let key = (addr, connector.pool_id());
    let kept = CONNS.with(|c| c.borrow().get(&key).cloned());
    if let Some(send) = kept {
        match send.ready().await {
            Ok(send) => return Ok(send),
            Err(_) => {
                CONNS.with(|c| c.borrow_mut().remove(&key));
            }
        }
    }
    let conn = connector.connect(addr).await?;
    let (send, driver) = h2::client::handshake(conn.io).await.map_err(h2_error)?;
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            log::debug!("h2 connection to {addr} ended: {e}");
        }
    });
    CONNS.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|_, s| usable(s));
        c.insert(key, send.clone());
    });
    send.ready().await.map_err(h2_error)
}
