//! The gateway on Kubernetes clusters: the real binary reading fake API servers (real list/watch
//! protocol) through kubeconfig files, asserted with real HTTP traffic to demo Pods.

mod support;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use support::fake_kube::FakeKube;
use support::*;

/// Service `name`: port 8000 named `http` to targetPort `http`.
fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]},
    }))
    .unwrap()
}

/// EndpointSlice `name` of `service` with `http` = `port`; endpoints (pod, ready, terminating).
fn slice(name: &str, service: &str, port: u16, eps: &[(&Pod, bool, bool)]) -> EndpointSlice {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(pod, ready, terminating)| {
            json!({
                "addresses": [pod.ip()],
                "conditions": {"ready": ready, "serving": true, "terminating": terminating},
                "targetRef": {"kind": "Pod", "name": pod.name, "namespace": "default"},
                "nodeName": "node-1",
                "zone": "zone-a",
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

/// Writes a kubeconfig per fake into the gateway folder and returns the `clusters:` YAML.
fn clusters_yaml(dir: &std::path::Path, fakes: &[(&str, &FakeKube)]) -> String {
    let mut s = String::from("clusters:\n");
    for (name, fake) in fakes {
        fake.write_kubeconfig(&dir.join(format!("{name}.kubeconfig")), Some("good-token"));
        s.push_str(&format!(
            "  - name: {name}\n    kubeconfig: {name}.kubeconfig\n"
        ));
    }
    s
}

/// One cluster `k` read through a kubeconfig, one upstream `web` of its service `web`, one route.
fn web_on_cluster_k(dir: &std::path::Path, k: &FakeKube) -> String {
    format!(
        "{}upstreams:\n  - {{name: web, services: [{{cluster: k, service: web, port: 8000}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        clusters_yaml(dir, &[("k", k)])
    )
}

async fn count_pods(gw: &Gateway, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts.entry(gw.pod_for("h", "/").await).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn two_clusters_split_by_the_sum_of_pod_weights() {
    let a = FakeKube::start().await;
    let b = FakeKube::start().await;
    let pods = pods_same_port(&["a-1", "a-2", "b-1"]).await;
    let port = pods[0].addr.port();
    for fake in [&a, &b] {
        fake.set_auth(Some("good-token"));
        fake.apply_service(&service("web"));
    }
    a.apply_slice(&slice(
        "web-a",
        "web",
        port,
        &[(&pods[0], true, false), (&pods[1], true, false)],
    ));
    b.apply_slice(&slice("web-b", "web", port, &[(&pods[2], true, false)]));

    let dir = tempfile::tempdir().unwrap();
    // Cluster a: 2 Pods × weight 3 = 6; cluster b: 1 Pod × weight 2 = 2 → 3:1.
    let conf = format!(
        "{}upstreams:\n  - name: web\n    services:\n\
         \x20     - {{cluster: a, namespace: default, service: web, port: 8000, weight: 3}}\n\
         \x20     - {{cluster: b, namespace: default, service: web, port: http, weight: 2}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        clusters_yaml(dir.path(), &[("a", &a), ("b", &b)])
    );
    let gw = Gateway::start_in(dir, &conf).await;
    wait_for("/readyz after both clusters synced", || async {
        matches!(get(gw.admin, "a", "/readyz").await, Ok(r) if r.status == 200)
    })
    .await;
    let counts = count_pods(&gw, 40).await;
    assert_eq!(counts.get("a-1"), Some(&15), "{counts:?}");
    assert_eq!(counts.get("a-2"), Some(&15), "{counts:?}");
    assert_eq!(counts.get("b-1"), Some(&10), "{counts:?}");

    let view = gw.upstreams_json().await;
    let clusters = view["clusters"].as_array().unwrap();
    assert!(
        clusters
            .iter()
            .all(|c| c["connected"] == true && c["synced"] == true),
        "{view}"
    );
    let ep = &view["upstreams"][0]["services"][0]["endpoints"][0];
    assert_eq!(ep["node"], "node-1");
    assert_eq!(ep["zone"], "zone-a");
    assert_eq!(ep["slice"], "web-a");
    assert_eq!(ep["address"], format!("{}:{port}", pods[0].ip()));
}

#[tokio::test]
async fn watch_events_move_traffic_within_a_deadline() {
    let k = FakeKube::start().await;
    let pods = pods_same_port(&["p-1", "p-2"]).await;
    let port = pods[0].addr.port();
    k.apply_service(&service("web"));
    k.apply_slice(&slice("web-1", "web", port, &[(&pods[0], true, false)]));
    let dir = tempfile::tempdir().unwrap();
    let conf = web_on_cluster_k(dir.path(), &k);
    let gw = Gateway::start_in(dir, &conf).await;
    wait_for("the first Pod", || async {
        gw.pod_for("h", "/").await == "p-1"
    })
    .await;

    // A Pod is added.
    k.apply_slice(&slice(
        "web-1",
        "web",
        port,
        &[(&pods[0], true, false), (&pods[1], true, false)],
    ));
    wait_for("the added Pod", || async {
        gw.pod_for("h", "/").await == "p-2"
    })
    .await;
    // The first turns terminating: no new traffic for it.
    k.apply_slice(&slice(
        "web-1",
        "web",
        port,
        &[(&pods[0], false, true), (&pods[1], true, false)],
    ));
    wait_for("traffic off the terminating Pod", || async {
        count_pods(&gw, 4).await.get("p-2") == Some(&4)
    })
    .await;
    // Removed from the slice, it stays gone.
    k.apply_slice(&slice("web-1", "web", port, &[(&pods[1], true, false)]));
    wait_for("the removal", || async {
        gw.upstreams_json().await["upstreams"][0]["services"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 1)
    })
    .await;
    assert_eq!(count_pods(&gw, 6).await.get("p-2"), Some(&6));
}

#[tokio::test]
async fn api_outage_keeps_serving_and_410_relist_drops_what_was_deleted() {
    let k = FakeKube::start().await;
    let pods = pods_same_port(&["o-1", "o-2"]).await;
    let port = pods[0].addr.port();
    k.apply_service(&service("web"));
    k.apply_slice(&slice("web-1", "web", port, &[(&pods[0], true, false)]));
    k.apply_slice(&slice("web-2", "web", port, &[(&pods[1], true, false)]));
    let dir = tempfile::tempdir().unwrap();
    let conf = web_on_cluster_k(dir.path(), &k);
    let gw = Gateway::start_in(dir, &conf).await;
    wait_for("both Pods", || async {
        count_pods(&gw, 4).await.len() == 2
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (counts, clients) = steady_load(gw.addr, "/", 1, 2, stop.clone());
    wait_for("load", || async { counts.ok() > 50 }).await;

    // The API server goes away: nothing is lost, traffic goes on.
    k.pause();
    wait_for("the outage to be noticed", || async {
        gw.upstreams_json().await["clusters"][0]["connected"] == false
    })
    .await;
    let during = counts.ok();
    wait_for("traffic during the outage", || async {
        counts.ok() > during + 100
    })
    .await;
    // (Counting answers would race the load clients for turns in the rotation.)
    let view = gw.upstreams_json().await;
    assert_eq!(
        view["upstreams"][0]["backends"].as_array().map(Vec::len),
        Some(2),
        "no endpoint lost in the outage: {view}"
    );

    // While it is away a slice is deleted; its watch history expires (410 Gone on resume).
    k.delete_slice("default", "web-2");
    k.gone_next(1);
    k.resume().await;
    wait_for("the relist to drop the deleted endpoint", || async {
        gw.upstreams_json().await["upstreams"][0]["services"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 1)
    })
    .await;
    assert_eq!(count_pods(&gw, 4).await.get("o-1"), Some(&4));
    let view = gw.upstreams_json().await;
    assert!(
        view["clusters"][0]["relists"].as_u64().unwrap() >= 1,
        "{view}"
    );

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    println!(
        "API outage under load: {} ok, {} failed",
        counts.ok(),
        counts.failed()
    );
    assert_eq!(counts.failed(), 0, "{:?}", counts.failures.lock().unwrap());
}

#[tokio::test]
async fn rejected_credentials_are_reported_and_nothing_is_emptied() {
    let k = FakeKube::start().await;
    let pods = pods_same_port(&["t-1"]).await;
    k.set_auth(Some("good-token"));
    k.apply_service(&service("web"));
    k.apply_slice(&slice(
        "web-1",
        "web",
        pods[0].addr.port(),
        &[(&pods[0], true, false)],
    ));
    let dir = tempfile::tempdir().unwrap();
    let conf = web_on_cluster_k(dir.path(), &k);
    let gw = Gateway::start_in(dir, &conf).await;
    wait_for("the Pod", || async { gw.pod_for("h", "/").await == "t-1" }).await;

    // The token is revoked and the watch breaks: every new request is 401.
    k.set_auth(Some("another-token"));
    k.drop_watches();
    wait_for("the rejection to be counted", || async {
        gw.upstreams_json().await["clusters"][0]["errors_by_reason"]["unauthorized"]
            .as_u64()
            .unwrap_or(0)
            > 0
    })
    .await;
    assert!(
        gw.log_text().contains("rejected the credentials"),
        "{}",
        gw.log_text()
    );
    for _ in 0..5 {
        assert_eq!(
            gw.pod_for("h", "/").await,
            "t-1",
            "last-known endpoints stay"
        );
    }
    let metrics =
        String::from_utf8(get(gw.admin, "a", "/metrics").await.unwrap().body.to_vec()).unwrap();
    assert!(
        metrics.contains("podgate_discovery_errors_total{cluster=\"k\",reason=\"unauthorized\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn not_ready_until_the_first_sync() {
    let k = FakeKube::start_paused().await;
    let pods = pods_same_port(&["r-1"]).await;
    k.apply_service(&service("web"));
    k.apply_slice(&slice(
        "web-1",
        "web",
        pods[0].addr.port(),
        &[(&pods[0], true, false)],
    ));
    let dir = tempfile::tempdir().unwrap();
    let conf = web_on_cluster_k(dir.path(), &k);
    // A cluster that is down at start does not stop podgate.
    let gw = Gateway::start_in(dir, &conf).await;
    assert_eq!(get(gw.admin, "a", "/readyz").await.unwrap().status, 503);
    assert_eq!(
        gw.get("h", "/").await.status,
        503,
        "serves what it has: nothing yet"
    );
    k.resume().await;
    wait_for("/readyz once the cluster synced", || async {
        matches!(get(gw.admin, "a", "/readyz").await, Ok(r) if r.status == 200)
    })
    .await;
    assert_eq!(gw.pod_for("h", "/").await, "r-1");
}

/// The Kubernetes Pod object of demo Pod `name`, labelled app=web and version=`version`.
fn kube_pod(name: &str, version: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"app": "web", "version": version}},
        "spec": {"containers": [{"name": "web", "image": "demo"}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn label_subsets_split_one_service_and_follow_relabelled_pods() {
    let k = FakeKube::start().await;
    let pods = pods_same_port(&["canary-1", "canary-2", "canary-3"]).await;
    let port = pods[0].addr.port();
    k.apply_service(&service("web"));
    k.apply_slice(&slice(
        "web-1",
        "web",
        port,
        &[
            (&pods[0], true, false),
            (&pods[1], true, false),
            (&pods[2], true, false),
        ],
    ));
    k.apply_pod(&kube_pod("canary-1", "v1"));
    k.apply_pod(&kube_pod("canary-2", "v1"));
    k.apply_pod(&kube_pod("canary-3", "v2"));
    let dir = tempfile::tempdir().unwrap();
    // One Service, two subsets: a canary split inside it. Weights are per Pod: 2 Pods × 9 for
    // v1, 1 Pod × 1 for v2, so a round of the rotation is 19 requests.
    let conf = format!(
        "{}upstreams:\n  - name: web\n    services:\n\
         \x20     - {{cluster: k, service: web, port: 8000, weight: 9, labels: {{version: v1}}}}\n\
         \x20     - {{cluster: k, service: web, port: http, weight: 1, labels: {{version: v2}}}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        clusters_yaml(dir.path(), &[("k", &k)])
    );
    let gw = Gateway::start_in(dir, &conf).await;
    wait_for("/readyz once both subsets are listed", || async {
        matches!(get(gw.admin, "a", "/readyz").await, Ok(r) if r.status == 200)
    })
    .await;
    wait_for("all three Pods live", || async {
        gw.upstreams_json().await["upstreams"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.len() == 3)
    })
    .await;
    // Any two rounds (one worker thread, a stable set): exactly 18, 18 and 2.
    let counts = count_pods(&gw, 38).await;
    assert_eq!(counts.get("canary-1"), Some(&18), "{counts:?}");
    assert_eq!(counts.get("canary-2"), Some(&18), "{counts:?}");
    assert_eq!(counts.get("canary-3"), Some(&2), "{counts:?}");
    // The two entries stay apart in the admin view, each with its own Pods.
    let view = gw.upstreams_json().await;
    let services = &view["upstreams"][0]["services"];
    assert_eq!(services[0]["weight"], 9, "{view}");
    assert_eq!(
        services[0]["endpoints"].as_array().map(Vec::len),
        Some(2),
        "{view}"
    );
    assert_eq!(services[1]["weight"], 1, "{view}");
    assert_eq!(
        services[1]["endpoints"].as_array().map(Vec::len),
        Some(1),
        "{view}"
    );
    assert_eq!(services[1]["endpoints"][0]["pod"], "canary-3", "{view}");

    // canary-2 is relabelled v2: it leaves v1 (weight 9) for v2 (weight 1), a round of 11.
    k.apply_pod(&kube_pod("canary-2", "v2"));
    wait_for("traffic to follow the relabelled Pod", || async {
        let counts = count_pods(&gw, 11).await;
        counts.get("canary-1") == Some(&9)
            && counts.get("canary-2") == Some(&1)
            && counts.get("canary-3") == Some(&1)
    })
    .await;
    let counts = count_pods(&gw, 22).await;
    assert_eq!(
        (
            counts.get("canary-1"),
            counts.get("canary-2"),
            counts.get("canary-3")
        ),
        (Some(&18), Some(&2), Some(&2)),
        "{counts:?}"
    );
    let view = gw.upstreams_json().await;
    assert_eq!(
        view["upstreams"][0]["services"][1]["endpoints"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{view}"
    );
}
