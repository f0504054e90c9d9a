//! A rolling deploy of a service under steady load, the Kubernetes way, then a Pod killed before
//! Kubernetes notices: no client request may fail.

mod support;

use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use support::fake_kube::FakeKube;
use support::*;

/// Where the endpoints come from: the same rollout runs against both sources.
enum Source {
    /// A manifests folder; the slice is rewritten (as JSON, which is YAML too).
    Manifests,
    /// A fake API server; the slice is applied and watchers get MODIFIED events.
    Kube(FakeKube),
}

fn live_pods(v: &serde_json::Value) -> Vec<String> {
    v["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["pod"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn rolling_deploy_on_a_manifests_cluster_fails_no_request() {
    rolling_deploy(Source::Manifests).await;
}

#[tokio::test]
async fn rolling_deploy_on_a_kubernetes_cluster_fails_no_request() {
    rolling_deploy(Source::Kube(FakeKube::start().await)).await;
}

async fn rolling_deploy(source: Source) {
    // Old and new Pods share the Service's targetPort on distinct loopback IPs.
    let mut pods: Vec<Option<Pod>> = pods_same_port(&[
        "web-old-1",
        "web-old-2",
        "web-old-3",
        "web-new-1",
        "web-new-2",
        "web-new-3",
    ])
    .await
    .into_iter()
    .map(Some)
    .collect();
    let port = pods[0].as_ref().unwrap().addr.port();
    let ips: Vec<String> = pods.iter().map(|p| p.as_ref().unwrap().ip()).collect();
    let names: Vec<String> = pods
        .iter()
        .map(|p| p.as_ref().unwrap().name.clone())
        .collect();

    // (index, ready, terminating) of each endpoint in the slice.
    let slice = |eps: &[(usize, bool, bool)]| {
        let endpoints: Vec<_> = eps
            .iter()
            .map(|(i, ready, terminating)| {
                json!({
                    "addresses": [ips[*i]],
                    "conditions": {"ready": ready, "serving": true, "terminating": terminating},
                    "targetRef": {"kind": "Pod", "name": names[*i], "namespace": "default"},
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints,
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = match &source {
        Source::Manifests => {
            std::fs::create_dir(dir.path().join("cluster")).unwrap();
            std::fs::write(dir.path().join("cluster/svc.yaml"), service_yaml("web")).unwrap();
            "manifests: cluster".to_string()
        }
        Source::Kube(fake) => {
            let svc = json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
            });
            fake.apply_service(&serde_json::from_value(svc).unwrap());
            fake.write_kubeconfig(&dir.path().join("k.kubeconfig"), None);
            "kubeconfig: k.kubeconfig".to_string()
        }
    };
    let conf = format!(
        "clusters:\n  - name: local\n    {cluster}\n\
         upstreams:\n  - name: web\n    retries: 2\n    connect_timeout: 500ms\n\
         \x20   services: [{{cluster: local, service: web, port: 8000}}]\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
    );
    let publish = |dir: &std::path::Path, eps: &[(usize, bool, bool)]| match &source {
        Source::Manifests => {
            write_atomically(&dir.join("cluster/slice.yaml"), &slice(eps).to_string())
        }
        Source::Kube(fake) => {
            fake.apply_slice(&serde_json::from_value(slice(eps)).unwrap());
        }
    };
    let mut current: Vec<(usize, bool, bool)> =
        vec![(0, true, false), (1, true, false), (2, true, false)];
    publish(dir.path(), &current);
    let gw = Gateway::start_full(dir, "", "threads: 2\n  grace_period: 1s", &conf).await;
    let root = gw.path("");
    wait_for("the three old Pods", || async {
        live_pods(&gw.upstreams_json().await).len() == 3
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (counts, clients) = steady_load(gw.addr, "/", 2, 2, stop.clone());
    wait_for("load to run", || async { counts.ok() > 100 }).await;

    for step in 0..3 {
        let (old, new) = (step, step + 3);
        // 1. The new Pod becomes ready.
        current.push((new, true, false));
        publish(&root, &current);
        wait_for("the new Pod to get traffic", || async {
            live_pods(&gw.upstreams_json().await).contains(&names[new])
        })
        .await;
        // 2. The old Pod turns terminating (still serving in-flight work).
        for e in current.iter_mut().filter(|e| e.0 == old) {
            *e = (old, false, true);
        }
        publish(&root, &current);
        wait_for("the old Pod to get no new traffic", || async {
            !live_pods(&gw.upstreams_json().await).contains(&names[old])
        })
        .await;
        // 3. Its process exits, 4. then its endpoint goes away.
        pods[old] = None;
        current.retain(|e| e.0 != old);
        publish(&root, &current);
        let before = counts.ok();
        wait_for("load to go on", || async { counts.ok() > before + 100 }).await;
    }

    // A Pod dies abruptly; Kubernetes has not noticed (its endpoint stays ready).
    pods[3] = None;
    let before = counts.ok();
    wait_for("load to go on past the dead Pod", || async {
        counts.ok() > before + 300
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    println!(
        "rolling deploy under load ({}): {} requests ok, {} failed",
        match source {
            Source::Manifests => "manifests",
            Source::Kube(_) => "fake API server",
        },
        counts.ok(),
        counts.failed()
    );
    assert_eq!(
        counts.failed(),
        0,
        "failures: {:?}\n{}",
        counts.failures.lock().unwrap(),
        gw.log_text()
    );
}
