//! podgate's HTTP/1.1 path on the wire: bodies (streamed, chunked, 100-continue), pipelining,
//! HTTP/1.0, framing that could smuggle a request, oversized heads, and upgrades. Clients here
//! write raw bytes on real sockets, so what is asserted is exactly what a client would see.

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A gateway with one route `/` to the demo Pod `echo-v1`, which answers JSON describing the
/// request it received (method, uri, headers, body_bytes).
async fn echo_gateway() -> (Gateway, Vec<Pod>) {
    let pods = pods_same_port(&["echo-v1"]).await;
    let conf = format!(
        "upstreams:\n  - {{name: echo, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: all, path_prefix: /, upstream: echo}}\n",
        pods[0].addr
    );
    (Gateway::start(&conf, &[]).await, pods)
}

/// One HTTP/1.1 response read off a raw connection: status, lowercased headers, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A raw client connection that keeps whatever it read past one response.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(gw: &Gateway) -> Raw {
        Raw {
            stream: TcpStream::connect(gw.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads until `buf` holds `n` bytes; false if the peer closed first.
    async fn fill(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            let mut chunk = [0u8; 8192];
            let read = tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk))
                .await
                .expect("an answer within the deadline")
                .unwrap_or(0);
            if read == 0 {
                return false;
            }
            self.buf.extend_from_slice(&chunk[..read]);
        }
        true
    }

    /// The next response with a Content-Length body.
    async fn answer(&mut self) -> Answer {
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let have = self.buf.len();
            assert!(
                self.fill(have + 1).await,
                "closed before a response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        assert!(self.fill(end + len).await, "closed inside a body");
        let body = self.buf[end..end + len].to_vec();
        self.buf.drain(..end + len);
        Answer {
            status,
            headers,
            body,
        }
    }

    /// A response whose body ends with the connection: its head (lowercased) and body.
    async fn answer_until_close(&mut self) -> (String, Vec<u8>) {
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let have = self.buf.len();
            assert!(self.fill(have + 1).await, "closed before a response head");
        };
        while self.fill(self.buf.len() + 1).await {}
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        (head, self.buf.split_off(end))
    }

    /// Whether the gateway closed the connection (reads EOF with nothing more).
    async fn closed(&mut self) -> bool {
        !self.fill(self.buf.len() + 1).await
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (gw, _pods) = echo_gateway().await;
    let mut c = Raw::connect(&gw).await;
    c.send(
        b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello\
          GET /three HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await;
    for (uri, method, bytes) in [
        ("/one", "GET", 0),
        ("/two", "POST", 5),
        ("/three", "GET", 0),
    ] {
        let a = c.answer().await;
        assert_eq!(a.status, 200);
        let j = a.json();
        assert_eq!(
            (j["uri"].as_str(), j["method"].as_str()),
            (Some(uri), Some(method))
        );
        assert_eq!(j["body_bytes"], bytes);
    }
}

#[tokio::test]
async fn chunked_and_large_request_bodies_reach_the_pod_whole() {
    let (gw, _pods) = echo_gateway().await;
    let mut c = Raw::connect(&gw).await;
    // Chunked, with an extension and a trailer, then a request right behind it.
    c.send(
        b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          4;x=y\r\nabcd\r\n6\r\nefghij\r\n0\r\nX-Trailer: 1\r\n\r\n\
          GET /after HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await;
    let a = c.answer().await;
    assert_eq!((a.status, a.json()["body_bytes"].clone()), (200, 10.into()));
    assert_eq!(c.answer().await.json()["uri"], "/after");

    // 1 MiB: more than is buffered before a Pod is chosen, so it streams.
    let big = vec![b'z'; 1 << 20];
    c.send(
        format!(
            "PUT /big HTTP/1.1\r\nHost: a.test\r\nContent-Length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await;
    c.send(&big).await;
    let a = c.answer().await;
    assert_eq!(
        (a.status, a.json()["body_bytes"].clone()),
        (200, (1u64 << 20).into())
    );
}

#[tokio::test]
async fn expect_continue_is_answered_before_the_body_is_sent() {
    let (gw, _pods) = echo_gateway().await;
    let mut c = Raw::connect(&gw).await;
    c.send(
        b"POST /e HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert!(c.fill(25).await);
    assert_eq!(&c.buf[..25], b"HTTP/1.1 100 Continue\r\n\r\n");
    c.buf.drain(..25);
    c.send(b"abc").await;
    let a = c.answer().await;
    let j = a.json();
    assert_eq!((a.status, j["body_bytes"].clone()), (200, 3.into()));
    assert!(
        j["headers"].get("expect").is_none(),
        "Expect is handled here: {j}"
    );
}

#[tokio::test]
async fn http10_clients_get_keep_alive_only_when_they_ask() {
    let (gw, _pods) = echo_gateway().await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /ka HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let a = c.answer().await;
    assert_eq!(
        (a.status, a.header("connection")),
        (200, Some("keep-alive"))
    );
    c.send(b"GET /plain HTTP/1.0\r\nHost: a.test\r\n\r\n").await;
    let a = c.answer().await;
    assert_eq!((a.status, a.header("connection")), (200, Some("close")));
    assert!(c.closed().await, "HTTP/1.0 without keep-alive closes");
}

#[tokio::test]
async fn ambiguous_framing_and_oversized_heads_are_refused() {
    let (gw, pods) = echo_gateway().await;
    // Content-Length with Transfer-Encoding, or two different lengths: the classic request
    // smuggling shapes. Both are refused and the connection closed.
    for bad in [
        &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\n\r\n",
    ] {
        let mut c = Raw::connect(&gw).await;
        c.send(bad).await;
        let a = c.answer().await;
        assert_eq!(a.status, 400, "{:?}", String::from_utf8_lossy(bad));
        assert_eq!(a.json()["error"], "bad_request");
        assert!(c.closed().await);
    }
    let mut c = Raw::connect(&gw).await;
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "y".repeat(70_000)
    );
    c.send(huge.as_bytes()).await;
    assert_eq!(c.answer().await.status, 431);
    // A transfer coding other than chunked cannot be delimited.
    let mut c = Raw::connect(&gw).await;
    c.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n")
        .await;
    assert_eq!(c.answer().await.status, 501);
    // None of it reached the Pod, and the gateway still serves.
    let r = gw.get("a.test", "/fine").await;
    assert_eq!(
        (r.status, r.header("x-pod")),
        (200, Some(pods[0].name.clone()))
    );
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop() {
    let (gw, _pods) = echo_gateway().await;
    let mut c = Raw::connect(&gw).await;
    c.send(
        b"GET /h HTTP/1.1\r\nHost: a.test\r\nConnection: x-secret, keep-alive\r\nX-Secret: 1\r\n\
          Keep-Alive: timeout=5\r\nTE: trailers\r\nX-Kept: yes\r\n\r\n",
    )
    .await;
    let j = c.answer().await.json();
    let h = &j["headers"];
    for gone in ["x-secret", "keep-alive", "te", "connection"] {
        assert!(h.get(gone).is_none(), "{gone} was passed on: {h}");
    }
    assert_eq!(h["x-kept"], "yes");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "a.test");
}

/// A Pod that accepts one WebSocket-style upgrade and then echoes bytes back upper-cased.
async fn upgrade_pod() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !head.contains("upgrade: echo") || !head.contains("connection: upgrade") {
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn upgrades_are_tunnelled_after_a_101() {
    let (pod, _task) = upgrade_pod().await;
    let conf = format!(
        "upstreams:\n  - {{name: ws, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: ws, path_prefix: /, upstream: ws}}\n"
    );
    let gw = Gateway::start(&conf, &[]).await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await;
    let a = c.answer().await;
    assert_eq!(a.status, 101);
    assert_eq!(a.header("upgrade"), Some("echo"));
    c.send(b"hello through podgate").await;
    assert!(c.fill(21).await);
    assert_eq!(&c.buf[..21], b"HELLO THROUGH PODGATE");
}

/// A Pod that answers every request head with `answer`, then closes if `close` is set.
async fn canned_pod(answer: &'static [u8], close: bool) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(p) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..p + 4);
                        if s.write_all(answer).await.is_err() || close {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn chunked_and_close_delimited_answers_reach_the_client_whole() {
    let chunked = canned_pod(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
        false,
    )
    .await;
    let until_close = canned_pod(b"HTTP/1.0 200 OK\r\n\r\nuntil the Pod closes", true).await;
    let conf = format!(
        "upstreams:\n  - {{name: chunked, nodes: [{{address: \"{chunked}\"}}]}}\n\
         \x20 - {{name: close, nodes: [{{address: \"{until_close}\"}}]}}\n\
         routes:\n  - {{name: chunked, path_prefix: /chunked, upstream: chunked}}\n\
         \x20 - {{name: close, path_prefix: /close, upstream: close}}\n"
    );
    let gw = Gateway::start(&conf, &[]).await;
    // hyper decodes the chunked framing: the body must be complete and the connection reusable.
    for _ in 0..3 {
        let r = gw.get("a.test", "/chunked").await;
        assert_eq!((r.status, &r.body[..]), (200, &b"hello, world"[..]));
    }
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /close HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let (head, body) = c.answer_until_close().await;
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"until the Pod closes");

    // An HTTP/1.0 client cannot read chunks: it gets the bare data, ended by the close.
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /chunked HTTP/1.0\r\nHost: a.test\r\n\r\n")
        .await;
    let (head, body) = c.answer_until_close().await;
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"hello, world");
    // The Pod's connection was read to the end of its chunked body: it is reused.
    let r = gw.get("a.test", "/chunked").await;
    assert_eq!((r.status, &r.body[..]), (200, &b"hello, world"[..]));
}

/// A Pod answering `200 ok` with keep-alive, counting the connections open to it.
async fn counting_pod() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let open = counter.clone();
            open.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                'conn: loop {
                    while let Some(p) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..p + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(answer).await.is_err() {
                            break 'conn;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                open.fetch_sub(1, SeqCst);
            });
        }
    });
    (addr, open)
}

#[tokio::test]
async fn idle_connections_to_a_pod_that_left_are_closed() {
    use std::sync::atomic::Ordering::SeqCst;
    let (a, open_a) = counting_pod().await;
    let (b, open_b) = counting_pod().await;
    let (c, open_c) = counting_pod().await;
    // One upstream over two services of one Pod each (a manifests cluster), one over a node.
    let manifest = |svc: &str, addr: std::net::SocketAddr, ready: bool| {
        let ep = Ep {
            ip: addr.ip().to_string(),
            pod: svc,
            ready: Some(ready),
            serving: Some(ready),
            terminating: Some(!ready),
        };
        format!(
            "{}---\n{}",
            service_yaml(svc),
            slice_yaml(&format!("{svc}-1"), svc, addr.port(), &[ep])
        )
    };
    let (a_yaml, b_yaml) = (manifest("a", a, true), manifest("b", b, true));
    let upstreams = |nodes: &str| {
        format!(
            "clusters:\n  - {{name: local, manifests: cluster}}\n\
             upstreams:\n  - name: pods\n    services:\n\
             \x20     - {{cluster: local, service: a, port: 8000}}\n\
             \x20     - {{cluster: local, service: b, port: 8000}}\n{nodes}\
             routes:\n  - {{name: pods, path_prefix: /, upstream: pods}}\n"
        )
    };
    let with_c = format!("  - {{name: node, nodes: [{{address: \"{c}\"}}]}}\n");
    let with_c = format!(
        "{}  - {{name: node, path_prefix: /node, upstream: node}}\n",
        upstreams(&with_c)
    );
    let gw = Gateway::start(
        &with_c,
        &[("cluster/a.yaml", &a_yaml), ("cluster/b.yaml", &b_yaml)],
    )
    .await;
    for _ in 0..4 {
        assert_eq!(gw.get("h", "/").await.status, 200);
    }
    assert_eq!(gw.get("h", "/node").await.status, 200);
    // Every Pod served and keeps a pooled connection from podgate.
    assert!(open_a.load(SeqCst) >= 1 && open_b.load(SeqCst) >= 1 && open_c.load(SeqCst) >= 1);

    // `a` turns terminating: it leaves the selection of an upstream that stays.
    write_atomically(&gw.path("cluster/a.yaml"), &manifest("a", a, false));
    // Traffic to the remaining Pod lets the pool sweep; the connection to `a` must go.
    wait_for(
        "the idle connection to the Pod that left to close",
        || async {
            assert_eq!(gw.get("h", "/").await.status, 200);
            open_a.load(SeqCst) == 0
        },
    )
    .await;
    assert!(
        open_b.load(SeqCst) >= 1,
        "the Pod that stays keeps its connection"
    );

    // A reload removes the upstream of `c` altogether.
    gw.rewrite_config(&upstreams(""));
    gw.signal("HUP");
    wait_for(
        "the idle connection of the removed upstream to close",
        || async {
            assert_eq!(gw.get("h", "/").await.status, 200);
            open_c.load(SeqCst) == 0
        },
    )
    .await;
}

#[tokio::test]
async fn a_streamed_answer_reaches_the_client_piece_by_piece() {
    // The Pod sends the head, then (once the client has it) a first event, then holds the rest
    // until the test has seen that event arrive through podgate (server-sent events, long
    // polls, progress output).
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pod = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).await.unwrap(), 1);
            head.push(b[0]);
        }
        s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        let _ = head_rx.await;
        s.write_all(b"d\r\ndata: first\n\n\r\n").await.unwrap();
        let _ = go_rx.await;
        s.write_all(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
            .await
            .unwrap();
    });
    let conf = format!(
        "upstreams:\n  - {{name: sse, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: sse, path_prefix: /, upstream: sse}}\n"
    );
    let gw = Gateway::start(&conf, &[]).await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /events HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await;
    while !c.buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let have = c.buf.len();
        assert!(c.fill(have + 1).await, "closed before the head");
    }
    head_tx.send(()).unwrap();
    let first = b"data: first\n\n";
    // Each read waits up to the deadline: a buffered first event fails here.
    while !c.buf.windows(first.len()).any(|w| w == first) {
        let have = c.buf.len();
        assert!(c.fill(have + 1).await, "closed before the first event");
    }
    go_tx.send(()).unwrap();
    let second = b"data: second\n\n";
    while !c.buf.windows(second.len()).any(|w| w == second) {
        let have = c.buf.len();
        assert!(c.fill(have + 1).await, "closed before the second event");
    }
}

#[tokio::test]
async fn x_forwarded_host_keeps_the_port_the_client_sent() {
    let (gw, _pods) = echo_gateway().await;
    let mut c = Raw::connect(&gw).await;
    c.send(b"GET /h HTTP/1.1\r\nHost: a.test:8080\r\n\r\n")
        .await;
    let j = c.answer().await.json();
    assert_eq!(j["headers"]["x-forwarded-host"], "a.test:8080");
    // An absolute-form target's authority is the host (RFC 9112 §3.2.2), also toward the Pod.
    c.send(b"GET http://b.test:81/h HTTP/1.1\r\nHost: ignored.test\r\n\r\n")
        .await;
    let j = c.answer().await.json();
    assert_eq!(j["headers"]["x-forwarded-host"], "b.test:81");
    assert_eq!(j["headers"]["host"], "b.test:81");
}
