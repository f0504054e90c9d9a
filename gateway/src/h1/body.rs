//! HTTP/1.1 message bodies as the proxy passes them on: how long a body is (its framing), and
//! moving exactly that many bytes from one side to the other, verbatim.
//!
//! Chunked bodies are not re-encoded: the decoder only follows the chunk structure to find where
//! the message ends, so that bytes of a next (pipelined) message are never sent along. The one
//! exception is an answer to an HTTP/1.0 client, which cannot read chunks: [`Framing::Dechunk`]
//! passes on only the chunk data, and the end of the connection ends the body.

use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How a message body is delimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, followed through [`Chunked`].
    Chunked(Chunked),
    /// Chunked on the way in; only the chunk data goes on (to an HTTP/1.0 client).
    Dechunk(Chunked),
    /// Everything until the sender closes (responses without length only).
    UntilClose,
}

/// Where the chunk structure of a chunked body stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunked {
    state: State,
    size: u64,
    digits: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size.
    Size,
    /// Chunk extensions, up to the LF.
    Extension,
    /// The LF after a chunk size line's CR.
    SizeLf,
    /// Chunk data; `size` bytes remain.
    Data,
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// The start of a trailer line (a bare CRLF here ends the body).
    TrailerStart,
    /// Inside a trailer field line, up to its LF.
    TrailerLine,
    /// The LF of the final CRLF.
    EndLf,
    Done,
}

/// A chunked body that breaks the grammar.
#[derive(Debug, PartialEq, Eq)]
pub struct BadChunk;

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size,
            size: 0,
            digits: 0,
        }
    }
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Follows `bytes` and returns how many of them belong to the body: all of them, or fewer
    /// when the body ends inside `bytes`.
    pub fn advance(&mut self, bytes: &[u8]) -> Result<usize, BadChunk> {
        self.advance_data(bytes, |_| {})
    }

    /// Like [`Chunked::advance`], and hands `data` each range of `bytes` that is chunk data.
    pub fn advance_data(
        &mut self,
        bytes: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < bytes.len() && self.state != State::Done {
            let b = bytes[i];
            match self.state {
                State::Data => {
                    let take = (self.size as usize).min(bytes.len() - i);
                    data(i..i + take);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::Size => match (b as char).to_digit(16) {
                    Some(d) => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(BadChunk);
                        }
                        self.size = self.size * 16 + u64::from(d);
                    }
                    None if self.digits == 0 => return Err(BadChunk),
                    None => match b {
                        b'\r' => self.state = State::SizeLf,
                        b';' | b' ' | b'\t' => self.state = State::Extension,
                        _ => return Err(BadChunk),
                    },
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(BadChunk),
                    _ => {}
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.digits = 0;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(BadChunk);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = State::Size;
                }
                State::TrailerStart => {
                    self.state = if b == b'\r' {
                        State::EndLf
                    } else {
                        State::TrailerLine
                    };
                }
                State::TrailerLine => {
                    if b == b'\n' {
                        self.state = State::TrailerStart;
                    }
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = State::Done;
                }
                State::Done => unreachable!("loop condition"),
            }
            i += 1;
        }
        Ok(i)
    }
}

impl Framing {
    /// Counts the leading bytes of `buf` that belong to the body as consumed and returns how
    /// many they are, and whether the body ends there.
    pub fn take(&mut self, buf: &[u8]) -> Result<(usize, bool), BadChunk> {
        Ok(match self {
            Framing::Empty => (0, true),
            Framing::Length(left) => {
                let take = (*left).min(buf.len() as u64) as usize;
                *left -= take as u64;
                (take, *left == 0)
            }
            Framing::Chunked(c) | Framing::Dechunk(c) => {
                let take = c.advance(buf)?;
                (take, c.is_done())
            }
            Framing::UntilClose => (buf.len(), false),
        })
    }

    /// Like [`Framing::take`], and appends to `out` what of those bytes goes on: all of them, or
    /// for [`Framing::Dechunk`] only the chunk data.
    pub fn take_into(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), BadChunk> {
        if let Framing::Dechunk(c) = self {
            let take = c.advance_data(buf, |r| out.extend_from_slice(&buf[r]))?;
            return Ok((take, c.is_done()));
        }
        let (take, done) = self.take(buf)?;
        out.extend_from_slice(&buf[..take]);
        Ok((take, done))
    }
}

/// Which side of a relay failed.
#[derive(Debug)]
pub enum RelayError {
    /// Reading the body failed, timed out, or the sender closed before the end.
    Read(std::io::Error),
    /// Writing it on failed.
    Write(std::io::Error),
    /// The body broke the chunked grammar.
    Malformed,
}

/// Reads more into `buf`, within `timeout`; 0 means the other side closed.
pub async fn read_more<R: AsyncRead + Unpin>(
    src: &mut R,
    buf: &mut BytesMut,
    timeout: Duration,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    match tokio::time::timeout(timeout, src.read_buf(buf)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "read timed out",
        )),
    }
}

/// Moves the body framed by `framing` from `buf` (bytes already read) and then `src` to `dst`.
/// Bytes after the body's end stay in `buf`. Returns the body bytes written.
pub async fn relay<R, W>(
    framing: &mut Framing,
    buf: &mut BytesMut,
    src: &mut R,
    dst: &mut W,
    timeout: Duration,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut sent = 0u64;
    let mut data = Vec::new();
    loop {
        let done = if let Framing::Dechunk(_) = framing {
            data.clear();
            let (take, done) = framing
                .take_into(buf, &mut data)
                .map_err(|_| RelayError::Malformed)?;
            let _ = buf.split_to(take);
            sent += pass_on(dst, &data).await?;
            done
        } else {
            let (take, done) = framing.take(buf).map_err(|_| RelayError::Malformed)?;
            sent += pass_on(dst, &buf.split_to(take)).await?;
            done
        };
        if done {
            return Ok(sent);
        }
        buf.clear();
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
async fn pass_on<W: AsyncWrite + Unpin>(dst: &mut W, piece: &[u8]) -> Result<u64, RelayError> {
    if !piece.is_empty() {
        dst.write_all(piece).await.map_err(RelayError::Write)?;
        dst.flush().await.map_err(RelayError::Write)?;
    }
    Ok(piece.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follow(input: &[u8]) -> (usize, bool) {
        let mut c = Chunked::default();
        let n = c.advance(input).unwrap();
        (n, c.is_done())
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        let body = b"5\r\nhello\r\n1A;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n";
        let mut with_next = body.to_vec();
        with_next.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(follow(&with_next), (body.len(), true));
        assert_eq!(follow(b"0\r\n\r\n"), (5, true));
    }

    #[test]
    fn a_chunked_body_can_arrive_a_byte_at_a_time() {
        let body = b"3\r\nabc\r\n0\r\n\r\n";
        let mut c = Chunked::default();
        for (i, b) in body.iter().enumerate() {
            assert!(!c.is_done(), "done early at {i}");
            assert_eq!(c.advance(std::slice::from_ref(b)), Ok(1));
        }
        assert!(c.is_done());
    }

    #[test]
    fn broken_chunk_framing_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"3\nabc",
            b"3\r\nabcX",
            b"ffffffffffffffff0\r\n",
            b"\r\n",
        ] {
            assert_eq!(
                Chunked::default().advance(bad),
                Err(BadChunk),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn dechunk_passes_on_only_the_chunk_data() {
        let wire = b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: 1\r\n\r\nNEXT";
        // Split at every position: the first part already read, the rest from the socket.
        for at in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..at]);
            let mut src: &[u8] = &wire[at..];
            let mut out = Vec::new();
            let mut f = Framing::Dechunk(Chunked::default());
            let n = relay(&mut f, &mut buf, &mut src, &mut out, Duration::from_secs(1))
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
        let n = relay(&mut f, &mut buf, &mut src, &mut out, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!((n, &out[..], &buf[..]), (5, &b"hello"[..], &b" world"[..]));

        let mut buf = BytesMut::new();
        let mut src: &[u8] = b"abc";
        let mut f = Framing::Length(5);
        let r = relay(&mut f, &mut buf, &mut src, &mut out, Duration::from_secs(1)).await;
        assert!(matches!(r, Err(RelayError::Read(_))), "{r:?}");
    }
}
