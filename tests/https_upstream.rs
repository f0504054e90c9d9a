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
