//! h2 floods against podgate's h2 client side, written as raw frames (a well-behaved h2 library
//! cannot send them): "rapid reset" (CVE-2023-44487: open a stream and cancel it at once, over
//! and over) and a CONTINUATION flood (CVE-2024-27316 class: a header block that never ends).
//! Each must end with podgate refusing the connection while its memory stays bounded and other
//! clients are served throughout.

mod support;

use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// HPACK for `GET http://h/` from the static table (`:method GET`, `:scheme http`, `:path /`)
/// and `:authority: h` as a literal without indexing.
const GET_BLOCK: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'h'];

/// An HPACK string length (no Huffman): a 7-bit prefix, then 7 bits a byte (RFC 7541 §5.1).
fn hpack_len(out: &mut Vec<u8>, n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    let mut rest = n - 127;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Reads frames from `io` until a GOAWAY or the end of the connection; the GOAWAY's error
/// code, if one came.
async fn until_goaway(io: &mut TcpStream) -> Option<u32> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == GOAWAY && len >= 8 {
                let p = &buf[9..9 + len];
                return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            buf.drain(..9 + len);
        }
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn flood_gateway() -> (Gateway, Vec<Pod>) {
    let pods = pods_same_port(&["f-1"]).await;
    let body = format!(
        "access_log: {{enabled: false}}\nupstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        pods[0].addr
    );
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start_with_listener(dir, "h2c: true", &body).await;
    (gw, pods)
}

/// A normal h2 request on a connection of its own gets its answer.
async fn h2_get_ok(gw: &Gateway) -> bool {
    let Ok(tcp) = TcpStream::connect(gw.addr).await else {
        return false;
    };
    let Ok((client, conn)) = h2::client::handshake(tcp).await else {
        return false;
    };
    let driver = tokio::spawn(conn);
    let ok = async {
        let mut client = client.ready().await.ok()?;
        let req = http::Request::get(format!("http://{}/", gw.addr))
            .body(())
            .ok()?;
        let (answer, _) = client.send_request(req, true).ok()?;
        let answer = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .ok()?
            .ok()?;
        Some(answer.status() == 200)
    }
    .await;
    driver.abort();
    ok == Some(true)
}

#[tokio::test]
async fn rapid_reset_flood_is_cut_off_and_others_are_served() {
    let (gw, _pods) = flood_gateway().await;
    assert!(h2_get_ok(&gw).await);
    let rss_before = rss_kib(gw.pid());

    let mut io = TcpStream::connect(gw.addr).await.unwrap();
    io.write_all(PREFACE).await.unwrap();
    io.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // 100,000 streams opened and cancelled at once, sent in batches of 500 (about 9 MB).
    const STREAMS: u32 = 100_000;
    let started = Instant::now();
    let mut sent = 0u32;
    let mut refused = false;
    while sent < STREAMS {
        let mut batch = Vec::with_capacity(500 * 28);
        for i in 0..500 {
            let id = 2 * (sent + i) + 1;
            batch.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, GET_BLOCK));
            batch.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        }
        if io.write_all(&batch).await.is_err() {
            refused = true;
            break;
        }
        sent += 500;
        assert!(started.elapsed() < DEADLINE, "the flood took too long");
    }
    // Whether or not every byte got out, podgate must end the connection with a GOAWAY (or
    // close it) rather than serve the flood to its end.
    let goaway = tokio::time::timeout(DEADLINE, until_goaway(&mut io))
        .await
        .expect("podgate ends the flood connection");
    eprintln!(
        "rapid reset: {sent} streams written (write refused: {refused}), GOAWAY {goaway:?}, \
         {:?}",
        started.elapsed()
    );
    // ENHANCE_YOUR_CALM (11), or the connection just closed.
    assert!(matches!(goaway, None | Some(11)), "{goaway:?}");

    // Other clients are served, and the flood left no lasting memory behind.
    assert!(h2_get_ok(&gw).await, "podgate still answers h2 clients");
    assert!(
        matches!(gw.get("h", "/").await.status, 200),
        "and HTTP/1.1 clients"
    );
    let rss_after = rss_kib(gw.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[tokio::test]
async fn continuation_flood_is_cut_off_with_bounded_memory() {
    let (gw, _pods) = flood_gateway().await;
    assert!(h2_get_ok(&gw).await);
    let rss_before = rss_kib(gw.pid());

    let mut io = TcpStream::connect(gw.addr).await.unwrap();
    io.write_all(PREFACE).await.unwrap();
    io.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // A HEADERS frame without END_HEADERS, then CONTINUATION frames that never set it: each
    // holds 16 KiB of literal header fields (name and value 8 KiB each, never indexed).
    io.write_all(&frame(HEADERS, END_STREAM, 1, GET_BLOCK))
        .await
        .unwrap();
    let mut field = vec![0x10]; // literal never indexed, new name
    for fill in [b'a', b'b'] {
        hpack_len(&mut field, 8000);
        field.resize(field.len() + 8000, fill);
    }
    let cont = frame(CONTINUATION, 0, 1, &field);
    // Up to 256 MiB; podgate must stop reading long before.
    let limit: usize = 256 << 20;
    let started = Instant::now();
    let mut written = 0usize;
    while written < limit && started.elapsed() < DEADLINE {
        match tokio::time::timeout(Duration::from_secs(2), io.write_all(&cont)).await {
            Ok(Ok(())) => written += cont.len(),
            // Refused (reset), or podgate stopped reading and the socket buffers filled.
            _ => break,
        }
    }
    let goaway = tokio::time::timeout(DEADLINE, until_goaway(&mut io))
        .await
        .expect("podgate ends the flood connection");
    eprintln!(
        "CONTINUATION flood: {} KiB written before podgate stopped it, GOAWAY {goaway:?}",
        written / 1024
    );
    assert!(
        written < 64 << 20,
        "podgate read {} MiB of one header block",
        written >> 20
    );
    let rss_after = rss_kib(gw.pid());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(h2_get_ok(&gw).await, "podgate still answers h2 clients");
}

#[tokio::test]
async fn h2_clients_are_told_the_stream_and_header_limits() {
    let (gw, _pods) = flood_gateway().await;
    let mut io = TcpStream::connect(gw.addr).await.unwrap();
    io.write_all(PREFACE).await.unwrap();
    io.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // The server's first frame is its SETTINGS.
    let mut head = [0u8; 9];
    tokio::time::timeout(DEADLINE, io.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[3], SETTINGS, "{head:?}");
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.unwrap();
    let settings: std::collections::HashMap<u16, u32> = payload
        .chunks_exact(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS and SETTINGS_MAX_HEADER_LIST_SIZE, as nginx's defaults
    // (128 streams; its header buffers are 32 KiB) are of the same order.
    assert_eq!(settings.get(&3), Some(&100), "{settings:?}");
    assert_eq!(settings.get(&6), Some(&65536), "{settings:?}");
}
