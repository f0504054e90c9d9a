//! A graceful stop ends as soon as the work does (issue 21), through the binary: SIGTERM on an
//! idle podgate exits right after `drain_delay`, not at the end of `grace_period`; idle
//! keep-alive connections hold it only for the 1 s linger; a request, an h2 stream or a
//! WebSocket-style tunnel in flight holds it until it ends (within `grace_period`), and gets its
//! answer. (`tests/lifecycle.rs` covers draining, the upgrade and the exit code of a stop.)

mod support;

use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A Pod that answers each request `hold` after it came (its own slowness), and turns an
/// `Upgrade` request into an echoing tunnel after a `101`.
async fn slow_pod(hold: Duration) -> (std::net::SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = seen.send(());
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if text.contains("upgrade: websocket") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                              upgrade: websocket\r\n\r\n",
                        )
                        .await;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                tokio::time::sleep(hold).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                    .await;
            });
        }
    });
    (addr, rx)
}

/// Told of every request head the Pod receives.
type Seen = tokio::sync::mpsc::UnboundedReceiver<()>;

async fn gateway(hold: Duration, listener: &str) -> (Gateway, Seen) {
    let (pod, seen) = slow_pod(hold).await;
    let conf = format!(
        "upstreams:\n  - {{name: slow, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: slow, path_prefix: /, upstream: slow}}\n"
    );
    let gw = Gateway::start_full(
        tempfile::tempdir().unwrap(),
        listener,
        "threads: 2\n  grace_period: 20s\n  drain_delay: 1s",
        &conf,
    )
    .await;
    (gw, seen)
}

/// Sends SIGTERM and waits for the exit: how long it took, after checking it was a clean one.
async fn stop(gw: &mut Gateway) -> Duration {
    let term = Instant::now();
    gw.signal("TERM");
    let mut status = None;
    wait_for("podgate to exit", || {
        status = gw.exited();
        std::future::ready(status.is_some())
    })
    .await;
    let took = term.elapsed();
    assert!(status.unwrap().success(), "{}", gw.log_text());
    assert!(gw.log_text().contains("stopped"), "{}", gw.log_text());
    assert!(!gw.path("podgate.pid").exists(), "the pid file stayed");
    took
}

const DRAIN: Duration = Duration::from_secs(1);

#[tokio::test]
async fn an_idle_podgate_stops_right_after_the_drain_delay() {
    let (mut gw, _seen) = gateway(Duration::ZERO, "").await;
    assert_eq!(gw.get("a", "/").await.status, 200);
    let took = stop(&mut gw).await;
    println!("idle stop: {took:?} (drain_delay 1s, grace_period 20s)");
    assert!(took >= DRAIN, "{took:?}: the drain delay was skipped");
    assert!(took < DRAIN + Duration::from_millis(900), "{took:?}");
}

#[tokio::test]
async fn idle_keep_alive_connections_hold_the_stop_only_for_the_linger() {
    let (mut gw, _seen) = gateway(Duration::ZERO, "").await;
    let mut idle = Conn::open(gw.addr).await.unwrap();
    assert_eq!(idle.send("GET", "a", "/", &[]).await.unwrap().status, 200);
    let took = stop(&mut gw).await;
    // drain_delay, then the 1 s linger for requests already on their way on such connections.
    assert!(took >= DRAIN + Duration::from_millis(900), "{took:?}");
    assert!(took < DRAIN + Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn a_request_in_flight_holds_the_stop_until_it_is_answered() {
    let hold = Duration::from_secs(3);
    let (mut gw, mut seen) = gateway(hold, "").await;
    let addr = gw.addr;
    let asked = Instant::now();
    let slow = tokio::spawn(async move { get(addr, "a", "/").await });
    tokio::time::timeout(DEADLINE, seen.recv())
        .await
        .expect("the Pod got the request in time")
        .expect("the Pod got the request");
    let took = stop(&mut gw).await;
    let answer = slow
        .await
        .unwrap()
        .expect("the request in flight was answered");
    assert_eq!((answer.status, &answer.body[..]), (200, &b"slow"[..]));
    let after_answer = asked.elapsed();
    assert!(after_answer >= hold, "{after_answer:?}");
    assert!(
        took < hold + Duration::from_millis(1500),
        "exited {took:?} after SIGTERM; the answer came {hold:?} after the request"
    );
}

#[tokio::test]
async fn an_h2_stream_in_flight_holds_the_stop_until_it_is_answered() {
    let hold = Duration::from_secs(3);
    let (mut gw, mut seen) = gateway(hold, "h2c: true").await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://a/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let asked = Instant::now();
    let slow = tokio::spawn(async move { send.send_request(req).await });
    tokio::time::timeout(DEADLINE, seen.recv())
        .await
        .expect("the Pod got the request in time")
        .expect("the Pod got the request");
    let took = stop(&mut gw).await;
    let answer = slow
        .await
        .unwrap()
        .expect("the h2 stream in flight was answered");
    assert_eq!(answer.status(), 200);
    assert!(asked.elapsed() >= hold);
    assert!(took < hold + Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn a_tunnel_holds_the_stop_until_it_closes() {
    let (mut gw, _seen) = gateway(Duration::ZERO, "").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let until = Instant::now() + DEADLINE;
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout_at(until.into(), s.read(&mut buf))
            .await
            .expect("the 101 in time")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    let term = Instant::now();
    gw.signal("TERM");
    // The tunnel still carries bytes well past the drain delay and the linger...
    let open_for = DRAIN + Duration::from_secs(2);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while term.elapsed() < open_for {
        tick.tick().await;
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut echo))
            .await
            .expect("the echo in time")
            .unwrap();
        assert_eq!(&echo, b"ping");
        assert!(gw.exited().is_none(), "exited with a tunnel open");
    }
    // ...and once it closes, podgate exits.
    drop(s);
    let closed = Instant::now();
    let mut status = None;
    wait_for("podgate to exit", || {
        status = gw.exited();
        std::future::ready(status.is_some())
    })
    .await;
    assert!(status.unwrap().success());
    assert!(
        closed.elapsed() < Duration::from_millis(900),
        "{:?}",
        closed.elapsed()
    );
}
