//! h2 clients to HTTP/1.1 Pods on podgate's own h2 path (`gateway/src/proxy/h2/`): what the Pod
//! receives must be one well-framed HTTP/1.1 request per h2 request, or nothing.
//!
//! The Pod here records the raw bytes of every request it is sent and parses them strictly (CRLF
//! line ends, one framing); adversarial requests are written as raw h2 frames (RFC 9113 §4.1,
//! HPACK literals of RFC 7541 §6.2.2) so that nothing smooths them over; valid ones go through
//! the `h2` crate as a client.

mod support;

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::h2_frames::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HPACK literal field without indexing, with a new name (both shorter than 127 bytes).
fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    assert!(name.len() < 127 && value.len() < 127);
    let mut b = vec![0x00, name.len() as u8];
    b.extend_from_slice(name);
    b.push(value.len() as u8);
    b.extend_from_slice(value);
    b
}

/// `:method` (GET or POST), `:scheme http`, `:authority a.test` and `:path` as a literal.
fn pseudo(post: bool, path: &[u8]) -> Vec<u8> {
    let mut b = vec![if post { 0x83 } else { 0x82 }, 0x86];
    b.extend(literal(b":authority", b"a.test"));
    b.extend(literal(b":path", path));
    b
}

/// One request as the Pod received it.
#[derive(Debug, Clone)]
struct Seen {
    /// The head, raw.
    head: String,
    body: Vec<u8>,
    /// Whether the body arrived whole as its framing said.
    complete: bool,
}

impl Seen {
    fn field(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_string())
            .collect()
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Reads until `buf` holds `n` bytes; false if the peer closed first.
async fn fill(io: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    while buf.len() < n {
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    true
}

/// Reads one CRLF-ended line from `buf` (reading more as needed).
async fn line(io: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let l = buf[..i].to_vec();
            buf.drain(..i + 2);
            return Some(l);
        }
        let have = buf.len();
        if !fill(io, buf, have + 1).await {
            return None;
        }
    }
}

/// An HTTP/1.1 Pod that records each request and answers `200 ok` (chunked for `/chunked`).
async fn recording_pod() -> (SocketAddr, Log) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log: Log = Arc::default();
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((mut io, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let have = buf.len();
                        if !fill(&mut io, &mut buf, have + 1).await {
                            if !buf.is_empty() {
                                let head = String::from_utf8_lossy(&buf).into_owned();
                                seen.lock().unwrap().push(Seen {
                                    head,
                                    body: Vec::new(),
                                    complete: false,
                                });
                            }
                            return;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    buf.drain(..head_end);
                    let mut rec = Seen {
                        head,
                        body: Vec::new(),
                        complete: true,
                    };
                    let length: Option<usize> = rec.field("content-length").first().map(|v| {
                        v.parse()
                            .expect("a content-length podgate wrote is plain digits")
                    });
                    if rec.field("transfer-encoding") == ["chunked"] {
                        loop {
                            let Some(size) = line(&mut io, &mut buf).await else {
                                rec.complete = false;
                                break;
                            };
                            let size =
                                usize::from_str_radix(std::str::from_utf8(&size).unwrap(), 16)
                                    .unwrap();
                            if !fill(&mut io, &mut buf, size + 2).await {
                                rec.complete = false;
                                break;
                            }
                            rec.body.extend_from_slice(&buf[..size]);
                            assert_eq!(&buf[size..size + 2], b"\r\n");
                            buf.drain(..size + 2);
                            if size == 0 {
                                break;
                            }
                        }
                    } else if let Some(n) = length {
                        rec.complete = fill(&mut io, &mut buf, n).await;
                        let take = n.min(buf.len());
                        rec.body = buf.drain(..take).collect();
                    }
                    let complete = rec.complete;
                    let chunked = rec.head.starts_with("GET /chunked ");
                    seen.lock().unwrap().push(rec);
                    if !complete {
                        return;
                    }
                    let answer: &[u8] = if chunked {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-pod: rec\r\n\r\nok"
                    };
                    if io.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
}

async fn h2c_gateway(pod: SocketAddr) -> Gateway {
    let conf = format!(
        "upstreams:\n  - {{name: web, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
    );
    Gateway::start_with_listener(tempfile::tempdir().unwrap(), "h2c: true", &conf).await
}

/// Every head the Pod got is well-formed HTTP/1.1: CRLF line ends only, one framing field at
/// most, lowercase or any-case names made of token characters, no field with a CR, LF or NUL.
fn assert_well_framed(seen: &[Seen]) {
    for s in seen {
        let h = s.head.as_bytes();
        for (i, b) in h.iter().enumerate() {
            assert!(*b != 0, "NUL in {:?}", s.head);
            if *b == b'\n' {
                assert!(i > 0 && h[i - 1] == b'\r', "bare LF in {:?}", s.head);
            }
            if *b == b'\r' {
                assert_eq!(h.get(i + 1), Some(&b'\n'), "bare CR in {:?}", s.head);
            }
        }
        let framing = s.field("content-length").len() + s.field("transfer-encoding").len();
        assert!(framing <= 1, "two framings in {:?}", s.head);
        assert_eq!(s.field("host").len(), 1, "one Host in {:?}", s.head);
        for l in s.head.trim_end().split("\r\n").skip(1) {
            let (name, _) = l.split_once(": ").expect("name: value");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)),
                "bad field name {name:?}"
            );
        }
    }
}

/// What the gateway did with stream 1 of a raw connection.
#[derive(Debug, PartialEq)]
enum Fate {
    /// RST_STREAM with this error code.
    Reset(u32),
    /// A HEADERS frame (an answer): whether its status is 200 (HPACK static index 8).
    Answered(bool),
    /// GOAWAY, or the connection closed.
    ConnectionEnded,
}

/// Sends `frames` on a fresh prior-knowledge connection and waits for stream 1's fate.
async fn raw(gw: &Gateway, frames: &[u8]) -> Fate {
    let mut io = TcpStream::connect(gw.addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(frame(SETTINGS, ACK, 0, &[]));
    hello.extend_from_slice(frames);
    io.write_all(&hello).await.unwrap();
    let read = async {
        let mut head = [0u8; 9];
        loop {
            if io.read_exact(&mut head).await.is_err() {
                return Fate::ConnectionEnded;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if io.read_exact(&mut payload).await.is_err() {
                return Fate::ConnectionEnded;
            }
            match (head[3], stream) {
                (RST_STREAM, 1) => {
                    return Fate::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()))
                }
                (HEADERS, 1) => return Fate::Answered(payload.first() == Some(&0x88)),
                (GOAWAY, _) => return Fate::ConnectionEnded,
                _ => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the gateway decided about stream 1 in time")
}

/// An h2 client connection (the `h2` crate).
async fn h2_client(gw: &Gateway) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    send.ready().await.unwrap()
}

/// Sends `req` with `body` (if any) and returns the status and body of the answer.
async fn call(
    send: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Option<Bytes>,
) -> (u16, Bytes, http::HeaderMap) {
    let (answer, mut stream) = send.send_request(req, body.is_none()).unwrap();
    if let Some(body) = body {
        stream.reserve_capacity(body.len());
        stream.send_data(body, true).unwrap();
    }
    let resp = tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("an answer in time")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut recv = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    (status, Bytes::from(data), headers)
}

fn get(path: &str) -> http::Request<()> {
    http::Request::builder()
        .uri(format!("http://a.test{path}"))
        .body(())
        .unwrap()
}

/// After `bad` (raw frames for stream 1), the Pod got nothing from it: an honest request on a
/// new connection is the only one it has.
async fn refused_and_nothing_reached_the_pod(what: &str, bad: Vec<u8>) {
    let (pod, log) = recording_pod().await;
    let gw = h2c_gateway(pod).await;
    let fate = raw(&gw, &bad).await;
    eprintln!("{what}: {fate:?}");
    assert_ne!(fate, Fate::Answered(true), "{what}: answered as if valid");
    let mut send = h2_client(&gw).await;
    let (status, body, _) = call(&mut send, get("/honest"), None).await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    let seen = log.lock().unwrap().clone();
    assert_well_framed(&seen);
    assert_eq!(seen.len(), 1, "{what}: the Pod got {seen:#?}");
    assert!(seen[0].head.starts_with("GET /honest HTTP/1.1\r\n"));
}

#[tokio::test]
async fn a_path_with_crlf_never_reaches_the_pod() {
    let block = pseudo(false, b"/a HTTP/1.1\r\nx-injected: 1\r\n\r\nGET /b");
    let bad = frame(HEADERS, END_STREAM | END_HEADERS, 1, &block);
    refused_and_nothing_reached_the_pod("CRLF in :path", bad).await;
}

#[tokio::test]
async fn a_path_with_a_space_or_nul_never_reaches_the_pod() {
    let bad = frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &pseudo(false, b"/a b"),
    );
    refused_and_nothing_reached_the_pod("space in :path", bad).await;
    let bad = frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &pseudo(false, b"/a\0b"),
    );
    refused_and_nothing_reached_the_pod("NUL in :path", bad).await;
}

#[tokio::test]
async fn field_values_with_lf_cr_or_nul_never_reach_the_pod() {
    for (what, value) in [
        ("LF in a value", &b"1\nx-injected: 2"[..]),
        ("CR in a value", b"1\rx-injected: 2"),
        ("CRLF in a value", b"1\r\nx-injected: 2"),
        ("NUL in a value", b"1\0"),
    ] {
        let mut block = pseudo(false, b"/x");
        block.extend(literal(b"x-a", value));
        let bad = frame(HEADERS, END_STREAM | END_HEADERS, 1, &block);
        refused_and_nothing_reached_the_pod(what, bad).await;
    }
}

#[tokio::test]
async fn uppercase_names_connection_fields_and_late_pseudo_headers_are_malformed() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an uppercase name", literal(b"X-Upper", b"1")),
        (
            "transfer-encoding",
            literal(b"transfer-encoding", b"chunked"),
        ),
        ("connection", literal(b"connection", b"close")),
        ("te other than trailers", literal(b"te", b"gzip")),
        ("upgrade", literal(b"upgrade", b"websocket")),
        ("a name with a colon inside", literal(b"x:y", b"1")),
        ("a name with a space", literal(b"x y", b"1")),
    ];
    for (what, field) in cases {
        let mut block = pseudo(false, b"/x");
        block.extend(field);
        let bad = frame(HEADERS, END_STREAM | END_HEADERS, 1, &block);
        refused_and_nothing_reached_the_pod(what, bad).await;
    }
    // A pseudo-header after a regular field (RFC 9113 §8.3).
    let mut block = vec![0x82, 0x86];
    block.extend(literal(b":authority", b"a.test"));
    block.extend(literal(b"x-a", b"1"));
    block.extend(literal(b":path", b"/x"));
    let bad = frame(HEADERS, END_STREAM | END_HEADERS, 1, &block);
    refused_and_nothing_reached_the_pod("a pseudo-header after a field", bad).await;
}

#[tokio::test]
async fn content_length_that_disagrees_with_the_data_never_reaches_the_pod() {
    for (what, declared, data) in [
        ("fewer bytes than declared", &b"10"[..], &b"abc"[..]),
        ("more bytes than declared", b"3", b"abcdef"),
        ("two different lengths", b"3, 4", b"abc"),
        ("a length that is not a number", b"3x", b"abc"),
    ] {
        let mut block = pseudo(true, b"/upload");
        block.extend(literal(b"content-length", declared));
        let mut bad = frame(HEADERS, END_HEADERS, 1, &block);
        bad.extend(frame(DATA, END_STREAM, 1, data));
        refused_and_nothing_reached_the_pod(what, bad).await;
    }
}

/// A body over the buffered size streams to the Pod; if it ends short of its `content-length`
/// the Pod's connection is closed with the request incomplete: the Pod never sees a complete
/// request, nor any byte after it.
#[tokio::test]
async fn a_streamed_body_shorter_than_its_length_leaves_the_pod_an_incomplete_request() {
    let (pod, log) = recording_pod().await;
    let gw = h2c_gateway(pod).await;
    let mut send = h2_client(&gw).await;
    let req = http::Request::builder()
        .method("POST")
        .uri("http://a.test/big")
        .header("content-length", "200000")
        .body(())
        .unwrap();
    let (answer, mut stream) = send.send_request(req, false).unwrap();
    // 100 KiB (more than the 64 KiB podgate reads before choosing a Pod), then the end.
    let data = Bytes::from(vec![b'x'; 100 * 1024]);
    stream.reserve_capacity(data.len());
    stream.send_data(data, true).unwrap();
    let outcome = tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("in time");
    match &outcome {
        Ok(resp) => assert_ne!(resp.status(), 200, "a short body was answered 200"),
        Err(e) => eprintln!("short streamed body: {e}"),
    }
    wait_for("the Pod's connection to close", || async {
        log.lock().unwrap().len() == 1
    })
    .await;
    let seen = log.lock().unwrap().clone();
    assert_well_framed(&seen);
    assert!(
        !seen[0].complete,
        "the Pod got a complete request: {:?}",
        seen[0].head
    );
    assert!(seen[0].body.len() <= 200_000);
}

#[tokio::test]
async fn valid_requests_are_translated_as_http1_wants_them() {
    let (pod, log) = recording_pod().await;
    let gw = h2c_gateway(pod).await;
    let mut send = h2_client(&gw).await;

    // Cookies split into crumbs, `te: trailers`, a forwarded-for chain, no body.
    let req = http::Request::builder()
        .uri("http://A.Test:8080/p?q=1")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("te", "trailers")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-custom", "yes")
        .body(())
        .unwrap();
    let (status, body, headers) = call(&mut send, req, None).await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    assert_eq!(headers["x-pod"], "rec");
    assert!(headers.contains_key("x-request-id"));

    // A small body without content-length: sent with podgate's length.
    let req = http::Request::builder()
        .method("POST")
        .uri("http://a.test/small")
        .body(())
        .unwrap();
    let (status, _, _) = call(&mut send, req, Some(Bytes::from_static(b"hello"))).await;
    assert_eq!(status, 200);

    // A large body without content-length: streamed in podgate's chunks.
    let big = Bytes::from(vec![b'y'; 150 * 1024]);
    let req = http::Request::builder()
        .method("POST")
        .uri("http://a.test/large")
        .body(())
        .unwrap();
    let (status, _, _) = call(&mut send, req, Some(big.clone())).await;
    assert_eq!(status, 200);

    // A chunked answer comes back as h2 DATA, its chunk framing gone.
    let (status, body, _) = call(&mut send, get("/chunked"), None).await;
    assert_eq!((status, &body[..]), (200, &b"abcde"[..]));

    let seen = log.lock().unwrap().clone();
    assert_well_framed(&seen);
    assert_eq!(seen.len(), 4, "{seen:#?}");
    let first = &seen[0];
    assert!(
        first.head.starts_with("GET /p?q=1 HTTP/1.1\r\n"),
        "{}",
        first.head
    );
    assert_eq!(first.field("cookie"), ["a=1; b=2"]);
    assert_eq!(first.field("host"), ["A.Test:8080"]);
    assert!(first.field("te").is_empty(), "te is hop-by-hop");
    assert_eq!(first.field("x-forwarded-for"), ["10.0.0.1, 127.0.0.1"]);
    assert_eq!(first.field("x-forwarded-proto"), ["http"]);
    assert_eq!(first.field("x-forwarded-host"), ["a.test:8080"]);
    assert_eq!(first.field("x-custom"), ["yes"]);
    assert_eq!(first.field("x-request-id").len(), 1);
    assert!(first.field("content-length").is_empty());
    assert_eq!(seen[1].field("content-length"), ["5"]);
    assert_eq!(seen[1].body, b"hello");
    assert_eq!(seen[2].field("transfer-encoding"), ["chunked"]);
    assert_eq!(seen[2].body.len(), big.len());
    assert!(seen.iter().all(|s| s.complete));
}

/// Many streams at once on one connection all reach the Pod and come back, each on its own
/// request (the streams are served inside the connection's task, interleaved).
#[tokio::test]
async fn concurrent_streams_on_one_connection_are_all_served() {
    let (pod, log) = recording_pod().await;
    let gw = h2c_gateway(pod).await;
    let send = h2_client(&gw).await;
    let mut calls = Vec::new();
    for i in 0..50 {
        let mut send = send.clone();
        calls.push(tokio::spawn(async move {
            send = send.ready().await.unwrap();
            call(&mut send, get(&format!("/s/{i}")), None).await.0
        }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let seen = log.lock().unwrap().clone();
    assert_well_framed(&seen);
    assert_eq!(seen.len(), 50);
}

/// A Pod that takes requests and never answers; counts the heads it got and the connections
/// that were closed on it.
async fn silent_pod() -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (got, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (g, c) = (got.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut io, _)) = l.accept().await {
            let (g, c) = (g.clone(), c.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let have = buf.len();
                    if !fill(&mut io, &mut buf, have + 1).await {
                        return;
                    }
                }
                g.fetch_add(1, Ordering::SeqCst);
                let mut rest = [0u8; 64];
                while matches!(io.read(&mut rest).await, Ok(n) if n > 0) {}
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, got, closed)
}

/// Rapid reset against a slow Pod (CVE-2023-44487's costly variant): a stream the client cancels
/// after podgate sent it on stops holding a Pod connection at once, rather than waiting for the
/// Pod's answer (`read_timeout`) after the client's stream slot was already free again.
#[tokio::test]
async fn a_stream_cancelled_while_its_pod_works_releases_the_pod_connection() {
    use std::sync::atomic::Ordering;
    let (pod, got, closed) = silent_pod().await;
    let gw = h2c_gateway(pod).await;
    let mut send = h2_client(&gw).await;
    let mut streams = Vec::new();
    for i in 0..20 {
        send = send.ready().await.unwrap();
        let (answer, stream) = send.send_request(get(&format!("/slow/{i}")), true).unwrap();
        streams.push((answer, stream));
    }
    wait_for("the Pod to get 20 requests", || async {
        got.load(Ordering::SeqCst) == 20
    })
    .await;
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    for (_, stream) in &mut streams {
        stream.send_reset(h2::Reason::CANCEL);
    }
    wait_for("podgate to close the 20 Pod connections", || async {
        closed.load(Ordering::SeqCst) == 20
    })
    .await;
}

/// On SIGTERM an h2 client gets GOAWAY, and a request already in flight is answered.
#[tokio::test]
async fn shutdown_sends_goaway_and_finishes_streams_in_flight() {
    // A Pod that answers after a while, so the request is in flight when the signal comes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pod = l.local_addr().unwrap();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut io, _)) = l.accept().await {
            let (got, mut go) = (got_tx.clone(), go_rx.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let have = buf.len();
                    if !fill(&mut io, &mut buf, have + 1).await {
                        return;
                    }
                }
                let _ = got.send(());
                let _ = go.wait_for(|g| *g).await;
                let _ = io
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate")
                    .await;
                let mut rest = [0u8; 64];
                let _ = io.read(&mut rest).await;
            });
        }
    });
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
    );
    let gw = Gateway::start_full(
        tempfile::tempdir().unwrap(),
        "h2c: true",
        "threads: 1\n  grace_period: 6s\n  drain_delay: 0s",
        &conf,
    )
    .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (send, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let mut send = send.ready().await.unwrap();
    let (answer, _) = send.send_request(get("/slow"), true).unwrap();
    // Drive the connection until the Pod has the request.
    tokio::select! {
        _ = &mut conn => panic!("the connection ended early"),
        _ = got_rx.recv() => {}
    }
    gw.signal("TERM");
    // The GOAWAY arrives while the stream is still open; then the Pod answers.
    let goaway = async {
        std::future::poll_fn(|cx| {
            let _ = std::pin::Pin::new(&mut conn).poll(cx);
            match send.poll_ready(cx) {
                std::task::Poll::Ready(Err(e)) if e.is_go_away() => std::task::Poll::Ready(()),
                std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(()),
                _ => std::task::Poll::Pending,
            }
        })
        .await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), goaway).await;
    go_tx.send(true).unwrap();
    let driven = tokio::spawn(conn);
    let resp = tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("an answer in time")
        .expect("the stream in flight is answered, not reset");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let data = body.data().await.unwrap().unwrap();
    assert_eq!(&data[..], b"late");
    drop(driven);
}

use std::future::Future;

/// How an HPACK header block (RFC 7541 §6) represents each field, in order: `'i'` indexed,
/// `'+'` literal added to the dynamic table, `'n'` literal never indexed, `'-'` literal without
/// indexing, `'s'` a table size update. Strings are skipped by length (Huffman or not).
fn representations(block: &[u8]) -> String {
    fn int(b: &[u8], at: &mut usize, prefix: u32) -> usize {
        let mask = (1usize << prefix) - 1;
        let mut v = usize::from(b[*at]) & mask;
        *at += 1;
        if v == mask {
            let mut shift = 0;
            loop {
                let next = b[*at];
                *at += 1;
                v += usize::from(next & 0x7f) << shift;
                shift += 7;
                if next & 0x80 == 0 {
                    break;
                }
            }
        }
        v
    }
    fn string(b: &[u8], at: &mut usize) {
        let len = int(b, at, 7);
        *at += len;
    }
    let mut kinds = String::new();
    let mut at = 0;
    while at < block.len() {
        let first = block[at];
        let (kind, prefix) = match first {
            f if f & 0x80 != 0 => ('i', 7),
            f if f & 0xc0 == 0x40 => ('+', 6),
            f if f & 0xe0 == 0x20 => ('s', 5),
            f if f & 0xf0 == 0x10 => ('n', 4),
            _ => ('-', 4),
        };
        let index = int(block, &mut at, prefix);
        if matches!(kind, '+' | 'n' | '-') {
            if index == 0 {
                string(block, &mut at);
            }
            string(block, &mut at);
        }
        kinds.push(kind);
    }
    kinds
}

/// Every answer carries its own `x-request-id`, which never recurs: it is sent as a literal
/// never indexed, so that ids do not fill the client's HPACK table (pushing out the fields that
/// do recur) nor cost the encoder a comparison with every id before. Three requests on one
/// connection: each answer block has exactly one never-indexed field, and the third has no
/// field added to the table but, at most, a new `date`.
#[tokio::test]
async fn request_ids_in_answers_are_never_indexed() {
    let (pod, _log) = recording_pod().await;
    let gw = h2c_gateway(pod).await;
    let mut io = TcpStream::connect(gw.addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(frame(SETTINGS, ACK, 0, &[]));
    io.write_all(&hello).await.unwrap();
    let mut blocks = Vec::new();
    for stream in [1u32, 3, 5] {
        let req = frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            stream,
            &pseudo(false, b"/id"),
        );
        io.write_all(&req).await.unwrap();
        let block = tokio::time::timeout(DEADLINE, async {
            let mut head = [0u8; 9];
            loop {
                io.read_exact(&mut head).await.expect("an answer");
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                io.read_exact(&mut payload).await.expect("a whole frame");
                if head[3] == HEADERS && id == stream {
                    assert_eq!(head[4] & 0x28, 0, "no padding or priority in {head:?}");
                    assert_ne!(head[4] & END_HEADERS, 0, "one HEADERS frame per block");
                    return payload;
                }
            }
        })
        .await
        .expect("an answer in time");
        blocks.push(representations(&block));
    }
    for (i, kinds) in blocks.iter().enumerate() {
        assert_eq!(
            kinds.matches('n').count(),
            1,
            "answer {i}: the id, and only it, never indexed: {blocks:?}"
        );
    }
    assert!(
        blocks[2].matches('+').count() <= 1,
        "the third answer adds nothing to the table but perhaps a new date: {blocks:?}"
    );
}

/// An HTTP/1.1 Pod whose every answer is `len` bytes (`i % 251` at offset `i`), read whole by
/// podgate in one or two reads.
async fn big_answer_pod(len: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
    answer.extend_from_slice(&body);
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut io, _)) = l.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let have = buf.len();
                        if !fill(&mut io, &mut buf, have + 1).await {
                            return;
                        }
                        continue;
                    };
                    buf.drain(..end + 4);
                    if io.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An h2 client whose streams start with a 1 KiB window (`initial_window_size`).
async fn narrow_client(gw: &Gateway) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1024)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    send.ready().await.unwrap()
}

/// An answer larger than the client's window goes out as the client opens it, byte for byte;
/// a client that never opens it has the stream given up at `client_body_timeout`, and its
/// connection serves the next request.
#[tokio::test]
async fn answers_wait_for_the_clients_window_until_the_body_timeout() {
    const LEN: usize = 48 * 1024;
    let pod = big_answer_pod(LEN).await;
    let conf = format!(
        "upstreams:\n  - {{name: web, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
    );
    let gw = Gateway::start_full(
        tempfile::tempdir().unwrap(),
        "h2c: true",
        "threads: 1\n  grace_period: 1s\n  client_body_timeout: 1s",
        &conf,
    )
    .await;
    let mut send = narrow_client(&gw).await;
    let (status, body, _) = call(&mut send, get("/big"), None).await;
    assert_eq!(status, 200);
    let expected: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    assert!(
        body[..] == expected[..],
        "{} bytes came, not the Pod's",
        body.len()
    );

    // Never opening the window: the first KiB, then the stream is reset at the body timeout.
    let (answer, _) = send.send_request(get("/stuck"), true).unwrap();
    let resp = tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("a head in time")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut recv = resp.into_body();
    let mut got = 0;
    let end = tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = recv.data().await {
            match chunk {
                Ok(c) => got += c.len(), // not released: the window stays shut
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await
    .expect("the stream ends within the deadline");
    assert_eq!(got, 1024, "exactly the window's worth came");
    assert!(
        end.as_ref().is_some_and(|e| e.is_reset()),
        "the stream was reset: {end:?}"
    );
    let (status, body, _) = call(&mut send, get("/after"), None).await;
    assert_eq!(
        (status, body.len()),
        (200, LEN),
        "the connection still serves"
    );
}
