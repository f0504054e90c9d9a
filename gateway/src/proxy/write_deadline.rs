//! Writes toward a client that make no progress for `server.client_body_timeout` fail.
//!
//! [`WriteDeadline`] wraps a client connection's transport: every write, flush and shutdown that
//! cannot go on (the client stopped reading and the socket's buffers are full) arms a timer,
//! any progress disarms it, and once it fires that write and every later one fail with
//! `TimedOut`. It is nginx's `send_timeout`: a bound on the time between two successive writes
//! that move bytes, not on a whole answer, so a slow client that keeps reading is never cut off,
//! and one that stopped is, whatever part of podgate was writing to it: the HTTP/1.1 relay, an
//! error answer, a tunnel, or an h2 connection's frames (the `h2` crate writes them all through
//! this one transport, so a connection that cannot flush fails as a whole and its streams end).
//!
//! On expiry the socket is set to close with a reset (`SO_LINGER` 0): what is still queued
//! toward a client that stopped reading would otherwise keep the socket, and up to its send
//! buffer of kernel memory, until the kernel gives up on it minutes later.
//!
//! The timer is allocated the first time a write has to wait, and kept for the connection's
//! life: an idle connection carries one pointer of it.

use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The `ended` reason of an exchange cut off by a [`WriteDeadline`] (access log).
pub use crate::proxy::ended::CLIENT_WRITE_TIMEOUT;

/// A client transport whose writes must make progress within a limit (see the module comment).
pub struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// A write is waiting since the timer's deadline minus `limit`.
    armed: bool,
    expired: bool,
    /// Told of the expiry, for whoever no longer holds the transport (an h2 connection's
    /// streams, when the `h2` crate owns it).
    shared: Option<Arc<AtomicBool>>,
    /// The socket, to reset on expiry; negative when there is none.
    fd: RawFd,
}

impl<S> WriteDeadline<S> {
    /// `inner`, whose writes must progress within `limit`; `fd` is its socket.
    pub fn new(inner: S, limit: Duration, fd: RawFd) -> Self {
        WriteDeadline {
            inner,
            limit,
            timer: None,
            armed: false,
            expired: false,
            shared: None,
            fd,
        }
    }

    /// The same, with `flag` set on expiry.
    pub fn with_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.shared = Some(flag);
        self
    }

    /// Changes the limit for the writes from now on.
    pub fn set_limit(&mut self, limit: Duration) {
        self.limit = limit;
    }

    /// Whether a write ran out of time (the connection is then done).
    pub fn expired(&self) -> bool {
        self.expired
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    fn timed_out() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took no bytes within client_body_timeout",
        )
    }

    /// Passes on what the inner write gave, arming, disarming or firing the timer.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if !self.armed {
            timer.as_mut().reset(Instant::now() + limit);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.expire();
                Poll::Ready(Err(Self::timed_out()))
            }
        }
    }

    fn expire(&mut self) {
        self.expired = true;
        if let Some(flag) = &self.shared {
            flag.store(true, Ordering::Relaxed);
        }
        if self.fd >= 0 {
            let reset = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: `fd` is the socket this transport owns, open for as long as it lives;
            // the option is a plain struct of the size given.
            unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&reset as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.expired {
            return Poll::Ready(Err(Self::timed_out()));
        }
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        me.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.expired {
            return Poll::Ready(Err(Self::timed_out()));
        }
        let r = Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        me.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.expired {
            return Poll::Ready(Err(Self::timed_out()));
        }
        let r = Pin::new(&mut me.inner).poll_flush(cx);
        me.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.expired {
            return Poll::Ready(Err(Self::timed_out()));
        }
        let r = Pin::new(&mut me.inner).poll_shutdown(cx);
        me.watch(cx, r)
    }
}

impl<S> std::fmt::Debug for WriteDeadline<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteDeadline")
            .field("limit", &self.limit)
            .field("expired", &self.expired)
            .finish()
    }
}

// What makes a wrapped Pingora stream a Pingora stream again (`protocols::IO`), so that an h2
// connection can be built on it: everything but the writes is the inner stream's.

#[async_trait::async_trait]
impl Shutdown for WriteDeadline<Stream> {
    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(self).await;
    }
}

impl UniqueID for WriteDeadline<Stream> {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for WriteDeadline<Stream> {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for WriteDeadline<Stream> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for WriteDeadline<Stream> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for WriteDeadline<Stream> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait::async_trait]
impl Peek for WriteDeadline<Stream> {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_that_cannot_go_on_fails_at_the_limit_and_progress_rearms_it() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut w = WriteDeadline::new(ours, Duration::from_millis(200), -1);
        // Filling the pipe: the write waits, nobody reads, the limit passes.
        let started = std::time::Instant::now();
        let r = w.write_all(&[0u8; 4096]).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(190));
        assert!(w.expired());
        // Once expired, every write fails at once.
        assert!(w.write_all(b"x").await.is_err());
        assert!(w.flush().await.is_err());

        // A reader that keeps taking bytes, slower than the limit per whole write but never
        // stalling for it, is served to the end.
        let (ours, mut theirs2) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(ours, Duration::from_millis(200), -1);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 2048 {
                // 64 bytes every 20 ms: the 2 KiB take 640 ms, well past the limit.
                tokio::time::sleep(Duration::from_millis(20)).await;
                got += theirs2.read(&mut buf).await.unwrap();
            }
            got
        });
        w.write_all(&[1u8; 2048]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 2048);
        assert!(!w.expired());
        drop(theirs.read(&mut [0u8; 1]).await);
    }
}
