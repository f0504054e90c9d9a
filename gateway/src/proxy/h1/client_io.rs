//! The transport under a client connection: a plain TCP socket podgate took over from Pingora
//! (see `spread.rs`), or Pingora's stream (TLS), under a [`WriteDeadline`]: every write toward
//! the client must make progress within `server.client_body_timeout`.
//!
//! Owning the socket lets an idle keep-alive connection wait for its next request with tokio's
//! readiness alone — no buffer and no system call — and read only once bytes are there, as
//! nginx does with epoll. Through Pingora's stream the same wait needs an empty `read`, one
//! extra system call per request (measured: 4 → 5 per proxied request on the load bench).

use crate::proxy::write_deadline::WriteDeadline;
use pingora_core::protocols::Stream;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Transport {
    Tcp(TcpStream),
    Pingora(Stream),
}

pub type ClientIo = WriteDeadline<Transport>;

/// `transport` with its writes bounded by `write_timeout` of no progress.
pub fn client_io(transport: Transport, write_timeout: Duration) -> ClientIo {
    let fd = match &transport {
        Transport::Tcp(t) => t.as_raw_fd(),
        // Pingora's streams (plain or TLS) name their socket by its descriptor.
        Transport::Pingora(s) => s.id(),
    };
    WriteDeadline::new(transport, write_timeout, fd)
}

impl WriteDeadline<Transport> {
    /// Waits until bytes (or the end) can be read, consuming nothing and holding no buffer. It
    /// may return early (a spurious wake-up): the read that follows waits properly.
    ///
    /// For a socket of podgate's own this is the socket's read readiness, whose waker tokio
    /// keeps in the socket's registration: the wait itself holds no state (`TcpStream::readable`
    /// would keep a 64-byte waiter in the connection's task while it is idle).
    pub async fn readable(&mut self) -> io::Result<()> {
        let inner = self.get_mut();
        std::future::poll_fn(|cx| match inner {
            Transport::Tcp(t) => t.poll_read_ready(cx),
            Transport::Pingora(s) => {
                let mut none = ReadBuf::new(&mut []);
                Pin::new(&mut *s).poll_read(cx, &mut none)
            }
        })
        .await
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            Transport::Pingora(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            Transport::Pingora(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Transport::Pingora(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(t) => t.is_write_vectored(),
            Transport::Pingora(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_flush(cx),
            Transport::Pingora(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            Transport::Pingora(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
