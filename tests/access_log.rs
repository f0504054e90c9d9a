//! The access log through the binary: every request of a burst has its line in the file once
//! podgate stopped (SIGTERM), or is counted as dropped; SIGHUP re-opens the file after a log
//! rotation and loses nothing on the way.
//!
//! The burst is 100,000 requests by default (`ACCESS_LOG_BURST` changes it), pipelined over
//! several keep-alive connections to a Pod that answers every request with the same bytes, so
//! that the test's own side costs little next to podgate's.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Instant;
use support::wire::{parse_response, WIRE_WAIT};
use support::{wait_for, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A Pod that answers every request head it reads with `200 ok` (requests carry no body).
async fn fixed_pod() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                let mut buf = vec![0u8; 64 << 10];
                let mut carry = 0usize; // bytes of an unfinished head kept at the start
                let mut out = Vec::new();
                loop {
                    let n = match conn.read(&mut buf[carry..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let filled = carry + n;
                    let mut start = 0;
                    while let Some(end) = find(&buf[start..filled], b"\r\n\r\n") {
                        start += end + 4;
                        out.extend_from_slice(ANSWER);
                    }
                    buf.copy_within(start..filled, 0);
                    carry = filled - start;
                    if conn.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
            });
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends `count` GETs for `/burst/{conn}/{i}` pipelined in windows of `window` on one
/// connection, and reads every answer; returns how many were 200.
async fn pipelined(addr: SocketAddr, conn: usize, count: usize, window: usize) -> usize {
    let mut stream = TcpStream::connect(addr).await.expect("connect to podgate");
    let mut buf = Vec::new();
    let mut ok = 0;
    let mut sent = 0;
    while sent < count {
        let n = window.min(count - sent);
        let mut reqs = Vec::with_capacity(n * 64);
        for i in sent..sent + n {
            reqs.extend_from_slice(
                format!("GET /burst/{conn}/{i} HTTP/1.1\r\nHost: logs.test\r\n\r\n").as_bytes(),
            );
        }
        stream
            .write_all(&reqs)
            .await
            .expect("podgate takes the requests");
        sent += n;
        let mut answered = 0;
        while answered < n {
            match parse_response(&buf, false, false) {
                Ok(Some((m, used))) => {
                    buf.drain(..used);
                    answered += 1;
                    ok += usize::from(m.status() == 200);
                }
                Ok(None) => {
                    let mut chunk = [0u8; 32 << 10];
                    let read = tokio::time::timeout(WIRE_WAIT, stream.read(&mut chunk)).await;
                    match read {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        other => panic!("connection {conn}: no answer after {sent}: {other:?}"),
                    }
                }
                Err(e) => panic!("connection {conn}: malformed answer: {e}"),
            }
        }
    }
    ok
}

/// What podgate's last words say: `(written, dropped)` from "access log closed: …".
fn closing_counts(log: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("access log closed:"))?;
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    // The numbers before the message are the log line's time stamp.
    let n = numbers.len();
    (n >= 2).then(|| (numbers[n - 2], numbers[n - 1]))
}

async fn wait_exit(gw: &mut Gateway) -> std::process::ExitStatus {
    let mut status = None;
    wait_for("podgate to exit", || {
        status = gw.exited();
        std::future::ready(status.is_some())
    })
    .await;
    status.unwrap()
}

/// Request ids of the lines in `text`, each checked to be a whole JSON line of the burst.
fn burst_lines(text: &str, paths: &mut HashSet<String>) -> usize {
    let mut n = 0;
    for l in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        let path = v["path"].as_str().expect("a path").to_string();
        assert!(path.starts_with("/burst/"), "{l}");
        assert_eq!(v["status"], 200, "{l}");
        assert!(paths.insert(path), "a request logged twice: {l}");
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_line_of_a_burst_reaches_the_file_at_sigterm() {
    let total: usize = std::env::var("ACCESS_LOG_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let pod = fixed_pod().await;
    // A long flush and a large buffer: at the signal, lines are still waiting in the workers'
    // buffers, and only the stop can write them.
    let body = format!(
        "access_log: {{path: access.log, buffer: 1MiB, flush: 1m}}\n\
         upstreams:\n  - {{name: pod, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: all, path_prefix: /, upstream: pod}}\n"
    );
    let mut gw = Gateway::start_full(
        tempfile::tempdir().unwrap(),
        "",
        "threads: 2\n  grace_period: 2s\n  drain_delay: 0s",
        &body,
    )
    .await;

    let start = Instant::now();
    let connections = 8;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let each = total / connections + usize::from(c < total % connections);
            tokio::spawn(pipelined(gw.addr, c, each, 64))
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, total, "every request answered 200");
    let burst = start.elapsed();

    let path = gw.path("access.log");
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    let in_file_before = before.lines().count();
    assert!(
        in_file_before < total,
        "with a 1 MiB buffer and a 1 min flush, some lines wait in the workers at the signal"
    );
    gw.signal("TERM");
    let status = wait_exit(&mut gw).await;
    assert!(status.success(), "{}", gw.log_text());

    let text = std::fs::read_to_string(&path).unwrap();
    let mut paths = HashSet::new();
    let in_file = burst_lines(&text, &mut paths);
    let (written, dropped) = closing_counts(&gw.log_text())
        .unwrap_or_else(|| panic!("no closing counts in the log:\n{}", gw.log_text()));
    println!(
        "{total} requests in {burst:?}; {in_file_before} lines in the file at SIGTERM, \
         {in_file} after; writer: {written} written, {dropped} dropped"
    );
    assert_eq!(
        written as usize, in_file,
        "the writer's count matches the file"
    );
    assert_eq!(
        in_file + dropped as usize,
        total,
        "lines + dropped = requests"
    );
    assert_eq!(dropped, 0, "a normal disk keeps up");
}

#[tokio::test]
async fn sighup_reopens_the_file_after_a_rotation_and_loses_no_line() {
    let pod = fixed_pod().await;
    let body = format!(
        "access_log: {{path: access.log, flush: 1m}}\n\
         upstreams:\n  - {{name: pod, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: all, path_prefix: /, upstream: pod}}\n"
    );
    let mut gw = Gateway::start_full(
        tempfile::tempdir().unwrap(),
        "",
        "threads: 2\n  grace_period: 2s\n  drain_delay: 0s",
        &body,
    )
    .await;
    assert_eq!(pipelined(gw.addr, 0, 500, 50).await, 500);
    // logrotate's way: move the file, then signal.
    let path = gw.path("access.log");
    let rotated = gw.path("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    gw.signal("HUP");
    wait_for("a new access.log", || std::future::ready(path.exists())).await;
    assert_eq!(pipelined(gw.addr, 1, 300, 50).await, 300);
    gw.signal("TERM");
    assert!(wait_exit(&mut gw).await.success(), "{}", gw.log_text());

    let mut paths = HashSet::new();
    let old_text = std::fs::read_to_string(&rotated).unwrap();
    let new_text = std::fs::read_to_string(&path).unwrap();
    let old = burst_lines(&old_text, &mut paths);
    let new = burst_lines(&new_text, &mut paths);
    assert_eq!(old + new, 800, "no line lost across the reload");
    // A line is logged just after its answer is sent, so the last few lines of the first part
    // may come after the signal; everything sent after the new file appeared is in it.
    assert!(old_text.lines().all(|l| l.contains("\"path\":\"/burst/0/")));
    let after = new_text
        .lines()
        .filter(|l| l.contains("\"path\":\"/burst/1/"));
    assert_eq!(after.count(), 300);
    assert!(old > 0);
}
