//! Traffic policies through the binary: failover tiers across two clusters (a fake Kubernetes
//! API server and a manifests folder), zone-aware routing, consistent hashing (affinity, and how
//! many keys move when one of 10 Pods leaves). Least request is measured, not asserted on time,
//! in `benches/least_request.rs`.
//!
//! Splits are checked against the plan's shares with a tolerance of about four standard
//! deviations of the binomial draw, so the assertions hold on any machine.

mod support;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use support::fake_kube::FakeKube;
use support::*;

/// One endpoint of a test slice: Pod name, IP, ready, zone, `hints.forZones`.
type Endpoint<'a> = (&'a str, String, bool, &'a str, Option<&'a [&'a str]>);

/// An EndpointSlice as JSON.
fn slice(name: &str, service: &str, port: u16, eps: &[Endpoint<'_>]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(pod, ip, ready, zone, hints)| {
            let mut e = json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"},
                "zone": zone,
            });
            if let Some(h) = hints {
                e["hints"] =
                    json!({"forZones": h.iter().map(|z| json!({"name": z})).collect::<Vec<_>>()});
            }
            e
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The upstream's traffic shares by (priority, zone part), from `/upstreams`.
async fn shares(gw: &Gateway) -> HashMap<(u64, String), f64> {
    let doc = gw.upstreams_json().await;
    doc["upstreams"][0]["traffic"]["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                (
                    s["priority"].as_u64().unwrap(),
                    s["zone"].as_str().unwrap().to_string(),
                ),
                s["share"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn share(map: &HashMap<(u64, String), f64>, priority: u64, zone: &str) -> f64 {
    map.get(&(priority, zone.to_string()))
        .copied()
        .unwrap_or(-1.0)
}

/// Sends `n` requests on one keep-alive connection; counts answers per Pod.
async fn spread(gw: &Gateway, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let mut conn = Conn::open(gw.addr).await.unwrap();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = conn.send("GET", "t.test", "/", headers).await.unwrap();
        assert_eq!(r.status, 200, "{}", gw.log_text());
        *counts.entry(r.header("x-pod").unwrap()).or_insert(0) += 1;
    }
    counts
}

fn sum_with(counts: &HashMap<String, usize>, prefix: &str) -> usize {
    counts
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// `got` of `n` is within four standard deviations of `p * n`.
fn close_to(got: usize, n: usize, p: f64) -> bool {
    let sd = (n as f64 * p * (1.0 - p)).sqrt().max(1.0);
    (got as f64 - p * n as f64).abs() <= 4.0 * sd
}

#[tokio::test]
async fn failover_tiers_spill_in_proportion_move_on_one_event_and_come_back() {
    let pods = pods_same_port(&["east-1", "east-2", "east-3", "east-4", "west-1", "west-2"]).await;
    let port = pods[0].addr.port();
    let ep = |i: usize, ready: bool| (pods[i].name.as_str(), pods[i].ip(), ready, "z", None);

    // Tier 0: cluster east, a Kubernetes API server. Tier 1: cluster west, a manifests folder.
    let fake = FakeKube::start().await;
    fake.apply_service(
        &serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
        }))
        .unwrap(),
    );
    let east = |eps: &[Endpoint<'_>]| {
        fake.apply_slice_json(slice("web-east", "web", port, eps));
    };
    east(&[ep(0, true), ep(1, true), ep(2, true), ep(3, true)]);
    let dir = tempfile::tempdir().unwrap();
    fake.write_kubeconfig(&dir.path().join("east.kubeconfig"), None);
    std::fs::create_dir(dir.path().join("west")).unwrap();
    std::fs::write(dir.path().join("west/svc.yaml"), service_yaml("web")).unwrap();
    let west_slice = slice("web-west", "web", port, &[ep(4, true), ep(5, true)]);
    std::fs::write(dir.path().join("west/slice.yaml"), west_slice.to_string()).unwrap();
    let conf = "clusters:\n  - {name: east, kubeconfig: east.kubeconfig}\n  - {name: west, manifests: west}\n\
                upstreams:\n  - name: web\n    retries: 2\n    services:\n\
                \x20     - {cluster: east, service: web, port: 8000, priority: 0}\n\
                \x20     - {cluster: west, service: web, port: 8000, priority: 1}\n\
                routes:\n  - {name: web, path_prefix: /, upstream: web}\n";
    let gw = Gateway::start_full(dir, "", "threads: 2\n  grace_period: 1s", conf).await;
    wait_for("both clusters' Pods", || async {
        gw.upstreams_json().await["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .len()
            == 6
    })
    .await;

    // Load runs through every step below; not one request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (load, clients) = steady_load(gw.addr, "/", 2, 1, stop.clone());

    // All of tier 0 healthy: it takes everything.
    assert_eq!(share(&shares(&gw).await, 0, "all"), 1.0);
    let c = spread(&gw, 200, &[]).await;
    assert_eq!(sum_with(&c, "east"), 200, "{c:?}");

    // Half of tier 0 not ready: 1.4 x 50 % = 70 % stays, 30 % spills to tier 1.
    east(&[ep(0, true), ep(1, true), ep(2, false), ep(3, false)]);
    wait_for("tier 0 at 70 %", || async {
        (share(&shares(&gw).await, 0, "all") - 0.7).abs() < 1e-3
    })
    .await;
    let n = 1000;
    let c = spread(&gw, n, &[]).await;
    let west = sum_with(&c, "west");
    println!("partial loss: {west} of {n} to tier 1 (plan 30 %): {c:?}");
    assert!(close_to(west, n, 0.3), "{west} of {n} to tier 1: {c:?}");
    assert_eq!(c.get("east-3"), None, "not-ready Pods get nothing");

    // Tier 0 loses every Pod: the very event moves all traffic to tier 1, while tier 0's last
    // endpoints are still held (for a slice replaced by delete + create) as a fallback only.
    east(&[]);
    let held = std::cell::Cell::new(false);
    wait_for("tier 1 to take everything", || async {
        let doc = gw.upstreams_json().await;
        let up = &doc["upstreams"][0];
        let tier1 = up["traffic"]["slots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["priority"] == 1 && s["share"] == 1.0);
        if tier1 {
            held.set(
                up["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|b| b["cluster"] == "east"),
            );
        }
        tier1
    })
    .await;
    let held_at_switch = held.get();
    assert!(
        held_at_switch,
        "the switch came with the discovery event, not after the hold ran out"
    );
    let c = spread(&gw, 200, &[]).await;
    assert_eq!(sum_with(&c, "west"), 200, "{c:?}");

    // Recovery: tier 0's Pods return and take their traffic back.
    east(&[ep(0, true), ep(1, true), ep(2, true), ep(3, true)]);
    wait_for("tier 0 to take everything again", || async {
        share(&shares(&gw).await, 0, "all") == 1.0
    })
    .await;
    let c = spread(&gw, 200, &[]).await;
    assert_eq!(sum_with(&c, "east"), 200, "{c:?}");

    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }
    assert!(load.ok() > 0);
    assert_eq!(
        load.failed(),
        0,
        "failed under load: {:?}",
        load.failures.lock().unwrap()
    );

    // The plan is in the metrics too.
    let m = get(gw.admin, "admin", "/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains(
            r#"podgate_upstream_traffic_share{priority="0",upstream="web",zone="all"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"podgate_upstream_traffic_share{priority="1",upstream="web",zone="all"} 0"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn zone_aware_routing_prefers_the_local_zone_while_it_has_capacity() {
    let pods = pods_same_port(&["a-1", "a-2", "b-1", "b-2"]).await;
    let port = pods[0].addr.port();
    let zone_of = |i: usize| if i < 2 { "a" } else { "b" };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    std::fs::write(dir.path().join("cluster/svc.yaml"), service_yaml("web")).unwrap();
    let publish = |root: &std::path::Path, ready: [bool; 4], hints: Option<[&[&str]; 4]>| {
        let eps: Vec<_> = (0..4)
            .map(|i| {
                (
                    pods[i].name.as_str(),
                    pods[i].ip(),
                    ready[i],
                    zone_of(i),
                    hints.map(|h| h[i]),
                )
            })
            .collect();
        write_atomically(
            &root.join("cluster/slice.yaml"),
            &slice("web-1", "web", port, &eps).to_string(),
        );
    };
    publish(dir.path(), [true; 4], None);
    let conf = "clusters:\n  - {name: local, manifests: cluster}\n\
                upstreams:\n  - name: web\n    zone_aware: true\n\
                \x20   services: [{cluster: local, service: web, port: 8000}]\n\
                routes:\n  - {name: web, path_prefix: /, upstream: web}\n";
    let gw = Gateway::start_full(dir, "", "threads: 1\n  grace_period: 1s\n  zone: a", conf).await;
    let root = gw.path("");
    let local_share = |want: f64| {
        let gw = &gw;
        async move { (share(&shares(gw).await, 0, "local") - want).abs() < 1e-3 }
    };
    wait_for("zone a to take everything", || local_share(1.0)).await;
    let doc = gw.upstreams_json().await;
    assert_eq!(doc["upstreams"][0]["zone"], "a");

    // Two of four Pods local, two zones: local capacity covers local demand, all stays local.
    let c = spread(&gw, 200, &[]).await;
    assert_eq!(sum_with(&c, "a-"), 200, "{c:?}");

    // One local Pod left of three: it can take 1/3 x 2 zones = 2/3 of the traffic.
    publish(&root, [true, false, true, true], None);
    wait_for("zone a at 2/3", || local_share(2.0 / 3.0)).await;
    let n = 1000;
    let c = spread(&gw, n, &[]).await;
    let local = c.get("a-1").copied().unwrap_or(0);
    println!("short local capacity: {local} of {n} local (plan 67 %): {c:?}");
    assert!(close_to(local, n, 2.0 / 3.0), "{c:?}");

    // No local Pod: every zone (Kubernetes' safeguard).
    publish(&root, [false, false, true, true], None);
    wait_for("no local share", || local_share(0.0)).await;
    let c = spread(&gw, 100, &[]).await;
    assert_eq!(sum_with(&c, "b-"), 100, "{c:?}");

    // Hints on every endpoint: the ones hinted for zone a are local, wherever they run.
    let crossed: [&[&str]; 4] = [&["b"], &["b"], &["a"], &["a"]];
    publish(&root, [true; 4], Some(crossed));
    wait_for("hinted Pods local", || async {
        let doc = gw.upstreams_json().await;
        doc["upstreams"][0]["traffic"]["slots"][0]["healthy_weight"] == 2
            && (share(&shares(&gw).await, 0, "local") - 1.0).abs() < 1e-3
    })
    .await;
    let c = spread(&gw, 100, &[]).await;
    assert_eq!(sum_with(&c, "b-"), 100, "hinted for a: {c:?}");
}

/// A fake API server with Service `web` (two Pods in zone a, two in zone b) and the nodes
/// `node-a` (zone label a), `node-legacy` (only the legacy label, b) and `node-bare` (no zone
/// label); a kubeconfig for it in `dir`, and the config body naming it cluster `home`.
async fn zone_cluster(dir: &std::path::Path) -> (FakeKube, Vec<support::Pod>, String) {
    let pods = pods_same_port(&["a-1", "a-2", "b-1", "b-2"]).await;
    let port = pods[0].addr.port();
    let fake = FakeKube::start().await;
    fake.apply_service(
        &serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
        }))
        .unwrap(),
    );
    let eps: Vec<Endpoint<'_>> = (0..4)
        .map(|i| {
            let zone = if i < 2 { "a" } else { "b" };
            (pods[i].name.as_str(), pods[i].ip(), true, zone, None)
        })
        .collect();
    fake.apply_slice_json(slice("web-1", "web", port, &eps));
    fake.apply_node(
        "node-a",
        &[
            ("kubernetes.io/hostname", "node-a"),
            ("topology.kubernetes.io/zone", "a"),
        ],
    );
    fake.apply_node(
        "node-legacy",
        &[("failure-domain.beta.kubernetes.io/zone", "b")],
    );
    fake.apply_node("node-bare", &[("kubernetes.io/hostname", "node-bare")]);
    fake.write_kubeconfig(&dir.join("home.kubeconfig"), None);
    let body = "clusters:\n  - {name: home, kubeconfig: home.kubeconfig}\n\
                upstreams:\n  - name: web\n    zone_aware: true\n\
                \x20   services: [{cluster: home, service: web, port: 8000}]\n\
                routes:\n  - {name: web, path_prefix: /, upstream: web}\n"
        .to_string();
    (fake, pods, body)
}

/// Waits until the upstream lists all four Pods.
async fn four_backends(gw: &Gateway) {
    wait_for("the four Pods", || async {
        gw.upstreams_json().await["upstreams"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.len() == 4)
    })
    .await;
}

#[tokio::test]
async fn zone_from_the_node_label_keeps_traffic_local() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _pods, body) = zone_cluster(dir.path()).await;
    let server = "threads: 1\n  grace_period: 1s\n  zone_from_node: home";
    let gw = Gateway::start_env(dir, server, &body, &[("NODE_NAME", "node-a")]).await;
    four_backends(&gw).await;
    let doc = gw.upstreams_json().await;
    let up = &doc["upstreams"][0];
    assert_eq!(up["zone"], "a", "{up}");
    assert_eq!(up["zone_source"], "node node-a (cluster home)", "{up}");
    assert_eq!(fake.node_gets(), 1);
    assert!(
        gw.log_text()
            .contains("zone a: from the zone label of node node-a (cluster home)"),
        "{}",
        gw.log_text()
    );
    wait_for("zone a to take everything", || async {
        (share(&shares(&gw).await, 0, "local") - 1.0).abs() < 1e-3
    })
    .await;
    let c = spread(&gw, 200, &[]).await;
    assert_eq!(sum_with(&c, "a-"), 200, "{c:?}");

    // A reload keeps the zone read at start-up, without asking again.
    gw.rewrite_config(&body);
    gw.signal("HUP");
    wait_for("the reload", || async {
        gw.log_text().contains("config reloaded")
    })
    .await;
    let doc = gw.upstreams_json().await;
    assert_eq!(doc["upstreams"][0]["zone"], "a", "{doc}");
    assert_eq!(
        doc["upstreams"][0]["zone_source"],
        "node node-a (cluster home)"
    );
    assert_eq!(fake.node_gets(), 1);
    let c = spread(&gw, 100, &[]).await;
    assert_eq!(sum_with(&c, "a-"), 100, "{c:?}");
    drop(gw);

    // Only the legacy label: it is the zone.
    let dir = tempfile::tempdir().unwrap();
    let (_fake, _pods, body) = zone_cluster(dir.path()).await;
    let gw = Gateway::start_env(dir, server, &body, &[("NODE_NAME", "node-legacy")]).await;
    four_backends(&gw).await;
    assert_eq!(gw.upstreams_json().await["upstreams"][0]["zone"], "b");
    wait_for("zone b to take everything", || async {
        (share(&shares(&gw).await, 0, "local") - 1.0).abs() < 1e-3
    })
    .await;
    let c = spread(&gw, 100, &[]).await;
    assert_eq!(sum_with(&c, "b-"), 100, "{c:?}");
}

/// No zone label, no right to read nodes, no NODE_NAME: one log line saying what is wrong,
/// podgate starts, and the zone-aware upstream sends traffic to every zone.
#[tokio::test]
async fn without_a_node_zone_traffic_goes_to_all_zones_and_the_log_says_why() {
    let server = "threads: 1\n  grace_period: 1s\n  zone_from_node: home";
    let cases: [(&str, Option<&str>, &str); 3] = [
        (
            "no label",
            Some("node-bare"),
            "cluster home: node node-bare has no topology.kubernetes.io/zone label \
             (nor failure-domain.beta.kubernetes.io/zone)",
        ),
        (
            "forbidden",
            Some("node-a"),
            "cluster home: not allowed to read node node-a (403 Forbidden): give podgate's \
             service account `get` on `nodes`",
        ),
        (
            "no NODE_NAME",
            None,
            "server.zone is not set and NODE_NAME is not set",
        ),
    ];
    for (case, node, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (fake, _pods, body) = zone_cluster(dir.path()).await;
        fake.forbid_nodes(case == "forbidden");
        let env: Vec<(&str, &str)> = node.map(|n| ("NODE_NAME", n)).into_iter().collect();
        let gw = Gateway::start_env(dir, server, &body, &env).await;
        four_backends(&gw).await;
        let log = gw.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("zone-aware upstreams route to all zones"))
            .collect();
        assert_eq!(lines.len(), 1, "{case}: {log}");
        assert!(lines[0].contains(says), "{case}: {}", lines[0]);
        let doc = gw.upstreams_json().await;
        let up = &doc["upstreams"][0];
        assert_eq!(up["zone"], Value::Null, "{case}: {up}");
        let source = up["zone_source"].as_str().unwrap_or_default();
        assert!(source.contains(says), "{case}: {source}");
        let c = spread(&gw, 200, &[]).await;
        let (a, b) = (sum_with(&c, "a-"), sum_with(&c, "b-"));
        assert_eq!(a + b, 200, "{case}: {c:?}");
        assert!(close_to(a, 200, 0.5), "{case}: all zones share: {c:?}");
    }
}

/// `server.zone` wins: the node is not even asked.
#[tokio::test]
async fn server_zone_overrides_the_node_label() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _pods, body) = zone_cluster(dir.path()).await;
    let server = "threads: 1\n  grace_period: 1s\n  zone: b\n  zone_from_node: home";
    let gw = Gateway::start_env(dir, server, &body, &[("NODE_NAME", "node-a")]).await;
    four_backends(&gw).await;
    let doc = gw.upstreams_json().await;
    assert_eq!(doc["upstreams"][0]["zone"], "b");
    assert_eq!(doc["upstreams"][0]["zone_source"], "server.zone");
    assert_eq!(fake.node_gets(), 0, "server.zone set: no need to ask");
    wait_for("zone b to take everything", || async {
        (share(&shares(&gw).await, 0, "local") - 1.0).abs() < 1e-3
    })
    .await;
    let c = spread(&gw, 200, &[]).await;
    assert_eq!(sum_with(&c, "b-"), 200, "{c:?}");
}

#[tokio::test]
async fn consistent_hash_keeps_keys_on_their_pod_and_moves_a_tenth_when_one_of_ten_leaves() {
    let names: Vec<String> = (0..10).map(|i| format!("web-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pods = pods_same_port(&refs).await;
    let port = pods[0].addr.port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    std::fs::write(dir.path().join("cluster/svc.yaml"), service_yaml("web")).unwrap();
    let publish = |root: &std::path::Path, without: Option<usize>| {
        let eps: Vec<_> = (0..10)
            .filter(|i| Some(*i) != without)
            .map(|i| (pods[i].name.as_str(), pods[i].ip(), true, "z", None))
            .collect();
        write_atomically(
            &root.join("cluster/slice.yaml"),
            &slice("web-1", "web", port, &eps).to_string(),
        );
    };
    publish(dir.path(), None);
    let conf = "clusters:\n  - {name: local, manifests: cluster}\n\
                upstreams:\n  - name: web\n    balance: consistent_hash\n    hash_on: header X-User\n\
                \x20   services: [{cluster: local, service: web, port: 8000}]\n  \
                - name: cookie\n    balance: consistent_hash\n    hash_on: cookie sid\n\
                \x20   services: [{cluster: local, service: web, port: 8000}]\n\
                routes:\n  - {name: web, path_prefix: /, upstream: web}\n  \
                - {name: cookie, hosts: [cookie.test], path_prefix: /, upstream: cookie}\n";
    let gw = Gateway::start_full(dir, "", "threads: 2\n  grace_period: 1s", conf).await;
    let root = gw.path("");
    async fn backends(gw: &Gateway) -> usize {
        gw.upstreams_json().await["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .len()
    }
    wait_for("ten Pods", || async { backends(&gw).await == 10 }).await;
    let doc = gw.upstreams_json().await;
    let web = doc["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "web")
        .unwrap();
    assert_eq!(web["balance"], "consistent_hash on header x-user");

    // Affinity: 100 users, 10 requests each, interleaved over two connections: 1,000 requests,
    // each user always on one Pod.
    let mut a = Conn::open(gw.addr).await.unwrap();
    let mut b = Conn::open(gw.addr).await.unwrap();
    let mut home: HashMap<String, String> = HashMap::new();
    for round in 0..10 {
        for u in 0..100 {
            let user = format!("user-{u}");
            let conn = if (u + round) % 2 == 0 { &mut a } else { &mut b };
            let r = conn
                .send("GET", "t.test", "/", &[("x-user", &user)])
                .await
                .unwrap();
            let pod = r.header("x-pod").unwrap();
            let was = home.entry(user.clone()).or_insert_with(|| pod.clone());
            assert_eq!(*was, pod, "{user} moved in round {round}");
        }
    }
    let used: std::collections::HashSet<&String> = home.values().collect();
    assert!(used.len() >= 8, "100 users over {} of 10 Pods", used.len());

    // One of 10 Pods leaves: only its users move, about a tenth of all.
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    let mut before = Vec::new();
    for k in &keys {
        before.push(
            a.send("GET", "t.test", "/", &[("x-user", k)])
                .await
                .unwrap()
                .header("x-pod")
                .unwrap(),
        );
    }
    let gone = "web-4";
    publish(&root, Some(4));
    wait_for("nine Pods", || async { backends(&gw).await == 9 }).await;
    let mut moved = 0;
    for (k, was) in keys.iter().zip(&before) {
        let now = a
            .send("GET", "t.test", "/", &[("x-user", k)])
            .await
            .unwrap()
            .header("x-pod")
            .unwrap();
        if now != *was {
            assert_eq!(
                was, gone,
                "{k} moved from {was} to {now}, though {was} stayed"
            );
            moved += 1;
        }
    }
    let fraction = moved as f64 / keys.len() as f64;
    println!(
        "remap: {moved} of {} keys moved ({:.1} %) when 1 of 10 Pods left",
        keys.len(),
        fraction * 100.0
    );
    assert_eq!(
        moved,
        before.iter().filter(|p| *p == gone).count(),
        "every key of {gone} moved"
    );
    assert!((0.03..0.2).contains(&fraction), "moved {fraction}");

    // Cookies: one session stays on one Pod, sessions spread.
    let mut seen = std::collections::HashSet::new();
    for s in 0..20 {
        let cookie = format!("theme=dark; sid=session-{s}");
        let mut pods_for_session = std::collections::HashSet::new();
        for _ in 0..5 {
            let r = a
                .send("GET", "cookie.test", "/", &[("cookie", &cookie)])
                .await
                .unwrap();
            pods_for_session.insert(r.header("x-pod").unwrap());
        }
        assert_eq!(
            pods_for_session.len(),
            1,
            "session-{s}: {pods_for_session:?}"
        );
        seen.extend(pods_for_session);
    }
    assert!(seen.len() >= 4, "20 sessions over {seen:?}");
}

/// Both proxy paths hash alike: on an `h2c` listener, HTTP/2 goes through Pingora's path and
/// HTTP/1.1 through podgate's own; a key reaches the same Pod on either.
#[tokio::test]
async fn the_pingora_path_and_the_http1_path_hash_a_key_to_the_same_pod() {
    let names: Vec<String> = (0..6).map(|i| format!("web-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pods = pods_same_port(&refs).await;
    let nodes: String = pods
        .iter()
        .map(|p| format!("{{address: \"{}\"}}, ", p.addr))
        .collect();
    let conf = format!(
        "upstreams:\n  - {{name: web, balance: consistent_hash, hash_on: header x-user, nodes: [{nodes}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
    );
    let gw = Gateway::start_with_listener(tempfile::tempdir().unwrap(), "h2c: true", &conf).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut h1 = Conn::open(gw.addr).await.unwrap();
    let mut used = std::collections::HashSet::new();
    for u in 0..40 {
        let user = format!("user-{u}");
        let req = http::Request::builder()
            .uri("http://h2c.test/")
            .header("x-user", &user)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let over_h2 = resp.headers()["x-pod"].to_str().unwrap().to_string();
        let over_h1 = h1
            .send("GET", "t.test", "/", &[("x-user", &user)])
            .await
            .unwrap()
            .header("x-pod")
            .unwrap();
        assert_eq!(over_h2, over_h1, "{user}");
        used.insert(over_h2);
    }
    assert!(used.len() >= 4, "40 users over {used:?}");
}

/// Active checks count for tier health: a tier-0 Pod that stops answering probes takes its
/// capacity with it, and its share spills to tier 1 without any change in Kubernetes.
#[tokio::test]
async fn a_pod_failing_active_checks_spills_its_tiers_share() {
    unhealthy_pod_spills(
        "outlier: {consecutive_failures: 0}\n    \
         health_check: {kind: tcp, interval: 100ms, timeout: 50ms, healthy: 1, unhealthy: 2}",
    )
    .await;
}

/// Passive ejection counts too: requests that fail on the Pod eject it (and are retried on
/// another), and the ejection re-divides the traffic.
#[tokio::test]
async fn an_ejected_pod_spills_its_tiers_share() {
    unhealthy_pod_spills("outlier: {consecutive_failures: 2, base_ejection: 60s}").await;
}

async fn unhealthy_pod_spills(health: &str) {
    let mut pods: Vec<Option<Pod>> = pods_same_port(&["east-1", "east-2", "west-1", "west-2"])
        .await
        .into_iter()
        .map(Some)
        .collect();
    let port = pods[0].as_ref().unwrap().addr.port();
    let ep = |p: &Option<Pod>| {
        let p = p.as_ref().unwrap();
        (p.name.clone(), p.ip())
    };
    let eps: Vec<(String, String)> = pods.iter().map(ep).collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    for (svc, range) in [("tier0", 0..2), ("tier1", 2..4)] {
        let list: Vec<_> = eps[range]
            .iter()
            .map(|(n, ip)| (n.as_str(), ip.clone(), true, "z", None))
            .collect();
        let text = format!(
            "{}---\n{}",
            service_yaml(svc),
            slice(&format!("{svc}-1"), svc, port, &list)
        );
        std::fs::write(dir.path().join(format!("cluster/{svc}.yaml")), text).unwrap();
    }
    let conf = format!(
        "clusters:\n  - {{name: local, manifests: cluster}}\n\
                upstreams:\n  - name: web\n    retries: 2\n    {health}\n\
                \x20   services:\n\
                \x20     - {{cluster: local, service: tier0, port: 8000}}\n\
                \x20     - {{cluster: local, service: tier1, port: 8000, priority: 1}}\n\
                routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
    );
    let gw = Gateway::start_full(dir, "", "threads: 1\n  grace_period: 1s", &conf).await;
    wait_for("tier 0 to take everything", || async {
        share(&shares(&gw).await, 0, "all") == 1.0
    })
    .await;
    // east-2 goes away; Kubernetes has not noticed (its endpoint stays ready).
    pods[1] = None;
    wait_for("tier 0 at 70 % once east-2 counts as unhealthy", || async {
        // Requests find out too (ejection); every one must still succeed through retries.
        let r = gw.get("t.test", "/").await;
        assert_eq!(r.status, 200);
        (share(&shares(&gw).await, 0, "all") - 0.7).abs() < 1e-3
    })
    .await;
    let n = 600;
    let c = spread(&gw, n, &[]).await;
    let west = sum_with(&c, "west");
    assert!(close_to(west, n, 0.3), "{west} of {n} to tier 1: {c:?}");
    assert_eq!(c.get("east-2"), None, "{c:?}");
}

/// A reload that drops a tier drops its share series too, rather than freezing its last value.
#[tokio::test]
async fn a_reload_that_drops_a_tier_drops_its_share_series() {
    let pods = pods_same_port(&["web-1"]).await;
    let port = pods[0].addr.port();
    let manifest = format!(
        "{}---\n{}---\n{}---\n{}",
        service_yaml("a"),
        slice_yaml("a-1", "a", port, &[Ep::ready(&pods[0])]),
        service_yaml("b"),
        slice_yaml("b-1", "b", port, &[Ep::ready(&pods[0])])
    );
    let conf = |tiers: bool| {
        let second = if tiers {
            "      - {cluster: local, service: b, port: 8000, priority: 1}\n"
        } else {
            ""
        };
        format!(
            "clusters:\n  - {{name: local, manifests: cluster}}\n\
             upstreams:\n  - name: web\n    services:\n\
             \x20     - {{cluster: local, service: a, port: 8000}}\n{second}\
             routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n"
        )
    };
    let gw = Gateway::start(&conf(true), &[("cluster/web.yaml", &manifest)]).await;
    let scrape = || async {
        String::from_utf8(get(gw.admin, "a", "/metrics").await.unwrap().body.to_vec()).unwrap()
    };
    let tier1 = r#"podgate_upstream_traffic_share{priority="1",upstream="web",zone="all"}"#;
    let tier0 = r#"podgate_upstream_traffic_share{priority="0",upstream="web",zone="all"} 1"#;
    wait_for("both tiers' series", || async {
        let t = scrape().await;
        t.contains(tier1) && t.contains(tier0)
    })
    .await;
    gw.rewrite_config(&conf(false));
    gw.signal("HUP");
    wait_for("the reload to drop tier 1's series", || async {
        let t = scrape().await;
        !t.contains(tier1) && t.contains(tier0)
    })
    .await;
}
