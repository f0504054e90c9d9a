//! HTTP/1.1 on the wire, byte for byte, on both sides of podgate: a raw client that reads what
//! podgate answered, a raw Pod that records every byte podgate sent it and answers with scripted
//! bytes, and one strict parser that both use to read what *podgate wrote*.
//!
//! The parser is deliberately stricter than RFC 9112 lets a recipient be: CRLF only, no obs-fold,
//! exactly one framing header, `Transfer-Encoding` exactly `chunked`, no chunk extensions. podgate
//! writes every head and every framing it forwards itself, so anything this parser refuses in
//! podgate's output is a message some Pod or client could read differently from podgate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long one read on loopback may take before the peer counts as silent. Generous for a
/// loaded 2-core machine; only a broken case ever waits this long.
pub const WIRE_WAIT: Duration = Duration::from_secs(5);

/// Header fields as read: names lowercased, values trimmed of optional whitespace.
pub type Fields = Vec<(String, String)>;

/// How a message body was delimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framed {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closed (responses only).
    Close,
}

/// One message as the strict parser read it.
#[derive(Clone, Debug)]
pub struct Message {
    /// The request line or the status line, without its CRLF.
    pub start: String,
    pub headers: Fields,
    pub framing: Framed,
    pub body: Vec<u8>,
    pub trailers: Fields,
}

impl Message {
    /// The status code of a response (0 if the status line is not one).
    pub fn status(&self) -> u16 {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    pub fn method(&self) -> &str {
        self.start.split(' ').next().unwrap_or("")
    }

    pub fn target(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or("")
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The next CRLF-ended line at `buf[from..]`: `Ok(None)` while incomplete; a bare LF or a CR
/// inside the line is an error.
fn next_line(buf: &[u8], from: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[from.min(buf.len())..];
    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
        // A CR followed by anything but LF is a bare CR, even before the line is complete.
        if let Some(cr) = rest.iter().position(|&b| b == b'\r') {
            if cr + 1 < rest.len() {
                return Err(format!("bare CR at byte {}", from + cr));
            }
        }
        return Ok(None);
    };
    if lf == 0 || rest[lf - 1] != b'\r' {
        return Err(format!("bare LF at byte {}", from + lf));
    }
    let line = &rest[..lf - 1];
    if let Some(cr) = line.iter().position(|&b| b == b'\r') {
        return Err(format!("bare CR at byte {}", from + cr));
    }
    Ok(Some((line, from + lf + 1)))
}

/// One `name: value` field line.
fn field(line: &[u8]) -> Result<(String, String), String> {
    let show = || String::from_utf8_lossy(line).into_owned();
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return Err(format!("obs-fold line {:?}", show()));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| format!("field line without a colon: {:?}", show()))?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(format!("bad field name in {:?}", show()));
    }
    let value = line[colon + 1..].trim_ascii();
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(format!("control byte in field value {:?}", show()));
    }
    Ok((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// A head at the start of `buf`: start line, fields, and the length of the head.
pub fn parse_head(buf: &[u8]) -> Result<Option<(String, Fields, usize)>, String> {
    let Some((start, mut at)) = next_line(buf, 0)? else {
        return Ok(None);
    };
    if start.is_empty() {
        return Err("empty start line".into());
    }
    if start.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(format!(
            "control byte in start line {:?}",
            String::from_utf8_lossy(start)
        ));
    }
    let start = String::from_utf8_lossy(start).into_owned();
    let mut fields = Vec::new();
    loop {
        let Some((line, next)) = next_line(buf, at)? else {
            return Ok(None);
        };
        at = next;
        if line.is_empty() {
            return Ok(Some((start, fields, at)));
        }
        fields.push(field(line)?);
    }
}

/// The `Content-Length` and whether `Transfer-Encoding: chunked` is set; anything ambiguous is
/// an error.
fn framing_fields(fields: &Fields) -> Result<(Option<u64>, bool), String> {
    let cls: Vec<&str> = fields
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    let tes: Vec<&str> = fields
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .map(|(_, v)| v.as_str())
        .collect();
    if cls.len() > 1 {
        return Err(format!("several Content-Length fields {cls:?}"));
    }
    if tes.len() > 1 {
        return Err(format!("several Transfer-Encoding fields {tes:?}"));
    }
    if !cls.is_empty() && !tes.is_empty() {
        return Err("Content-Length and Transfer-Encoding".into());
    }
    if let Some(te) = tes.first() {
        if !te.eq_ignore_ascii_case("chunked") {
            return Err(format!("Transfer-Encoding {te:?}"));
        }
        return Ok((None, true));
    }
    match cls.first() {
        None => Ok((None, false)),
        Some(v) if !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()) => {
            Ok((Some(v.parse().expect("19 digits fit")), false))
        }
        Some(v) => Err(format!("Content-Length {v:?}")),
    }
}

/// A chunked body at the start of `buf`: data, trailer fields, bytes used.
pub fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, Fields, usize)>, String> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let Some((line, next)) = next_line(buf, at)? else {
            return Ok(None);
        };
        let show = String::from_utf8_lossy(line);
        if line.contains(&b';') {
            return Err(format!("chunk extension passed on: {show:?}"));
        }
        if line.is_empty() || line.len() > 16 || !line.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!("bad chunk size line {show:?}"));
        }
        let size = u64::from_str_radix(std::str::from_utf8(line).unwrap(), 16).unwrap();
        at = next;
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some((line, next)) = next_line(buf, at)? else {
                    return Ok(None);
                };
                at = next;
                if line.is_empty() {
                    return Ok(Some((data, trailers, at)));
                }
                trailers.push(field(line)?);
            }
        }
        let size = usize::try_from(size).map_err(|_| "chunk size beyond memory")?;
        if buf.len() < at.saturating_add(size).saturating_add(2) {
            if buf.len() > at + size && buf[at + size] != b'\r' {
                return Err("chunk data longer than its size".into());
            }
            return Ok(None);
        }
        data.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        at += size + 2;
    }
}

/// Reads the body framed by `framing` from `buf[at..]`; `eof` says the sender closed.
#[allow(clippy::type_complexity)]
fn body(
    buf: &[u8],
    at: usize,
    framing: &Framed,
    eof: bool,
) -> Result<Option<(Vec<u8>, Fields, usize)>, String> {
    let rest = &buf[at..];
    Ok(match framing {
        Framed::None => Some((Vec::new(), Vec::new(), at)),
        Framed::Length(n) => {
            let n = usize::try_from(*n).map_err(|_| "length beyond memory")?;
            (rest.len() >= n).then(|| (rest[..n].to_vec(), Vec::new(), at + n))
        }
        Framed::Chunked => decode_chunked(rest)?.map(|(d, t, used)| (d, t, at + used)),
        Framed::Close => eof.then(|| (rest.to_vec(), Vec::new(), buf.len())),
    })
}

/// A request as podgate must write it to a Pod: `METHOD target HTTP/1.1`, strict fields, one
/// framing (or none), CRLF everywhere. Returns the request and the bytes it used.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Message, usize)>, String> {
    let Some((start, headers, at)) = parse_head(buf)? else {
        return Ok(None);
    };
    let parts: Vec<&str> = start.split(' ').collect();
    if parts.len() != 3 || parts[0].is_empty() || parts[1].is_empty() || parts[2] != "HTTP/1.1" {
        return Err(format!("bad request line {start:?}"));
    }
    let framing = match framing_fields(&headers)? {
        (_, true) => Framed::Chunked,
        (Some(n), false) => Framed::Length(n),
        (None, false) => Framed::None,
    };
    Ok(
        body(buf, at, &framing, false)?.map(|(body, trailers, used)| {
            (
                Message {
                    start,
                    headers,
                    framing,
                    body,
                    trailers,
                },
                used,
            )
        }),
    )
}

/// A response at the start of `buf`, for a request that was a HEAD if `head_only`; `eof` says
/// the sender closed (which ends a body without framing).
pub fn parse_response(
    buf: &[u8],
    head_only: bool,
    eof: bool,
) -> Result<Option<(Message, usize)>, String> {
    let Some((start, headers, at)) = parse_head(buf)? else {
        return Ok(None);
    };
    let code = start
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| start.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {start:?}"))?;
    if start.len() > 12 && start.as_bytes()[12] != b' ' {
        return Err(format!("bad status line {start:?}"));
    }
    let (length, chunked) = framing_fields(&headers)?;
    let framing = if head_only || (100..200).contains(&code) || code == 204 || code == 304 {
        Framed::None
    } else if chunked {
        Framed::Chunked
    } else if let Some(n) = length {
        Framed::Length(n)
    } else {
        Framed::Close
    };
    Ok(body(buf, at, &framing, eof)?.map(|(body, trailers, used)| {
        (
            Message {
                start,
                headers,
                framing,
                body,
                trailers,
            },
            used,
        )
    }))
}

/// Shows bytes as a Rust byte string, for assertion messages.
pub fn show(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

// ------------------------------------------------------------------------------------------
// The client side.

/// What the client read as the next answer.
#[derive(Debug)]
pub enum Got {
    Answer(Message),
    /// The connection ended with no byte of an answer.
    Closed,
    /// The connection ended inside an answer; the bytes read of it.
    Truncated(Vec<u8>),
    /// podgate wrote bytes the strict parser refuses.
    Malformed(String, Vec<u8>),
    /// Nothing ended the answer within [`WIRE_WAIT`]; the bytes read of it.
    Silent(Vec<u8>),
}

/// A raw client connection that keeps whatever it read past one answer.
pub struct RawClient {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
    pub eof: bool,
    /// Every byte read, for failure messages.
    pub transcript: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: std::net::SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("connect to podgate"),
            buf: Vec::new(),
            eof: false,
            transcript: Vec::new(),
        }
    }

    /// Writes `bytes`; an error (podgate already closed) is not one of the test's, the reads
    /// that follow show it.
    pub async fn send(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).await.is_ok() {
            let _ = self.stream.flush().await;
        }
    }

    /// Reads once more; false at the end of the stream (a reset counts as the end) or after
    /// [`WIRE_WAIT`] of silence (then `eof` stays false).
    pub async fn read_more(&mut self) -> bool {
        if self.eof {
            return false;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WIRE_WAIT, self.stream.read(&mut chunk)).await {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                false
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.transcript.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next answer (for a HEAD request if `head_only`).
    pub async fn next(&mut self, head_only: bool) -> Got {
        loop {
            match parse_response(&self.buf, head_only, self.eof) {
                Ok(Some((m, used))) => {
                    self.buf.drain(..used);
                    return Got::Answer(m);
                }
                Err(e) => return Got::Malformed(e, std::mem::take(&mut self.buf)),
                Ok(None) if self.eof && self.buf.is_empty() => return Got::Closed,
                Ok(None) if self.eof => return Got::Truncated(std::mem::take(&mut self.buf)),
                Ok(None) => {
                    if !self.read_more().await && !self.eof {
                        return Got::Silent(std::mem::take(&mut self.buf));
                    }
                }
            }
        }
    }

    /// Exactly `n` more bytes (a tunnel), or what came before the stream ended or went silent.
    pub async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n && self.read_more().await {}
        let take = n.min(self.buf.len());
        self.buf.drain(..take).collect()
    }
}

// ------------------------------------------------------------------------------------------
// The Pod side.

/// What a raw Pod does after writing a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Reads the next request on the connection.
    Keep,
    /// Closes its side (and records whatever else arrives).
    Close,
    /// Becomes a tunnel that echoes every byte upper-cased (after a 101).
    Echo,
}

/// The bytes a raw Pod writes for one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub then: Then,
}

impl Reply {
    pub fn keep(bytes: impl AsRef<[u8]>) -> Reply {
        Reply {
            bytes: bytes.as_ref().to_vec(),
            then: Then::Keep,
        }
    }

    pub fn close(bytes: impl AsRef<[u8]>) -> Reply {
        Reply {
            bytes: bytes.as_ref().to_vec(),
            then: Then::Close,
        }
    }

    pub fn echo(bytes: impl AsRef<[u8]>) -> Reply {
        Reply {
            bytes: bytes.as_ref().to_vec(),
            then: Then::Echo,
        }
    }

    /// `200` with `METHOD target` as its body: tells the client which request was answered.
    pub fn naming(req: &Message) -> Reply {
        let body = format!("{} {}", req.method(), req.target());
        Reply::keep(format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    }
}

/// Chooses the reply to the `n`th request the Pod parsed (counted over all its connections).
pub type Script = Arc<dyn Fn(usize, &Message) -> Reply + Send + Sync>;

/// Everything that happened on one connection to a raw Pod.
#[derive(Clone, Debug, Default)]
pub struct PodConn {
    /// Every byte received.
    pub raw: Vec<u8>,
    /// The complete requests parsed, in order.
    pub requests: Vec<Message>,
    /// Why the strict parser stopped (podgate wrote something malformed or ambiguous).
    pub error: Option<String>,
    /// Bytes of an incomplete request when the connection ended.
    pub leftover: Vec<u8>,
    /// Bytes received after a 101, in tunnel mode.
    pub tunnel: Vec<u8>,
    pub closed: bool,
}

/// A Pod on a raw socket that parses strictly, records, and answers by script.
pub struct RawPod {
    pub addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<PodConn>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawPod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawPod {
    pub async fn start(script: Script) -> RawPod {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<PodConn>>> = Arc::default();
        let count = Arc::new(AtomicUsize::new(0));
        let log = conns.clone();
        let task = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let index = {
                    let mut all = log.lock().unwrap();
                    all.push(PodConn::default());
                    all.len() - 1
                };
                tasks.spawn(pod_connection(
                    stream,
                    index,
                    log.clone(),
                    script.clone(),
                    count.clone(),
                ));
            }
        });
        RawPod { addr, conns, task }
    }

    /// What the Pod has seen so far.
    pub fn snapshot(&self) -> Vec<PodConn> {
        self.conns.lock().unwrap().clone()
    }

    /// Waits until every connection to the Pod has ended (the test ended podgate), within a
    /// deadline, and returns what was seen.
    pub async fn settled(&self) -> Vec<PodConn> {
        let start = Instant::now();
        loop {
            let all = self.snapshot();
            if all.iter().all(|c| c.closed) || start.elapsed() > WIRE_WAIT {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[derive(PartialEq)]
enum Mode {
    Parse,
    Tunnel,
    /// After a close or a parse error: only record.
    Record,
}

async fn pod_connection(
    mut stream: TcpStream,
    index: usize,
    log: Arc<Mutex<Vec<PodConn>>>,
    script: Script,
    count: Arc<AtomicUsize>,
) {
    let note = |f: &mut dyn FnMut(&mut PodConn)| f(&mut log.lock().unwrap()[index]);
    let mut pending = Vec::new();
    let mut mode = Mode::Parse;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while mode == Mode::Parse {
            match parse_request(&pending) {
                Ok(Some((req, used))) => {
                    pending.drain(..used);
                    let reply = script(count.fetch_add(1, Ordering::SeqCst), &req);
                    note(&mut |c| c.requests.push(req.clone()));
                    let _ = stream.write_all(&reply.bytes).await;
                    match reply.then {
                        Then::Keep => {}
                        Then::Close => {
                            let _ = stream.shutdown().await;
                            mode = Mode::Record;
                        }
                        Then::Echo => {
                            mode = Mode::Tunnel;
                            let early = std::mem::take(&mut pending);
                            note(&mut |c| c.tunnel.extend_from_slice(&early));
                            let _ = stream.write_all(&early.to_ascii_uppercase()).await;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    note(&mut |c| c.error = Some(e.clone()));
                    mode = Mode::Record;
                }
            }
        }
        // The test ends podgate, which ends every connection; the timeout only bounds a test
        // that forgot to.
        let n = match tokio::time::timeout(Duration::from_secs(60), stream.read(&mut chunk)).await {
            Ok(Ok(n)) => n,
            _ => 0,
        };
        if n == 0 {
            break;
        }
        let got = &chunk[..n];
        note(&mut |c| c.raw.extend_from_slice(got));
        match mode {
            Mode::Parse => pending.extend_from_slice(got),
            Mode::Tunnel => {
                note(&mut |c| c.tunnel.extend_from_slice(got));
                let _ = stream.write_all(&got.to_ascii_uppercase()).await;
            }
            Mode::Record => {}
        }
    }
    let rest = if mode == Mode::Parse {
        pending
    } else {
        Vec::new()
    };
    note(&mut |c| {
        c.leftover = rest.clone();
        c.closed = true;
    });
}

/// The config body (for [`super::Gateway::start`]) of one route `/` to one node, with no retry
/// (so that what a Pod receives is exactly what the client sent once).
pub fn one_pod_config(pod: std::net::SocketAddr) -> String {
    format!(
        "upstreams:\n  - {{name: pod, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: all, path_prefix: /, upstream: pod}}\n"
    )
}
