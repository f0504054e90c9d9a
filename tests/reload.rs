//! SIGHUP reloads the config under load: no failed request, new routes work, removed ones 404,
//! and an invalid file changes nothing.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use support::*;

fn body(routes: &[(&str, &str)], pods: &[Pod]) -> String {
    let mut s = String::from("upstreams:\n");
    for p in pods {
        s.push_str(&format!(
            "  - {{name: {}, nodes: [{{address: \"{}\"}}]}}\n",
            p.name, p.addr
        ));
    }
    s.push_str("routes:\n");
    for (prefix, up) in routes {
        s.push_str(&format!(
            "  - {{name: r{}, path_prefix: {prefix}, upstream: {up}}}\n",
            &prefix[1..]
        ));
    }
    s
}

#[tokio::test]
async fn reload_under_load_adds_and_removes_routes() {
    let pods = pods_same_port(&["a-v1", "b-v1", "c-v1"]).await;
    let gw = Gateway::start(&body(&[("/a", "a-v1"), ("/b", "b-v1")], &pods), &[]).await;
    assert_eq!(gw.pod_for("h", "/b").await, "b-v1");
    assert_eq!(gw.get("h", "/c").await.status, 404);

    // Steady load on the route that stays, from four clients.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), gw.addr);
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match get(addr, "h", "/a").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    wait_for("load to run", || async { ok.load(Ordering::Relaxed) > 50 }).await;

    gw.rewrite_config(&body(&[("/a", "a-v1"), ("/c", "c-v1")], &pods));
    gw.signal("HUP");
    wait_for("the new route", || async {
        gw.get("h", "/c").await.status == 200
    })
    .await;
    assert_eq!(gw.pod_for("h", "/c").await, "c-v1");
    assert_eq!(gw.get("h", "/b").await.status, 404, "removed route");
    let after_reload = ok.load(Ordering::Relaxed);
    wait_for("load to go on after the reload", || async {
        ok.load(Ordering::Relaxed) > after_reload + 50
    })
    .await;

    // A broken file: refused, counted, and everything keeps working.
    gw.rewrite_config("upstreams: [oops\n");
    gw.signal("HUP");
    wait_for("the refusal to be logged", || async {
        gw.log_text().contains("config reload refused")
    })
    .await;
    assert_eq!(gw.pod_for("h", "/c").await, "c-v1");

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("reload under load: {ok} requests ok, {failed} failed");
    assert_eq!(failed, 0, "{ok} ok, {failed} failed");

    let metrics = get(gw.admin, "a", "/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("podgate_config_reloads_total{result=\"success\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("podgate_config_reloads_total{result=\"failure\"} 1"),
        "{text}"
    );
}
