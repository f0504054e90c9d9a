//! HTTP/1.1 message heads from untrusted peers: parsing a request head from a client and a
//! response head from a Pod, and deciding from their fields how long each body is (RFC 9112
//! §6.3) — or that the framing is ambiguous and the message must be refused.
//!
//! Everything here is a pure function of bytes, so it is fuzzed as a whole
//! (`gateway/src/proxy/h1/props.rs`). Field positions are kept as ranges into the head's own
//! buffer; a range is only ever made from a slice that lies inside that buffer ([`inside`]), so
//! no input can produce an out-of-bounds index (httparse hands back a static `""` for a missing
//! or non-ASCII reason phrase, which is not inside anything).

use bytes::{Bytes, BytesMut};
use http::Method;
use std::mem::MaybeUninit;
use std::ops::Range;

/// The largest request or response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one head. httparse gets that many slots uninitialised (it writes
/// every one it hands back): zeroing 128 slots (4 KiB) cost ~400 instructions per head, twice
/// per proxied request (callgrind, issue 25).
pub const MAX_HEADERS: usize = 128;

/// A parsed request head. Ranges point into `raw`.
#[derive(Debug)]
pub struct Request {
    pub raw: Bytes,
    pub method: Method,
    pub target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<(Range<usize>, Range<usize>)>,
}

impl Request {
    pub fn target(&self) -> &str {
        std::str::from_utf8(&self.raw[self.target.clone()]).unwrap_or("")
    }

    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        fields(&self.raw, &self.headers)
    }
}

/// A parsed response head. Ranges point into `raw`.
#[derive(Debug)]
pub struct Response {
    pub raw: Bytes,
    pub status: u16,
    pub minor: u8,
    /// The reason phrase, when the Pod sent a printable one.
    pub reason: Option<Range<usize>>,
    pub headers: Vec<(Range<usize>, Range<usize>)>,
}

impl Response {
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        fields(&self.raw, &self.headers)
    }

    pub fn reason(&self) -> &[u8] {
        self.reason.clone().map_or(&[][..], |r| &self.raw[r])
    }
}

fn fields<'a>(
    raw: &'a [u8],
    ranges: &'a [(Range<usize>, Range<usize>)],
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    ranges
        .iter()
        .map(|(n, v)| (&raw[n.clone()], &raw[v.clone()]))
}

/// The range of `part` within `base`, if `part` lies inside it.
pub fn inside(base: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= base.len()).then_some(start..end)
}

/// The name and value ranges of parsed fields within `buf`; `None` if one lies outside it.
fn field_ranges(
    buf: &[u8],
    fields: &[httparse::Header<'_>],
) -> Option<Vec<(Range<usize>, Range<usize>)>> {
    fields
        .iter()
        .map(|h| Some((inside(buf, h.name.as_bytes())?, inside(buf, h.value)?)))
        .collect()
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The status to answer (for a request) — 400, 431, 501…
    pub status: u16,
    pub why: &'static str,
}

const fn refused(status: u16, why: &'static str) -> Refused {
    Refused { status, why }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while incomplete. On success the
/// head's bytes are split off `buf`.
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<Request>, Refused> {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(refused(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(refused(431, "too many header fields")),
        Err(_) => return Err(refused(400, "malformed request head")),
    };
    if len > MAX_HEAD {
        return Err(refused(431, "request head too large"));
    }
    let bad = refused(400, "malformed request head");
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| bad)?;
    let target = inside(buf, req.path.unwrap_or("").as_bytes()).ok_or(bad)?;
    let minor = req.version.ok_or(bad)?;
    let headers = field_ranges(buf, req.headers).ok_or(bad)?;
    Ok(Some(Request {
        raw: buf.split_to(len).freeze(),
        method,
        target,
        minor,
        headers,
    }))
}

/// Parses a response head at the start of `buf`: `Ok(None)` while incomplete.
pub fn parse_response(buf: &mut BytesMut) -> Result<Option<Response>, &'static str> {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err("response head too large")
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed response head"),
    };
    if len > MAX_HEAD {
        return Err("response head too large");
    }
    let bad = "malformed response head";
    let status = resp.code.ok_or(bad)?;
    if !(100..=999).contains(&status) {
        return Err("status code below 100");
    }
    let minor = resp.version.ok_or(bad)?;
    let reason = resp
        .reason
        .filter(|r| !r.is_empty() && r.bytes().all(|b| matches!(b, b'\t' | b' '..=b'~')))
        .and_then(|r| inside(buf, r.as_bytes()));
    let headers = field_ranges(buf, resp.headers).ok_or(bad)?;
    Ok(Some(Response {
        raw: buf.split_to(len).freeze(),
        status,
        minor,
        reason,
        headers,
    }))
}

/// How a message says its body is framed, checked (RFC 9112 §6.1–§6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// Neither `Content-Length` nor `Transfer-Encoding`.
    None,
    Length(u64),
    Chunked,
}

/// What the proxy needs from a head's fields, gathered in one pass.
#[derive(Default, Debug)]
pub struct HeadInfo<'a> {
    /// Every `Host` field value (a request must have exactly one).
    pub host: Option<&'a [u8]>,
    pub hosts: u8,
    content_length: Option<u64>,
    content_lengths: u32,
    /// Content-Length values disagree or do not parse.
    bad_length: bool,
    /// `Transfer-Encoding` lines seen, and whether all of them together are exactly `chunked`.
    transfer_encodings: u32,
    chunked: bool,
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade_token: bool,
    /// An `Upgrade` field.
    pub upgrade: bool,
    /// An `Upgrade` field offering `h2c`, which podgate never tunnels: h2 spoken straight to a
    /// Pod would bypass routing for every later request on the connection ("h2c smuggling").
    pub h2c: bool,
    pub expect_continue: bool,
    pub request_id: Option<&'a [u8]>,
    pub forwarded_for: Option<&'a [u8]>,
    /// Headers named in `Connection` (hop-by-hop), besides the standard tokens. Names of framing
    /// and routing fields are never taken: no `Connection` option removes `Content-Length`,
    /// `Transfer-Encoding` or `Host`.
    pub named: Vec<&'a [u8]>,
}

/// Fields a `Connection` option cannot make hop-by-hop.
const PROTECTED: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"host"];

impl<'a> HeadInfo<'a> {
    pub fn gather(headers: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut i = HeadInfo::default();
        for (name, value) in headers {
            match name.len() {
                4 if name.eq_ignore_ascii_case(b"host") => {
                    i.hosts = i.hosts.saturating_add(1);
                    i.host = Some(value);
                }
                14 if name.eq_ignore_ascii_case(b"content-length") => {
                    // A list (`5, 5`) is accepted only as repeats of one number, as RFC 9110
                    // §8.6 allows; requests refuse repeats altogether (see `request_length`).
                    for part in value.split(|b| *b == b',') {
                        i.content_lengths += 1;
                        match parse_length(part.trim_ascii()) {
                            Some(n) if i.content_length.is_none_or(|m| m == n) => {
                                i.content_length = Some(n)
                            }
                            _ => i.bad_length = true,
                        }
                    }
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    i.transfer_encodings += 1;
                    i.chunked = i.transfer_encodings == 1 && value.eq_ignore_ascii_case(b"chunked");
                }
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                        if token.eq_ignore_ascii_case(b"close") {
                            i.close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            i.keep_alive = true;
                        } else if token.eq_ignore_ascii_case(b"upgrade") {
                            i.upgrade_token = true;
                        } else if !token.is_empty()
                            && !PROTECTED.iter().any(|p| token.eq_ignore_ascii_case(p))
                        {
                            i.named.push(token);
                        }
                    }
                }
                7 if name.eq_ignore_ascii_case(b"upgrade") => {
                    i.upgrade = true;
                    i.h2c |= value
                        .split(|b| *b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"));
                }
                6 if name.eq_ignore_ascii_case(b"expect") => {
                    i.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
                }
                12 if name.eq_ignore_ascii_case(b"x-request-id") => i.request_id = Some(value),
                15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => {
                    i.forwarded_for = Some(value)
                }
                _ => {}
            }
        }
        i
    }

    /// An upgrade asked for as RFC 9110 §7.8 says (`Connection: upgrade` too), to anything but
    /// h2c.
    pub fn upgrading(&self) -> bool {
        self.upgrade_token && self.upgrade && !self.h2c
    }

    /// The length of a request body, or why the request must be refused (and the connection
    /// closed): the framing cannot be trusted to mean the same to every parser.
    pub fn request_length(&self, minor: u8) -> Result<BodyLength, Refused> {
        if self.transfer_encodings > 0 {
            if minor == 0 {
                return Err(refused(400, "Transfer-Encoding in an HTTP/1.0 request"));
            }
            if self.content_lengths > 0 {
                return Err(refused(400, "both Content-Length and Transfer-Encoding"));
            }
            if !self.chunked {
                return Err(refused(501, "a Transfer-Encoding other than chunked"));
            }
            return Ok(BodyLength::Chunked);
        }
        if self.content_lengths > 1 || self.bad_length {
            return Err(refused(400, "a bad or repeated Content-Length"));
        }
        Ok(self
            .content_length
            .map_or(BodyLength::None, BodyLength::Length))
    }

    /// The length of a response body as the Pod framed it, or why the answer cannot be trusted.
    pub fn response_length(&self, minor: u8) -> Result<BodyLength, &'static str> {
        if self.transfer_encodings > 0 {
            if minor == 0 {
                return Err("Transfer-Encoding in an HTTP/1.0 response");
            }
            if self.content_lengths > 0 {
                return Err("both Content-Length and Transfer-Encoding");
            }
            if !self.chunked {
                return Err("a Transfer-Encoding other than chunked");
            }
            return Ok(BodyLength::Chunked);
        }
        if self.bad_length {
            return Err("a bad or conflicting Content-Length");
        }
        Ok(self
            .content_length
            .map_or(BodyLength::None, BodyLength::Length))
    }

    /// Whether the field `name` must not be passed on: framing (podgate writes its own),
    /// hop-by-hop, or set by podgate.
    pub fn drops(&self, name: &[u8], upgrading: bool) -> bool {
        const ALWAYS: [&[u8]; 13] = [
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"expect",
            b"content-length",
            b"transfer-encoding",
            b"host",
            b"x-forwarded-for",
            b"x-forwarded-proto",
            b"x-forwarded-host",
            b"x-request-id",
        ];
        ALWAYS.iter().any(|h| name.eq_ignore_ascii_case(h))
            || (!upgrading && name.eq_ignore_ascii_case(b"upgrade"))
            || self.named.iter().any(|h| name.eq_ignore_ascii_case(h))
    }
}

/// A Content-Length value: 1 to 19 ASCII digits (fits a u64).
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(head: &'static [u8]) -> HeadInfo<'static> {
        let mut buf = BytesMut::from(head);
        let req = parse_request(&mut buf).unwrap().unwrap();
        let req: &'static Request = Box::leak(Box::new(req));
        HeadInfo::gather(req.headers())
    }

    #[test]
    fn request_framing_is_decided_strictly() {
        let len = |h: &'static [u8]| info(h).request_length(1).map_err(|r| r.status);
        assert_eq!(
            len(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(BodyLength::None)
        );
        assert_eq!(
            len(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Ok(BodyLength::Length(5))
        );
        assert_eq!(
            len(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(BodyLength::Chunked)
        );
        for (bad, status) in [
            (&b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"[..], 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: \"chunked\"\r\n\r\n", 501),
        ] {
            assert_eq!(len(bad), Err(status), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            info(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n")
                .request_length(0)
                .map_err(|r| r.status),
            Err(400)
        );
    }

    #[test]
    fn response_framing_accepts_repeats_of_one_length_only() {
        let resp = |h: &'static [u8]| {
            let mut buf = BytesMut::from(h);
            let r: &'static Response =
                Box::leak(Box::new(parse_response(&mut buf).unwrap().unwrap()));
            HeadInfo::gather(r.headers()).response_length(r.minor)
        };
        assert_eq!(
            resp(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            Ok(BodyLength::Length(5))
        );
        assert!(
            resp(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").is_err()
        );
        assert!(resp(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n").is_err());
        assert!(resp(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .is_err());
        assert!(resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").is_err());
        assert!(resp(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn connection_options_cannot_name_framing_or_host() {
        let i = info(
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, transfer-encoding, HOST, x-a\r\n\
              Content-Length: 1\r\n\r\n",
        );
        assert_eq!(i.named, vec![&b"x-a"[..]]);
        assert_eq!(i.request_length(1), Ok(BodyLength::Length(1)));
    }

    #[test]
    fn a_missing_or_odd_reason_phrase_is_no_range() {
        for (head, reason) in [
            (&b"HTTP/1.1 200\r\n\r\n"[..], &b""[..]),
            (b"HTTP/1.1 200 \r\n\r\n", b""),
            (b"HTTP/1.1 200 \xe4\xf6\r\n\r\n", b""),
            (b"HTTP/1.1 404 Not Here\r\n\r\n", b"Not Here"),
        ] {
            let mut buf = BytesMut::from(head);
            let r = parse_response(&mut buf).unwrap().unwrap();
            assert_eq!(r.reason(), reason, "{}", String::from_utf8_lossy(head));
        }
    }
}
