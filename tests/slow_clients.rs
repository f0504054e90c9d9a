//! Slow and memory-hungry clients against the HTTP/1.1 path, through the binary: a head sent a
//! byte at a time is cut off at `server.client_header_timeout` (not kept for ever, as a per-read
//! timeout would), idle keep-alive connections close at `server.keepalive_timeout`, a stalled
//! body at `server.client_body_timeout`, and connections still sending heads cannot hold more
//! than `server.header_memory` together. Also: the keys' mistakes are reported like any other.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn gateway(server_extra: &str) -> (Gateway, Vec<Pod>) {
    let pods = pods_same_port(&["slow-v1"]).await;
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: all, path_prefix: /, upstream: web}}\n",
        pods[0].addr
    );
    let server = format!("threads: 1\n  grace_period: 1s\n  {server_extra}");
    let gw = Gateway::start_full(tempfile::tempdir().unwrap(), "", &server, &conf).await;
    (gw, pods)
}

/// Reads until the peer closes (or `DEADLINE`): everything it sent.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got)).await;
    got
}

#[tokio::test]
async fn a_head_trickled_a_byte_at_a_time_is_cut_off_at_the_whole_head_deadline() {
    let (gw, _pods) = gateway("client_header_timeout: 1s").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: ")
        .await
        .unwrap();
    // One byte every 100 ms: each read is quick, the head as a whole never ends. A per-read
    // timeout would keep this connection for the whole 15 s of the trickle.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..150 {
        tokio::select! {
            _ = tick.tick() => {
                if s.write_all(b"a").await.is_err() {
                    break;
                }
            }
            n = s.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
        }
    }
    got.extend(read_to_close(&mut s).await);
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "closed after {took:?}, the deadline is 1 s"
    );
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_silently_at_the_head_deadline() {
    let (gw, _pods) = gateway("client_header_timeout: 500ms").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let start = Instant::now();
    assert_eq!(read_to_close(&mut s).await, b"");
    assert!(start.elapsed() >= Duration::from_millis(400));
    assert!(start.elapsed() < DEADLINE);
}

#[tokio::test]
async fn idle_keep_alive_connections_close_at_the_keepalive_timeout() {
    let (gw, _pods) = gateway("keepalive_timeout: 300ms").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let got = read_to_close(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(!text.contains("connection: close"), "{text}");
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert!(start.elapsed() < DEADLINE, "never closed");

    // keepalive_timeout: 0s turns keep-alive off: every answer says close.
    let (gw, _pods) = gateway("keepalive_timeout: 0s").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&read_to_close(&mut s).await).to_string();
    assert!(text.contains("connection: close"), "{text}");
}

#[tokio::test]
async fn a_stalled_body_is_given_up_at_the_body_timeout() {
    let (gw, _pods) = gateway("client_body_timeout: 500ms").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let start = Instant::now();
    let got = read_to_close(&mut s).await;
    assert!(
        !String::from_utf8_lossy(&got).contains(" 200 "),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(start.elapsed() >= Duration::from_millis(400));
    assert!(start.elapsed() < DEADLINE, "never closed");
}

#[tokio::test]
async fn heads_in_progress_share_one_memory_budget() {
    // 64 KiB for all heads in progress: four connections whose heads grew to 16 KiB use it up.
    let (gw, _pods) = gateway("header_memory: 64KiB").await;
    let mut hogs = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let mut head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: ".to_vec();
        head.resize(15_000, b'a');
        // The gateway may close (503) before taking it all.
        let _ = s.write_all(&head).await;
        hogs.push(s);
    }
    let mut refused = 0;
    let mut waiting = Vec::new();
    for mut s in hogs {
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
                assert!(text.contains("\"busy\""), "{text}");
                refused += 1;
            }
            // Still reading its head: the budget holds it.
            _ => waiting.push(s),
        }
    }
    assert!(
        (1..8).contains(&refused),
        "{refused} of 8 connections refused; the budget fits 4 of them"
    );
    assert!(gw.log_text().contains("server.header_memory"));
    // Their memory comes back when they go: a normal request is served again.
    drop(waiting);
    wait_for("a request served after the hogs left", || async {
        matches!(get(gw.addr, "a", "/x").await, Ok(r) if r.status == 200)
    })
    .await;
}

#[test]
fn mistakes_in_the_client_limits_are_reported_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let conf = "listeners: [{address: 127.0.0.1:8080}]\n\
                server:\n  client_header_timeout: 0s\n  client_body_timeout: 5\n  \
                header_memory: lots\n  keepalive_timeout: 1s\n";
    std::fs::write(dir.path().join("c.yaml"), conf).unwrap();
    let out = Command::new(podgate_bin())
        .args(["-c", "c.yaml", "-t"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for (line, path, what) in [
        (3, "server.client_header_timeout", "longer than 0s"),
        (4, "server.client_body_timeout", "add a unit"),
        (5, "server.header_memory", "not a size"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("c.yaml:{line}: {path}")) && l.contains(what)),
            "{path} at line {line}: {err}"
        );
    }
}
