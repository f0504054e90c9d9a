//! The gateway end to end: the real binary, real sockets, demo Pods found in a manifests folder.

mod support;

use std::collections::HashMap;
use support::*;

/// A config body with one manifests cluster `local` in `cluster/`, plus `rest`.
fn with_cluster(rest: &str) -> String {
    format!("clusters:\n  - name: local\n    manifests: cluster\n{rest}")
}

fn one_service_upstream(name: &str, service: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    services:\n      - {{cluster: local, namespace: default, service: {service}, port: 8000}}\n{extra}"
    )
}

#[tokio::test]
async fn routes_to_pods_in_weighted_smooth_order() {
    // Three services, one Pod each, weights 1, 2, 1: smooth order interleaves the heavy one.
    let a = pods_same_port(&["a-v1"]).await;
    let b = pods_same_port(&["b-v1"]).await;
    let c = pods_same_port(&["c-v1"]).await;
    let mut files = Vec::new();
    let mut texts = Vec::new();
    for (svc, pods) in [("a", &a), ("b", &b), ("c", &c)] {
        texts.push((
            format!("cluster/{svc}.yaml"),
            format!(
                "{}---\n{}",
                service_yaml(svc),
                slice_yaml(
                    &format!("{svc}-1"),
                    svc,
                    pods[0].addr.port(),
                    &[Ep::ready(&pods[0])]
                )
            ),
        ));
    }
    for (p, t) in &texts {
        files.push((p.as_str(), t.as_str()));
    }
    let conf = with_cluster(
        "upstreams:\n  - name: mixed\n    services:\n\
         \x20     - {cluster: local, service: a, port: 8000, weight: 1}\n\
         \x20     - {cluster: local, service: b, port: http, weight: 2}\n\
         \x20     - {cluster: local, service: c, port: 8000, weight: 1}\n\
         routes:\n  - {name: all, path_prefix: /, upstream: mixed}\n",
    );
    let gw = Gateway::start(&conf, &files).await;
    let mut seq = Vec::new();
    for _ in 0..40 {
        seq.push(gw.pod_for("any.example", "/").await);
    }
    let count = |n: &str| seq.iter().filter(|x| x.as_str() == n).count();
    assert_eq!(
        (count("a-v1"), count("b-v1"), count("c-v1")),
        (10, 20, 10),
        "{seq:?}"
    );
    for w in seq.windows(4) {
        let heavy = w.iter().filter(|x| x.as_str() == "b-v1").count();
        assert!((1..=3).contains(&heavy), "window {w:?} of {seq:?}");
    }
    for w in seq.windows(2) {
        assert!(
            !(w[0] == w[1] && w[0] != "b-v1"),
            "a weight-1 Pod twice in a row: {seq:?}"
        );
    }
    assert!(
        seq.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
        "a block of one Pod: {seq:?}"
    );
}

#[tokio::test]
async fn a_pod_in_two_services_of_an_upstream_gets_one_share() {
    // Services a (p1, p2) and b (p2, p3) share p2; each address is one backend.
    let pods = pods_same_port(&["p1", "p2", "p3"]).await;
    let port = pods[0].addr.port();
    let slice = |svc: &str, members: &[usize]| {
        let eps: Vec<Ep> = members.iter().map(|i| Ep::ready(&pods[*i])).collect();
        format!(
            "{}---\n{}",
            service_yaml(svc),
            slice_yaml(&format!("{svc}-1"), svc, port, &eps)
        )
    };
    let conf = with_cluster(
        "upstreams:\n  - name: both\n    services:\n\
         \x20     - {cluster: local, service: a, port: 8000}\n\
         \x20     - {cluster: local, service: b, port: 8000}\n\
         routes:\n  - {name: all, path_prefix: /, upstream: both}\n",
    );
    let (a, b) = (slice("a", &[0, 1]), slice("b", &[1, 2]));
    let gw = Gateway::start(&conf, &[("cluster/a.yaml", &a), ("cluster/b.yaml", &b)]).await;
    let spread = || async {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..30 {
            *counts.entry(gw.pod_for("h", "/").await).or_default() += 1;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort();
        counts
    };
    let even = vec![("p1".into(), 10), ("p2".into(), 10), ("p3".into(), 10)];
    assert_eq!(spread().await, even);
    let view = gw.upstreams_json().await;
    assert_eq!(
        view["upstreams"][0]["backends"].as_array().unwrap().len(),
        3
    );

    // b lets p2 go: the services no longer share a Pod, and p2 still gets its share through a.
    // Then back: b takes p1 this time.
    for (what, members) in [
        ("b to hold p3 only", &[2][..]),
        ("b to hold p1 and p3", &[0, 2]),
    ] {
        write_atomically(&gw.path("cluster/b.yaml"), &slice("b", members));
        wait_for(what, || async {
            let view = gw.upstreams_json().await;
            view["upstreams"][0]["services"][1]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == members.len())
        })
        .await;
        assert_eq!(spread().await, even);
    }
}

#[tokio::test]
async fn target_port_and_even_spread_over_one_service() {
    let pods = pods_same_port(&["httpbin-v1", "httpbin-v2", "httpbin-v3"]).await;
    let port = pods[0].addr.port();
    let eps: Vec<Ep> = pods.iter().map(Ep::ready).collect();
    let manifest = format!(
        "{}---\n{}",
        service_yaml("httpbin"),
        slice_yaml("httpbin-abc", "httpbin", port, &eps)
    );
    let conf = with_cluster(&format!(
        "upstreams:\n{}routes:\n  - {{name: httpbin, path_prefix: /httpbin, strip_prefix: true, upstream: httpbin}}\n",
        one_service_upstream("httpbin", "httpbin", "")
    ));
    let gw = Gateway::start(&conf, &[("cluster/httpbin.yaml", &manifest)]).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        *counts
            .entry(gw.pod_for("h", "/httpbin/get").await)
            .or_default() += 1;
    }
    for p in &pods {
        assert_eq!(counts.get(&p.name), Some(&10), "{counts:?}");
    }
}

#[tokio::test]
async fn not_found_method_not_allowed_and_no_endpoint() {
    let pods = pods_same_port(&["p-v1"]).await;
    let manifests = format!(
        "{}---\n{}---\n{}---\n{}",
        service_yaml("web"),
        slice_yaml("web-1", "web", pods[0].addr.port(), &[Ep::ready(&pods[0])]),
        service_yaml("empty"),
        slice_yaml("empty-1", "empty", 80, &[]),
    );
    let conf = with_cluster(&format!(
        "upstreams:\n{}{}routes:\n\
         \x20 - {{name: api, hosts: [api.example.com], path_prefix: /api, methods: [GET, HEAD], upstream: web}}\n\
         \x20 - {{name: wild, hosts: [\"*.example.org\"], path_prefix: /, upstream: web}}\n\
         \x20 - {{name: void, path_prefix: /void, upstream: empty}}\n",
        one_service_upstream("web", "web", ""),
        one_service_upstream("empty", "empty", ""),
    ));
    let gw = Gateway::start(&conf, &[("cluster/all.yaml", &manifests)]).await;

    let ok = gw.get("api.example.com", "/api/users").await;
    assert_eq!(ok.status, 200);
    let ok = gw.get("API.example.com:8080", "/api").await;
    assert_eq!(ok.status, 200, "host match ignores case and port");
    assert_eq!(gw.get("x.example.org", "/anything").await.status, 200);

    let nf = gw.get("other.example.com", "/api").await;
    assert_eq!(nf.status, 404);
    assert_eq!(nf.json()["error"], "not_found");
    assert_eq!(gw.get("api.example.com", "/apix").await.status, 404);

    let na = request(gw.addr, "POST", "api.example.com", "/api/users", &[])
        .await
        .unwrap();
    assert_eq!(na.status, 405);
    assert_eq!(na.header("allow").as_deref(), Some("GET, HEAD"));
    assert_eq!(na.json()["error"], "method_not_allowed");

    let none = gw.get("x", "/void/x").await;
    assert_eq!(none.status, 503);
    assert_eq!(none.json()["error"], "no_endpoint");
    let text = String::from_utf8_lossy(&none.body);
    assert!(!text.contains("127.0."), "no internals in {text}");
}

#[tokio::test]
async fn retries_go_to_another_endpoint_and_dead_upstreams_give_502() {
    let alive = pods_same_port(&["alive-v1"]).await;
    let dead = free_port();
    let conf = format!(
        "upstreams:\n\
         \x20 - name: half\n    retries: 1\n    connect_timeout: 500ms\n    nodes:\n\
         \x20     - {{address: \"127.0.0.1:{dead}\"}}\n      - {{address: \"{}\"}}\n\
         \x20 - name: dead\n    retries: 2\n    connect_timeout: 500ms\n    nodes:\n\
         \x20     - {{address: \"127.0.0.1:{dead}\"}}\n\
         routes:\n  - {{name: half, path_prefix: /half, upstream: half}}\n  - {{name: dead, path_prefix: /dead, upstream: dead}}\n",
        alive[0].addr
    );
    let gw = Gateway::start(&conf, &[]).await;
    for _ in 0..10 {
        let r = gw.get("h", "/half").await;
        assert_eq!(r.status, 200, "a refused connection is retried elsewhere");
        assert_eq!(r.header("x-pod").as_deref(), Some("alive-v1"));
    }
    let r = gw.get("h", "/dead").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "bad_gateway");
    assert!(!String::from_utf8_lossy(&r.body).contains(&dead.to_string()));
}

#[tokio::test]
async fn slow_pod_gives_504() {
    // A Pod that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let conf = format!(
        "upstreams:\n  - name: slow\n    retries: 0\n    read_timeout: 300ms\n    nodes: [{{address: \"{addr}\"}}]\n\
         routes:\n  - {{name: slow, path_prefix: /, upstream: slow}}\n"
    );
    let gw = Gateway::start(&conf, &[]).await;
    let r = gw.get("h", "/").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"], "gateway_timeout");
    hold.abort();
}

#[tokio::test]
async fn host_override_prefix_strip_and_forwarded_headers() {
    let pods = pods_same_port(&["echo-v1"]).await;
    let conf = format!(
        "upstreams:\n\
         \x20 - {{name: over, host_header: backend.internal, nodes: [{{address: \"{a}\"}}]}}\n\
         \x20 - {{name: keep, nodes: [{{address: \"{a}\"}}]}}\n\
         routes:\n\
         \x20 - {{name: over, path_prefix: /httpbin, strip_prefix: true, upstream: over}}\n\
         \x20 - {{name: keep, path_prefix: /keep, upstream: keep}}\n",
        a = pods[0].addr
    );
    let gw = Gateway::start(&conf, &[]).await;
    let r = request(
        gw.addr,
        "GET",
        "Api.Example.com",
        "/httpbin/get?x=1&y=2",
        &[("x-forwarded-for", "10.1.2.3")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["uri"], "/get?x=1&y=2");
    assert_eq!(echo["headers"]["host"], "backend.internal");
    assert_eq!(echo["headers"]["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    assert_eq!(echo["headers"]["x-forwarded-host"], "api.example.com");

    let r = gw.get("client.example", "/httpbin").await.json();
    assert_eq!(r["uri"], "/");

    let r = gw.get("client.example", "/keep/a?b=c").await.json();
    assert_eq!(r["uri"], "/keep/a?b=c", "no strip_prefix: path untouched");
    assert_eq!(
        r["headers"]["host"], "client.example",
        "client Host passed on"
    );
}

#[tokio::test]
async fn manifests_change_moves_traffic_and_broken_file_keeps_state() {
    let pods = pods_same_port(&["old-v1", "new-v2"]).await;
    let port = pods[0].addr.port();
    let conf = with_cluster(&format!(
        "upstreams:\n{}routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        one_service_upstream("web", "web", "")
    ));
    let svc = service_yaml("web");
    let slice_old = slice_yaml("web-1", "web", port, &[Ep::ready(&pods[0])]);
    let gw = Gateway::start(
        &conf,
        &[
            ("cluster/svc.yaml", &svc),
            ("cluster/slice.yaml", &slice_old),
        ],
    )
    .await;
    assert_eq!(gw.pod_for("h", "/").await, "old-v1");

    // The Kubernetes way of a rollout step: the new Pod joins ready, the old one turns
    // terminating (still serving). Only the ready one may get traffic.
    let mut old_terminating = Ep::ready(&pods[0]);
    old_terminating.ready = Some(false);
    old_terminating.terminating = Some(true);
    let slice_new = slice_yaml(
        "web-1",
        "web",
        port,
        &[old_terminating, Ep::ready(&pods[1])],
    );
    write_atomically(&gw.path("cluster/slice.yaml"), &slice_new);
    wait_for("traffic to move to the new Pod", || async {
        gw.pod_for("h", "/").await == "new-v2"
    })
    .await;
    for _ in 0..10 {
        assert_eq!(gw.pod_for("h", "/").await, "new-v2");
    }

    // A broken edit is refused and the last good state stays.
    write_atomically(
        &gw.path("cluster/slice.yaml"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: [oops\n",
    );
    wait_for("the broken file to be reported", || async {
        gw.upstreams_json().await["clusters"][0]["errors"]
            .as_u64()
            .unwrap_or(0)
            > 0
    })
    .await;
    for _ in 0..5 {
        assert_eq!(gw.pod_for("h", "/").await, "new-v2");
    }

    // The admin view shows what was discovered.
    let view = gw.upstreams_json().await;
    let up = &view["upstreams"][0];
    assert_eq!(up["name"], "web");
    let eps = up["services"][0]["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2, "{view}");
    assert_eq!(up["backends"].as_array().unwrap().len(), 1, "{view}");
}

#[tokio::test]
async fn terminating_pods_are_a_fallback_only() {
    let pods = pods_same_port(&["draining-v1"]).await;
    let mut ep = Ep::ready(&pods[0]);
    ep.ready = Some(false);
    ep.terminating = Some(true);
    let manifest = format!(
        "{}---\n{}",
        service_yaml("web"),
        slice_yaml("web-1", "web", pods[0].addr.port(), &[ep])
    );
    let conf = with_cluster(&format!(
        "upstreams:\n{}routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        one_service_upstream("web", "web", "")
    ));
    let gw = Gateway::start(&conf, &[("cluster/web.yaml", &manifest)]).await;
    assert_eq!(
        gw.pod_for("h", "/").await,
        "draining-v1",
        "a serving, terminating Pod still beats a 503"
    );
}

#[tokio::test]
async fn a_replaced_slice_never_leaves_the_service_empty() {
    let pods = pods_same_port(&["one-v1", "two-v2"]).await;
    let port = pods[0].addr.port();
    let conf = with_cluster(&format!(
        "upstreams:\n{}routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        one_service_upstream("web", "web", "")
    ));
    let gw = Gateway::start(
        &conf,
        &[
            ("cluster/svc.yaml", &service_yaml("web")),
            (
                "cluster/a.yaml",
                &slice_yaml("web-a", "web", port, &[Ep::ready(&pods[0])]),
            ),
        ],
    )
    .await;
    assert_eq!(gw.pod_for("h", "/").await, "one-v1");

    // Requests run throughout; the old slice goes away and a new one comes a moment later.
    let addr = gw.addr;
    let load = tokio::spawn(async move {
        let mut statuses = Vec::new();
        loop {
            let r = get(addr, "h", "/").await.expect("request");
            let done = r.header("x-pod").as_deref() == Some("two-v2");
            statuses.push(r.status);
            if done {
                return statuses;
            }
        }
    });
    std::fs::remove_file(gw.path("cluster/a.yaml")).unwrap();
    wait_for("the deletion to be seen", || async {
        gw.upstreams_json().await["upstreams"][0]["services"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.is_empty())
            || gw.log_text().contains("lost its last endpoint")
    })
    .await;
    write_atomically(
        &gw.path("cluster/b.yaml"),
        &slice_yaml("web-b", "web", port, &[Ep::ready(&pods[1])]),
    );
    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{} requests, not all 200: {statuses:?}",
        statuses.len()
    );

    // Scaling to zero for real still empties the service once the hold is over.
    std::fs::remove_file(gw.path("cluster/b.yaml")).unwrap();
    wait_for("503 after the service really emptied", || async {
        gw.get("h", "/").await.status == 503
    })
    .await;
}

/// A Pod manifest named `name` with labels app=web and version=`version`.
fn pod_yaml(name: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  \
         labels: {{app: web, version: {version}}}\nspec:\n  containers: [{{name: web, image: demo}}]\n"
    )
}

#[tokio::test]
async fn a_label_subset_of_a_manifests_service_follows_its_pods() {
    let pods = pods_same_port(&["lab-1", "lab-2", "lab-3"]).await;
    let port = pods[0].addr.port();
    // Two upstreams on one Service: the whole of it, and its v1 Pods.
    let conf = with_cluster(
        "upstreams:\n  - name: all\n    services: [{cluster: local, service: web, port: 8000}]\n\
         \x20 - name: v1\n    services: [{cluster: local, service: web, port: 8000, labels: {version: v1}}]\n\
         routes:\n  - {name: all, path_prefix: /, upstream: all}\n\
         \x20 - {name: v1, path_prefix: /v1, upstream: v1}\n",
    );
    let svc = service_yaml("web");
    let slice = slice_yaml(
        "web-1",
        "web",
        port,
        &[
            Ep::ready(&pods[0]),
            Ep::ready(&pods[1]),
            Ep::ready(&pods[2]),
        ],
    );
    // lab-3 has no Pod manifest: nothing says it is v1, so it is not.
    let pod_list = format!(
        "{}---\n{}",
        pod_yaml("lab-1", "v1"),
        pod_yaml("lab-2", "v2")
    );
    let gw = Gateway::start(
        &conf,
        &[
            ("cluster/svc.yaml", &svc),
            ("cluster/slice.yaml", &slice),
            ("cluster/pods.yaml", &pod_list),
        ],
    )
    .await;
    let count = |path: &'static str, n: usize| {
        let gw = &gw;
        async move {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for _ in 0..n {
                *counts.entry(gw.pod_for("h", path).await).or_default() += 1;
            }
            counts
        }
    };
    assert_eq!(count("/v1", 4).await, HashMap::from([("lab-1".into(), 4)]));
    assert_eq!(
        count("/", 6).await.len(),
        3,
        "the whole Service is unchanged"
    );

    // lab-2 relabelled v1, lab-3 gets a v1 Pod manifest: both join the subset.
    write_atomically(
        &gw.path("cluster/pods.yaml"),
        &format!(
            "{}---\n{}---\n{}",
            pod_yaml("lab-1", "v1"),
            pod_yaml("lab-2", "v1"),
            pod_yaml("lab-3", "v1")
        ),
    );
    wait_for("the subset to grow to three Pods", || async {
        count("/v1", 3).await.len() == 3
    })
    .await;
    // lab-1 leaves v1.
    write_atomically(
        &gw.path("cluster/pods.yaml"),
        &format!(
            "{}---\n{}---\n{}",
            pod_yaml("lab-1", "v2"),
            pod_yaml("lab-2", "v1"),
            pod_yaml("lab-3", "v1")
        ),
    );
    wait_for("lab-1 out of the subset", || async {
        !count("/v1", 4).await.contains_key("lab-1")
    })
    .await;
    let counts = count("/v1", 4).await;
    assert_eq!(
        (counts.get("lab-2"), counts.get("lab-3")),
        (Some(&2), Some(&2)),
        "{counts:?}"
    );
    assert_eq!(count("/", 6).await.len(), 3);
}
