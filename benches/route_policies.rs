//! What route policies cost per request: `Policies::on_request` on one and the same request view
//! (an HTTP/1.1 head with an API key and an RS256 bearer token) for a route without policies,
//! with an API key, and with an RS256 JWT — verified from the per-thread cache, and verified
//! anew (the cache cleared before each call). Policies are built from config text and files by
//! the real loader; the RSA key is generated here. Targets (issue 23): API key < 1 µs, cached
//! JWT < 5 µs. Figures in benches/RESULTS.md.

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use podgate_gateway::policies::{
    jwt, jwt_crypto, Edits, Fields, Identities, Policies, RequestView, Verdict,
};
use std::future::Future;
use std::hint::black_box;
use std::ops::Range;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

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

/// Polls the (never waiting) policy future once.
fn decide(p: &Policies, view: &RequestView<'_>) -> (bool, Edits) {
    let mut edits = Edits::default();
    let verdict = {
        let fut = std::pin::pin!(p.on_request(view, &mut edits));
        let mut cx = Context::from_waker(Waker::noop());
        match fut.poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => unreachable!("no policy here waits"),
        }
    };
    (matches!(verdict, Verdict::Continue), edits)
}

fn policies(c: &mut Criterion) {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let jwks = format!(
        r#"{{"keys":[{{"kty":"RSA","kid":"k1","n":"{}","e":"{}"}}]}}"#,
        b64(&key.n().to_bytes_be()),
        b64(&key.e().to_bytes_be())
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks).unwrap();
    // 1,000 consumers' keys, so the lookup is not a one-entry map.
    let mut keys = String::new();
    for i in 0..1000 {
        keys.push_str(&format!("key-{i:04}-aaaaaaaaaaaaaaaaaaaaaaaa\n"));
    }
    std::fs::write(dir.path().join("shop.keys"), keys).unwrap();
    let text = "listeners: [{address: \"127.0.0.1:8080\"}]
upstreams: [{name: u, nodes: [{address: \"127.0.0.1:9\"}]}]
consumers: [{name: shop, api_keys_file: shop.keys}]
jwt_providers:
  - {name: corp, issuer: https://idp.example.com, audiences: [orders], jwks_file: jwks.json, consumer_claim: sub, claims_to_headers: {sub: x-user-id}}
routes:
  - {name: none, path_prefix: /n, upstream: u}
  - {name: key, path_prefix: /k, upstream: u, policies: {auth: {api_key: {header: x-api-key}}}}
  - {name: jwt, path_prefix: /j, upstream: u, policies: {auth: {jwt: corp}}}
";
    let config = podgate_gateway::config::parse("bench.yaml", text, dir.path()).unwrap();
    let identities = Arc::new(Identities::load(&config.consumers, &config.jwt_providers));
    let build = |name: &str| {
        Policies::build(
            config.routes.iter().find(|r| r.name == name).unwrap(),
            &identities,
        )
    };
    let (none, with_key, with_jwt) = (build("none"), build("key"), build("jwt"));

    jwt_crypto::install();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({
        "iss": "https://idp.example.com", "aud": "orders", "sub": "user-1234",
        "exp": 4_000_000_000u64, "iat": 1_700_000_000u64, "scope": "orders:read orders:write",
    });
    let der = key.to_pkcs1_der().unwrap();
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
    )
    .unwrap();

    let fields = [
        ("Host", "api.example.com".to_string()),
        ("User-Agent", "bench/1.0".to_string()),
        ("Accept", "application/json".to_string()),
        ("X-Api-Key", "key-0500-aaaaaaaaaaaaaaaaaaaaaaaa".to_string()),
        ("Authorization", format!("Bearer {token}")),
    ];
    let mut raw = Vec::new();
    let mut ranges: Vec<(Range<usize>, Range<usize>)> = Vec::new();
    for (n, v) in &fields {
        let s = raw.len();
        raw.extend_from_slice(n.as_bytes());
        let name = s..raw.len();
        raw.extend_from_slice(b": ");
        let vs = raw.len();
        raw.extend_from_slice(v.as_bytes());
        ranges.push((name, vs..raw.len()));
        raw.extend_from_slice(b"\r\n");
    }
    let view = RequestView {
        method: &Method::GET,
        host: "api.example.com",
        path_and_query: "/orders/42?expand=items",
        fields: Fields::Lines {
            raw: &raw,
            ranges: &ranges,
        },
        peer: Some("192.0.2.1".parse().unwrap()),
        client: Some("192.0.2.1".parse().unwrap()),
        tls: true,
        grpc: false,
        content_length: None,
    };
    for p in [&none, &with_key, &with_jwt] {
        assert!(decide(p, &view).0, "every case lets the request through");
    }
    assert!(none.is_empty());

    let mut g = c.benchmark_group("route_policies");
    g.bench_function("no_policies", |b| {
        b.iter(|| {
            let p = black_box(&none);
            if !p.is_empty() {
                black_box(decide(p, &view));
            }
        })
    });
    g.bench_function("api_key", |b| {
        b.iter(|| black_box(decide(black_box(&with_key), &view)))
    });
    g.bench_function("jwt_rs256_cached", |b| {
        b.iter(|| black_box(decide(black_box(&with_jwt), &view)))
    });
    g.bench_function("jwt_rs256_uncached", |b| {
        b.iter(|| {
            jwt::clear_cache();
            black_box(decide(black_box(&with_jwt), &view))
        })
    });
    g.finish();
}

criterion_group!(benches, policies);
criterion_main!(benches);
