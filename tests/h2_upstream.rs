//! HTTP/1.1 clients to upstreams whose Pods speak h2c: podgate's own HTTP/1.1 path turns the
//! request into an h2 stream and the answer back into HTTP/1.1 framing it writes itself. The
//! Pod is hyper's h2 server; the client writes raw bytes, so the framing it gets is checked as
//! sent.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An h2c Pod that answers with what it received: method, path, selected fields and the body
/// length, and sets a custom field and a trailer (which HTTP/1.1 clients do not get).
async fn h2c_echo_pod() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    h2c_echo_pod_window(None).await
}

/// [`h2c_echo_pod`] with a flow-control window of `window` bytes per stream and connection.
async fn h2c_echo_pod_window(window: Option<u32>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let field = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string()
                        };
                        let head = format!(
                            "{} {} {:?} authority={} xff={} proto={} id={} custom={}",
                            req.method(),
                            req.uri().path_and_query().map_or("", |p| p.as_str()),
                            req.version(),
                            req.uri().authority().map_or("-", |a| a.as_str()),
                            field("x-forwarded-for"),
                            field("x-forwarded-proto"),
                            !field("x-request-id").is_empty(),
                            field("x-custom"),
                        );
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let text = format!("{head} body={}\n", body.len());
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("x-pod", "h2c-echo")
                                .body(Full::new(Bytes::from(text)))
                                .unwrap(),
                        )
                    },
                );
                let mut b =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                if let Some(w) = window {
                    b.adaptive_window(false)
                        .initial_stream_window_size(w)
                        .initial_connection_window_size(w);
                }
                let _ = b
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// Writes `request` and reads one answer: head and body (chunked decoded, or until close).
async fn exchange(io: &mut TcpStream, request: &[u8]) -> (String, String) {
    io.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = io.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before a head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let mut rest = buf[head_end..].to_vec();
    let body = if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        loop {
            while !rest.windows(2).any(|w| w == b"\r\n") {
                let n = io.read(&mut chunk).await.unwrap();
                rest.extend_from_slice(&chunk[..n]);
            }
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
            while rest.len() < line_end + 2 + size + 2 {
                let n = io.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                rest.extend_from_slice(&chunk[..n]);
            }
            out.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
        String::from_utf8(out).unwrap()
    } else if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse::<usize>().ok())
    {
        while rest.len() < len {
            let n = io.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed inside a content-length body");
            rest.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(rest[..len].to_vec()).unwrap()
    } else {
        io.read_to_end(&mut rest).await.unwrap();
        String::from_utf8(rest).unwrap()
    };
    (head, body)
}

#[tokio::test]
async fn http1_clients_reach_h2c_pods() {
    let (pod, _task) = h2c_echo_pod().await;
    let body = format!(
        "upstreams:\n  - {{name: h2pod, protocol: h2c, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: api, path_prefix: /api, strip_prefix: true, upstream: h2pod}}\n"
    );
    let gw = Gateway::start(&body, &[]).await;
    let mut io = TcpStream::connect(gw.addr).await.unwrap();

    // A GET and a POST with a body on one keep-alive connection.
    let (head, text) = exchange(
        &mut io,
        b"GET /api/items?q=1 HTTP/1.1\r\nHost: api.test\r\nX-Custom: yes\r\nConnection: keep-alive, x-custom\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("x-pod: h2c-echo\r\n"), "{head}");
    assert!(head.contains("x-request-id: "), "{head}");
    // The Pod's content-length holds (the h2 crate checks its DATA against it).
    assert!(head.contains("content-length: "), "{head}");
    // Over h2, with the prefix stripped, Host as :authority, forwarding fields added and
    // fields the client named in Connection dropped.
    assert_eq!(
        text,
        "GET /items?q=1 HTTP/2.0 authority=api.test xff=127.0.0.1 proto=http id=true custom=- body=0\n"
    );
    let (head, text) = exchange(
        &mut io,
        b"POST /api/upload HTTP/1.1\r\nHost: api.test\r\nContent-Length: 11\r\n\r\nhello world",
    )
    .await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(
        text.starts_with("POST /upload HTTP/2.0") && text.ends_with("body=11\n"),
        "{text}"
    );

    // HTTP/1.0 without keep-alive: the connection ends after the answer, which is never chunked.
    let mut old = TcpStream::connect(gw.addr).await.unwrap();
    let (head, text) = exchange(&mut old, b"GET /api/x HTTP/1.0\r\nHost: api.test\r\n\r\n").await;
    assert!(!head.contains("chunked"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(text.starts_with("GET /x HTTP/2.0"), "{text}");
}

/// Bodies larger than podgate reads whole, and chunked ones, stream to the Pod under its
/// flow-control window (16 KiB here, so most of the body waits for WINDOW_UPDATEs), and the
/// connection stays usable for the next request.
#[tokio::test]
async fn http1_large_and_chunked_bodies_stream_to_h2c_pods() {
    let (pod, _task) = h2c_echo_pod_window(Some(16 * 1024)).await;
    let body = format!(
        "upstreams:\n  - {{name: h2pod, protocol: h2c, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: api, path_prefix: /, upstream: h2pod}}\n"
    );
    let gw = Gateway::start(&body, &[]).await;
    let mut io = TcpStream::connect(gw.addr).await.unwrap();

    let mut req =
        b"POST /big HTTP/1.1\r\nHost: api.test\r\nContent-Length: 300000\r\n\r\n".to_vec();
    req.resize(req.len() + 300_000, b'x');
    let (head, text) = exchange(&mut io, &req).await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert!(text.starts_with("POST /big HTTP/2.0"), "{text}");
    assert!(text.ends_with("body=300000\n"), "{text}");

    // Chunked, with an extension and a trailer: the Pod gets the data only.
    let mut req =
        b"PUT /chunks HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for size in [1usize, 40_000, 70_000] {
        req.extend_from_slice(format!("{size:x};ext=1\r\n").as_bytes());
        req.resize(req.len() + size, b'y');
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\nx-sum: 1\r\n\r\n");
    let (head, text) = exchange(&mut io, &req).await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(text.starts_with("PUT /chunks HTTP/2.0"), "{text}");
    assert!(text.ends_with("body=110001\n"), "{text}");

    // A chunked body that breaks the grammar is a 400, and the connection ends.
    let (head, _) = exchange(
        &mut io,
        b"POST /bad HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 400 "), "{head}");
}

#[tokio::test]
async fn http1_to_an_h2c_pod_that_is_down_is_a_502() {
    let port = free_port();
    let body = format!(
        "upstreams:\n  - {{name: h2pod, protocol: h2c, retries: 0, nodes: [{{address: \"127.0.0.1:{port}\"}}]}}\n\
         routes:\n  - {{name: api, path_prefix: /, upstream: h2pod}}\n"
    );
    let gw = Gateway::start(&body, &[]).await;
    let r = gw.get("h", "/x").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "bad_gateway");
}

/// Reads one h2 frame header (type, flags, stream id) and its payload from `io`.
async fn read_frame(io: &mut TcpStream) -> Option<(u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    Some((head[3], stream, payload))
}

/// A Pod whose first connection refuses the first stream the way a server rotating its
/// connections does: GOAWAY with last stream id 0 (nothing processed), then it waits for the
/// client to close. Later connections are served by hyper and answer `second connection`.
/// Counts the connections it accepted.
async fn refusing_pod() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            if count.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::spawn(async move {
                    let mut preface = [0u8; 24];
                    tcp.read_exact(&mut preface).await.unwrap();
                    // An empty SETTINGS frame, then wait for the first HEADERS.
                    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
                    while let Some((kind, _, _)) = read_frame(&mut tcp).await {
                        if kind == 1 {
                            break;
                        }
                    }
                    let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    tcp.write_all(&goaway).await.unwrap();
                    let mut rest = Vec::new();
                    let _ = tcp.read_to_end(&mut rest).await;
                });
                continue;
            }
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"second connection"),
                    )))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    (addr, accepted, task)
}

/// A stream the Pod refused unprocessed (GOAWAY past it) goes again on a new connection to the
/// same Pod, even for a POST and with `retries: 0`: the Pod said it did nothing with it.
#[tokio::test]
async fn a_stream_refused_by_goaway_goes_again_on_a_new_connection() {
    let (pod, accepted, _task) = refusing_pod().await;
    let body = format!(
        "upstreams:\n  - {{name: h2pod, protocol: h2c, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: api, path_prefix: /, upstream: h2pod}}\n"
    );
    let gw = Gateway::start(&body, &[]).await;
    let mut io = TcpStream::connect(gw.addr).await.unwrap();
    let (head, text) = exchange(
        &mut io,
        b"POST /x HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert_eq!(text, "second connection");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// A loopback IO that keeps a copy of every byte read, so a test Pod can check which frames
/// podgate sent it.
struct Tee {
    io: TcpStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl tokio::io::AsyncRead for Tee {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.seen.lock().unwrap().extend_from_slice(&new);
        r
    }
}

impl tokio::io::AsyncWrite for Tee {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The frame types in `bytes` (a client's side of an h2 connection, preface first), with the
/// error code of each GOAWAY (type 7) and RST_STREAM (type 3).
fn frames(bytes: &[u8]) -> Vec<(u8, Option<u32>)> {
    let mut out = Vec::new();
    let mut i = 24;
    while i + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[i], bytes[i + 1], bytes[i + 2]]) as usize;
        let kind = bytes[i + 3];
        let payload = &bytes[(i + 9).min(bytes.len())..(i + 9 + len).min(bytes.len())];
        let code = match (kind, payload.len()) {
            (7, n) if n >= 8 => Some(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
            (3, 4) => Some(u32::from_be_bytes(payload.try_into().unwrap())),
            _ => None,
        };
        out.push((kind, code));
        i += 9 + len;
    }
    out
}

/// What the h2 Pods of the drain test saw: per ended connection, the Pod and the frames.
type Ended = Arc<Mutex<Vec<(String, Vec<(u8, Option<u32>)>)>>>;

/// h2c Pods (on the h2 crate) on one port and distinct loopback IPs. `/slow` tells `started`
/// which Pod took it and answers once `release` is notified; other paths answer at once. Every
/// answer's body is the Pod's name.
async fn h2c_pods(
    names: &[&'static str],
    started: tokio::sync::mpsc::UnboundedSender<&'static str>,
    release: Arc<tokio::sync::Notify>,
    ended: Ended,
) -> Vec<SocketAddr> {
    let (base, port, listeners) = 'found: {
        for attempt in 0..50u32 {
            let base = 30 + ((std::process::id() + attempt * 11) % 200) as u8;
            let Ok(first) = TcpListener::bind((std::net::Ipv4Addr::new(127, 0, base, 1), 0)).await
            else {
                continue;
            };
            let port = first.local_addr().unwrap().port();
            let mut ls = vec![first];
            for i in 1..names.len() {
                let ip = std::net::Ipv4Addr::new(127, 0, base, 1 + i as u8);
                match TcpListener::bind((ip, port)).await {
                    Ok(l) => ls.push(l),
                    Err(_) => break,
                }
            }
            if ls.len() == names.len() {
                break 'found (base, port, ls);
            }
        }
        panic!("no shared free port on loopback");
    };
    let _ = (base, port);
    let mut addrs = Vec::new();
    for (name, l) in names.iter().copied().zip(listeners) {
        addrs.push(l.local_addr().unwrap());
        let (started, release, ended) = (started.clone(), release.clone(), ended.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let (started, release, ended) = (started.clone(), release.clone(), ended.clone());
                tokio::spawn(async move {
                    let seen = Arc::new(Mutex::new(Vec::new()));
                    let tee = Tee {
                        io: tcp,
                        seen: seen.clone(),
                    };
                    let Ok(mut conn) = h2::server::handshake(tee).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let (started, release) = (started.clone(), release.clone());
                        tokio::spawn(async move {
                            if req.uri().path() == "/slow" {
                                let _ = started.send(name);
                                release.notified().await;
                            }
                            let answer = http::Response::new(());
                            if let Ok(mut body) = respond.send_response(answer, false) {
                                let _ = body.send_data(Bytes::from(name), true);
                            }
                        });
                    }
                    let frames = frames(&seen.lock().unwrap());
                    ended.lock().unwrap().push((name.to_string(), frames));
                });
            }
        });
    }
    addrs
}

/// One GET over h2 (prior knowledge) to `gw`: the status and the body.
async fn h2_get(gw: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(gw).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://a.test{path}"))
        .body(())
        .unwrap();
    let (answer, _) = client.send_request(req, true).unwrap();
    let resp = answer.await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    (status, String::from_utf8(text).unwrap())
}

/// A Pod that leaves its Service has its h2 connection from podgate drained: the call running on
/// it finishes, then podgate sends GOAWAY (NO_ERROR) and closes, well before the 60 s idle
/// timeout of HTTP/1.1 connections; no stream is reset. The Pod that stays keeps its
/// connection. `h2_clients`: the clients speak h2 (prior knowledge), else HTTP/1.1.
async fn a_leaving_pod_is_drained(h2_clients: bool) {
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let ended: Ended = Arc::default();
    let names = ["g-1", "g-2"];
    let addrs = h2c_pods(&names, started_tx, release.clone(), ended.clone()).await;
    let port = addrs[0].port();
    let ep = |i: usize| Ep {
        ip: addrs[i].ip().to_string(),
        pod: names[i],
        ready: Some(true),
        serving: Some(true),
        terminating: Some(false),
    };
    let both = format!(
        "{}---\n{}",
        service_yaml("g"),
        slice_yaml("g-1", "g", port, &[ep(0), ep(1)])
    );
    let conf = "clusters:\n  - name: local\n    manifests: cluster\n\
         upstreams:\n  - name: grpcish\n    protocol: h2c\n    services:\n\
         \x20     - {cluster: local, service: g, port: 8000}\n\
         routes:\n  - {name: all, path_prefix: /, upstream: grpcish}\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    std::fs::write(dir.path().join("cluster/g.yaml"), &both).unwrap();
    let listener = if h2_clients { "h2c: true" } else { "" };
    let gw = Gateway::start_with_listener(dir, listener, conf).await;
    let addr = gw.addr;
    let call = move |path: &'static str| async move {
        if h2_clients {
            h2_get(addr, path).await
        } else {
            let mut io = TcpStream::connect(addr).await.unwrap();
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
            let (head, text) = exchange(&mut io, request.as_bytes()).await;
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (status, text)
        }
    };

    // Both Pods get a connection.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let (status, text) = call("/").await;
        assert_eq!(status, 200);
        seen.insert(text);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // A call in flight on one Pod; then that Pod leaves the slice.
    let slow = tokio::spawn(call("/slow"));
    let leaving = started.recv().await.unwrap();
    let stays = names.iter().position(|n| *n != leaving).unwrap();
    write_atomically(
        &gw.path("cluster/g.yaml"),
        &format!(
            "{}---\n{}",
            service_yaml("g"),
            slice_yaml("g-1", "g", port, &[ep(stays)])
        ),
    );
    let gone = format!("\"{}\"", addrs[1 - stays]);
    wait_for("the Pod to leave the upstream", || async {
        !gw.upstreams_json().await.to_string().contains(&gone)
    })
    .await;
    // The call still runs: its connection is draining, not gone.
    assert!(
        ended.lock().unwrap().is_empty(),
        "closed before the call ended"
    );
    release.notify_one();
    assert_eq!(slow.await.unwrap(), (200, leaving.to_string()));

    wait_for("the leaving Pod's connection to close", || async {
        ended.lock().unwrap().iter().any(|(n, _)| n == leaving)
    })
    .await;
    let ended = ended.lock().unwrap().clone();
    assert_eq!(
        ended.len(),
        1,
        "only the leaving Pod's connection ends: {ended:?}"
    );
    let frames = &ended[0].1;
    assert!(
        frames.contains(&(7, Some(0))),
        "no GOAWAY (NO_ERROR) before the close: {frames:?}"
    );
    assert!(
        !frames.iter().any(|(kind, _)| *kind == 3),
        "a stream was reset: {frames:?}"
    );
}

#[tokio::test]
async fn a_pod_that_leaves_gets_its_h2_connection_drained_with_goaway() {
    a_leaving_pod_is_drained(false).await;
}

#[tokio::test]
async fn a_pod_that_leaves_gets_its_h2_connection_from_h2_clients_drained_with_goaway() {
    a_leaving_pod_is_drained(true).await;
}

/// The same refusal for an h2 client (prior knowledge on an `h2c: true` listener): the POST is
/// sent again on a new connection to the Pod and answered.
#[tokio::test]
async fn an_h2_clients_stream_refused_by_goaway_goes_again_on_a_new_connection() {
    let (pod, accepted, _task) = refusing_pod().await;
    let body = format!(
        "upstreams:\n  - {{name: h2pod, protocol: h2c, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: api, path_prefix: /, upstream: h2pod}}\n"
    );
    let gw = Gateway::start_with_listener(tempfile::tempdir().unwrap(), "h2c: true", &body).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post("http://api.test/x").body(()).unwrap();
    let (answer, mut stream) = client.send_request(req, false).unwrap();
    stream
        .send_data(Bytes::from_static(b"hello"), true)
        .unwrap();
    let resp = answer.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(text, b"second connection");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// An h2 client's large upload reaches an h2c Pod whose window is 16 KiB, under both sides'
/// flow control, with its `content-length`; the answer comes back with the Pod's fields.
#[tokio::test]
async fn an_h2_clients_large_body_flows_to_an_h2c_pod_under_flow_control() {
    let (pod, _task) = h2c_echo_pod_window(Some(16 * 1024)).await;
    let body = format!(
        "upstreams:\n  - {{name: h2pod, protocol: h2c, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: api, path_prefix: /api, strip_prefix: true, upstream: h2pod}}\n"
    );
    let gw = Gateway::start_with_listener(tempfile::tempdir().unwrap(), "h2c: true", &body).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post("http://api.test/api/up?x=1")
        .header("content-length", "300000")
        .header("x-custom", "yes")
        .body(())
        .unwrap();
    let (answer, mut stream) = client.send_request(req, false).unwrap();
    let mut left = Bytes::from(vec![b'z'; 300_000]);
    while !left.is_empty() {
        stream.reserve_capacity(left.len());
        let n = std::future::poll_fn(|cx| stream.poll_capacity(cx))
            .await
            .unwrap()
            .unwrap();
        let part = left.split_to(n.min(left.len()));
        stream.send_data(part, left.is_empty()).unwrap();
    }
    let resp = answer.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-pod"], "h2c-echo");
    assert!(resp.headers().contains_key("x-request-id"));
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(text).unwrap();
    assert_eq!(
        text,
        "POST /up?x=1 HTTP/2.0 authority=api.test xff=127.0.0.1 proto=http id=true custom=yes body=300000\n"
    );
}

/// A call the h2 client cancels while its Pod works is cancelled at the Pod too: the Pod's
/// stream is reset, so the Pod can stop (no answer nobody waits for, no stream left open).
#[tokio::test]
async fn an_h2_client_cancelling_a_call_resets_the_pods_stream() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pod = l.local_addr().unwrap();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (reset_tx, mut reset) = tokio::sync::mpsc::unbounded_channel::<h2::Reason>();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (started_tx, reset_tx) = (started_tx.clone(), reset_tx.clone());
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(tcp).await.unwrap();
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let (started_tx, reset_tx) = (started_tx.clone(), reset_tx.clone());
                    tokio::spawn(async move {
                        let _ = started_tx.send(());
                        // Never answers: waits for the stream's reset.
                        if let Ok(reason) = std::future::poll_fn(|cx| respond.poll_reset(cx)).await
                        {
                            let _ = reset_tx.send(reason);
                        }
                    });
                }
            });
        }
    });
    let body = format!(
        "upstreams:\n  - {{name: h2pod, protocol: h2c, read_timeout: 30s, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n  - {{name: api, path_prefix: /, upstream: h2pod}}\n"
    );
    let gw = Gateway::start_with_listener(tempfile::tempdir().unwrap(), "h2c: true", &body).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get("http://api.test/slow").body(()).unwrap();
    let (_answer, mut stream) = client.send_request(req, true).unwrap();
    started.recv().await.unwrap();
    stream.send_reset(h2::Reason::CANCEL);
    let reason = tokio::time::timeout(DEADLINE, reset.recv())
        .await
        .expect("the Pod's stream was not reset")
        .unwrap();
    assert_eq!(reason, h2::Reason::CANCEL);
}
