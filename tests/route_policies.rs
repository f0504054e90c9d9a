//! Route policies on the real request path: one podgate (a plain, a TLS and an h2c listener)
//! in front of one Pod that speaks HTTP/1.1 and h2c, each policy's allowed and refused cases
//! sent by the four clients of the semantic table (HTTP/1.1, TLS HTTP/1.1, TLS h2, h2c) to a
//! route whose upstream speaks HTTP/1.1 and to one whose upstream speaks h2c. Each case asserts
//! what the client got and what reached the Pod (or that nothing did), read from the Pod's own
//! log by the request's `x-case`.
//!
//! The clients run from 127.0.0.1, which the config trusts as a proxy: their `X-Forwarded-For`
//! names the client, so the IP rules are exercised with real addresses; a peer that is not
//! trusted (127.0.0.2) is one case of its own.

mod support;

#[path = "semantics/client.rs"]
mod client;
// Shared with the semantic table, which reads every field of what the Pod saw.
#[allow(dead_code)]
#[path = "semantics/pod.rs"]
mod pod;

use bytes::Bytes;
use client::{Answer, Client, Listeners, GATEWAY_NAME};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use pod::{grpc_frame, AnyBody, Log, Seen};
use std::sync::atomic::{AtomicUsize, Ordering};
use support::Gateway;

/// The two upstreams: Pods spoken to over HTTP/1.1 and over h2c (the same Pod).
const PODS: [&str; 2] = ["h1", "h2c"];

const ROUTES: &str = r#"
  - {name: key-K, hosts: [K.test], path_prefix: /key, upstream: u-K, policies: {auth: {api_key: {header: x-api-key}}, consumers: [shop]}}
  - {name: qkey-K, hosts: [K.test], path_prefix: /qkey, upstream: u-K, policies: {auth: {api_key: {query: apikey}}}}
  - {name: jwt-K, hosts: [K.test], path_prefix: /jwt, upstream: u-K, policies: {auth: {jwt: corp}}}
  - {name: grpc-K, hosts: [K.test], path_prefix: /grpc.Svc, upstream: u-K, policies: {auth: {any_of: [{api_key: {}}, {jwt: corp}]}}}
  - {name: ip-K, hosts: [K.test], path_prefix: /ip, upstream: u-K, policies: {ip_allow: [192.0.2.0/24]}}
  - {name: cors-K, hosts: [K.test], path_prefix: /cors, methods: [GET, POST], upstream: u-K, policies: {cors: {origins: ["https://shop.example.com"], methods: [GET, POST], headers: [x-api-key], max_age: 10m}}}
  - {name: hdr-K, hosts: [K.test], path_prefix: /hdr, upstream: u-K, policies: {request_headers: {set: {x-env: prod}, add: {x-via: podgate}, remove: [x-debug]}, response_headers: {set: {cache-control: no-store}, remove: [x-pod]}}}
  - {name: rw-K, hosts: [K.test], path_prefix: /rw, upstream: u-K, policies: {rewrite: {path: {regex: "^/rw/(.*)$", to: "/v2/${1}"}}}}
  - {name: redir-K, hosts: [K.test], path_prefix: /redir, upstream: u-K, policies: {redirect: {scheme: https, status: 301}}}
  - {name: body-K, hosts: [K.test], path_prefix: /body, upstream: u-K, policies: {max_body: 16}}
"#;

struct Fx {
    gw: Gateway,
    _pod: pod::EchoPod,
    listeners: Listeners,
    log: Log,
    /// Tokens: valid, expired, signed by a key the JWKS does not have.
    good: String,
    expired: String,
    forged: String,
}

/// A request body.
enum Body {
    None,
    Fixed(&'static [u8]),
    /// In two pieces without a length (chunked over HTTP/1.1).
    Streamed(&'static [u8]),
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// An RS256 token by `key` (kid `k1`) for the test's provider, expiring at `exp`.
fn token(key: &rsa::RsaPrivateKey, exp: u64) -> String {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({
        "iss": "https://idp.test", "aud": "orders", "sub": "user-1", "exp": exp,
    });
    let der = key.to_pkcs1_der().unwrap();
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
    )
    .unwrap()
}

impl Fx {
    async fn start() -> Fx {
        use rsa::traits::PublicKeyParts;
        podgate_gateway::policies::jwt_crypto::install();
        let mut rng = rsa::rand_core::OsRng;
        let key = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let other = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let jwks = format!(
            r#"{{"keys":[{{"kty":"RSA","kid":"k1","alg":"RS256","n":"{}","e":"{}"}}]}}"#,
            b64(&key.n().to_bytes_be()),
            b64(&key.e().to_bytes_be())
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let log = Log::default();
        let pod = pod::start("pod-a", log.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/shop"), "shop-key-1\n").unwrap();
        std::fs::write(dir.path().join("keys/other"), "other-key-1\n").unwrap();
        std::fs::write(dir.path().join("jwks.json"), jwks).unwrap();
        let mut conf = String::from(
            "consumers:\n  - {name: shop, api_keys_file: keys/shop}\n  - {name: other, api_keys_file: keys/other}\n\
             jwt_providers:\n  - {name: corp, issuer: \"https://idp.test\", audiences: [orders], jwks_file: jwks.json, claims_to_headers: {sub: x-user-id}}\n\
             upstreams:\n",
        );
        for k in PODS {
            let proto = if k == "h1" { "http1" } else { "h2c" };
            conf.push_str(&format!(
                "  - {{name: u-{k}, protocol: {proto}, retries: 0, nodes: [{{address: \"{}\"}}]}}\n",
                pod.addr
            ));
        }
        conf.push_str("routes:");
        for k in PODS {
            conf.push_str(&ROUTES.replace('K', k));
        }
        let pki = support::make_pki(dir.path(), "gw", &[GATEWAY_NAME]);
        let tls = format!(
            "tls: {{cert: {}, key: {}}}",
            pki.cert_pem.display(),
            pki.key_pem.display()
        );
        let server = "threads: 1\n  grace_period: 1s\n  trusted_proxies: [127.0.0.1/32]";
        let gw = Gateway::start_listeners_with(dir, &["", &tls, "h2c: true"], server, &conf).await;
        let listeners = Listeners {
            plain: gw.addrs[0],
            tls: gw.addrs[1],
            h2c: gw.addrs[2],
            tls_h1: support::tls_connector(&pki.ca_pem, &[b"http/1.1"]),
            tls_h2: support::tls_connector(&pki.ca_pem, &[b"h2"]),
        };
        Fx {
            gw,
            _pod: pod,
            listeners,
            log,
            good: token(&key, now + 3600),
            expired: token(&key, now - 3600),
            forged: token(&other, now + 3600),
        }
    }

    /// Sends one request from `client` to the routes of Pod kind `k`; what the client got and
    /// what the Pod received (`None`: nothing complete).
    async fn send(
        &self,
        client: Client,
        k: &str,
        method: &str,
        path: &str,
        fields: &[(&str, &str)],
        body: Body,
    ) -> (Answer, Option<Seen>) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let case = format!("{}-{client:?}-{k}", N.fetch_add(1, Ordering::Relaxed));
        let mut all: Vec<(String, String)> = fields
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        all.push(("x-case".into(), case.clone()));
        let body: AnyBody = match body {
            Body::None => Empty::new().boxed(),
            Body::Fixed(b) => Full::new(Bytes::from_static(b)).boxed(),
            Body::Streamed(b) => {
                let (x, y) = b.split_at(b.len() / 2);
                let pieces = [Bytes::from_static(x), Bytes::from_static(y)]
                    .map(|p| Ok(hyper::body::Frame::data(p)));
                BodyExt::boxed(StreamBody::new(futures::stream::iter(pieces)))
            }
        };
        let host = format!("{k}.test");
        let answer = self
            .listeners
            .send(client, method, &host, path, &all, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} ({case}): {e}\n{}", self.gw.log_text()));
        let seen = self
            .log
            .lock()
            .unwrap()
            .remove(&case)
            .and_then(|mut v| v.pop());
        (answer, seen)
    }
}

fn field<'a>(seen: &'a Seen, name: &str) -> Vec<&'a str> {
    seen.fields
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn header(a: &Answer, name: &str) -> Option<String> {
    a.headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// podgate's JSON refusal: the status, its `error` code, nothing reached the Pod.
fn refused(what: &str, got: &(Answer, Option<Seen>), status: u16, code: &str) {
    let (a, seen) = got;
    assert_eq!(a.status, status, "{what}: {:?}", a.body);
    let json: serde_json::Value = serde_json::from_slice(&a.body)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {:?}", a.body));
    assert_eq!(json["error"], code, "{what}: {json}");
    assert_eq!(json["status"], status, "{what}: {json}");
    assert_eq!(
        header(a, "content-type").as_deref(),
        Some("application/json"),
        "{what}"
    );
    assert!(seen.is_none(), "{what}: reached the Pod: {seen:?}");
}

fn served<'a>(what: &str, got: &'a (Answer, Option<Seen>)) -> &'a Seen {
    let (a, seen) = got;
    assert_eq!(a.status, 200, "{what}: {:?}", a.body);
    seen.as_ref()
        .unwrap_or_else(|| panic!("{what}: nothing reached the Pod"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_holds_on_every_client_and_pod_protocol() {
    let fx = Fx::start().await;
    for &c in Client::ALL {
        for k in PODS {
            let at = |what: &str| format!("{what} ({c:?} to {k} Pod)");
            api_keys(&fx, c, k, &at).await;
            jwt(&fx, c, k, &at).await;
            ip_rules(&fx, c, k, &at).await;
            cors(&fx, c, k, &at).await;
            rules_and_rewrites(&fx, c, k, &at).await;
            body_limits(&fx, c, k, &at).await;
        }
    }
    for &c in Client::H2 {
        for k in PODS {
            grpc(&fx, c, k).await;
        }
    }
    untrusted_peer(&fx).await;
    admin_config(&fx).await;
    key_rotation(&fx).await;
}

/// A consumer's key file replaced while podgate runs: the new key works, the old one is refused,
/// with no reload or restart.
async fn key_rotation(fx: &Fx) {
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

async fn api_keys(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
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

async fn jwt(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
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

async fn ip_rules(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
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

async fn cors(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
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

async fn rules_and_rewrites(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
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

async fn body_limits(fx: &Fx, c: Client, k: &str, at: &dyn Fn(&str) -> String) {
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

async fn grpc(fx: &Fx, c: Client, k: &str) {
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

/// A peer that is not a trusted proxy: its `X-Forwarded-For` is not believed, and not passed
/// on either.
async fn untrusted_peer(fx: &Fx) {
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

/// `/config` shows each route's policies, never a key, a key file or a secret.
async fn admin_config(fx: &Fx) {
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
