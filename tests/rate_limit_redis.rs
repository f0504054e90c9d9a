//! Shared rate limits against real redis-server processes, at the engine level: the
//! `RateLimits` a route builds, called as the request pipeline calls it. Two limiters that share
//! nothing but Redis stand in for two podgate replicas (phase 2 repeats this through the binary).
//! Every test starts its own Redis on a free loopback port and kills it at the end.

mod support;

use podgate_gateway::config::{
    OnError, Rate, RateKey, RateLimitMode, RateLimitRule, RateLimitStoreConf, RedisTarget,
    RuleStore, Secret,
};
use podgate_gateway::policies::rate_limit::RateLimits;
use podgate_gateway::policies::{AnswerBody, Edits, Fields, LocalAnswer, RequestView};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use support::redis::{RedisCluster, RedisServer, TlsFiles};

static NO_FIELDS: LazyLock<http::HeaderMap> = LazyLock::new(http::HeaderMap::new);

fn store(name: &str, target: RedisTarget, mode: RateLimitMode) -> RateLimitStoreConf {
    RateLimitStoreConf {
        name: Arc::from(name),
        tls: matches!(&target, RedisTarget::Server(u) if u.0.starts_with("rediss")),
        target,
        ca_pem: None,
        ca_file: None,
        password: None,
        timeout: Duration::from_millis(50),
        on_error: OnError::Allow,
        mode,
        lease: 10,
        key_prefix: "test:".into(),
    }
}

fn server(url: String) -> RedisTarget {
    RedisTarget::Server(Secret(url))
}

fn limits(route: &str, store: RateLimitStoreConf, rate: u64, burst: u64) -> Arc<RateLimits> {
    let rule = RateLimitRule {
        key: RateKey::Consumer,
        rate: Rate {
            count: rate,
            per_secs: 1,
        },
        burst,
        store: RuleStore::Shared(Arc::new(store)),
        max_keys: 1024,
        headers: true,
    };
    Arc::new(RateLimits::new(route, &[rule]).unwrap())
}

/// One request of `consumer` through `limits`: its answer, if it was refused.
async fn hit(limits: &RateLimits, consumer: &str) -> Option<LocalAnswer> {
    let view = RequestView {
        method: &http::Method::GET,
        host: "h",
        path_and_query: "/",
        fields: Fields::Map(&NO_FIELDS),
        peer: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        client: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        tls: false,
        grpc: false,
        content_length: None,
    };
    let mut edits = Edits {
        consumer: Some(Arc::from(consumer)),
        ..Edits::default()
    };
    limits.check(&view, &mut edits).await
}

/// The value of a series of the default registry (a counter, or a histogram's count).
fn metric(family: &str, labels: &[(&str, &str)]) -> f64 {
    for f in prometheus::gather() {
        if f.name() != family {
            continue;
        }
        for m in f.get_metric() {
            let all = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if all {
                if m.get_histogram().get_sample_count() > 0 {
                    return m.get_histogram().get_sample_count() as f64;
                }
                return m.get_counter().get_value();
            }
        }
    }
    0.0
}

/// Two replicas hammer one key from 8 tasks each for `secs`: (admitted, expected by the exact
/// GCRA over the time the load ran).
async fn two_replicas(
    a: Arc<RateLimits>,
    b: Arc<RateLimits>,
    rate: u64,
    burst: u64,
    secs: f64,
) -> (u64, f64) {
    let admitted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let run = Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for replica in [a, b] {
        for _ in 0..8 {
            let (replica, admitted) = (replica.clone(), admitted.clone());
            tasks.push(tokio::spawn(async move {
                while start.elapsed() < run {
                    if hit(&replica, "shared-key").await.is_none() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    // A request served from a lease does no I/O; real ones read a socket.
                    tokio::task::yield_now().await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    (
        admitted.load(Ordering::Relaxed),
        burst as f64 + rate as f64 * elapsed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_sharing_one_redis_admit_within_5_percent_exact_and_batched() {
    let redis = RedisServer::start();
    let (rate, burst, secs) = (400, 100, 3.0);
    for mode in [RateLimitMode::Exact, RateLimitMode::Batched] {
        let names = match mode {
            RateLimitMode::Exact => ["exact-a", "exact-b"],
            RateLimitMode::Batched => ["batched-a", "batched-b"],
        };
        let route = names[0];
        // This test is about accuracy: a loaded machine must not turn into timeouts (and with
        // on_error: deny, a failure could only lower the count).
        let conf = |n: &str| RateLimitStoreConf {
            timeout: Duration::from_secs(1),
            on_error: OnError::Deny,
            ..store(n, server(redis.url()), mode)
        };
        let [a, b] = names.map(|n| limits(route, conf(n), rate, burst));
        let (admitted, expected) = two_replicas(a, b, rate, burst, secs).await;
        let calls: f64 = names
            .iter()
            .map(|n| metric("podgate_rate_limit_redis_duration_seconds", &[("store", n)]))
            .sum();
        let requests = metric(
            "podgate_rate_limit_requests_total",
            &[("route", route), ("result", "limited")],
        ) + metric(
            "podgate_rate_limit_requests_total",
            &[("route", route), ("result", "allowed")],
        );
        let error = (admitted as f64 - expected) / expected;
        eprintln!(
            "{mode:?}: admitted {admitted} of {expected:.0} expected ({:+.2} %), {requests} \
             requests, {calls} Redis calls",
            error * 100.0
        );
        assert!(error.abs() <= 0.05, "{mode:?}: {admitted} vs {expected:.0}");
        if mode == RateLimitMode::Batched {
            // The bound: at most replicas × (lease − 1) = 2 × 9 over the exact limit. (Under it,
            // leases still held at the end and the refusals remembered until a token is due.)
            assert!(
                admitted as f64 - expected <= 18.0,
                "{admitted} vs {expected:.0}"
            );
        }
        let skipped = metric(
            "podgate_rate_limit_redis_errors_total",
            &[("store", names[0]), ("reason", "skipped")],
        );
        assert_eq!(skipped, 0.0, "the store answered throughout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_follows_on_error_and_recovers_when_it_returns() {
    let mut redis = RedisServer::start();
    let mut deny = store("kill-deny", server(redis.url()), RateLimitMode::Exact);
    deny.on_error = OnError::Deny;
    let allow = store("kill-allow", server(redis.url()), RateLimitMode::Exact);
    let timeout = deny.timeout;
    let deny = limits("kill-deny", deny, 1000, 1000);
    let allow = limits("kill-allow", allow, 1000, 1000);
    assert!(hit(&deny, "k").await.is_none());
    assert!(hit(&allow, "k").await.is_none());

    redis.kill();
    for _ in 0..50 {
        let start = Instant::now();
        let answer = hit(&deny, "k").await.expect("on_error: deny refuses");
        assert_eq!(answer.status, 500);
        assert!(matches!(answer.body, AnswerBody::Error));
        assert!(
            hit(&allow, "k").await.is_none(),
            "on_error: allow lets through"
        );
        assert!(start.elapsed() < 2 * timeout + Duration::from_millis(500));
    }
    let label = |route: &str, result: &str| {
        metric(
            "podgate_rate_limit_requests_total",
            &[("route", route), ("result", result)],
        )
    };
    assert_eq!(label("kill-deny", "error_denied"), 50.0);
    assert_eq!(label("kill-allow", "error_allowed"), 50.0);
    let skipped = metric(
        "podgate_rate_limit_redis_errors_total",
        &[("store", "kill-deny"), ("reason", "skipped")],
    );
    assert!(skipped > 0.0, "a dead store is skipped, not waited for");

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while hit(&deny, "k").await.is_some() {
        assert!(Instant::now() < deadline, "the store did not recover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Back on Redis (a fresh one: the script is loaded again after NOSCRIPT).
    assert!(hit(&allow, "k").await.is_none());
    assert!(label("kill-deny", "allowed") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_answers_slowly_never_holds_a_call_longer_than_timeout() {
    let redis = RedisServer::start();
    let conf = store("slow", server(redis.url()), RateLimitMode::Exact);
    let timeout = conf.timeout;
    let limits = limits("slow", conf, 1000, 1000);
    assert!(hit(&limits, "k").await.is_none());
    // Redis takes commands but runs none for 3 s.
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "3000", "ALL"]).trim(), "OK");
    let paused = Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let limits = limits.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let answer = hit(&limits, &format!("k{i}")).await;
                (answer.is_none(), start.elapsed())
            })
        })
        .collect();
    for c in calls {
        let (allowed, took) = c.await.unwrap();
        assert!(allowed, "on_error: allow");
        assert!(
            took < timeout + Duration::from_millis(300),
            "a call took {took:?}"
        );
    }
    assert!(
        paused.elapsed() < Duration::from_secs(2),
        "all answered during the pause"
    );
    let timeouts = metric(
        "podgate_rate_limit_redis_errors_total",
        &[("store", "slow"), ("reason", "timeout")],
    );
    assert!(timeouts >= 1.0);
    // Once Redis runs again, calls are answered by it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let served = || {
        metric(
            "podgate_rate_limit_requests_total",
            &[("route", "slow"), ("result", "allowed")],
        )
    };
    let before = served();
    while served() == before {
        assert!(
            Instant::now() < deadline,
            "no call reached Redis after the pause"
        );
        hit(&limits, "k").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_keeps_every_key_exact_across_its_nodes() {
    let cluster = RedisCluster::start();
    // One seed node is enough: the client learns the others from the cluster.
    let seed = vec![Secret(cluster.urls()[0].clone())];
    let conf = store("cluster", RedisTarget::Cluster(seed), RateLimitMode::Exact);
    let limits = limits("cluster", conf, 1, 5);
    for c in 0..30 {
        let mut admitted = 0;
        for _ in 0..8 {
            if hit(&limits, &format!("consumer-{c}")).await.is_none() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5, "consumer-{c}");
    }
    let holding = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert!(
        holding >= 2,
        "keys spread over the cluster's slots ({holding} nodes hold some)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_ca_file_works_and_an_unknown_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::make_pki(dir.path(), "redis", &["127.0.0.1", "localhost"]);
    let redis = RedisServer::start_tls(TlsFiles {
        ca: pki.ca_pem.clone(),
        cert: pki.cert_pem.clone(),
        key: pki.key_pem.clone(),
    });
    assert!(redis.url().starts_with("rediss://"));
    let mut conf = store("tls", server(redis.url()), RateLimitMode::Exact);
    conf.ca_pem = Some(std::fs::read(&pki.ca_pem).unwrap());
    // The first call connects and shakes hands first: 50 ms is too little for that in a debug
    // build while the whole suite runs (one call timed out and on_error let a 4th through).
    conf.timeout = Duration::from_secs(1);
    let trusted = limits("tls", conf, 1, 3);
    let mut admitted = 0;
    for _ in 0..5 {
        match hit(&trusted, "k").await {
            None => admitted += 1,
            Some(answer) => assert_eq!(answer.status, 429),
        }
    }
    assert_eq!(admitted, 3);
    // Without the CA (system roots only) the certificate is not trusted: on_error decides.
    let mut untrusted = store("tls-untrusted", server(redis.url()), RateLimitMode::Exact);
    untrusted.on_error = OnError::Deny;
    untrusted.timeout = Duration::from_millis(500);
    let untrusted = limits("tls-untrusted", untrusted, 1, 3);
    assert_eq!(hit(&untrusted, "k").await.map(|a| a.status), Some(500));
}
