//! Running out of file descriptors under load, through the binary: podgate logs a bounded number
//! of lines (no error loop filling a disk), serves again once descriptors are free, and still
//! stops on SIGTERM within its grace period.

mod support;

use std::time::{Duration, Instant};
use support::*;
use tokio::net::TcpStream;

/// Sets the descriptor limit of process `pid` (as `prlimit --nofile` does).
fn limit_descriptors(pid: u32, n: u64) {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: plain syscall on a child process we started; `limit` outlives the call.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn open_descriptors(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

#[tokio::test]
async fn running_out_of_descriptors_logs_boundedly_recovers_and_still_stops() {
    let pods = pods_same_port(&["fd-v1"]).await;
    let conf = format!(
        "upstreams:\n  - {{name: web, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: all, path_prefix: /, upstream: web}}\n",
        pods[0].addr
    );
    let mut gw = Gateway::start_full(
        tempfile::tempdir().unwrap(),
        "",
        "threads: 1\n  grace_period: 2s",
        &conf,
    )
    .await;
    let pid = gw.pid();
    limit_descriptors(pid, open_descriptors(pid) + 6);

    // Far more connections than descriptors left: accepts fail with EMFILE while they are held.
    let mut held = Vec::new();
    for _ in 0..60 {
        if let Ok(s) = TcpStream::connect(gw.addr).await {
            held.push(s);
        }
    }
    wait_for("podgate to report failing accepts", || async {
        gw.log_text().contains("Accept() failed")
    })
    .await;
    // Observe the log for a while under the exhaustion (a window, not a synchronisation).
    let before = gw.log_text().lines().count();
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let during = gw.log_text().lines().count() - before;
    assert!(
        during <= 3 * podgate::logging::PER_SECOND as usize * 2,
        "{during} log lines in {window:?}:\n{}",
        gw.log_text()
    );

    // Descriptors come back: requests are served again.
    drop(held);
    wait_for(
        "a request served after the descriptors came back",
        || async { matches!(get(gw.addr, "a", "/x").await, Ok(r) if r.status == 200) },
    )
    .await;

    // And SIGTERM still ends it within grace_period (2 s) plus the watchdog's slack.
    gw.signal("TERM");
    let start = Instant::now();
    while gw.exited().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "still running 8 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
