//! HTTP/1.1 clients to upstreams whose Pods speak h2c: podgate's own HTTP/1.1 path turns the
//! request into an h2 stream and the answer back into HTTP/1.1 framing it writes itself. The
//! Pod is hyper's h2 server; the client writes raw bytes, so the framing it gets is checked as
//! sent.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An h2c Pod that answers with what it received: method, path, selected fields and the body
/// length, and sets a custom field and a trailer (which HTTP/1.1 clients do not get).
async fn h2c_echo_pod() -> (SocketAddr, tokio::task::JoinHandle<()>) {
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
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
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
    } else if head.contains("content-length: 0") {
        String::new()
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
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
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

    // HTTP/1.0 has no chunked coding: the answer ends with the connection.
    let mut old = TcpStream::connect(gw.addr).await.unwrap();
    let (head, text) = exchange(&mut old, b"GET /api/x HTTP/1.0\r\nHost: api.test\r\n\r\n").await;
    assert!(!head.contains("chunked"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(text.starts_with("GET /x HTTP/2.0"), "{text}");

    // A body larger than podgate reads whole is refused rather than half-relayed.
    let mut big = TcpStream::connect(gw.addr).await.unwrap();
    let mut req =
        b"POST /api/big HTTP/1.1\r\nHost: api.test\r\nContent-Length: 70000\r\n\r\n".to_vec();
    req.resize(req.len() + 70_000, b'x');
    let (head, _) = exchange(&mut big, &req).await;
    assert!(head.starts_with("http/1.1 413 "), "{head}");
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
