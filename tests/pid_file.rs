//! Two podgates on one host (issue 14): each config gets its own pid file (and upgrade socket)
//! by default, so `podgate -c A -s stop` stops A and only A, and a second podgate on a config
//! whose podgate already runs refuses to start instead of taking its pid file over.

mod support;

use std::path::PathBuf;
use support::*;

/// The `server:` body of a gateway that keeps podgate's default pid file: the support code gives
/// every test gateway a pid file in its temp folder unless `server` mentions `pid_file`.
const DEFAULT_PID_FILE: &str = "threads: 1\n  grace_period: 1s\n  # pid_file: podgate's default";

fn body(pod: &Pod) -> String {
    format!(
        "upstreams:\n  - {{name: a, nodes: [{{address: \"{}\"}}]}}\n\
         routes:\n  - {{name: a, path_prefix: /, upstream: a}}\n",
        pod.addr
    )
}

/// `podgate -c CONF ARGS…`: (exit code, stdout + stderr).
fn podgate(conf: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(podgate_bin())
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("run podgate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// The pid file the running gateway uses, as `/config` reports it.
async fn pid_file_of(gw: &Gateway) -> PathBuf {
    let r = get(gw.admin, "admin", "/config").await.unwrap();
    PathBuf::from(r.json()["server"]["pid_file"].as_str().unwrap())
}

#[tokio::test]
async fn two_podgates_on_one_host_each_have_their_own_pid_file() {
    let pods = pods_same_port(&["a-v1"]).await;
    let dir = || tempfile::tempdir().unwrap();
    let mut a = Gateway::start_full(dir(), "", DEFAULT_PID_FILE, &body(&pods[0])).await;
    let mut b = Gateway::start_full(dir(), "", DEFAULT_PID_FILE, &body(&pods[0])).await;
    let (conf_a, conf_b) = (a.path("podgate.yaml"), b.path("podgate.yaml"));

    // Same file name in two folders: two pid files, in /tmp, each holding its own process' pid.
    let (pid_a, pid_b) = (pid_file_of(&a).await, pid_file_of(&b).await);
    assert_ne!(pid_a, pid_b);
    for (file, gw) in [(&pid_a, &a), (&pid_b, &b)] {
        assert!(file.starts_with("/tmp"), "{}", file.display());
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("podgate-podgate-") && name.ends_with(".pid"),
            "{name}"
        );
        assert_eq!(
            std::fs::read_to_string(file).unwrap().trim(),
            gw.pid().to_string()
        );
    }
    // `-s` finds the same file as the process it signals.
    let (code, text) = podgate(&conf_b, &["-s", "reload"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("pid {}", b.pid())), "{text}");
    wait_for("B to reload", || {
        let log = b.log_text();
        async move { log.contains("config reloaded") }
    })
    .await;

    // A second podgate on B's config would take B's pid file over: it refuses, naming B.
    let (code, text) = podgate(&conf_b, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("podgate pid {}", b.pid()))
            && text.contains(&pid_b.display().to_string()),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_b).unwrap().trim(),
        b.pid().to_string()
    );

    // Stopping A stops A only; A's pid file goes with it.
    let (code, text) = podgate(&conf_a, &["-s", "stop"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("pid {}", a.pid())), "{text}");
    wait_for("A to stop", || {
        let gone = a.exited().is_some();
        async move { gone }
    })
    .await;
    assert!(a.exited().unwrap().success());
    assert!(!pid_a.exists(), "A left {} behind", pid_a.display());
    assert_eq!(get(b.admin, "admin", "/healthz").await.unwrap().status, 200);
    assert_eq!(b.get("h", "/").await.status, 200);
    assert!(!b.log_text().contains("SIGTERM"), "{}", b.log_text());

    let (code, text) = podgate(&conf_a, &["-s", "stop"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not running"), "{text}");
    let (code, text) = podgate(&conf_b, &["-s", "stop"]);
    assert_eq!(code, Some(0), "{text}");
    wait_for("B to stop", || {
        let gone = b.exited().is_some();
        async move { gone }
    })
    .await;
    assert!(!pid_b.exists(), "B left {} behind", pid_b.display());
}
