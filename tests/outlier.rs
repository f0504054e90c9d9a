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
