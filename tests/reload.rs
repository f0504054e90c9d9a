//! SIGHUP reloads the config under load: no failed request, new routes work, removed ones 404,
//! and an invalid file changes nothing.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
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

    // Steady load on the route that stays: two keep-alive and two new-connection clients.
    let stop = Arc::new(AtomicBool::new(false));
    let (counts, clients) = steady_load(gw.addr, "/a", 2, 2, stop.clone());
    wait_for("load to run", || async { counts.ok() > 50 }).await;

    gw.rewrite_config(&body(&[("/a", "a-v1"), ("/c", "c-v1")], &pods));
    gw.signal("HUP");
    wait_for("the new route", || async {
        gw.get("h", "/c").await.status == 200
    })
    .await;
    assert_eq!(gw.pod_for("h", "/c").await, "c-v1");
    assert_eq!(gw.get("h", "/b").await.status, 404, "removed route");
    let after_reload = counts.ok();
    wait_for("load to go on after the reload", || async {
        counts.ok() > after_reload + 50
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
    let (ok, failed) = (counts.ok(), counts.failed());
    println!(
        "reload under load: {ok} requests ok, {failed} failed, {} resent",
        counts.resent()
    );
    assert_eq!(
        failed,
        0,
        "{ok} ok, failures: {:?}",
        counts.failures.lock().unwrap()
    );

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

/// `podgate -c FILE -s reload|stop`, the nginx-style way to signal the running gateway: it finds
/// the process through `server.pid_file`, refuses to send anything for a bad file, and says so
/// when nothing runs.
#[tokio::test]
async fn dash_s_reload_and_stop_signal_the_running_gateway() {
    let pods = pods_same_port(&["a-v1", "c-v1"]).await;
    let mut gw = Gateway::start(&body(&[("/a", "a-v1")], &pods), &[]).await;
    let conf = gw.path("podgate.yaml");
    let dash_s = |what: &str| {
        let out = std::process::Command::new(podgate_bin())
            .arg("-c")
            .arg(&conf)
            .args(["-s", what])
            .output()
            .expect("run podgate -s");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };

    gw.rewrite_config("upstreams: [oops\n");
    let (code, text) = dash_s("reload");
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("mistake"), "{text}");
    assert!(
        !gw.log_text().contains("SIGHUP"),
        "a bad file must not be signalled"
    );

    gw.rewrite_config(&body(&[("/a", "a-v1"), ("/c", "c-v1")], &pods));
    let (code, text) = dash_s("reload");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("pid {}", gw.pid())), "{text}");
    wait_for("the route added by the reload", || async {
        gw.get("h", "/c").await.status == 200
    })
    .await;

    let (code, text) = dash_s("stop");
    assert_eq!(code, Some(0), "{text}");
    wait_for("podgate to stop", || {
        let gone = gw.exited().is_some();
        async move { gone }
    })
    .await;
    let (code, text) = dash_s("reload");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not running"), "{text}");
}
