//! `auth` and `consumers` end to end: config text and files → `Policies` → requests in both
//! field forms, with real keys and real file rotation.

use super::jwt::cached_tokens;
use super::test_support::*;
use serde_json::json;

const KEYS: &str = "consumers:
  - {name: shop, api_keys_file: shop.keys}
  - {name: ops, api_keys_file: ops.keys}
  - {name: partner}
";

fn key_routes() -> String {
    format!(
        "{KEYS}routes:
  - {{name: keys, path_prefix: /k, upstream: u, policies: {{auth: {{api_key: {{header: x-api-key}}}}}}}}
  - {{name: fwd, path_prefix: /f, upstream: u, policies: {{auth: {{api_key: {{}}, forward: true, consumer_header: x-caller}}}}}}
  - name: query
    path_prefix: /q
    strip_prefix: true
    upstream: u
    policies: {{auth: {{api_key: {{query: apikey}}}}, consumers: [shop]}}
"
    )
}

fn key_files() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("shop.keys", b"# shop's keys\nshop-key-1\nshop-key-2\n"),
        ("ops.keys", b"ops-key\n"),
    ]
}

fn refusals(route: &str, policy: &str, status: &str) -> u64 {
    metric(
        "podgate_policy_refusals_total",
        &[("route", route), ("policy", policy), ("status", status)],
    )
}

fn metric(family: &str, labels: &[(&str, &str)]) -> u64 {
    for f in prometheus::gather() {
        if f.name() != family {
            continue;
        }
        for m in f.get_metric() {
            let all = labels.iter().all(|(n, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *n && l.value() == *v)
            });
            if all {
                return m.get_counter().get_value() as u64;
            }
        }
    }
    0
}

#[test]
fn api_keys_name_consumers_and_never_reach_the_pod() {
    let fx = Fixture::new(&key_routes(), &key_files());
    let p = fx.route("keys");
    let before = refusals("keys", "auth", "401");

    let none = run(&p, &get("/k/a"));
    assert_eq!(none.status(), Some(401));
    assert_eq!(
        none.answer_field("www-authenticate"),
        [r#"ApiKey realm="keys", header="x-api-key""#]
    );

    let wrong = run(&p, &get("/k/a").header("X-Api-Key", "shop-key-3"));
    assert_eq!(wrong.status(), Some(401));
    assert_eq!(
        wrong.answer_field("www-authenticate"),
        [r#"ApiKey realm="keys", header="x-api-key", error="invalid_key""#]
    );
    assert!(
        !format!("{:?}", wrong.answer).contains("shop-key"),
        "no answer holds a key"
    );

    let twice = get("/k/a")
        .header("x-api-key", "shop-key-1")
        .header("x-api-key", "shop-key-1");
    assert_eq!(
        run(&p, &twice).status(),
        Some(401),
        "two keys are ambiguous"
    );
    // `run` sends each request twice (HTTP/1.1 lines, h2 map).
    assert_eq!(refusals("keys", "auth", "401"), before + 6);

    // The client's own x-consumer is dropped, podgate's goes on; the key stays behind.
    let ok = run(
        &p,
        &get("/k/a")
            .header("x-api-key", "shop-key-2")
            .header("x-consumer", "admin"),
    );
    assert_eq!(ok.status(), None);
    assert_eq!(ok.edits.consumer.as_deref(), Some("shop"));
    assert!(ok.removes("x-api-key") && ok.removes("x-consumer"));
    assert_eq!(ok.added("x-consumer"), ["shop"]);
    assert_eq!(ok.edits.path, None);

    let fwd = run(&fx.route("fwd"), &get("/f").header("x-api-key", "ops-key"));
    assert_eq!(fwd.status(), None);
    assert!(!fwd.removes("x-api-key"), "auth.forward keeps the key");
    assert!(fwd.removes("x-caller"));
    assert_eq!(fwd.added("x-caller"), ["ops"]);
}

#[test]
fn query_keys_are_taken_out_of_the_query_and_consumers_limit_who_calls() {
    let fx = Fixture::new(&key_routes(), &key_files());
    let p = fx.route("query");
    let ok = run(&p, &get("/q/items?a=1&apikey=shop-key-1&b=2"));
    assert_eq!(ok.status(), None);
    assert_eq!(
        ok.edits.path.as_deref(),
        Some("/items?a=1&b=2"),
        "strip_prefix still applies"
    );
    let only = run(&p, &get("/q/items?apikey=shop%2Dkey%2D1"));
    assert_eq!(
        only.edits.path.as_deref(),
        Some("/items"),
        "percent-decoded, then removed"
    );
    let ops = run(&p, &get("/q/items?apikey=ops-key"));
    assert_eq!(ops.status(), Some(403), "ops is not in consumers");
    let missing = run(&p, &get("/q/items?api=shop-key-1"));
    assert_eq!(
        missing.answer_field("www-authenticate"),
        [r#"ApiKey realm="query", query="apikey""#]
    );
}

#[test]
fn a_rewritten_key_file_takes_effect_and_an_unreadable_one_keeps_the_last_keys() {
    let fx = Fixture::new(&key_routes(), &key_files());
    let p = fx.route("fwd");
    let with = |key: &str| run(&p, &get("/k").header("x-api-key", key)).status();
    assert_eq!(with("shop-key-1"), None);
    fx.replace("shop.keys", b"shop-key-new\n");
    wait_for("the new key to work", || with("shop-key-new").is_none());
    assert_eq!(
        with("shop-key-1"),
        Some(401),
        "the old key is refused after rotation"
    );

    let failures = || {
        metric(
            "podgate_policy_file_reloads_total",
            &[
                ("kind", "api_keys"),
                ("name", "shop"),
                ("result", "failure"),
            ],
        )
    };
    let before = failures();
    fx.replace("shop.keys", b"a key with spaces\n");
    wait_for("the bad file to be seen", || failures() > before);
    assert_eq!(
        with("shop-key-new"),
        None,
        "a bad file keeps the last good keys"
    );
    std::fs::remove_file(fx.dir.path().join("shop.keys")).unwrap();
    wait_for("the removal to be seen", || failures() > before + 1);
    assert_eq!(with("shop-key-new"), None, "so does a missing one");
}

const JWT: &str = "jwt_providers:
  - name: corp
    issuer: https://idp.example.com
    audiences: [orders-api]
    jwks_file: jwks.json
    consumer_claim: client
    claims_to_headers: {sub: x-user-id, roles: x-roles}
  - {name: legacy, secret_file: hs.secret, jwks_file: jwks.json}
routes:
  - {name: jwt, path_prefix: /j, upstream: u, policies: {auth: {jwt: corp}}}
  - {name: hs, path_prefix: /h, upstream: u, policies: {auth: {jwt: legacy}}}
  - name: either
    path_prefix: /e
    upstream: u
    policies: {auth: {any_of: [{api_key: {header: x-api-key}}, {jwt: corp}]}, consumers: [shop, partner]}
";

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs\n";

fn jwt_fixture() -> Fixture {
    let [rsa, _] = &*RSA;
    let keys = jwks(&[rsa.with_kid("k1")]);
    Fixture::new(
        &format!("{KEYS}{JWT}"),
        &[
            ("jwks.json", &keys),
            ("hs.secret", SECRET),
            ("shop.keys", b"shop-key-1\n"),
            ("ops.keys", b"ops-key\n"),
        ],
    )
}

fn claims() -> serde_json::Value {
    json!({
        "iss": "https://idp.example.com", "aud": "orders-api", "sub": "user-7",
        "client": "partner", "roles": ["a", "b"], "exp": now() + 600, "nbf": now() - 10,
    })
}

fn with_claims(change: serde_json::Value) -> serde_json::Value {
    let mut c = claims();
    for (k, v) in change.as_object().unwrap() {
        match v {
            serde_json::Value::Null => c.as_object_mut().unwrap().remove(k),
            v => c.as_object_mut().unwrap().insert(k.clone(), v.clone()),
        };
    }
    c
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn a_valid_token_passes_with_its_consumer_and_claims_and_bad_ones_say_why() {
    let fx = jwt_fixture();
    let p = fx.route("jwt");
    let [rsa, other] = &*RSA;
    let good = token(rsa, Some("k1"), &claims());
    let ok = run(
        &p,
        &get("/j")
            .header("authorization", &bearer(&good))
            .header("x-user-id", "root"),
    );
    assert_eq!(ok.status(), None, "{:?}", ok.answer);
    assert_eq!(ok.edits.consumer.as_deref(), Some("partner"));
    assert_eq!(ok.added("x-user-id"), ["user-7"]);
    assert_eq!(ok.added("x-roles"), ["a,b"]);
    assert!(
        ok.removes("authorization") && ok.removes("x-user-id"),
        "the client's x-user-id goes"
    );

    let missing = run(&p, &get("/j"));
    assert_eq!(
        missing.answer_field("www-authenticate"),
        [r#"Bearer realm="jwt""#]
    );
    let basic = run(&p, &get("/j").header("authorization", "Basic dTpw"));
    assert_eq!(
        basic.answer_field("www-authenticate"),
        [r#"Bearer realm="jwt""#]
    );

    let none_alg = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims().to_string().as_bytes())
    );
    // HS256 signed with the RSA public key as the secret: the classic algorithm confusion.
    let n = rsa.jwk["n"].as_str().unwrap().as_bytes();
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims(),
        &jsonwebtoken::EncodingKey::from_secret(n).unwrap(),
    )
    .unwrap();
    let cases = [
        (
            "expired",
            token(rsa, Some("k1"), &with_claims(json!({"exp": now() - 3600}))),
            "the token has expired",
        ),
        (
            "not yet valid",
            token(rsa, Some("k1"), &with_claims(json!({"nbf": now() + 3600}))),
            "the token is not valid yet",
        ),
        (
            "wrong audience",
            token(rsa, Some("k1"), &with_claims(json!({"aud": "billing"}))),
            "the token is not meant for this audience",
        ),
        (
            "no audience",
            token(rsa, Some("k1"), &with_claims(json!({"aud": null}))),
            "the token lacks a required claim",
        ),
        (
            "wrong issuer",
            token(
                rsa,
                Some("k1"),
                &with_claims(json!({"iss": "https://evil"})),
            ),
            "the token's issuer is not accepted",
        ),
        (
            "bad signature",
            token(other, Some("k1"), &claims()),
            "the signature is invalid",
        ),
        (
            "unknown kid",
            token(rsa, Some("k9"), &claims()),
            "no key of the issuer matches the token",
        ),
        ("alg none", none_alg, "the token is malformed"),
        (
            "HS256 with the RSA key",
            confused,
            "the token's algorithm is not accepted",
        ),
        (
            "exp as a string",
            token(rsa, Some("k1"), &with_claims(json!({"exp": "99999999999"}))),
            "the token lacks a required claim",
        ),
        (
            "nbf as a string",
            token(rsa, Some("k1"), &with_claims(json!({"nbf": "99999999999"}))),
            "the token is malformed",
        ),
        (
            "no exp",
            token(rsa, Some("k1"), &with_claims(json!({"exp": null}))),
            "the token lacks a required claim",
        ),
        (
            "no consumer",
            token(rsa, Some("k1"), &with_claims(json!({"client": null}))),
            "the token names no consumer",
        ),
        ("garbage", "a.b.c".to_string(), "the token is malformed"),
    ];
    for (what, t, why) in cases {
        let out = run(&p, &get("/j").header("authorization", &bearer(&t)));
        assert_eq!(out.status(), Some(401), "{what}");
        let expected =
            format!(r#"Bearer realm="jwt", error="invalid_token", error_description="{why}""#);
        assert_eq!(out.answer_field("www-authenticate"), [expected], "{what}");
        assert!(
            !format!("{:?}", out.answer).contains(&t),
            "{what}: the token is not echoed"
        );
    }
}

#[test]
fn es256_and_eddsa_keys_verify_and_hs256_needs_its_secret() {
    let [rsa, _] = &*RSA;
    let (ec, ed) = (ec_key(), ed_key());
    let keys = jwks(&[rsa.with_kid("k1"), ec.with_kid("e1"), ed.jwk.clone()]);
    let fx = Fixture::new(
        &format!("{KEYS}{JWT}"),
        &[
            ("jwks.json", &keys),
            ("hs.secret", SECRET),
            ("shop.keys", b"s\n"),
            ("ops.keys", b"o\n"),
        ],
    );
    let p = fx.route("jwt");
    for (what, t) in [
        ("ES256", token(&ec, Some("e1"), &claims())),
        ("EdDSA without kid", token(&ed, None, &claims())),
    ] {
        let out = run(&p, &get("/j").header("authorization", &bearer(&t)));
        assert_eq!(out.status(), None, "{what}: {:?}", out.answer);
    }
    let secret = jsonwebtoken::EncodingKey::from_secret(SECRET.trim_ascii()).unwrap();
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims(),
        &secret,
    )
    .unwrap();
    assert_eq!(
        run(
            &fx.route("hs"),
            &get("/h").header("authorization", &bearer(&hs))
        )
        .status(),
        None
    );
    assert_eq!(
        run(&p, &get("/j").header("authorization", &bearer(&hs))).status(),
        Some(401),
        "corp has no secret_file: HS256 is refused"
    );
    // With a secret, an HS256 token signed with the RSA public key still fails.
    let n = rsa.jwk["n"].as_str().unwrap().as_bytes();
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims(),
        &jsonwebtoken::EncodingKey::from_secret(n).unwrap(),
    )
    .unwrap();
    assert_eq!(
        run(
            &fx.route("hs"),
            &get("/h").header("authorization", &bearer(&confused))
        )
        .status(),
        Some(401)
    );
}

#[test]
fn verified_tokens_are_cached_until_the_keys_rotate() {
    let fx = jwt_fixture();
    let p = fx.route("jwt");
    let [rsa, next] = &*RSA;
    let old = token(rsa, Some("k1"), &claims());
    let with = |t: &str| run(&p, &get("/j").header("authorization", &bearer(t))).status();
    let cached = cached_tokens();
    assert_eq!(with(&old), None);
    assert_eq!(cached_tokens(), cached + 1, "one entry per token");
    assert_eq!(with(&old), None);
    assert_eq!(
        cached_tokens(),
        cached + 1,
        "the second call is a cache hit"
    );

    let new = token(next, Some("k2"), &claims());
    assert_eq!(with(&new), Some(401));
    fx.replace("jwks.json", &jwks(&[next.with_kid("k2")]));
    wait_for("the rotated key to verify", || with(&new).is_none());
    assert_eq!(
        with(&old),
        Some(401),
        "a cached token of a retired key is refused"
    );

    let failures = || {
        metric(
            "podgate_policy_file_reloads_total",
            &[("kind", "jwks"), ("name", "corp"), ("result", "failure")],
        )
    };
    let before = failures();
    fx.replace("jwks.json", b"{not json");
    wait_for("the broken JWKS to be seen", || failures() > before);
    let fresh = token(next, Some("k2"), &with_claims(json!({"sub": "other"})));
    assert_eq!(with(&fresh), None, "a broken JWKS keeps the last good keys");
}

#[test]
fn any_of_takes_either_credential_and_names_both_when_refusing() {
    let fx = jwt_fixture();
    let p = fx.route("either");
    let [rsa, _] = &*RSA;
    assert_eq!(
        run(&p, &get("/e").header("x-api-key", "shop-key-1")).status(),
        None
    );
    let t = token(rsa, Some("k1"), &claims());
    let out = run(&p, &get("/e").header("authorization", &bearer(&t)));
    assert_eq!(
        (out.status(), out.edits.consumer.as_deref()),
        (None, Some("partner"))
    );
    assert!(out.removes("authorization") && out.removes("x-api-key"));
    assert_eq!(
        run(&p, &get("/e").header("x-api-key", "ops-key")).status(),
        Some(403),
        "ops is not listed"
    );
    let shop_claim = token(rsa, Some("k1"), &with_claims(json!({"client": "stranger"})));
    assert_eq!(
        run(&p, &get("/e").header("authorization", &bearer(&shop_claim))).status(),
        Some(403)
    );
    let neither = run(&p, &get("/e"));
    assert_eq!(
        neither.answer_field("www-authenticate"),
        [
            r#"ApiKey realm="either", header="x-api-key""#,
            r#"Bearer realm="either""#
        ]
    );
}

/// Rate limits run after authentication (a `key: consumer` rule counts each consumer apart, and
/// a refused credential spends no token) and before the body limit (an over-limit request with
/// a too-large body is answered 429, not 413).
#[test]
fn rate_limits_count_the_authenticated_consumer_before_the_body_limit() {
    let yaml = format!(
        "{KEYS}routes:
  - name: limited
    upstream: u
    policies:
      auth: {{api_key: {{}}}}
      rate_limit: [{{key: consumer, rate: 1/h, burst: 2}}]
      max_body: 10
"
    );
    let fx = Fixture::new(&yaml, &key_files());
    let p = fx.route("limited");
    // Once per request: `run` asks twice (both field forms), which a bucket would count twice.
    let run = |p: &super::Policies, r: &Req| {
        let mut map = http::HeaderMap::new();
        for (n, v) in &r.headers {
            map.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        run_with(p, r, super::Fields::Map(&map))
    };
    assert!(!p.is_empty());
    let shop = || get("/a").header("x-api-key", "shop-key-1");
    // Bad keys are refused by auth and take nothing from any bucket.
    for _ in 0..5 {
        let bad = run(&p, &get("/a").header("x-api-key", "nope"));
        assert_eq!(bad.status(), Some(401));
    }
    for _ in 0..2 {
        let ok = run(&p, &shop());
        assert_eq!(ok.status(), None);
        assert_eq!(ok.edits.consumer.as_deref(), Some("shop"));
        assert_eq!(
            ok.answer_field("ratelimit-policy").len(),
            1,
            "the fields go on the answer"
        );
    }
    let mut big = shop();
    big.content_length = Some(11);
    let over = run(&p, &big);
    assert_eq!(
        over.status(),
        Some(429),
        "the limit decides before max_body"
    );
    assert!(!over.answer_field("retry-after").is_empty());
    // Another consumer from the same address has a bucket of its own; its big body is 413.
    let ops = || get("/a").header("x-api-key", "ops-key");
    assert_eq!(run(&p, &ops()).status(), None);
    let mut big = ops();
    big.content_length = Some(11);
    assert_eq!(run(&p, &big).status(), Some(413));
}
