//! Who may call: API keys and consumers, JWT, their gRPC refusals, a key rotated by file.

use super::*;

pub(super) async fn api_keys(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
    let got = fx
        .send(
            c,
            k,
            "GET",
            "/key/a",
            &[("x-api-key", "shop-key-1"), ("x-consumer", "evil")],
            Body::None,
        )
        .await;
    let seen = served(&at("a consumer's key"), &got);
    assert_eq!(field(seen, "x-consumer"), ["shop"], "{}", at("x-consumer"));
    assert!(
        field(seen, "x-api-key").is_empty(),
        "{}: the key reached the Pod",
        at("key")
    );

    let got = fx.send(c, k, "GET", "/key/a", &[], Body::None).await;
    refused(&at("no key"), &got, 401, "unauthorized");
    let challenge = header(&got.0, "www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("ApiKey realm=\"key-"),
        "{}: {challenge}",
        at("no key")
    );

    let got = fx
        .send(c, k, "GET", "/key/a", &[("x-api-key", "nope")], Body::None)
        .await;
    refused(&at("a wrong key"), &got, 401, "unauthorized");
    let challenge = header(&got.0, "www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains("error=\"invalid_key\""),
        "{}: {challenge}",
        at("wrong key")
    );
    assert!(!challenge.contains("nope"), "the key is never echoed");

    let got = fx
        .send(
            c,
            k,
            "GET",
            "/key/a",
            &[("x-api-key", "other-key-1")],
            Body::None,
        )
        .await;
    refused(&at("a consumer not on the list"), &got, 403, "forbidden");

    let got = fx
        .send(
            c,
            k,
            "GET",
            "/qkey/a?x=1&apikey=shop-key-1&y=2",
            &[],
            Body::None,
        )
        .await;
    let seen = served(&at("a key in the query"), &got);
    assert_eq!(
        seen.target,
        "/qkey/a?x=1&y=2",
        "{}",
        at("query key removed")
    );
    assert_eq!(field(seen, "x-consumer"), ["shop"]);
    let got = fx.send(c, k, "GET", "/qkey/a?x=1", &[], Body::None).await;
    refused(&at("no query key"), &got, 401, "unauthorized");
}

pub(super) async fn jwt(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
    let bearer = |t: &str| format!("Bearer {t}");
    let got = fx
        .send(
            c,
            k,
            "GET",
            "/jwt/a",
            &[("authorization", &bearer(&fx.good))],
            Body::None,
        )
        .await;
    let seen = served(&at("a valid RS256 token"), &got);
    assert_eq!(
        field(seen, "x-user-id"),
        ["user-1"],
        "{}",
        at("claim to header")
    );
    assert!(
        field(seen, "authorization").is_empty(),
        "{}: the token reached the Pod",
        at("jwt")
    );

    for (what, t, why) in [
        ("an expired token", &fx.expired, "the token has expired"),
        (
            "a token signed by another key",
            &fx.forged,
            "the signature is invalid",
        ),
    ] {
        let got = fx
            .send(
                c,
                k,
                "GET",
                "/jwt/a",
                &[("authorization", &bearer(t))],
                Body::None,
            )
            .await;
        refused(&at(what), &got, 401, "unauthorized");
        let challenge = header(&got.0, "www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=\"jwt-")
                && challenge.contains("error=\"invalid_token\"")
                && challenge.contains(why),
            "{}: {challenge}",
            at(what)
        );
    }
    let got = fx.send(c, k, "GET", "/jwt/a", &[], Body::None).await;
    refused(&at("no token"), &got, 401, "unauthorized");
}

pub(super) async fn grpc(fx: &Fx, c: Client, k: &str) {
    let call = |auth: Vec<(&'static str, String)>| async move {
        let mut fields = vec![
            ("content-type", "application/grpc".to_string()),
            ("te", "trailers".into()),
        ];
        fields.extend(auth);
        let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        fx.send(
            c,
            k,
            "POST",
            "/grpc.Svc/Call",
            &fields,
            Body::Fixed(b"\0\0\0\0\x02hi"),
        )
        .await
    };
    for (what, auth) in [
        ("no credential", vec![]),
        ("a wrong key", vec![("x-api-key", "nope".to_string())]),
        (
            "an expired token",
            vec![("authorization", format!("Bearer {}", fx.expired))],
        ),
    ] {
        let (a, seen) = call(auth).await;
        let at = format!("gRPC {what} ({c:?} to {k} Pod)");
        assert_eq!(a.status, 200, "{at}");
        // Trailers-only: the status in the one head, no body, no trailers.
        assert_eq!(
            header(&a, "grpc-status").as_deref(),
            Some("16"),
            "{at}: {:?}",
            a.headers
        );
        assert_eq!(
            header(&a, "content-type").as_deref(),
            Some("application/grpc"),
            "{at}"
        );
        assert!(
            a.body.is_empty() && a.trailers.is_none(),
            "{at}: {:?}",
            a.body
        );
        assert!(seen.is_none(), "{at}: reached the Pod");
    }
    // A declared length past max_body: RESOURCE_EXHAUSTED, trailers-only.
    let big = b"\0\0\0\0\x28012345678901234567890123456789012345678901";
    let grpc_fields = [("content-type", "application/grpc"), ("te", "trailers")];
    let (a, seen) = fx
        .send(c, k, "POST", "/body/x", &grpc_fields, Body::Fixed(big))
        .await;
    assert_eq!(
        header(&a, "grpc-status").as_deref(),
        Some("8"),
        "{c:?} {k}: {:?}",
        a.headers
    );
    assert!(a.body.is_empty() && a.trailers.is_none() && seen.is_none());
    if k == "h2c" {
        let (a, seen) = call(vec![("x-api-key", "shop-key-1".to_string())]).await;
        assert_eq!(a.status, 200);
        let status = a.trailers.as_ref().and_then(|t| t.get("grpc-status"));
        assert_eq!(
            status.map(|v| v.as_bytes()),
            Some(&b"0"[..]),
            "{c:?}: {:?}",
            a.trailers
        );
        assert_eq!(&a.body[..], &grpc_frame(b"pod-a:hi")[..]);
        let seen = seen.expect("an authenticated call reaches the Pod");
        assert!(field(&seen, "x-api-key").is_empty());
        assert_eq!(field(&seen, "x-consumer"), ["shop"]);
    }
}

/// A consumer's key file replaced while podgate runs: the new key works, the old one is refused,
/// with no reload or restart.
pub(super) async fn key_rotation(fx: &Fx) {
    support::write_atomically(&fx.gw.path("keys/shop"), "shop-key-2\n");
    let key = |k: &'static str| async move {
        let got = fx
            .send(
                Client::TlsH2,
                "h1",
                "GET",
                "/key/a",
                &[("x-api-key", k)],
                Body::None,
            )
            .await;
        got.0.status
    };
    support::wait_for("the rotated key to be accepted", || async {
        key("shop-key-2").await == 200
    })
    .await;
    assert_eq!(key("shop-key-1").await, 401, "the replaced key is refused");
}
