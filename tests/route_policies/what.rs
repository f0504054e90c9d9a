//! What reaches the Pod: header rules, rewrite, redirect, body limits; and `/config`.

use super::*;

pub(super) async fn rules_and_rewrites(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
    let sent = [
        ("x-debug", "1"),
        ("x-env", "dev"),
        ("x-forwarded-for", "6.6.6.6, 203.0.113.5"),
    ];
    let got = fx.send(c, k, "GET", "/hdr/a", &sent, Body::None).await;
    let seen = served(&at("header rules"), &got);
    assert!(
        field(seen, "x-debug").is_empty(),
        "{}: {:?}",
        at("removed"),
        seen.fields
    );
    assert_eq!(field(seen, "x-env"), ["prod"], "{}", at("set"));
    assert_eq!(field(seen, "x-via"), ["podgate"], "{}", at("add"));
    // What the client wrote left of the client the trusted proxy named never reaches the Pod.
    assert_eq!(
        field(seen, "x-forwarded-for"),
        ["203.0.113.5, 127.0.0.1"],
        "{}",
        at("xff")
    );
    assert_eq!(header(&got.0, "cache-control").as_deref(), Some("no-store"));
    assert_eq!(
        header(&got.0, "x-pod"),
        None,
        "{}: response remove",
        at("rules")
    );

    let got = fx.send(c, k, "GET", "/rw/42?x=1", &[], Body::None).await;
    let seen = served(&at("a rewrite"), &got);
    assert_eq!(
        seen.target,
        "/v2/42?x=1",
        "{}",
        at("rewrite keeps the query")
    );

    let (a, seen) = fx.send(c, k, "GET", "/redir/a?b=1", &[], Body::None).await;
    if c.tls() {
        // Already on https: served.
        assert_eq!(a.status, 200, "{}", at("redirect over TLS"));
        assert_eq!(seen.map(|s| s.target).as_deref(), Some("/redir/a?b=1"));
    } else {
        assert_eq!(a.status, 301, "{}", at("redirect"));
        let want = format!("https://{k}.test/redir/a?b=1");
        assert_eq!(header(&a, "location"), Some(want), "{}", at("location"));
        assert!(
            seen.is_none(),
            "{}: a redirect reached the Pod",
            at("redirect")
        );
    }
}

pub(super) async fn body_limits(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
    let got = fx
        .send(c, k, "POST", "/body/a", &[], Body::Fixed(b"0123456789"))
        .await;
    assert_eq!(
        served(&at("a body within max_body"), &got).body,
        b"0123456789"
    );
    let got = fx
        .send(c, k, "POST", "/body/a", &[], Body::Streamed(b"0123456789"))
        .await;
    assert_eq!(
        served(&at("a streamed body within max_body"), &got).body,
        b"0123456789"
    );

    let big: &[u8] = b"0123456789012345678901234567890123456789";
    let got = fx
        .send(c, k, "POST", "/body/a", &[], Body::Fixed(big))
        .await;
    refused(
        &at("a Content-Length past max_body"),
        &got,
        413,
        "payload_too_large",
    );
    let (a, seen) = fx
        .send(c, k, "POST", "/body/a", &[], Body::Streamed(big))
        .await;
    assert_eq!(
        a.status,
        413,
        "{}: {:?}",
        at("a streamed body past max_body"),
        a.body
    );
    // The Pod may have seen the head of a streamed body; never all of it.
    assert!(
        seen.as_ref().is_none_or(|s| s.body != big),
        "{}: the whole body reached the Pod",
        at("streamed past max_body")
    );
}

/// `/config` shows each route's policies, never a key, a key file or a secret.
pub(super) async fn admin_config(fx: &Fx) {
    let r = support::get(fx.gw.admin, "admin", "/config").await.unwrap();
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let json = r.json();
    let route = json["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "key-h1")
        .unwrap()
        .clone();
    assert_eq!(
        route["policies"]["auth"]["any_of"][0]["api_key"]["header"],
        "x-api-key"
    );
    assert_eq!(route["policies"]["consumers"][0], "shop");
    assert_eq!(json["trusted_proxies"][0], "127.0.0.1/32");
    assert!(
        !text.contains("shop-key-1") && !text.contains("keys/shop"),
        "{text}"
    );
}
