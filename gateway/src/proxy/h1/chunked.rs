//! The chunked transfer coding (RFC 9112 §7.1), followed strictly: CRLF only, at most 16 size
//! digits, bounded extensions and trailer section. `body.rs` decides when a body is chunked and
//! re-encodes what this decoder hands it; the bounds and the grammar live here.

/// Longest chunk extension accepted on one chunk-size line.
pub(super) const MAX_EXTENSION: usize = 4096;
/// Largest trailer section accepted (the field lines together).
pub(super) const MAX_TRAILERS: usize = 16 * 1024;
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
pub(super) fn write_chunk(data: &[u8], out: &mut Vec<u8>) {
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
