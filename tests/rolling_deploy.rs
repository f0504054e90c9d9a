//! A rolling deploy of a service under steady load, the Kubernetes way, then a Pod killed before
//! Kubernetes notices: no client request may fail.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use support::*;

fn live_pods(v: &serde_json::Value) -> Vec<String> {
    v["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["pod"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn rolling_deploy_and_abrupt_pod_death_fail_no_request() {
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
        let list: Vec<Ep> = eps
            .iter()
            .map(|(i, ready, terminating)| Ep {
                ip: ips[*i].clone(),
                pod: &names[*i],
                ready: Some(*ready),
                serving: Some(true),
                terminating: Some(*terminating),
            })
            .collect();
        slice_yaml("web-1", "web", port, &list)
    };
    let conf = "clusters:\n  - name: local\n    manifests: cluster\n\
                upstreams:\n  - name: web\n    retries: 2\n    connect_timeout: 500ms\n\
                \x20   services: [{cluster: local, service: web, port: 8000}]\n\
                routes:\n  - {name: web, path_prefix: /, upstream: web}\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    std::fs::write(dir.path().join("cluster/svc.yaml"), service_yaml("web")).unwrap();
    let mut current: Vec<(usize, bool, bool)> =
        vec![(0, true, false), (1, true, false), (2, true, false)];
    std::fs::write(dir.path().join("cluster/slice.yaml"), slice(&current)).unwrap();
    let gw = Gateway::start_full(dir, "", "threads: 2\n  grace_period: 1s", conf).await;
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
        write_atomically(&gw.path("cluster/slice.yaml"), &slice(&current));
        wait_for("the new Pod to get traffic", || async {
            live_pods(&gw.upstreams_json().await).contains(&names[new])
        })
        .await;
        // 2. The old Pod turns terminating (still serving in-flight work).
        for e in current.iter_mut().filter(|e| e.0 == old) {
            *e = (old, false, true);
        }
        write_atomically(&gw.path("cluster/slice.yaml"), &slice(&current));
        wait_for("the old Pod to get no new traffic", || async {
            !live_pods(&gw.upstreams_json().await).contains(&names[old])
        })
        .await;
        // 3. Its process exits, 4. then its endpoint goes away.
        pods[old] = None;
        current.retain(|e| e.0 != old);
        write_atomically(&gw.path("cluster/slice.yaml"), &slice(&current));
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
        "rolling deploy under load: {} requests ok, {} failed",
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
