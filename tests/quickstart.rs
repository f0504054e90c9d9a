//! The quickstart as the README shows it: `conf/quickstart.yaml` and its manifests folder, with
//! the demo Pods moved to free loopback addresses (the real ones sit on 127.0.0.11-13:8080 and
//! the gateway on 8080/9901, which a developer may be using).

mod support;

use support::*;

const NAMES: [&str; 3] = ["httpbin-v1-6d8f9", "httpbin-v2-5c7b4", "httpbin-v3-8a1e2"];

#[tokio::test]
async fn the_quickstart_answers_as_the_readme_says() {
    let pods = pods_same_port(&NAMES).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    // The quickstart's own listeners, admin and server settings give way to the test's.
    let conf = std::fs::read_to_string(root.join("quickstart.yaml")).unwrap();
    let body = &conf[conf.find("clusters:").expect("a clusters: section")..];
    let moved = |text: String| {
        let mut text = text.replace("port: 8080", &format!("port: {}", pods[0].addr.port()));
        for (i, pod) in pods.iter().enumerate() {
            text = text.replace(
                &format!("\"127.0.0.1{}\"", i + 1),
                &format!("\"{}\"", pod.ip()),
            );
        }
        text
    };
    let manifests: Vec<(String, String)> = std::fs::read_dir(root.join("quickstart/cluster"))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (
                format!("quickstart/cluster/{name}"),
                moved(std::fs::read_to_string(&path).unwrap()),
            )
        })
        .collect();
    let files: Vec<(&str, &str)> = manifests
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let gw = Gateway::start(body, &files).await;

    // One worker thread: v1, v2, v3 in turn (the README's first curl loop).
    let mut seen = Vec::new();
    for _ in 0..6 {
        let r = gw.get("localhost", "/httpbin/get").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["uri"], "/get", "the prefix is stripped");
        seen.push(r.json()["pod"].as_str().unwrap().to_string());
    }
    let first = NAMES.iter().position(|n| *n == seen[0]).unwrap();
    let expected: Vec<_> = (0..6).map(|i| NAMES[(first + i) % 3]).collect();
    assert_eq!(seen, expected);

    // Weights 4 (stable: v1 and v2) and 1 (canary: v3) over 9 requests: 4, 4, 1.
    let mut counts = [0; 3];
    for _ in 0..9 {
        let pod = gw.pod_for("localhost", "/canary/get").await;
        counts[NAMES.iter().position(|n| *n == pod).unwrap()] += 1;
    }
    assert_eq!(counts, [4, 4, 1]);

    // The `labels: {version: v1}` subset.
    for _ in 0..3 {
        assert_eq!(gw.pod_for("localhost", "/v1/get").await, NAMES[0]);
    }
}
