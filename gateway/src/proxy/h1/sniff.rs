//! Tells prior-knowledge h2 from HTTP/1.x on `h2c: true` listeners by the first bytes.
//!
//! Pingora's own h2c detection reads exactly 24 bytes (the length of the h2 preface) before it
//! decides, so a shorter HTTP/1.x request (`GET / HTTP/1.0\r\n\r\n`, 18 bytes) was never
//! answered, and HTTP/1.1 on such a listener ran on Pingora's proxy path rather than podgate's.
//! Here the first bytes are looked at without being taken off the socket (`MSG_PEEK`): the first
//! byte that differs from the preface means HTTP/1.x, at once; all 24 matching mean h2. The
//! connection then goes to its path untouched, as if nothing had been read.
//!
//! Pingora's stream shows no readiness to wait on, so when the bytes are not there yet a second
//! descriptor of the socket (as [`spread::detach`] makes) is registered with this runtime to wait
//! on, and dropped once the protocol is known. Peeking cannot wait for "more bytes than are
//! queued" (a peek returns the queued ones again at once), so each peek runs under tokio's
//! readiness tick: it waits again only after new bytes (or the end of the stream) arrived.

use super::spread;
use pingora_core::protocols::Stream;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use tokio::io::Interest;

/// What a client sends first on an h2 connection without TLS (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which path a connection on an `h2c: true` listener takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// It opened with the h2 preface, or its bytes could not be looked at: `proxy/h2/serve.rs`
    /// takes it (in the second case a client that is not h2 fails its handshake there).
    H2,
    /// Its first bytes differ from the preface: podgate's HTTP/1.1 path.
    Http1,
    /// The client closed, failed, or sent no telling byte before the deadline: drop it.
    Gone,
}

/// The path the bytes seen so far decide; `None` while they are a strict prefix of the preface.
pub fn classify(first: &[u8]) -> Option<Sniffed> {
    let n = first.len().min(PREFACE.len());
    if first[..n] != PREFACE[..n] {
        Some(Sniffed::Http1)
    } else if n == PREFACE.len() {
        Some(Sniffed::H2)
    } else {
        None
    }
}

/// Copies the queued bytes of socket `fd` into `buf` without taking them off the socket.
fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes; `fd` is a socket the caller holds
    // open for the duration of the call. MSG_DONTWAIT: never block a runtime thread.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// What the queued bytes of `fd` decide: `Err(WouldBlock)` while they decide nothing yet.
fn decide(fd: RawFd) -> io::Result<Sniffed> {
    let mut buf = [0u8; PREFACE.len()];
    match peek(fd, &mut buf)? {
        0 => Ok(Sniffed::Gone),
        n => classify(&buf[..n]).ok_or_else(|| io::ErrorKind::WouldBlock.into()),
    }
}

/// Waits until the first bytes of plain-TCP connection `io` tell h2 from HTTP/1.x, for at most
/// `deadline` (the client header timeout). Consumes nothing.
pub async fn sniff(io: &Stream, deadline: Duration) -> Sniffed {
    // Usually the request arrived with the connection: no second descriptor is needed.
    match decide(io.id()) {
        Ok(found) => return found,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(_) => return Sniffed::Gone,
    }
    let Some(copy) = spread::detach(io) else {
        return Sniffed::H2;
    };
    let Ok(copy) = tokio::net::TcpStream::from_std(copy) else {
        return Sniffed::H2;
    };
    let fd = copy.as_raw_fd();
    let wait = async {
        loop {
            let Ok(ready) = copy.ready(Interest::READABLE).await else {
                return Sniffed::Gone;
            };
            // `try_io` clears the readiness only if no new event came in since it was read:
            // bytes arriving during the peek wake the next `ready` at once.
            match copy.try_io(Interest::READABLE, || decide(fd)) {
                Ok(found) => return found,
                // A prefix of the preface and then the end of the stream: nothing more comes.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                    return Sniffed::Gone
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Sniffed::Gone,
            }
        }
    };
    tokio::time::timeout(deadline, wait)
        .await
        .unwrap_or(Sniffed::Gone)
}

impl super::Engine {
    /// Serves an `h2c: true` listener: each plain connection is sniffed ([`sniff`]) and goes to
    /// the h2 path (`proxy/h2/serve.rs`) if it opens with the h2 preface.
    pub fn with_h2c(mut self, h2c: bool) -> Self {
        self.h2c = h2c;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_differing_byte_decides_http1() {
        assert_eq!(classify(b"G"), Some(Sniffed::Http1));
        assert_eq!(classify(b"GET / HTTP/1.0\r\n\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"PRI * HTTX"), Some(Sniffed::Http1));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Sniffed::Http1));
    }

    #[test]
    fn a_prefix_waits_and_the_whole_preface_is_h2() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(&PREFACE[..23]), None);
        assert_eq!(classify(PREFACE), Some(Sniffed::H2));
        let mut more = PREFACE.to_vec();
        more.extend_from_slice(b"\0\0\x12\x04");
        assert_eq!(classify(&more), Some(Sniffed::H2));
    }
}
