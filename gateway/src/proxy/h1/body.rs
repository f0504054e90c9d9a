//! HTTP/1.1 message bodies as the proxy passes them on: how long a body is (its framing, decided
//! by podgate from the head, RFC 9112 §6.3), and moving exactly that body from one side to the
//! other under framing that podgate writes itself.
//!
//! A `Content-Length` body is copied as it came: its length was decided here and is written in
//! the forwarded head. A chunked body is decoded strictly (CRLF only, at most 16 size digits,
//! bounded extensions and trailer section) and *re-encoded*: the receiver sees podgate's chunk
//! lines, no chunk extensions, and only trailer fields that parse as `name: value` and carry no
//! framing or routing. So no byte the sender chose can reach the receiver as framing, and bytes
//! after the body's end (a pipelined or smuggled next message) are never sent along. An
//! HTTP/1.0 receiver cannot read chunks: [`Out::Plain`] passes on only the chunk data, and the
//! end of the connection ends the body.

use super::chunked::write_chunk;
pub use super::chunked::{is_dropped_trailer, is_tchar, write_trailers, BadChunk, Chunked, Piece};
use crate::proxy::lazy_timeout::within;
use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Request bodies up to this size are read whole before the Pod is chosen (on the h2 path too).
pub const BUFFERED_BODY: u64 = 64 * 1024;

/// How a message body is delimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// `Content-Length` bytes; the number left.
    Length(u64),
    /// `Transfer-Encoding: chunked`, followed through [`Chunked`].
    Chunked(Chunked),
    /// Everything until the sender closes (responses without length only).
    UntilClose,
}

/// How a chunked body is written on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    /// Re-encoded as chunks, with the checked trailer fields.
    Chunked,
    /// Only the chunk data (to an HTTP/1.0 client, ended by the close).
    Plain,
}

impl Framing {
    /// Takes the leading bytes of `buf` that belong to the body, appends what of them goes on to
    /// `out` (as `how` asks for chunked bodies), and returns how many were taken and whether the
    /// body ended there.
    pub fn take_into(
        &mut self,
        buf: &[u8],
        out: &mut Vec<u8>,
        how: Out,
    ) -> Result<(usize, bool), BadChunk> {
        Ok(match self {
            Framing::Empty => (0, true),
            Framing::Length(left) => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= take as u64;
                out.extend_from_slice(&buf[..take]);
                (take, *left == 0)
            }
            Framing::Chunked(c) => {
                let take = c.decode(buf, |p| match (p, how) {
                    (Piece::Data(d), Out::Chunked) => write_chunk(d, out),
                    (Piece::Data(d), Out::Plain) => out.extend_from_slice(d),
                    (Piece::End(t), Out::Chunked) => {
                        out.extend_from_slice(b"0\r\n");
                        write_trailers(t, out);
                        out.extend_from_slice(b"\r\n");
                    }
                    (Piece::End(_), Out::Plain) => {}
                })?;
                (take, c.is_done())
            }
            Framing::UntilClose => {
                out.extend_from_slice(buf);
                (buf.len(), false)
            }
        })
    }
}

/// Which side of a relay failed.
#[derive(Debug)]
pub enum RelayError {
    /// Reading the body failed, timed out, or the sender closed before the end.
    Read(std::io::Error),
    /// Writing it on failed or made no progress in time.
    Write(std::io::Error),
    /// The body broke the chunked grammar.
    Malformed(BadChunk),
}

impl RelayError {
    fn timed_out(e: &std::io::Error) -> bool {
        e.kind() == std::io::ErrorKind::TimedOut
    }

    /// The access log's `ended` for an answer (Pod → client) whose relay failed.
    pub fn ended_answer(&self) -> &'static str {
        use crate::proxy::ended::*;
        match self {
            RelayError::Read(e) if Self::timed_out(e) => UPSTREAM_TIMEOUT,
            RelayError::Read(_) | RelayError::Malformed(_) => UPSTREAM_CLOSED,
            RelayError::Write(e) if Self::timed_out(e) => CLIENT_WRITE_TIMEOUT,
            RelayError::Write(_) => CLIENT_CLOSED,
        }
    }

    /// The access log's `ended` for a request body (client → Pod) whose relay failed; `None`
    /// for a malformed body (its `400` says it).
    pub fn ended_request(&self) -> Option<&'static str> {
        use crate::proxy::ended::*;
        Some(match self {
            RelayError::Read(e) if Self::timed_out(e) => CLIENT_READ_TIMEOUT,
            RelayError::Read(_) => CLIENT_CLOSED,
            RelayError::Write(e) if Self::timed_out(e) => UPSTREAM_TIMEOUT,
            RelayError::Write(_) => UPSTREAM_CLOSED,
            RelayError::Malformed(_) => return None,
        })
    }
}

/// Reads more into `buf`, within `timeout`; 0 means the other side closed. Makes room for at
/// least `room` more bytes first if `buf` has less spare capacity than 4 KiB.
pub async fn read_more<R: AsyncRead + Unpin>(
    src: &mut R,
    buf: &mut BytesMut,
    timeout: Duration,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    match within(timeout, src.read_buf(buf)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "read timed out",
        )),
    }
}

/// The access log's `ended` when a read of a client's body (`read_more`) gave no bytes: the
/// client closed or was silent too long. `None` when it gave some.
pub fn client_read_ended(read: &std::io::Result<usize>) -> Option<&'static str> {
    use crate::proxy::ended::*;
    match read {
        Ok(0) => Some(CLIENT_CLOSED),
        Ok(_) => None,
        Err(e) if RelayError::timed_out(e) => Some(CLIENT_READ_TIMEOUT),
        Err(_) => Some(CLIENT_CLOSED),
    }
}

/// Moves the body framed by `framing` from `buf` (bytes already read) and then `src` to `dst`,
/// chunked bodies written as `how` says. Bytes after the body's end stay in `buf`. Returns the
/// body bytes written. `timeout` bounds each read; `write_timeout`, when given, bounds each
/// write's progress (none for a client connection: its
/// [`WriteDeadline`](crate::proxy::write_deadline::WriteDeadline) does that).
pub async fn relay<R, W>(
    framing: &mut Framing,
    how: Out,
    buf: &mut BytesMut,
    src: &mut R,
    dst: &mut W,
    timeout: Duration,
    write_timeout: Option<Duration>,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut sent = 0u64;
    let mut out = Vec::new();
    loop {
        let done = if let Framing::Chunked(_) = framing {
            out.clear();
            let (take, done) = framing
                .take_into(buf, &mut out, how)
                .map_err(RelayError::Malformed)?;
            let _ = buf.split_to(take);
            sent += pass_on(dst, &out, write_timeout).await?;
            done
        } else {
            // Length and until-close bodies go on as they are, without a copy.
            let take = match framing {
                Framing::Length(left) => usize::try_from(*left).unwrap_or(usize::MAX),
                Framing::UntilClose => usize::MAX,
                _ => 0,
            }
            .min(buf.len());
            if let Framing::Length(left) = framing {
                *left -= take as u64;
            }
            sent += pass_on(dst, &buf.split_to(take), write_timeout).await?;
            match framing {
                Framing::Length(left) => *left == 0,
                Framing::UntilClose => false,
                _ => true,
            }
        };
        if done {
            return Ok(sent);
        }
        let n = read_more(src, buf, timeout)
            .await
            .map_err(RelayError::Read)?;
        if n == 0 {
            if *framing == Framing::UntilClose {
                return Ok(sent);
            }
            return Err(RelayError::Read(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Writes `piece` (if any) and flushes it at once: a streamed answer (server-sent events,
/// progress) must not wait in a write buffer for bytes that come later. Returns its length.
/// With `timeout`, each write must move bytes within it (a bound on stalls, not on the piece:
/// a slow receiver that keeps reading is never cut off).
async fn pass_on<W: AsyncWrite + Unpin>(
    dst: &mut W,
    piece: &[u8],
    timeout: Option<Duration>,
) -> Result<u64, RelayError> {
    if piece.is_empty() {
        return Ok(0);
    }
    let Some(timeout) = timeout else {
        dst.write_all(piece).await.map_err(RelayError::Write)?;
        dst.flush().await.map_err(RelayError::Write)?;
        return Ok(piece.len() as u64);
    };
    let stalled = || RelayError::Write(std::io::ErrorKind::TimedOut.into());
    let mut at = 0;
    while at < piece.len() {
        match within(timeout, dst.write(&piece[at..])).await {
            Ok(Ok(0)) => return Err(RelayError::Write(std::io::ErrorKind::WriteZero.into())),
            Ok(Ok(n)) => at += n,
            Ok(Err(e)) => return Err(RelayError::Write(e)),
            Err(_) => return Err(stalled()),
        }
    }
    match within(timeout, dst.flush()).await {
        Ok(r) => r.map_err(RelayError::Write)?,
        Err(_) => return Err(stalled()),
    }
    Ok(piece.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::super::chunked::{MAX_EXTENSION, MAX_TRAILERS};
    use super::*;

    /// Decodes `input` whole: bytes taken, done, and the re-encoded output.
    fn follow(input: &[u8], how: Out) -> Result<(usize, bool, Vec<u8>), BadChunk> {
        let mut f = Framing::Chunked(Chunked::default());
        let mut out = Vec::new();
        let (n, done) = f.take_into(input, &mut out, how)?;
        Ok((n, done, out))
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        let body = b"5\r\nhello\r\n1A;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n";
        let mut with_next = body.to_vec();
        with_next.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (n, done, out) = follow(&with_next, Out::Chunked).unwrap();
        assert_eq!((n, done), (body.len(), true));
        assert_eq!(
            out,
            b"5\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n"
        );
        assert_eq!(
            follow(b"0\r\n\r\n", Out::Chunked).unwrap(),
            (5, true, b"0\r\n\r\n".to_vec())
        );
    }

    #[test]
    fn a_chunked_body_can_arrive_a_byte_at_a_time() {
        let body = b"3\r\nabc\r\n0\r\nA: b\r\n\r\n";
        let mut f = Framing::Chunked(Chunked::default());
        let mut out = Vec::new();
        for (i, b) in body.iter().enumerate() {
            let (n, done) = f
                .take_into(std::slice::from_ref(b), &mut out, Out::Chunked)
                .unwrap();
            assert_eq!((n, done), (1, i == body.len() - 1), "at {i}");
        }
        assert_eq!(out, b"1\r\na\r\n1\r\nb\r\n1\r\nc\r\n0\r\nA: b\r\n\r\n");
    }

    #[test]
    fn broken_chunk_framing_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"3\nabc",
            b"3\r\nabcX",
            b"3\r\nabc\n",
            b"ffffffffffffffff0\r\n",
            b"\r\n",
            b"-1\r\n",
            b"3 x\r\n",
            b"3;a\nb\r\n",
            b"3;a\x00\r\n",
            b"0\r\n\n",
            b"0\r\nX: y\n\n",
            b"0\r\nX: y\r\r\n",
            b"0\r\n\r\r",
        ] {
            assert!(
                follow(bad, Out::Chunked).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut huge = b"1;".to_vec();
        huge.resize(MAX_EXTENSION + 3, b'a');
        assert!(follow(&huge, Out::Chunked).is_err());
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_TRAILERS + 10 {
            trailers.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(follow(&trailers, Out::Chunked).is_err());
    }

    #[test]
    fn trailers_carry_no_framing_and_no_malformed_lines() {
        let body = b"0\r\nContent-Length: 5\r\nX-Ok: yes\r\nTransfer-Encoding: chunked\r\n\
                     Bad Name: 1\r\nHost: evil\r\nNoColon\r\n\r\n";
        let (_, done, out) = follow(body, Out::Chunked).unwrap();
        assert!(done);
        assert_eq!(out, b"0\r\nX-Ok: yes\r\n\r\n");
    }

    #[test]
    fn sizes_with_leading_zeros_and_whitespace_before_extensions_are_read() {
        let (_, done, out) = follow(b"0003 ;a=b\r\nabc\r\n00\r\n\r\n", Out::Plain).unwrap();
        assert!(done);
        assert_eq!(out, b"abc");
    }

    #[tokio::test]
    async fn dechunk_passes_on_only_the_chunk_data() {
        let wire = b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: 1\r\n\r\nNEXT";
        // Split at every position: the first part already read, the rest from the socket.
        for at in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..at]);
            let mut src: &[u8] = &wire[at..];
            let mut out = Vec::new();
            let mut f = Framing::Chunked(Chunked::default());
            let n = relay(
                &mut f,
                Out::Plain,
                &mut buf,
                &mut src,
                &mut out,
                Duration::from_secs(1),
                None,
            )
            .await
            .unwrap();
            assert_eq!((n, &out[..]), (11, &b"hello world"[..]), "split at {at}");
        }
    }

    #[tokio::test]
    async fn relay_stops_at_the_end_of_the_body_and_keeps_the_rest() {
        let mut buf = BytesMut::from(&b"hel"[..]);
        let mut src: &[u8] = b"lo world";
        let mut out = Vec::new();
        let mut f = Framing::Length(5);
        let n = relay(
            &mut f,
            Out::Chunked,
            &mut buf,
            &mut src,
            &mut out,
            Duration::from_secs(1),
            None,
        )
        .await
        .unwrap();
        assert_eq!((n, &out[..], &buf[..]), (5, &b"hello"[..], &b" world"[..]));

        let mut buf = BytesMut::new();
        let mut src: &[u8] = b"abc";
        let mut f = Framing::Length(5);
        let r = relay(
            &mut f,
            Out::Chunked,
            &mut buf,
            &mut src,
            &mut out,
            Duration::from_secs(1),
            None,
        )
        .await;
        assert!(matches!(r, Err(RelayError::Read(_))), "{r:?}");
    }
}
