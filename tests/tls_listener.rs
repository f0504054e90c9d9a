//! An HTTPS listener: TLS 1.2/1.3 with h2 and HTTP/1.1 offered by ALPN; and an h2c listener,
//! which tells prior-knowledge h2 from HTTP/1.x by the first bytes (`gateway/src/proxy/h1/sniff.rs`).

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use support::*;

async fn tls_get(gw: &Gateway, ca: &std::path::Path, alpn: &[&[u8]]) -> (String, u16, String) {
    let connector = tls_connector(ca, alpn);
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("gateway.test").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let negotiated = tls
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let io = hyper_util::rt::TokioIo::new(tls);
    let req = http::Request::builder()
        .uri("https://gateway.test/web/x")
        .header("host", "gateway.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = if negotiated == "h2" {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        negotiated,
        status,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn https_listener_speaks_h2_and_http1_by_alpn() {
    let pods = pods_same_port(&["web-v1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "gw", &["gateway.test"]);
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /web, upstream: web}}\n",
        pods[0].addr
    );
    let tls = format!(
        "tls: {{cert: {}, key: {}}}",
        pki.cert_pem.display(),
        pki.key_pem.display()
    );
    let ca = pki.ca_pem.clone();
    let gw = Gateway::start_with_listener(dir, &tls, &conf).await;

    let (proto, status, body) = tls_get(&gw, &ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!((proto.as_str(), status), ("h2", 200), "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["pod"], "web-v1");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");

    let (proto, status, _) = tls_get(&gw, &ca, &[b"http/1.1"]).await;
    assert_eq!((proto.as_str(), status), ("http/1.1", 200));
}

/// A gateway with an `h2c: true` listener in front of one demo Pod (kept alive with it).
async fn h2c_gateway() -> (Gateway, Vec<Pod>) {
    let pods = pods_same_port(&["web-v1"]).await;
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        pods[0].addr
    );
    let gw = Gateway::start_with_listener(tempfile::tempdir().unwrap(), "h2c: true", &conf).await;
    (gw, pods)
}

/// Sends `parts` on a fresh connection, `pause` apart, then (if `half_close`) ends the sending
/// side; returns all the gateway sent until it closed, and how long that took from the last part.
async fn raw_exchange(
    gw: &Gateway,
    parts: &[&[u8]],
    pause: std::time::Duration,
    half_close: bool,
) -> (String, std::time::Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            // The bytes must arrive in separate segments: that is the case under test.
            tokio::time::sleep(pause).await;
        }
        tcp.write_all(part).await.unwrap();
    }
    if half_close {
        tcp.shutdown().await.unwrap();
    }
    let sent = std::time::Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("the gateway did not close in time\n{}", gw.log_text()));
    // Closing a socket with unread bytes sends a reset: a close all the same.
    if let Err(e) = read {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    (String::from_utf8_lossy(&got).into_owned(), sent.elapsed())
}

/// A client stream whose first write stops after `split` bytes and whose next write waits
/// `pause`: an h2 preface arriving in two pieces.
struct SplitPreface {
    inner: tokio::net::TcpStream,
    split: usize,
    written: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for SplitPreface {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SplitPreface {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let me = &mut *self;
        if me.written < me.split {
            let n = buf.len().min(me.split - me.written);
            let r = std::pin::Pin::new(&mut me.inner).poll_write(cx, &buf[..n]);
            if let Poll::Ready(Ok(n)) = r {
                me.written += n;
                if me.written == me.split {
                    me.pause = Some(Box::pin(tokio::time::sleep(
                        std::time::Duration::from_millis(100),
                    )));
                }
            }
            return r;
        }
        if let Some(pause) = me.pause.as_mut() {
            std::task::ready!(std::future::Future::poll(pause.as_mut(), cx));
            me.pause = None;
        }
        std::pin::Pin::new(&mut me.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One prior-knowledge h2 GET over `io`; returns the status and the answering Pod.
async fn h2_get<I>(io: I) -> (u16, String)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://h2c.test/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, send.send_request(req))
        .await
        .expect("an h2 answer in time")
        .unwrap();
    let pod = resp.headers()["x-pod"].to_str().unwrap().to_string();
    (resp.status().as_u16(), pod)
}

#[tokio::test]
async fn h2c_listener_accepts_prior_knowledge_http2() {
    let (gw, _pods) = h2c_gateway().await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(h2_get(tcp).await, (200, "web-v1".to_string()));

    // The preface in two pieces: the first 8 bytes decide nothing, the gateway waits for more.
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let split = SplitPreface {
        inner: tcp,
        split: 8,
        written: 0,
        pause: None,
    };
    assert_eq!(h2_get(split).await, (200, "web-v1".to_string()));
}

#[tokio::test]
async fn h2c_listener_serves_http1_on_podgates_path_without_waiting_for_24_bytes() {
    let (gw, _pods) = h2c_gateway().await;
    // 18 bytes, fewer than the h2 preface: Pingora's h2c detection waited for 24 for ever.
    let (answer, _) = raw_exchange(
        &gw,
        &[b"GET / HTTP/1.0\r\n\r\n"],
        std::time::Duration::ZERO,
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("x-pod: web-v1\r\n"), "{answer}");
    assert!(answer.contains("x-request-id: "), "{answer}");

    // A usual HTTP/1.1 client, kept alive over two requests.
    let mut conn = Conn::open(gw.addr).await.unwrap();
    for _ in 0..2 {
        let r = conn.send("GET", "h", "/x", &[]).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-pod").as_deref(), Some("web-v1"));
        assert!(r.header("x-request-id").is_some());
    }

    // "P" could start the preface; the next byte differs from it.
    let (answer, _) = raw_exchange(
        &gw,
        &[
            b"P",
            b"UT /x HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        ],
        std::time::Duration::from_millis(100),
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("\"method\":\"PUT\""), "{answer}");

    // Bytes that leave the preface late are HTTP/1.x, and not valid: podgate's 400.
    let (answer, _) = raw_exchange(
        &gw,
        &[b"PRI * HTTX/1.1\r\nhost: h\r\n\r\n"],
        std::time::Duration::ZERO,
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
}

#[tokio::test]
async fn h2c_listener_closes_clients_that_end_before_telling_their_protocol() {
    let (gw, _pods) = h2c_gateway().await;
    // Nothing at all, or part of the preface, then the end of the stream: closed at once,
    // without an answer (neither the 60 s header timeout nor an h2 handshake).
    for parts in [&[][..], &[&b"PRI * HT"[..]][..]] {
        let (answer, took) = raw_exchange(&gw, parts, std::time::Duration::ZERO, true).await;
        assert_eq!(answer, "", "{parts:?}");
        assert!(
            took < std::time::Duration::from_secs(5),
            "{parts:?}: {took:?}"
        );
    }
    // The listener still serves.
    assert_eq!(gw.get("h", "/").await.status, 200);
}
