//! Starting and stopping podgate: an address in use stops the start with exit 1; SIGTERM → not
//! ready at once, still accepting during the drain delay, in-flight requests finish, exit within
//! the grace period; a binary upgrade loses no request.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use std::net::SocketAddr;
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

/// A socket listening on a fresh loopback port with `SO_REUSEPORT` set, as a second server
/// started with reuseport holds it (a listener that sets it too would share the port silently).
fn reuseport_listener() -> std::net::TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor created here; the sockaddr and option value
    // live on this stack frame for the calls that read them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let listener = std::net::TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(set, 0, "SO_REUSEPORT: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let bound = libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, 16), 0);
        listener
    }
}

/// Runs `podgate -c` with the proxy listener on `proxy` and the admin listener on `admin` until
/// it exits (killed after `DEADLINE`): its exit code, stderr, and how long it ran.
fn run_until_exit(proxy: SocketAddr, admin: SocketAddr) -> (Option<i32>, String, Duration) {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("podgate.yaml");
    std::fs::write(
        &conf,
        format!(
            "listeners:\n  - address: {proxy}\nadmin:\n  address: {admin}\nserver:\n  \
             pid_file: {}\nupstreams:\n  - {{name: web, nodes: [{{address: \"127.0.0.1:9\"}}]}}\n\
             routes:\n  - {{name: web, path_prefix: /, upstream: web}}\n",
            dir.path().join("podgate.pid").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("podgate.log");
    let start = Instant::now();
    let mut child = Command::new(podgate_bin())
        .arg("-c")
        .arg(&conf)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn podgate");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !dir.path().join("podgate.pid").exists(),
        "a failed start must not write the pid file (it names the running podgate)"
    );
    (status, stderr, took)
}

#[test]
fn an_address_in_use_stops_the_start_with_exit_code_1() {
    let free = || SocketAddr::from(([127, 0, 0, 1], free_port()));
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reuseport = reuseport_listener();
    for (holder, kind) in [
        (&plain, "a plain listener"),
        (&reuseport, "an SO_REUSEPORT one"),
    ] {
        let held = holder.local_addr().unwrap();
        for (proxy, admin, named) in [
            (held, free(), "proxy listener listeners[0]"),
            (free(), held, "admin listener admin.address"),
        ] {
            let (code, stderr, took) = run_until_exit(proxy, admin);
            println!("{named} on {held} held by {kind}: exit {code:?} after {took:?}");
            assert_eq!(code, Some(1), "{named} held by {kind}:\n{stderr}");
            assert!(
                stderr.contains(&format!("{named} {held} is in use")),
                "the message names the listener and the address:\n{stderr}"
            );
            assert!(
                !stderr.contains("listening on"),
                "nothing may be reported as listening:\n{stderr}"
            );
            assert!(took < Duration::from_secs(5), "exit took {took:?}");
        }
    }
}
