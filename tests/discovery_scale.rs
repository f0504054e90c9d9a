//! Discovery at scale — a benchmark, not a test: `#[ignore]`d, run by `benches/discovery.sh`
//! (in release mode) and reported in benches/RESULTS.md. Nothing here asserts on time.
//!
//! Three fake API servers hold 10,000 endpoints in 100-endpoint slices across 30 services; one
//! upstream names 20 services (spread over the three clusters), others the rest. Measured:
//! - start of the `podgate` binary → every endpoint live, and its RSS then;
//! - 1,000 single-endpoint changes sent at 100/s: time from the fake API server sending the
//!   watch event to the new selection being live (in-process, on the same library the binary
//!   uses, so the moment of the swap can be observed exactly), and the CPU time used.

mod support;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::fake_kube::FakeKube;

const SERVICES: usize = 30;
const SLICES_PER_SERVICE: usize = 3; // 30 services × 3 slices (+1 extra on 10) × 100 = 10,000
const PER_SLICE: usize = 100;

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }))
    .unwrap()
}

/// Slice `k` of service `s`: 100 endpoints 10.s.k.i, the one at `bump` (if any) on a new IP.
fn slice(s: usize, k: usize, version: u32) -> EndpointSlice {
    let endpoints: Vec<_> = (0..PER_SLICE)
        .map(|i| {
            // `version` moves one endpoint per change, like a Pod replaced.
            // Endpoints 1..99 sit on .2–.100; endpoint 0 moves within .101–.250.
            let last = if i == 0 { 101 + (version % 150) as usize } else { i + 1 };
            json!({
                "addresses": [format!("10.{s}.{k}.{last}")],
                "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": format!("svc{s}-{k}-{i}"), "namespace": "default"},
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc{s}-{k}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc{s}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn slices_of(s: usize) -> usize {
    SLICES_PER_SERVICE + usize::from(s < 10)
}

fn cluster_of(s: usize) -> usize {
    s % 3
}

/// Fakes loaded with every object; and the config body naming them.
async fn setup(dir: &std::path::Path) -> (Vec<FakeKube>, String) {
    let mut fakes = Vec::new();
    for _ in 0..3 {
        fakes.push(FakeKube::start().await);
    }
    let mut total = 0;
    for s in 0..SERVICES {
        let fake = &fakes[cluster_of(s)];
        fake.apply_service(&service(&format!("svc{s}")));
        for k in 0..slices_of(s) {
            fake.apply_slice(&slice(s, k, 0));
            total += PER_SLICE;
        }
    }
    assert_eq!(total, 10_000);
    let mut conf = String::from("clusters:\n");
    for (i, f) in fakes.iter().enumerate() {
        f.write_kubeconfig(&dir.join(format!("c{i}.kubeconfig")), None);
        conf.push_str(&format!(
            "  - {{name: c{i}, kubeconfig: {}}}\n",
            dir.join(format!("c{i}.kubeconfig")).display()
        ));
    }
    conf.push_str("upstreams:\n  - name: big\n    services:\n");
    for s in 0..20 {
        conf.push_str(&format!(
            "      - {{cluster: c{}, service: svc{s}, port: 8000}}\n",
            cluster_of(s)
        ));
    }
    for s in 20..SERVICES {
        conf.push_str(&format!(
            "  - {{name: u{s}, services: [{{cluster: c{}, service: svc{s}, port: 8000}}]}}\n",
            cluster_of(s)
        ));
    }
    conf.push_str("routes:\n  - {name: big, path_prefix: /, upstream: big}\n");
    (fakes, conf)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by benches/discovery.sh"]
async fn discovery_at_scale_binary_start_and_rss() {
    let dir = tempfile::tempdir().unwrap();
    let (_fakes, body) = setup(dir.path()).await;
    let start = Instant::now();
    let gw = support::Gateway::start_full(dir, "", "threads: 2\n  grace_period: 1s", &body).await;
    loop {
        let v = gw.upstreams_json().await;
        let live: usize = v["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["backends"].as_array().map_or(0, Vec::len))
            .sum();
        if live == 10_000 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "only {live} live"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    println!(
        "RESULT start → 10,000 endpoints live: {:.0} ms (process start included); podgate RSS {:.1} MiB",
        took.as_secs_f64() * 1000.0,
        rss_mib(gw.pid())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by benches/discovery.sh"]
async fn discovery_at_scale_event_to_live_latency() {
    let dir = tempfile::tempdir().unwrap();
    let (fakes, body) = setup(dir.path()).await;
    let conf_path = dir.path().join("podgate.yaml");
    std::fs::write(
        &conf_path,
        format!("listeners: [{{address: \"127.0.0.1:1\"}}]\n{body}"),
    )
    .unwrap();
    let config = podgate_gateway::config::load(&conf_path).unwrap();
    let live = podgate_gateway::live::Live::start(config).unwrap();
    live.watch();
    let big = live.upstreams().by_name["big"].clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let expected: usize = (0..20).map(|s| slices_of(s) * PER_SLICE).sum();
    while big.selection().backends().len() < expected {
        assert!(Instant::now() < deadline, "the big upstream never filled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "big upstream: {} endpoints live",
        big.selection().backends().len()
    );

    // Called right after the gateway's own listener (subscription order), on the same thread:
    // the moment the new selection is live.
    struct Stamp(tokio::sync::mpsc::UnboundedSender<Instant>);
    impl podgate_discovery::Listener for Stamp {
        fn changed(&self, _keys: &[podgate_discovery::ServiceKey]) {
            let _ = self.0.send(Instant::now());
        }
    }
    let (tx, mut swapped) = tokio::sync::mpsc::unbounded_channel();
    live.store.subscribe(Arc::new(Stamp(tx)));

    let changes = 1000;
    let mut latencies = Vec::with_capacity(changes);
    let cpu_before = cpu_seconds();
    let wall = Instant::now();
    let mut next = Instant::now();
    for n in 0..changes {
        // 100 changes per second, each moving one endpoint of one slice of the big upstream.
        next += Duration::from_millis(10);
        tokio::time::sleep_until(next.into()).await;
        let s = n % 20;
        let k = n % slices_of(s);
        let before = big.selection();
        let sent = Instant::now();
        fakes[cluster_of(s)].apply_slice(&slice(s, k, n as u32 + 1));
        let at = tokio::time::timeout(Duration::from_secs(10), swapped.recv())
            .await
            .expect("change went live")
            .unwrap();
        assert!(
            !Arc::ptr_eq(&before, &big.selection()),
            "change {n} swapped the selection"
        );
        latencies.push(at - sent);
    }
    let cpu = cpu_seconds() - cpu_before;
    let wall = wall.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "RESULT 1000 changes at 100/s, event sent → selection live: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         CPU {:.2} s over {:.1} s wall ({:.0}% of one core, the fake API servers included)",
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
        cpu,
        wall.as_secs_f64(),
        cpu / wall.as_secs_f64() * 100.0
    );
}
