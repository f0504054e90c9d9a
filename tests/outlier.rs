//! Passive ejection: a Pod that keeps failing is taken out, comes back later, and never more
//! than max_ejection_percent of an upstream is out at once.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

/// A Pod that answers every request with 500 and its name in `x-pod`.
async fn failing_pod(name: &'static str) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .status(500)
                            .header("x-pod", name)
                            .body(Full::new(Bytes::from_static(b"broken")))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

async fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    let r = get(gw.admin, "a", "/metrics").await.unwrap();
    String::from_utf8_lossy(&r.body)
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn a_failing_pod_is_ejected_and_comes_back() {
    let good = pods_same_port(&["good-v1", "good-v2"]).await;
    let (bad, _bad_task) = failing_pod("bad").await;
    let conf = format!(
        "upstreams:\n  - name: web\n    retries: 0\n    outlier: {{consecutive_failures: 3, base_ejection: 1s}}\n\
         \x20   nodes: [{{address: \"{}\"}}, {{address: \"{}\"}}, {{address: \"{bad}\"}}]\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        good[0].addr, good[1].addr
    );
    let gw = Gateway::start(&conf, &[]).await;
    let mut bad_answers = 0;
    while bad_answers < 3 {
        let r = gw.get("h", "/").await;
        if r.header("x-pod").as_deref() == Some("bad") {
            assert_eq!(r.status, 500);
            bad_answers += 1;
        }
    }
    // Ejected now: the next rounds go to the good Pods only.
    for _ in 0..20 {
        let pod = gw.pod_for("h", "/").await;
        assert_ne!(pod, "bad", "an ejected Pod got traffic");
    }
    assert_eq!(
        metric(&gw, r#"podgate_upstream_ejections_total{upstream="web"}"#).await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &gw,
            r#"podgate_upstream_endpoints{cluster="static",state="ejected",upstream="web"}"#
        )
        .await,
        Some(1.0)
    );
    assert!(gw.log_text().contains("ejected node"), "{}", gw.log_text());
    // After the ejection it gets traffic again.
    wait_for("the ejected Pod to be tried again", || async {
        gw.pod_for("h", "/").await == "bad"
    })
    .await;
}

#[tokio::test]
async fn never_more_than_max_ejection_percent() {
    let (bad1, _t1) = failing_pod("bad-1").await;
    let (bad2, _t2) = failing_pod("bad-2").await;
    let conf = format!(
        "upstreams:\n  - name: web\n    retries: 0\n    outlier: {{consecutive_failures: 2, base_ejection: 30s, max_ejection_percent: 50}}\n\
         \x20   nodes: [{{address: \"{bad1}\"}}, {{address: \"{bad2}\"}}]\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
    );
    let gw = Gateway::start(&conf, &[]).await;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..20 {
        *seen.entry(gw.pod_for("h", "/").await).or_insert(0) += 1;
    }
    assert_eq!(
        metric(&gw, r#"podgate_upstream_ejections_total{upstream="web"}"#).await,
        Some(1.0),
        "{seen:?}"
    );
    // One is out; the other keeps getting traffic rather than the upstream going dark.
    let last = gw.pod_for("h", "/").await;
    assert!(last == "bad-1" || last == "bad-2");
    assert!(
        gw.log_text().contains("is not ejected"),
        "{}",
        gw.log_text()
    );
}

/// A Pod whose `/healthz` answers 503 while `sick` is set; other paths answer 200.
async fn switchable_pod(
    name: &'static str,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let sick = std::sync::Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let flag = sick.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let flag = flag.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let down = req.uri().path() == "/healthz" && flag.load(Ordering::Relaxed);
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(if down { 503 } else { 200 })
                                    .header("x-pod", name)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, sick)
}

#[tokio::test]
async fn active_checks_take_a_pod_out_and_bring_it_back() {
    use std::sync::atomic::Ordering;
    let (a, _) = switchable_pod("steady").await;
    let (b, sick) = switchable_pod("flaky").await;
    let conf = format!(
        "upstreams:\n  - name: web\n\
         \x20   health_check: {{kind: http, path: /healthz, expect: [200-299], interval: 200ms, timeout: 150ms, healthy: 2, unhealthy: 2}}\n\
         \x20   nodes: [{{address: \"{a}\"}}, {{address: \"{b}\"}}]\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
    );
    let gw = Gateway::start(&conf, &[]).await;
    let flaky = b.to_string();
    let flaky_down = |v: serde_json::Value| {
        v["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["address"] == flaky.as_str() && x["check_down"] == true)
    };
    assert!(!flaky_down(gw.upstreams_json().await), "starts healthy");

    sick.store(true, Ordering::Relaxed);
    let start = std::time::Instant::now();
    while !flaky_down(gw.upstreams_json().await) {
        assert!(
            start.elapsed() < DEADLINE,
            "never marked down:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for _ in 0..10 {
        assert_eq!(gw.pod_for("h", "/").await, "steady");
    }
    let gauge = |state: &str| {
        format!(r#"podgate_upstream_endpoints{{cluster="static",state="{state}",upstream="web"}}"#)
    };
    assert_eq!(metric(&gw, &gauge("unhealthy")).await, Some(1.0));
    assert_eq!(metric(&gw, &gauge("ready")).await, Some(1.0));

    sick.store(false, Ordering::Relaxed);
    wait_for("the flaky Pod to come back", || async {
        gw.pod_for("h", "/").await == "flaky"
    })
    .await;
    let metrics =
        String::from_utf8(get(gw.admin, "a", "/metrics").await.unwrap().body.to_vec()).unwrap();
    assert!(
        metrics.contains("podgate_health_checks_total{result=\"failure\",upstream=\"web\"}"),
        "{metrics}"
    );
    assert!(gw.log_text().contains("is down after 2 failed checks"));
    assert_eq!(metric(&gw, &gauge("unhealthy")).await, Some(0.0));
    assert_eq!(metric(&gw, &gauge("ready")).await, Some(2.0));
}

#[tokio::test]
async fn slow_start_ramps_a_new_pod_up() {
    let pods = pods_same_port(&["old-v1", "new-v1"]).await;
    let port = pods[0].addr.port();
    let conf = "clusters:\n  - name: local\n    manifests: cluster\n\
                upstreams:\n  - name: web\n    slow_start: 3s\n\
                \x20   services: [{cluster: local, service: web, port: 8000, weight: 20}]\n\
                routes:\n  - {name: web, path_prefix: /, upstream: web}\n";
    let gw = Gateway::start(
        conf,
        &[
            ("cluster/svc.yaml", &service_yaml("web")),
            (
                "cluster/slice.yaml",
                &slice_yaml("web-1", "web", port, &[Ep::ready(&pods[0])]),
            ),
        ],
    )
    .await;
    assert_eq!(gw.pod_for("h", "/").await, "old-v1");
    write_atomically(
        &gw.path("cluster/slice.yaml"),
        &slice_yaml(
            "web-1",
            "web",
            port,
            &[Ep::ready(&pods[0]), Ep::ready(&pods[1])],
        ),
    );
    wait_for("the new Pod to be live", || async {
        gw.upstreams_json().await["upstreams"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.len() == 2)
    })
    .await;
    let view = gw.upstreams_json().await;
    let new_weight = view["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["pod"] == "new-v1")
        .unwrap()["weight"]
        .as_u64()
        .unwrap();
    assert!(
        new_weight < 20,
        "a newcomer starts below its weight: {view}"
    );
    let mut early = 0;
    for _ in 0..20 {
        if gw.pod_for("h", "/").await == "new-v1" {
            early += 1;
        }
    }
    assert!(
        early <= 7,
        "the new Pod got {early} of the first 20 requests"
    );
    wait_for("the new Pod to reach its full share", || async {
        let mut n = 0;
        for _ in 0..20 {
            if gw.pod_for("h", "/").await == "new-v1" {
                n += 1;
            }
        }
        n == 10
    })
    .await;
}
