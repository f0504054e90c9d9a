//! h2 floods against an `h2c: true` listener, frame by frame: a client that opens streams and
//! resets them at once ("rapid reset", CVE-2023-44487) and one that sends a header block that never
//! ends (CONTINUATION flood, CVE-2024-27316 class). Either must cost podgate a bounded amount of
//! work and memory, end with the attacker's connection closed, and leave other clients served.
//!
//! The frames are written by hand (RFC 9113 §4.1 framing, a few HPACK static-table entries), so
//! the attacker does exactly what the test says, with no client library smoothing it over.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::h2_frames::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET /` for `host`: `:method GET`, `:scheme http`, `:path /` from HPACK's static table, then
/// `:authority` as a literal with an indexed name (RFC 7541 §6.2.2).
fn get_block(host: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, host.len() as u8];
    b.extend_from_slice(host.as_bytes());
    b
}

/// What the gateway sent on the attacker's connection, read by a task of its own (which also
/// acknowledges the gateway's SETTINGS, as a real client would).
#[derive(Default)]
struct Seen {
    goaway: Option<u32>,
    closed: bool,
    /// The gateway's SETTINGS (identifier, value), first frame only.
    settings: Option<Vec<(u16, u32)>>,
}

fn read_frames(mut rd: tokio::net::tcp::OwnedReadHalf) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let mut head = [0u8; 9];
        loop {
            if rd.read_exact(&mut head).await.is_err() {
                seen.closed = true;
                return seen;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                seen.closed = true;
                return seen;
            }
            if head[3] == SETTINGS && head[4] & ACK == 0 && seen.settings.is_none() {
                let pairs = payload
                    .chunks_exact(6)
                    .map(|c| {
                        let id = u16::from_be_bytes([c[0], c[1]]);
                        (id, u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
                    })
                    .collect();
                seen.settings = Some(pairs);
            }
            if head[3] == GOAWAY && payload.len() >= 8 {
                seen.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
        }
    })
}

/// A Pod that counts the requests it is sent.
async fn counting_pod() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    seen.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok\n")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

async fn h2c_gateway(pod: std::net::SocketAddr) -> Gateway {
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
    );
    Gateway::start_with_listener(tempfile::tempdir().unwrap(), "h2c: true", &conf).await
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// One prior-knowledge h2 GET from a well-behaved client (hyper), with a deadline.
async fn honest_get(gw: &Gateway) -> u16 {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://h2c.test/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, send.send_request(req))
        .await
        .expect("an answer to an honest client in time")
        .unwrap();
    resp.status().as_u16()
}

/// Opens the attacker's connection: preface, empty SETTINGS, an ACK of the gateway's.
async fn attacker(
    gw: &Gateway,
) -> (
    tokio::net::tcp::OwnedWriteHalf,
    tokio::task::JoinHandle<Seen>,
) {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (rd, mut wr) = tcp.into_split();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(frame(SETTINGS, ACK, 0, &[]));
    wr.write_all(&hello).await.unwrap();
    (wr, read_frames(rd))
}

#[tokio::test]
async fn rapid_reset_is_cut_off_and_costs_bounded_work() {
    let (pod, count) = counting_pod().await;
    let gw = h2c_gateway(pod).await;
    assert_eq!(honest_get(&gw).await, 200);
    let before = count.load(Ordering::Relaxed);
    let rss_before = rss_kib(gw.pid());

    const STREAMS: u32 = 50_000;
    let (mut wr, reader) = attacker(&gw).await;
    let block = get_block("h2c.test");
    let mut sent = 0u32;
    let start = Instant::now();
    // Batches of 500 HEADERS + RST_STREAM(CANCEL) pairs, as fast as the socket takes them.
    'flood: for batch in 0..STREAMS / 500 {
        let mut out = Vec::with_capacity(500 * 40);
        for i in 0..500 {
            let id = 1 + 2 * (batch * 500 + i);
            out.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
            out.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        }
        match tokio::time::timeout(DEADLINE, wr.write_all(&out)).await {
            Ok(Ok(())) => sent += 500,
            _ => break 'flood,
        }
    }
    let _ = wr.shutdown().await;
    let seen = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("the attacker's connection ends")
        .unwrap();
    let forwarded = count.load(Ordering::Relaxed) - before;
    let grew = rss_kib(gw.pid()).saturating_sub(rss_before);
    eprintln!(
        "rapid reset: {sent} streams sent in {:?}, {forwarded} reached the Pod, GOAWAY {:?}, \
         RSS +{grew} KiB",
        start.elapsed(),
        seen.goaway
    );
    assert!(seen.closed, "the gateway closed the attacker's connection");
    assert!(
        forwarded < 5_000,
        "{forwarded} of {sent} reset streams were forwarded to the Pod: the work per \
         connection is not bounded"
    );
    assert!(grew < 64 * 1024, "RSS grew by {grew} KiB during the flood");
    assert_eq!(honest_get(&gw).await, 200, "other clients are still served");
}

#[tokio::test]
async fn continuation_flood_is_cut_off_before_it_costs_memory() {
    let (pod, count) = counting_pod().await;
    let gw = h2c_gateway(pod).await;
    assert_eq!(honest_get(&gw).await, 200);
    let rss_before = rss_kib(gw.pid());

    let (mut wr, reader) = attacker(&gw).await;
    // A HEADERS frame without END_HEADERS, then CONTINUATION frames of 16 KiB of literal fields
    // (`x-flood: aaaa…`, literal without indexing, new name) that never end the block.
    let mut field = vec![0x00, 7];
    field.extend_from_slice(b"x-flood");
    field.extend_from_slice(&[0x7f, 0x81, 0x07]); // value length 127 + 129 = 256, 7-bit prefix
    field.extend(std::iter::repeat_n(b'a', 256));
    let mut chunk = Vec::with_capacity(16 * 1024);
    while chunk.len() + field.len() <= 16 * 1024 {
        chunk.extend_from_slice(&field);
    }
    let mut out = frame(HEADERS, END_STREAM, 1, &get_block("h2c.test"));
    wr.write_all(&out).await.unwrap();
    const LIMIT: usize = 256 << 20; // give up after 256 MiB
    let mut sent = 0usize;
    let start = Instant::now();
    out.clear();
    for _ in 0..16 {
        out.extend(frame(CONTINUATION, 0, 1, &chunk));
    }
    while sent < LIMIT {
        match tokio::time::timeout(Duration::from_secs(5), wr.write_all(&out)).await {
            Ok(Ok(())) => sent += out.len(),
            // Refused (closed), or not read for 5 s: either way the gateway stopped taking it.
            _ => break,
        }
    }
    let _ = wr.shutdown().await;
    let seen = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("the attacker's connection ends")
        .unwrap();
    let grew = rss_kib(gw.pid()).saturating_sub(rss_before);
    eprintln!(
        "CONTINUATION flood: {} KiB sent in {:?} before the gateway stopped it, GOAWAY {:?}, \
         RSS +{grew} KiB",
        sent / 1024,
        start.elapsed(),
        seen.goaway
    );
    assert!(
        sent < LIMIT,
        "the gateway took {} MiB of one never-ending header block",
        sent >> 20
    );
    assert!(seen.closed, "the gateway closed the attacker's connection");
    assert!(grew < 64 * 1024, "RSS grew by {grew} KiB during the flood");
    assert_eq!(
        count.load(Ordering::Relaxed),
        1,
        "the unfinished request never reached the Pod (only the honest one did)"
    );
    assert_eq!(honest_get(&gw).await, 200, "other clients are still served");
}

/// The limits a client learns from the gateway's first SETTINGS frame: a bound on concurrent
/// streams (RFC 9113 §6.5.2 leaves it unlimited by default, which no edge should) and on the
/// header list.
#[tokio::test]
async fn the_gateway_announces_stream_and_header_limits() {
    let (pod, _count) = counting_pod().await;
    let gw = h2c_gateway(pod).await;
    let (mut wr, reader) = attacker(&gw).await;
    let _ = wr.shutdown().await;
    let seen = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("the connection ends")
        .unwrap();
    let settings = seen.settings.expect("the gateway sent SETTINGS");
    eprintln!("gateway SETTINGS: {settings:?}");
    let get = |id: u16| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
    let streams = get(0x3).expect("SETTINGS_MAX_CONCURRENT_STREAMS is announced");
    assert!(
        (1..=1024).contains(&streams),
        "max concurrent streams {streams}"
    );
}
