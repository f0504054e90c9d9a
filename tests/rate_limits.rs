//! Rate limits through the podgate binary, on the real request path.
//!
//! Local rules: one podgate (a plain, a TLS and an h2c listener) in front of one Pod that speaks
//! HTTP/1.1 and h2c; each of the four clients of the semantic table (HTTP/1.1, TLS HTTP/1.1,
//! TLS h2, h2c) has routes of its own (host `N.test`), so counts never mix. Every rule refills
//! at `1/min`, so a burst of N admits exactly N in a row and the next gets 429, with no timing
//! in the test. What reached the Pod is read from its log by the request's `x-case`.
//!
//! Shared rules: two podgate processes with one config naming one real `redis-server` (on a
//! free loopback port, killed at the end): requests spread over both, at once, are admitted N in
//! total (exact mode) or within the documented bound (batched mode). Then Redis is killed:
//! `on_error: allow` lets requests through a bucket that Redis had emptied, `on_error: deny`
//! answers 500 with `Retry-After: 1`, and the deny route serves again once Redis is back. A
//! Redis that never answers holds no request much past the store's `timeout`. Every wait polls a
//! condition with a deadline.
//!
//! redis-server is required (`.ci/run` installs it): without it the shared test fails, naming it.

mod support;

#[path = "semantics/client.rs"]
mod client;
// Shared with the semantic table, which reads every field of what the Pod saw.
#[allow(dead_code)]
#[path = "semantics/pod.rs"]
mod pod;

use bytes::Bytes;
use client::{Answer, Client, Listeners, GATEWAY_NAME};
use http_body_util::{BodyExt, Empty, Full};
use pod::{grpc_frame, AnyBody, Log};
use std::sync::atomic::{AtomicUsize, Ordering};
use support::redis::RedisServer;
use support::Gateway;

/// A fresh `x-case` value: what the Pod's log is keyed by.
fn case(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{}-{what}", N.fetch_add(1, Ordering::Relaxed))
}

/// The routes of one client (host `N.test`): per client address, per header, per consumer,
/// and gRPC per client address (toward the h2c upstream: gRPC needs h2 to the Pod).
const ROUTES: &str = r#"
  - {name: ip-N, hosts: [N.test], path_prefix: /ip, upstream: h1, policies: {rate_limit: [{key: client_ip, rate: 1/min, burst: 3}]}}
  - {name: hdr-N, hosts: [N.test], path_prefix: /hdr, upstream: h1, policies: {rate_limit: [{key: "header x-tenant", rate: 1/min, burst: 2}]}}
  - {name: key-N, hosts: [N.test], path_prefix: /key, upstream: h1, policies: {auth: {api_key: {header: x-api-key}}, rate_limit: [{key: consumer, rate: 1/min, burst: 2}]}}
  - {name: grpc-N, hosts: [N.test], path_prefix: /grpc.Svc, upstream: h2c, policies: {rate_limit: [{key: client_ip, rate: 1/min, burst: 1}]}}
"#;

struct Fx {
    gw: Gateway,
    _pod: pod::EchoPod,
    listeners: Listeners,
    log: Log,
}

impl Fx {
    async fn start() -> Fx {
        let log = Log::default();
        let pod = pod::start("pod-a", log.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/shop"), "shop-key-1\n").unwrap();
        std::fs::write(dir.path().join("keys/other"), "other-key-1\n").unwrap();
        let mut conf = format!(
            "consumers:\n  - {{name: shop, api_keys_file: keys/shop}}\n  - {{name: other, api_keys_file: keys/other}}\n\
             upstreams:\n  - {{name: h1, protocol: http1, retries: 0, nodes: [{{address: \"{0}\"}}]}}\n\
             \x20 - {{name: h2c, protocol: h2c, retries: 0, nodes: [{{address: \"{0}\"}}]}}\nroutes:",
            pod.addr
        );
        for n in 0..Client::ALL.len() {
            conf.push_str(&ROUTES.replace('N', &n.to_string()));
        }
        let pki = support::make_pki(dir.path(), "gw", &[GATEWAY_NAME]);
        let tls = format!(
            "tls: {{cert: {}, key: {}}}",
            pki.cert_pem.display(),
            pki.key_pem.display()
        );
        let gw = Gateway::start_listeners(dir, &["", &tls, "h2c: true"], &conf).await;
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
        }
    }

    /// One request from `client` to its own routes: the answer, and whether it reached the Pod.
    async fn send(
        &self,
        client: Client,
        method: &str,
        path: &str,
        fields: &[(&str, &str)],
        body: AnyBody,
    ) -> (Answer, bool) {
        let case = case(&format!("{client:?}"));
        let mut all: Vec<(String, String)> = fields
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        all.push(("x-case".into(), case.clone()));
        let host = format!("{}.test", index(client));
        let answer = self
            .listeners
            .send(client, method, &host, path, &all, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} ({case}): {e}\n{}", self.gw.log_text()));
        let reached = self.log.lock().unwrap().remove(&case).is_some();
        (answer, reached)
    }

    async fn get(&self, client: Client, path: &str, fields: &[(&str, &str)]) -> (Answer, bool) {
        self.send(client, "GET", path, fields, Empty::new().boxed())
            .await
    }
}

fn index(client: Client) -> usize {
    Client::ALL.iter().position(|c| *c == client).unwrap()
}

fn header(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// An admitted request: 200 from the Pod, with the rule's fields and `remaining` left.
fn admitted(what: &str, got: &(Answer, bool), rule: &str, q: u64, remaining: u64) {
    let (a, reached) = got;
    assert_eq!(a.status, 200, "{what}: {:?}", a.body);
    assert!(reached, "{what}: nothing reached the Pod");
    assert_eq!(
        header(&a.headers, "ratelimit-policy").as_deref(),
        Some(format!("\"{rule}\";q={q};w=60").as_str()),
        "{what}"
    );
    let field = header(&a.headers, "ratelimit").unwrap_or_default();
    assert!(
        field.starts_with(&format!("\"{rule}\";r={remaining};t=")),
        "{what}: RateLimit {field:?}"
    );
}

/// A refusal over the limit: 429, podgate's JSON, `Retry-After` and the fields; no Pod.
fn limited(what: &str, got: &(Answer, bool), rule: &str, q: u64) {
    let (a, reached) = got;
    assert_eq!(a.status, 429, "{what}: {:?}", a.body);
    assert!(!reached, "{what}: reached the Pod");
    let json: serde_json::Value = serde_json::from_slice(&a.body)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {:?}", a.body));
    assert_eq!(json["error"], "too_many_requests", "{what}: {json}");
    assert_eq!(json["status"], 429, "{what}: {json}");
    assert_eq!(
        json["message"],
        "the route's rate limit is exceeded; retry after the Retry-After seconds"
    );
    assert_eq!(
        header(&a.headers, "content-type").as_deref(),
        Some("application/json"),
        "{what}"
    );
    // One token a minute, just spent: the next is due in (almost) 60 s.
    let retry: u64 = header(&a.headers, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no numeric Retry-After: {:?}", a.headers));
    assert!((1..=60).contains(&retry), "{what}: Retry-After {retry}");
    assert_eq!(
        header(&a.headers, "ratelimit-policy").as_deref(),
        Some(format!("\"{rule}\";q={q};w=60").as_str()),
        "{what}"
    );
    let field = header(&a.headers, "ratelimit").unwrap_or_default();
    let t: u64 = field
        .strip_prefix(&format!("\"{rule}\";r=0;t="))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{what}: RateLimit {field:?}"));
    assert!(
        t >= retry,
        "{what}: full again ({t}) before the next token ({retry})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_limits_hold_on_every_client() {
    let fx = Fx::start().await;
    for &c in Client::ALL {
        let at = |what: &str| format!("{what} ({c:?})");

        // By client address: exactly the burst, then 429.
        let rule = "client_ip 1/min";
        for left in (0..3).rev() {
            admitted(&at("ip"), &fx.get(c, "/ip/a", &[]).await, rule, 1, left);
        }
        for _ in 0..2 {
            limited(&at("ip over"), &fx.get(c, "/ip/a", &[]).await, rule, 1);
        }

        // By header: each tenant its own bucket; without the header, the client address.
        let rule = "header x-tenant 1/min";
        for tenant in ["a", "b"] {
            let t = [("x-tenant", tenant)];
            for left in [1, 0] {
                let got = fx.get(c, "/hdr/x", &t).await;
                admitted(&at(&format!("tenant {tenant}")), &got, rule, 1, left);
            }
            let got = fx.get(c, "/hdr/x", &t).await;
            limited(&at(&format!("tenant {tenant} over")), &got, rule, 1);
        }
        for left in [1, 0] {
            admitted(
                &at("no tenant"),
                &fx.get(c, "/hdr/x", &[]).await,
                rule,
                1,
                left,
            );
        }
        limited(
            &at("no tenant over"),
            &fx.get(c, "/hdr/x", &[]).await,
            rule,
            1,
        );

        // By consumer: two consumers counted apart; a bad key is refused before counting.
        let rule = "consumer 1/min";
        for key in ["shop-key-1", "other-key-1"] {
            let k = [("x-api-key", key)];
            for left in [1, 0] {
                admitted(&at(key), &fx.get(c, "/key/x", &k).await, rule, 1, left);
            }
            limited(
                &at(&format!("{key} over")),
                &fx.get(c, "/key/x", &k).await,
                rule,
                1,
            );
        }
        let (a, reached) = fx.get(c, "/key/x", &[("x-api-key", "nope")]).await;
        assert!(a.status == 401 && !reached, "{}", at("a wrong key"));
    }

    // gRPC: the first call passes, the next ends trailers-only with RESOURCE_EXHAUSTED.
    for &c in Client::H2 {
        const FIELDS: [(&str, &str); 2] =
            [("content-type", "application/grpc"), ("te", "trailers")];
        let call = || {
            let body = Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")).boxed();
            fx.send(c, "POST", "/grpc.Svc/Call", &FIELDS, body)
        };
        let (a, reached) = call().await;
        let status = a.trailers.as_ref().and_then(|t| header(t, "grpc-status"));
        assert_eq!(status.as_deref(), Some("0"), "{c:?}: {:?}", a.headers);
        assert_eq!(&a.body[..], &grpc_frame(b"pod-a:hi")[..], "{c:?}");
        assert!(reached, "{c:?}: the first call reached the Pod");
        let (a, reached) = call().await;
        assert_eq!(a.status, 200, "{c:?}");
        assert_eq!(
            header(&a.headers, "grpc-status").as_deref(),
            Some("8"),
            "{c:?}: {:?}",
            a.headers
        );
        assert_eq!(
            header(&a.headers, "content-type").as_deref(),
            Some("application/grpc"),
            "{c:?}"
        );
        assert!(
            a.body.is_empty() && a.trailers.is_none(),
            "{c:?}: not trailers-only"
        );
        assert!(!reached, "{c:?}: the limited call reached the Pod");
    }
}

/// One plain HTTP/1.1 GET to `gw` with a fresh `x-case`: the answer, and whether it reached
/// the Pod.
async fn hit(gw: &Gateway, log: &Log, path: &str) -> (support::Reply, bool) {
    let case = case("shared");
    let r = support::request(gw.addr, "GET", "shared.test", path, &[("x-case", &case)])
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", gw.log_text()));
    let reached = log.lock().unwrap().remove(&case).is_some();
    (r, reached)
}

/// Four clients per gateway at once, each sending `each` requests to `path` one after the
/// other: (admitted, limited).
async fn spread(gws: &[Gateway; 2], log: &Log, path: &str, each: usize) -> (usize, usize) {
    let client = |name: &'static str, i: usize| {
        let gw = &gws[i % 2];
        async move {
            let mut counts = (0, 0);
            for _ in 0..each {
                let (r, reached) = hit(gw, log, path).await;
                let body = String::from_utf8_lossy(&r.body);
                match r.status {
                    200 => {
                        assert!(reached, "{path}: a 200 that did not reach the Pod");
                        counts.0 += 1;
                    }
                    429 => {
                        assert!(!reached, "{path}: a 429 that reached the Pod");
                        assert!(body.contains("\"too_many_requests\""), "{path}: {body}");
                        let retry = r.header("retry-after").and_then(|v| v.parse::<u64>().ok());
                        assert!(
                            retry.is_some_and(|s| s >= 1),
                            "{path} ({name}): {:?}",
                            r.headers
                        );
                        assert!(r.header("ratelimit").is_some_and(|v| v.contains(";r=0;")));
                        counts.1 += 1;
                    }
                    s => panic!("{path}: status {s}: {body}"),
                }
            }
            counts
        }
    };
    let all = (0..8).map(|i| client(if i % 2 == 0 { "first" } else { "second" }, i));
    let got = futures::future::join_all(all).await;
    got.iter().fold((0, 0), |t, c| (t.0 + c.0, t.1 + c.1))
}

async fn metrics(gw: &Gateway) -> String {
    let r = support::get(gw.admin, "admin", "/metrics").await.unwrap();
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Redis calls a gateway made for `store` (its latency histogram's count).
async fn redis_calls(gw: &Gateway, store: &str) -> u64 {
    let series = format!("podgate_rate_limit_redis_duration_seconds_count{{store=\"{store}\"}} ");
    let text = metrics(gw).await;
    let n = text.lines().find_map(|l| l.strip_prefix(&series));
    n.and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limits_hold_across_two_processes() {
    assert!(
        std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok(),
        "redis-server is required for this test (Debian: apt-get install redis-server; .ci/run installs it)"
    );
    let mut redis = RedisServer::start();
    let log = Log::default();
    let pod = pod::start("pod-a", log.clone()).await;
    // A generous timeout: on a busy machine a late answer would let a request through
    // (on_error: allow) and make the exact count wrong for reasons that are not the limiter's.
    let conf = format!(
        "rate_limit_stores:\n\
         \x20 - {{name: exact, redis: \"{url}\", timeout: 1s, on_error: allow}}\n\
         \x20 - {{name: batched, redis: \"{url}\", timeout: 1s, on_error: allow, mode: batched, lease: 10}}\n\
         \x20 - {{name: strict, redis: \"{url}\", timeout: 1s, on_error: deny}}\n\
         upstreams:\n  - {{name: h1, protocol: http1, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n\
         \x20 - {{name: exact, path_prefix: /exact, upstream: h1, policies: {{rate_limit: [{{key: client_ip, rate: 1/min, burst: 10, store: exact}}]}}}}\n\
         \x20 - {{name: batched, path_prefix: /batched, upstream: h1, policies: {{rate_limit: [{{key: client_ip, rate: 1/min, burst: 100, store: batched}}]}}}}\n\
         \x20 - {{name: strict, path_prefix: /strict, upstream: h1, policies: {{rate_limit: [{{key: client_ip, rate: 1/min, burst: 1000, store: strict}}]}}}}\n",
        url = redis.url(),
        pod = pod.addr,
    );
    let start = |conf: String| async move {
        Gateway::start_listeners(tempfile::tempdir().unwrap(), &[""], &conf).await
    };
    let gws = [start(conf.clone()).await, start(conf).await];

    // Exact: 32 requests from 8 clients over both processes, exactly the burst admitted.
    let (ok, refused) = spread(&gws, &log, "/exact/a", 4).await;
    assert_eq!((ok, refused), (10, 22), "exact mode across two processes");

    // Batched: each process takes 10 tokens per Redis call; Redis never grants more than the
    // burst, and at most lease − 1 tokens per process are taken and not spent.
    let (ok, refused) = spread(&gws, &log, "/batched/a", 20).await;
    // One Redis call per request in exact mode; a fraction of that batched (32 of 160 here).
    let (mut exact, mut batched) = (0, 0);
    for gw in &gws {
        exact += redis_calls(gw, "exact").await;
        batched += redis_calls(gw, "batched").await;
    }
    assert_eq!(exact, 32, "exact mode: one Redis call per request");
    assert!(
        batched < 80,
        "batched mode: {batched} Redis calls for 160 requests"
    );
    assert!(
        (100 - 2 * 9..=100).contains(&ok),
        "batched mode admitted {ok} of a burst of 100 (refused {refused})"
    );
    for gw in &gws {
        let (r, _) = hit(gw, &log, "/strict/a").await;
        assert_eq!(r.status, 200, "the deny store serves while Redis answers");
    }

    // Redis gone: `allow` lets requests through the emptied bucket, `deny` answers 500.
    redis.kill();
    for gw in &gws {
        support::wait_for("on_error: allow to let a request through", || async {
            hit(gw, &log, "/exact/a").await.0.status == 200
        })
        .await;
        let (r, reached) = hit(gw, &log, "/exact/a").await;
        assert!(
            r.status == 200 && reached,
            "allow with Redis down: {}",
            r.status
        );
        let (r, reached) = hit(gw, &log, "/strict/a").await;
        let body = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 500, "deny with Redis down: {body}");
        assert_eq!(
            r.header("retry-after").as_deref(),
            Some("1"),
            "deny's Retry-After"
        );
        assert!(body.contains("\"internal_error\""), "{body}");
        assert!(!reached, "a denied request reached the Pod");
        let text = metrics(gw).await;
        for result in ["error_allowed", "error_denied", "limited"] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("podgate_rate_limit_requests_total")
                        && l.contains(&format!("result=\"{result}\""))),
                "no {result} in the metrics"
            );
        }
    }

    // Redis back (empty): the deny store serves again, with no restart of podgate.
    redis.restart();
    for gw in &gws {
        support::wait_for("the deny store to serve once Redis is back", || async {
            hit(gw, &log, "/strict/a").await.0.status == 200
        })
        .await;
    }
}

/// A Redis that never answers (a loopback listener that accepts and reads, silent): no request
/// waits much past the store's `timeout`, then `on_error` decides. The bound is loose (a debug
/// build on a shared machine), far below the test's 20 s deadline a request without a timeout
/// would hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_holds_no_request_past_the_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let log = Log::default();
    let pod = pod::start("pod-a", log.clone()).await;
    let url = format!("redis://127.0.0.1:{port}/0");
    let conf = format!(
        "rate_limit_stores:\n\
         \x20 - {{name: allow, redis: \"{url}\", timeout: 100ms, on_error: allow}}\n\
         \x20 - {{name: deny, redis: \"{url}\", timeout: 100ms, on_error: deny}}\n\
         upstreams:\n  - {{name: h1, protocol: http1, retries: 0, nodes: [{{address: \"{pod}\"}}]}}\n\
         routes:\n\
         \x20 - {{name: allow, path_prefix: /allow, upstream: h1, policies: {{rate_limit: [{{key: client_ip, rate: 10/s, store: allow}}]}}}}\n\
         \x20 - {{name: deny, path_prefix: /deny, upstream: h1, policies: {{rate_limit: [{{key: client_ip, rate: 10/s, store: deny}}]}}}}\n",
        pod = pod.addr,
    );
    let gw = Gateway::start_listeners(tempfile::tempdir().unwrap(), &[""], &conf).await;
    let timed = |path: &'static str| {
        let (gw, log) = (&gw, &log);
        async move {
            let start = std::time::Instant::now();
            let (r, reached) = hit(gw, log, path).await;
            (r.status, reached, start.elapsed())
        }
    };
    let all = (0..10).map(|i| timed(if i % 2 == 0 { "/allow/a" } else { "/deny/a" }));
    for (i, (status, reached, took)) in futures::future::join_all(all).await.into_iter().enumerate()
    {
        let want = if i % 2 == 0 {
            (200, true)
        } else {
            (500, false)
        };
        assert_eq!((status, reached), want, "request {i}");
        assert!(
            took < std::time::Duration::from_millis(1500),
            "request {i} waited {took:?} on a silent Redis (timeout 100ms)"
        );
    }
    let text = metrics(&gw).await;
    for store in ["allow", "deny"] {
        let series = format!(
            "podgate_rate_limit_redis_errors_total{{reason=\"timeout\",store=\"{store}\"}} "
        );
        assert!(
            text.lines().any(|l| l.starts_with(&series)),
            "no {series}in the metrics"
        );
    }
}
