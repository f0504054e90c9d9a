//! From where: IP rules behind a trusted proxy and from an untrusted peer, CORS.

use super::*;

pub(super) async fn ip_rules(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
    // The trusted proxy (the test's own address) says the client is 192.0.2.10.
    let got = fx
        .send(
            c,
            k,
            "GET",
            "/ip/a",
            &[("x-forwarded-for", "192.0.2.10")],
            Body::None,
        )
        .await;
    let seen = served(&at("an allowed client behind a trusted proxy"), &got);
    assert_eq!(
        field(seen, "x-forwarded-for"),
        ["192.0.2.10, 127.0.0.1"],
        "{}",
        at("xff")
    );

    // A client behind the proxy wrote an allowed address in front of its own: the proxy's
    // entry (the rightmost) is the client.
    let got = fx
        .send(
            c,
            k,
            "GET",
            "/ip/a",
            &[("x-forwarded-for", "192.0.2.10, 203.0.113.5")],
            Body::None,
        )
        .await;
    refused(&at("a spoofed X-Forwarded-For"), &got, 403, "forbidden");
    let got = fx.send(c, k, "GET", "/ip/a", &[], Body::None).await;
    refused(&at("the proxy itself, not allowed"), &got, 403, "forbidden");
}

/// A peer that is not a trusted proxy: its `X-Forwarded-For` is not believed, and not passed
/// on either.
pub(super) async fn untrusted_peer(fx: &Fx) {
    for (path, want) in [("/ip/a", 403), ("/hdr/a", 200)] {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let tcp = sock.connect(fx.listeners.plain).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let case = format!("untrusted{path}");
        let req = http::Request::get(path)
            .header("host", "h1.test")
            .header("x-forwarded-for", "192.0.2.10")
            .header("x-case", &case)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), want, "{path} from an untrusted peer");
        let seen = fx
            .log
            .lock()
            .unwrap()
            .remove(&case)
            .and_then(|mut v| v.pop());
        if want == 200 {
            let seen = seen.expect("served");
            assert_eq!(field(&seen, "x-forwarded-for"), ["127.0.0.2"]);
        } else {
            assert!(seen.is_none());
        }
    }
}

pub(super) async fn cors(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
    let origin = ("origin", "https://shop.example.com");
    let preflight = [origin, ("access-control-request-method", "POST")];
    // OPTIONS is not among the route's methods: the preflight reaches it all the same.
    let (a, seen) = fx
        .send(c, k, "OPTIONS", "/cors/a", &preflight, Body::None)
        .await;
    assert_eq!(a.status, 204, "{}", at("preflight"));
    assert!(
        seen.is_none(),
        "{}: a preflight reached the Pod",
        at("preflight")
    );
    let expect = [
        ("access-control-allow-origin", "https://shop.example.com"),
        ("access-control-allow-methods", "GET, POST"),
        ("access-control-allow-headers", "x-api-key"),
        ("access-control-max-age", "600"),
        ("vary", "Origin"),
    ];
    for (n, v) in expect {
        assert_eq!(
            header(&a, n).as_deref(),
            Some(v),
            "{}: {n}",
            at("preflight")
        );
    }
    let stranger = [
        ("origin", "https://evil.example"),
        ("access-control-request-method", "POST"),
    ];
    let (a, seen) = fx
        .send(c, k, "OPTIONS", "/cors/a", &stranger, Body::None)
        .await;
    assert_eq!(a.status, 204, "{}", at("disallowed preflight"));
    assert!(seen.is_none());
    assert!(
        a.headers
            .keys()
            .all(|n| !n.as_str().starts_with("access-control-")),
        "{}: {:?}",
        at("a disallowed origin gets no CORS field"),
        a.headers
    );
    // An OPTIONS that is not a preflight keeps the route's methods.
    let (a, seen) = fx
        .send(c, k, "OPTIONS", "/cors/a", &[origin], Body::None)
        .await;
    assert_eq!(a.status, 405, "{}", at("OPTIONS without a preflight"));
    assert_eq!(header(&a, "allow").as_deref(), Some("GET, POST"));
    assert!(seen.is_none());

    let got = fx.send(c, k, "GET", "/cors/a", &[origin], Body::None).await;
    served(&at("the actual request"), &got);
    assert_eq!(
        header(&got.0, "access-control-allow-origin").as_deref(),
        Some("https://shop.example.com"),
        "{}",
        at("actual request")
    );
    assert_eq!(header(&got.0, "vary").as_deref(), Some("Origin"));
}
