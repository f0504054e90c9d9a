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

/// Longest chunk extension accepted on one chunk-size line.
const MAX_EXTENSION: usize = 4096;
/// Largest trailer section accepted (the field lines together).
const MAX_TRAILERS: usize = 16 * 1024;
/// Most hex digits of a chunk size (16 fill a u64).
const MAX_SIZE_DIGITS: u8 = 16;

/// Where the chunk structure of a chunked body stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunked {
    state: State,
    size: u64,
    digits: u8,
    /// Bytes of the current line's extension, or of the trailer section.
    seen: usize,
    /// The trailer section as received, while it is read (bounded by [`MAX_TRAILERS`]).
    trailers: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size.
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeWs,
    /// Chunk extensions, up to the CR.
    Extension,
    /// The LF after a chunk size line's CR.
    SizeLf,
    /// Chunk data; `size` bytes remain.
    Data,
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// The start of a trailer line (a CRLF here ends the body).
    TrailerStart,
    /// Inside a trailer field line, up to its CR.
    TrailerLine,
    /// The LF after a trailer line's CR.
    TrailerLf,
    /// The LF of the final CRLF.
    EndLf,
    Done,
}

/// A chunked body that breaks the grammar or a bound.
#[derive(Debug, PartialEq, Eq)]
pub struct BadChunk(pub &'static str);

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size,
            size: 0,
            digits: 0,
            seen: 0,
            trailers: Vec::new(),
        }
    }
}

/// What the decoder found in the bytes it was given.
pub enum Piece<'a> {
    /// Chunk data.
    Data(&'a [u8]),
    /// The end of the body, with its trailer section (field lines, each ending in CRLF).
    End(&'a [u8]),
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Follows `bytes` and returns how many of them belong to the body: all of them, or fewer
    /// when the body ends inside `bytes`. Hands `piece` the chunk data and, at the end, the
    /// trailer section.
    pub fn decode(
        &mut self,
        bytes: &[u8],
        mut piece: impl FnMut(Piece<'_>),
    ) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < bytes.len() && self.state != State::Done {
            let b = bytes[i];
            match self.state {
                State::Data => {
                    let take = usize::try_from(self.size)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    piece(Piece::Data(&bytes[i..i + take]));
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::Size => match hex(b) {
                    Some(d) => {
                        self.digits += 1;
                        if self.digits > MAX_SIZE_DIGITS {
                            return Err(BadChunk("chunk size of more than 16 hex digits"));
                        }
                        self.size = (self.size << 4) | u64::from(d);
                    }
                    None if self.digits == 0 => return Err(BadChunk("chunk size missing")),
                    None => self.after_size(b)?,
                },
                State::SizeWs => self.after_size(b)?,
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => {
                        self.seen += 1;
                        if self.seen > MAX_EXTENSION {
                            return Err(BadChunk("chunk extension too long"));
                        }
                    }
                    _ => return Err(BadChunk("control byte in a chunk extension")),
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(BadChunk("chunk size line not ended by CRLF"));
                    }
                    self.digits = 0;
                    self.seen = 0;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(BadChunk("chunk data not followed by CRLF"));
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(BadChunk("chunk data not followed by CRLF"));
                    }
                    self.size = 0;
                    self.state = State::Size;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else {
                        self.state = State::TrailerLine;
                        self.trailer_byte(b)?;
                    }
                }
                State::TrailerLine => {
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    }
                    self.trailer_byte(b)?;
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(BadChunk("trailer line not ended by CRLF"));
                    }
                    self.trailer_byte(b)?;
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(BadChunk("chunked body not ended by CRLF"));
                    }
                    self.state = State::Done;
                    piece(Piece::End(&self.trailers));
                    self.trailers = Vec::new();
                }
                State::Done => break,
            }
            i += 1;
        }
        Ok(i)
    }

    /// A byte after at least one size digit: whitespace, the extension's `;`, or the CR.
    fn after_size(&mut self, b: u8) -> Result<(), BadChunk> {
        match b {
            b'\r' => self.state = State::SizeLf,
            b';' => self.state = State::Extension,
            b' ' | b'\t' => self.state = State::SizeWs,
            _ => return Err(BadChunk("bad byte after a chunk size")),
        }
        Ok(())
    }

    fn trailer_byte(&mut self, b: u8) -> Result<(), BadChunk> {
        if b == b'\n' && self.state != State::TrailerLf {
            return Err(BadChunk("bare LF in the trailer section"));
        }
        if self.trailers.len() >= MAX_TRAILERS {
            return Err(BadChunk("trailer section too large"));
        }
        self.trailers.push(b);
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Trailer fields that must not be sent on: framing, routing and connection control.
const DROPPED_TRAILERS: [&[u8]; 9] = [
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"trailer",
    b"connection",
    b"keep-alive",
    b"te",
    b"upgrade",
    b"proxy-connection",
];

/// Whether a trailer field `name` must not be sent on (framing, routing, connection control).
pub fn is_dropped_trailer(name: &[u8]) -> bool {
    DROPPED_TRAILERS
        .iter()
        .any(|d| name.eq_ignore_ascii_case(d))
}

/// Appends the well-formed, allowed fields of a trailer section to `out`, each as
/// `name: value\r\n`. A line that is not `token ":" OWS field-value OWS` is dropped.
pub fn write_trailers(section: &[u8], out: &mut Vec<u8>) {
    for line in section.split(|b| *b == b'\n') {
        let Some(line) = line.strip_suffix(b"\r") else {
            continue;
        };
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        let name_ok = !name.is_empty() && name.iter().all(|b| is_tchar(*b));
        let value_ok = value
            .iter()
            .all(|b| matches!(b, b'\t' | b' '..=b'~' | 0x80..=0xff));
        if !name_ok
            || !value_ok
            || DROPPED_TRAILERS
                .iter()
                .any(|d| name.eq_ignore_ascii_case(d))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
}

/// A token character (RFC 9110 §5.6.2).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Appends one chunk holding `data` (nothing for empty data: a zero-size chunk would end the
/// body).
fn write_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    let mut size = [0u8; 16];
    let mut n = data.len();
    let mut at = size.len();
    while n > 0 || at == size.len() {
        at -= 1;
        size[at] = b"0123456789abcdef"[n & 15];
        n >>= 4;
    }
    out.extend_from_slice(&size[at..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
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
    /// Writing it on failed.
    Write(std::io::Error),
    /// The body broke the chunked grammar.
    Malformed(BadChunk),
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
    match tokio::time::timeout(timeout, src.read_buf(buf)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "read timed out",
        )),
    }
}

/// Moves the body framed by `framing` from `buf` (bytes already read) and then `src` to `dst`,
/// chunked bodies written as `how` says. Bytes after the body's end stay in `buf`. Returns the
/// body bytes written. `timeout` bounds each read.
pub async fn relay<R, W>(
    framing: &mut Framing,
    how: Out,
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
    let mut out = Vec::new();
    loop {
        let done = if let Framing::Chunked(_) = framing {
            out.clear();
            let (take, done) = framing
                .take_into(buf, &mut out, how)
                .map_err(RelayError::Malformed)?;
            let _ = buf.split_to(take);
            sent += pass_on(dst, &out).await?;
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
            sent += pass_on(dst, &buf.split_to(take)).await?;
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
        )
        .await;
        assert!(matches!(r, Err(RelayError::Read(_))), "{r:?}");
    }
}
