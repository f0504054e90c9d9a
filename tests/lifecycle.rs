//! Stopping podgate the Kubernetes way: SIGTERM → not ready at once, still accepting during the
//! drain delay, in-flight requests finish, exit within the grace period.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use std::time::{Duration, Instant};
use support::*;

/// A Pod that reports each request on `seen` and answers it `hold` later.
async fn slow_pod(
    hold: Duration,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let seen = seen.clone();
                    async move {
                        let _ = seen.send(());
                        // The Pod's own slowness, not a wait in the test.
                        tokio::time::sleep(hold).await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"slow answer"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn sigterm_drains_then_finishes_in_flight_work() {
    let (slow, mut seen) = slow_pod(Duration::from_millis(1500)).await;
    let fast = pods_same_port(&["fast-v1"]).await;
    let conf = format!(
        "upstreams:\n  - {{name: slow, nodes: [{{address: \"{slow}\"}}]}}\n\
         \x20 - {{name: fast, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: slow, path_prefix: /slow, upstream: slow}}\n\
         \x20 - {{name: fast, path_prefix: /fast, upstream: fast}}\n",
        fast[0].addr
    );
    let grace = Duration::from_secs(4);
    let mut gw = Gateway::start_full(
        tempfile::tempdir().unwrap(),
        "",
        "threads: 2\n  grace_period: 4s\n  drain_delay: 1s",
        &conf,
    )
    .await;
    assert_eq!(get(gw.admin, "a", "/readyz").await.unwrap().status, 200);

    let addr = gw.addr;
    let in_flight = tokio::spawn(async move { get(addr, "h", "/slow").await });
    seen.recv().await.expect("the slow Pod got the request");

    let term = Instant::now();
    gw.signal("TERM");
    wait_for("/readyz to say 503", || async {
        matches!(get(gw.admin, "a", "/readyz").await, Ok(r) if r.status == 503)
    })
    .await;
    // Within the drain delay new connections are still served.
    let during_drain = get(gw.addr, "h", "/fast")
        .await
        .expect("accepted while draining");
    assert_eq!(during_drain.status, 200);
    assert!(
        term.elapsed() < Duration::from_secs(1),
        "checked inside the drain delay"
    );

    let slow_answer = in_flight
        .await
        .unwrap()
        .expect("in-flight request finished");
    assert_eq!(slow_answer.status, 200);
    assert_eq!(&slow_answer.body[..], b"slow answer");

    let mut status = None;
    wait_for("podgate to exit", || {
        status = gw.exited();
        std::future::ready(status.is_some())
    })
    .await;
    let took = term.elapsed();
    println!("SIGTERM to exit: {took:?} (grace_period {grace:?})");
    assert!(status.unwrap().success(), "{}", gw.log_text());
    assert!(
        took <= grace + Duration::from_millis(500),
        "exited after {took:?}, grace period {grace:?}"
    );
    assert!(
        get(addr, "h", "/fast").await.is_err(),
        "nothing listens after exit"
    );
}

#[tokio::test]
async fn binary_upgrade_under_load_loses_no_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let pods = pods_same_port(&["up-v1"]).await;
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
        pods[0].addr
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("upgrade.sock");
    let mut old = Gateway::start_full(
        dir,
        "",
        &format!(
            "threads: 1\n  grace_period: 2s\n  drain_delay: 0s\n  upgrade_sock: {}",
            sock.display()
        ),
        &conf,
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (counts, clients) = steady_load(old.addr, "/", 2, 6, stop.clone());
    wait_for("load to run", || async { counts.ok() > 50 }).await;

    let mut new = old.spawn_upgrade();
    wait_for("the new process to wait for the sockets", || {
        std::future::ready(sock.exists())
    })
    .await;
    old.signal("QUIT");
    let mut status = None;
    wait_for("the old process to exit", || {
        status = old.exited();
        std::future::ready(status.is_some())
    })
    .await;
    assert!(new.try_wait().unwrap().is_none(), "the new process runs");
    let at_handover = counts.ok();
    wait_for("the new process to serve", || async {
        counts.ok() > at_handover + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (counts.ok(), counts.failed());
    println!(
        "binary upgrade under load: {ok} requests ok, {failed} failed, {} resent by keep-alive \
         clients after the server closed an idle connection",
        counts.resent()
    );
    let _ = new.kill();
    let _ = new.wait();
    assert_eq!(
        failed,
        0,
        "{ok} ok, {failed} failed: {:?}\nold:\n{}\nnew:\n{}",
        counts.failures.lock().unwrap(),
        old.log_text(),
        std::fs::read_to_string(old.path("upgrade.log")).unwrap_or_default()
    );
}
