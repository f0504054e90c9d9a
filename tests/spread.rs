//! Client connections are spread evenly over the request threads, whichever thread Pingora
//! hands them to; a connection moved to another thread is served like any other.

mod support;

use support::*;

/// The `podgate_client_connections` gauge of each request thread, by thread label.
async fn per_thread(gw: &Gateway) -> Vec<(String, i64)> {
    let r = get(gw.admin, "admin", "/metrics").await.unwrap();
    let mut v: Vec<(String, i64)> = std::str::from_utf8(&r.body)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("podgate_client_connections{thread=\""))
        .filter_map(|l| {
            let (thread, value) = l.split_once("\"} ")?;
            Some((thread.to_string(), value.parse().ok()?))
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn keep_alive_connections_are_spread_evenly_over_the_request_threads() {
    let pods = pods_same_port(&["web-v1"]).await;
    let manifest = format!(
        "{}---\n{}",
        service_yaml("web"),
        slice_yaml("web-1", "web", pods[0].addr.port(), &[Ep::ready(&pods[0])])
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cluster")).unwrap();
    std::fs::write(dir.path().join("cluster/web.yaml"), manifest).unwrap();
    let body = "clusters:\n  - {name: local, manifests: cluster}\n\
                upstreams:\n  - name: web\n    services: [{cluster: local, service: web, port: 8000}]\n\
                routes:\n  - {name: web, path_prefix: /, upstream: web}\n";
    let gw = Gateway::start_full(dir, "", "threads: 2\n  grace_period: 1s", body).await;

    // Each answer must come from the Pod, with the client's own address forwarded: a moved
    // connection keeps its peer.
    let check = |r: Result<Reply, String>| {
        let r = r.expect("an answer");
        assert_eq!(r.status, 200);
        let echo = r.json();
        assert_eq!(echo["pod"], "web-v1", "{echo}");
        assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1", "{echo}");
    };
    let mut conns = vec![Conn::open(gw.addr).await.unwrap()];
    check(conns[0].send("GET", "h", "/", &[]).await);
    // The first connection makes the request threads known to each other.
    wait_for("both request threads to be known", || async {
        per_thread(&gw).await.len() == 2
    })
    .await;
    // One at a time, each answered before the next opens, so that each placement sees the
    // previous ones. Left to chance, 8 connections split 4:4 only about one time in four.
    for _ in 1..8 {
        let mut c = Conn::open(gw.addr).await.unwrap();
        check(c.send("GET", "h", "/", &[]).await);
        conns.push(c);
    }
    assert_eq!(
        per_thread(&gw).await,
        vec![("0".to_string(), 4), ("1".to_string(), 4)]
    );
    // Every connection, moved or not, goes on serving.
    for c in &mut conns {
        for _ in 0..3 {
            check(c.send("GET", "h", "/", &[]).await);
        }
    }
    drop(conns);
    wait_for("the closed connections to be uncounted", || async {
        per_thread(&gw).await == vec![("0".to_string(), 0), ("1".to_string(), 0)]
    })
    .await;
}
