//! An HTTPS listener: TLS 1.2/1.3 with h2 and HTTP/1.1 offered by ALPN; and an h2c listener.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::sync::Arc;
use support::*;
use tokio_rustls::rustls;

async fn tls_get(gw: &Gateway, ca: &std::path::Path, alpn: &[&[u8]]) -> (String, u16, String) {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
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

#[tokio::test]
async fn h2c_listener_accepts_prior_knowledge_http2() {
    let pods = pods_same_port(&["web-v1"]).await;
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        pods[0].addr
    );
    let gw = Gateway::start_with_listener(tempfile::tempdir().unwrap(), "h2c: true", &conf).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://h2c.test/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-pod"], "web-v1");
    // HTTP/1.1 still works on the same listener.
    assert_eq!(gw.get("h", "/").await.status, 200);
}
