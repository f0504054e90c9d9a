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

#[path = "route_policies/from_where.rs"]
mod from_where;
#[path = "route_policies/what.rs"]
mod what;
#[path = "route_policies/who.rs"]
mod who;

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
            who::api_keys(&fx, c, k, &at).await;
            who::jwt(&fx, c, k, &at).await;
            from_where::ip_rules(&fx, c, k, &at).await;
            from_where::cors(&fx, c, k, &at).await;
            what::rules_and_rewrites(&fx, c, k, &at).await;
            what::body_limits(&fx, c, k, &at).await;
        }
    }
    for &c in Client::H2 {
        for k in PODS {
            who::grpc(&fx, c, k).await;
        }
    }
    from_where::untrusted_peer(&fx).await;
    what::admin_config(&fx).await;
    who::key_rotation(&fx).await;
}
