//! `RateLimits::check` with local rules: answers, fields, key fallbacks, refunds. The Redis
//! stores are tested against a real redis-server in `tests/rate_limit_redis.rs`.

use super::*;
use crate::config::{Rate, RateKey, RateLimitRule, RuleStore};
use crate::policies::{Fields, RequestView};
use http::{HeaderMap, Method};
use std::net::Ipv4Addr;

fn rule(key: RateKey, count: u64, per_secs: u64, burst: u64) -> RateLimitRule {
    RateLimitRule {
        key,
        rate: Rate { count, per_secs },
        burst,
        store: RuleStore::Local,
        max_keys: 1024,
        headers: true,
    }
}

fn view<'a>(map: &'a HeaderMap, client: u8) -> RequestView<'a> {
    RequestView {
        method: &Method::GET,
        host: "h",
        path_and_query: "/",
        fields: Fields::Map(map),
        peer: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))),
        client: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, client))),
        tls: false,
        grpc: false,
        content_length: None,
    }
}

fn field<'a>(headers: &'a [(HeaderName, HeaderValue)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.to_str().ok())
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn over_the_burst_is_a_429_with_retry_after_and_the_draft_fields() {
    let limits = RateLimits::new("t1", &[rule(RateKey::ClientIp, 2, 3600, 2)]).unwrap();
    let map = HeaderMap::new();
    block(async {
        for remaining in [1, 0] {
            let mut edits = Edits::default();
            assert!(limits.check(&view(&map, 1), &mut edits).await.is_none());
            let fields = &edits.response_add;
            assert_eq!(
                field(fields, "ratelimit-policy"),
                Some("\"client_ip 2/h\";q=2;w=3600")
            );
            let expect = format!("\"client_ip 2/h\";r={remaining};t=");
            assert!(field(fields, "ratelimit").unwrap().starts_with(&expect));
        }
        let mut edits = Edits::default();
        let answer = limits.check(&view(&map, 1), &mut edits).await.unwrap();
        assert_eq!(answer.status, 429);
        assert!(matches!(answer.body, AnswerBody::Error));
        // One request per 30 minutes: the next is due in 1800 s.
        let retry: u64 = field(&answer.headers, "retry-after")
            .unwrap()
            .parse()
            .unwrap();
        assert!((1799..=1800).contains(&retry), "{retry}");
        assert_eq!(
            field(&answer.headers, "ratelimit").unwrap(),
            "\"client_ip 2/h\";r=0;t=3600"
        );
        assert!(edits.response_add.is_empty());
        // Another client has its own bucket.
        let mut edits = Edits::default();
        assert!(limits.check(&view(&map, 2), &mut edits).await.is_none());
    });
}

#[test]
fn keyless_requests_count_by_client_address_and_consumers_by_name() {
    let rules = [rule(RateKey::Header("x-tenant".into()), 1, 3600, 1)];
    let limits = RateLimits::new("t2", &rules).unwrap();
    let mut tenant = HeaderMap::new();
    tenant.insert("x-tenant", HeaderValue::from_static("acme"));
    let none = HeaderMap::new();
    block(async {
        let mut e = Edits::default();
        assert!(limits.check(&view(&tenant, 1), &mut e).await.is_none());
        // The same tenant from another address: one bucket.
        assert!(limits.check(&view(&tenant, 2), &mut e).await.is_some());
        // No header: the client's own bucket, not the tenant's and not a shared one.
        assert!(limits.check(&view(&none, 1), &mut e).await.is_none());
        assert!(limits.check(&view(&none, 1), &mut e).await.is_some());
        assert!(limits.check(&view(&none, 3), &mut e).await.is_none());
    });
    let limits = RateLimits::new("t3", &[rule(RateKey::Consumer, 1, 3600, 1)]).unwrap();
    block(async {
        let mut alice = Edits {
            consumer: Some(Arc::from("alice")),
            ..Edits::default()
        };
        assert!(limits.check(&view(&none, 1), &mut alice).await.is_none());
        assert!(limits.check(&view(&none, 2), &mut alice).await.is_some());
        let mut bob = Edits {
            consumer: Some(Arc::from("bob")),
            ..Edits::default()
        };
        assert!(limits.check(&view(&none, 1), &mut bob).await.is_none());
    });
}

#[test]
fn a_refusal_by_a_later_rule_gives_back_what_earlier_rules_took() {
    let rules = [
        rule(RateKey::ClientIp, 10, 3600, 10),
        rule(RateKey::Header("x-k".into()), 1, 3600, 1),
    ];
    let limits = RateLimits::new("t4", &rules).unwrap();
    let mut map = HeaderMap::new();
    map.insert("x-k", HeaderValue::from_static("v"));
    block(async {
        let mut e = Edits::default();
        assert!(limits.check(&view(&map, 1), &mut e).await.is_none());
        for _ in 0..20 {
            assert_eq!(
                limits.check(&view(&map, 1), &mut e).await.unwrap().status,
                429
            );
        }
        // The per-address rule was given back every refused request: 9 left of 10.
        let mut e = Edits::default();
        map.insert("x-k", HeaderValue::from_static("other"));
        assert!(limits.check(&view(&map, 1), &mut e).await.is_none());
        let r = field(&e.response_add, "ratelimit").unwrap();
        assert!(r.starts_with("\"client_ip 10/h\";r=8;"), "{r}");
    });
}

#[test]
fn headers_false_leaves_the_fields_out_and_an_unchanged_rule_survives_a_rebuild() {
    let mut quiet = rule(RateKey::ClientIp, 1, 3600, 1);
    quiet.headers = false;
    let limits = RateLimits::new("t5", &[quiet.clone()]).unwrap();
    let map = HeaderMap::new();
    block(async {
        let mut e = Edits::default();
        assert!(limits.check(&view(&map, 1), &mut e).await.is_none());
        assert!(e.response_add.is_empty());
        // A reload that keeps the rule keeps its buckets.
        let again = RateLimits::new("t5", &[quiet.clone()]).unwrap();
        let answer = again.check(&view(&map, 1), &mut e).await.unwrap();
        assert_eq!(answer.status, 429);
        assert_eq!(answer.headers.len(), 1, "Retry-After only");
        // A changed rule starts full.
        let mut changed = quiet.clone();
        changed.burst = 2;
        let changed = RateLimits::new("t5", &[changed]).unwrap();
        assert!(changed.check(&view(&map, 1), &mut e).await.is_none());
    });
}

#[test]
fn redis_keys_are_short_and_carry_no_hash_tag() {
    let k = Key::Text(b'h', b"acme").redis_key(b"p:");
    assert_eq!(k, b"p:h:acme");
    let long = vec![b'a'; 65];
    let k = Key::Text(b'h', &long).redis_key(b"p:");
    assert_eq!(k.len(), "p:h:~".len() + 40);
    let k = Key::Text(b'h', b"{tag}").redis_key(b"p:");
    assert!(!k.contains(&b'{'), "{k:?}");
    let v6 = "::ffff:10.0.0.1".parse::<IpAddr>().unwrap().to_canonical();
    assert_eq!(Key::Ip(v6).redis_key(b"p:"), b"p:i:10.0.0.1");
}

proptest::proptest! {
    /// Any header value a client sends makes a bounded Redis key without a hash tag, and two
    /// different values never make the same key.
    #[test]
    fn any_header_value_makes_a_short_tagless_key(a in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                                                  b in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
        let ka = Key::Text(b'h', &a).redis_key(b"p:");
        let kb = Key::Text(b'h', &b).redis_key(b"p:");
        proptest::prop_assert!(ka.len() <= 2 + 2 + 64 + 1);
        let tagless = !ka.contains(&b'{') && !ka.contains(&b'}');
        proptest::prop_assert!(tagless, "hash tag in {:?}", ka);
        proptest::prop_assert_eq!(ka == kb, a == b);
    }
}
