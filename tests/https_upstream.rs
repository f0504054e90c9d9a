//! HTTPS to the Pod: verified against a CA made here, refused with the wrong CA.

mod support;

use support::*;

#[tokio::test]
async fn https_upstream_is_verified_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let good = make_pki(dir.path(), "good", &["pod.internal"]);
    let other = make_pki(dir.path(), "other", &["pod.internal"]);
    let pod = https_pod("secure-v1", &good).await;
    let conf = format!(
        "upstreams:\n\
         \x20 - name: good\n    scheme: https\n    tls: {{sni: pod.internal, ca_file: {ca}}}\n    nodes: [{{address: \"{a}\"}}]\n\
         \x20 - name: wrong-ca\n    scheme: https\n    retries: 0\n    tls: {{sni: pod.internal, ca_file: {wrong}}}\n    nodes: [{{address: \"{a}\"}}]\n\
         \x20 - name: wrong-name\n    scheme: https\n    retries: 0\n    host_header: other.internal\n    tls: {{ca_file: {ca}}}\n    nodes: [{{address: \"{a}\"}}]\n\
         \x20 - name: unverified\n    scheme: https\n    tls: {{verify: false}}\n    nodes: [{{address: \"{a}\"}}]\n\
         routes:\n\
         \x20 - {{name: good, path_prefix: /good, upstream: good}}\n\
         \x20 - {{name: wrong-ca, path_prefix: /wrong-ca, upstream: wrong-ca}}\n\
         \x20 - {{name: wrong-name, path_prefix: /wrong-name, upstream: wrong-name}}\n\
         \x20 - {{name: unverified, path_prefix: /unverified, upstream: unverified}}\n",
        ca = good.ca_pem.display(),
        wrong = other.ca_pem.display(),
        a = pod.addr,
    );
    let gw = Gateway::start_in(dir, &conf).await;

    let r = gw.get("client.example", "/good").await;
    assert_eq!(r.status, 200, "{}", gw.log_text());
    assert_eq!(r.header("x-pod").as_deref(), Some("secure-v1"));

    let r = gw.get("client.example", "/wrong-ca").await;
    assert_eq!(r.status, 502, "a certificate from another CA is refused");
    assert_eq!(r.json()["error"], "bad_gateway");

    let r = gw.get("client.example", "/wrong-name").await;
    assert_eq!(r.status, 502, "host_header is the SNI and the name checked");

    let r = gw.get("client.example", "/unverified").await;
    assert_eq!(r.status, 200, "verify: false accepts any certificate");
}

#[tokio::test]
async fn http_health_checks_of_an_https_upstream_run_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let good = make_pki(dir.path(), "good", &["pod.internal"]);
    let other = make_pki(dir.path(), "other", &["pod.internal"]);
    let trusted = https_pod("trusted-v1", &good).await;
    let stranger = https_pod("stranger-v1", &other).await;
    let conf = format!(
        "upstreams:\n\
         \x20 - name: secure\n    scheme: https\n    tls: {{sni: pod.internal, ca_file: {ca}}}\n\
         \x20   health_check: {{kind: http, path: /healthz, interval: 200ms, timeout: 150ms, healthy: 1, unhealthy: 2}}\n\
         \x20   nodes: [{{address: \"{a}\"}}, {{address: \"{b}\"}}]\n\
         routes:\n  - {{name: secure, path_prefix: /, upstream: secure}}\n",
        ca = good.ca_pem.display(),
        a = trusted.addr,
        b = stranger.addr,
    );
    let gw = Gateway::start_in(dir, &conf).await;
    let check_down = |v: &serde_json::Value, addr: std::net::SocketAddr| {
        v["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["address"] == addr.to_string().as_str())
            .map(|x| x["check_down"] == true)
    };
    // The Pod whose certificate another CA signed fails its checks; the trusted one passes.
    wait_for(
        "the Pod with the untrusted certificate to be marked down",
        || async { check_down(&gw.upstreams_json().await, stranger.addr) == Some(true) },
    )
    .await;
    assert_eq!(
        check_down(&gw.upstreams_json().await, trusted.addr),
        Some(false)
    );
    let metrics =
        String::from_utf8(get(gw.admin, "a", "/metrics").await.unwrap().body.to_vec()).unwrap();
    assert!(
        metrics.contains(r#"podgate_health_checks_total{result="success",upstream="secure"}"#),
        "{metrics}"
    );
    for _ in 0..6 {
        assert_eq!(gw.pod_for("client.example", "/").await, "trusted-v1");
    }
}
