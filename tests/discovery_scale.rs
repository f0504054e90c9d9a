//! Discovery at scale — a benchmark, not a test: `#[ignore]`d, run by `benches/discovery.sh`
//! (in release mode) and reported in benches/RESULTS.md. Nothing here asserts on time.
//!
//! Three fake API servers hold 10,000 endpoints in 100-endpoint slices across 30 services; one
//! upstream names 20 services (spread over the three clusters), others the rest. Measured:
//! - start of the `podgate` binary → every endpoint live, and its RSS then;
//! - 1,000 single-endpoint changes sent at 100/s: time from the fake API server sending the
//!   watch event to the new selection being live (in-process, on the same library the binary
//!   uses, so the moment of the swap can be observed exactly), and the CPU time used;
//! - requests per second through the `podgate` binary to three small HTTP servers on loopback
//!   (a Service of their own in the first fake API server), from a few keep-alive clients, in
//!   three rounds of three 5 s windows: without changes; during 500 changes at 100/s sent to
//!   Services nobody watches (what the fake API servers themselves cost on the shared CPUs);
//!   during the same changes sent to the big upstream. Medians of the per-round ratios.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::fake_kube::FakeKube;
use tokio::net::TcpListener;

/// The allocator of the `podgate` binary, so that the in-process latency measurement costs what
/// the binary's rebuilds cost (glibc's malloc made them several times dearer here).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// Slice `k` of service `s`: 100 endpoints 10.s.k.i, the first one on an IP that `version`
/// picks. As JSON: building the typed object first would double the harness' work per change.
fn slice(s: usize, k: usize, version: u32) -> serde_json::Value {
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
    json!({
        "metadata": {"name": format!("svc{s}-{k}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc{s}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    })
}

fn slices_of(s: usize) -> usize {
    SLICES_PER_SERVICE + usize::from(s < 10)
}

/// Change `n` of a churn: one endpoint of one slice of one of the big upstream's 20 Services
/// moves to a new IP; to the same-shaped Services nobody watches unless `watched`.
fn apply_change(fakes: &[FakeKube], n: usize, watched: bool) {
    let s = n % 20;
    let k = n % slices_of(s);
    let target = if watched { s } else { unwatched(s) };
    fakes[cluster_of(s)].apply_slice_json(slice(target, k, n as u32 + 1));
}

/// A Service index of the same shape as `s` that no upstream names (svc100…svc119).
fn unwatched(s: usize) -> usize {
    s + 100
}

fn cluster_of(s: usize) -> usize {
    s % 3
}

/// Fakes loaded with every object; and the config body naming them, up to the list of upstreams
/// (no `routes:` yet: callers add their own, and may add upstreams first).
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
            fake.apply_slice_json(slice(s, k, 0));
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
    (fakes, conf)
}

/// The routes of the tests that send no request through the proxy.
const BIG_ROUTE: &str = "routes:\n  - {name: big, path_prefix: /, upstream: big}\n";

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
    cpu_seconds_of("self")
}

/// CPU time used so far by process `pid` ("self" for this one), in seconds.
fn cpu_seconds_of(pid: &str) -> f64 {
    // utime + stime, in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
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
    let (_fakes, mut body) = setup(dir.path()).await;
    body.push_str(BIG_ROUTE);
    let start = Instant::now();
    let gw = support::Gateway::start_full(dir, "", "threads: 2\n  grace_period: 1s", &body).await;
    // Polls the small /metrics page, not /upstreams: rendering 10,000 endpoints as JSON would
    // itself grow the heap that the RSS figure is meant to show.
    loop {
        let live = ready_endpoints(&gw).await;
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
    let rss_live = rss_mib(gw.pid());
    let v = gw.upstreams_json().await;
    assert_eq!(v["upstreams"].as_array().unwrap().len(), 11);
    println!(
        "RESULT start → 10,000 endpoints live: {:.0} ms (process start included); podgate RSS {:.1} MiB \
         then, {:.1} MiB after serving /upstreams once",
        took.as_secs_f64() * 1000.0,
        rss_live,
        rss_mib(gw.pid())
    );
}

/// Sum of `podgate_upstream_endpoints{state="ready"}` over every upstream and cluster.
async fn ready_endpoints(gw: &support::Gateway) -> usize {
    let r = support::get(gw.admin, "admin", "/metrics").await.unwrap();
    std::str::from_utf8(&r.body)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("podgate_upstream_endpoints{") && l.contains("state=\"ready\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by benches/discovery.sh"]
async fn discovery_at_scale_event_to_live_latency() {
    let dir = tempfile::tempdir().unwrap();
    let (fakes, mut body) = setup(dir.path()).await;
    body.push_str(BIG_ROUTE);
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
    while big.selection().len() < expected {
        assert!(Instant::now() < deadline, "the big upstream never filled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("big upstream: {} endpoints live", big.selection().len());

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
        let before = big.selection();
        let sent = Instant::now();
        apply_change(&fakes, n, true);
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

/// What every backend request gets: 64 bytes, as in benches/load.
const BODY: &[u8; 64] = b"podgate discovery-scale backend: 64 bytes of body, every time!!\n";

/// Keep-alive clients of the throughput measurement.
const CLIENTS: usize = 8;

/// Rounds of the throughput measurement, each a window without changes, one of changes to
/// Services nobody watches and one of changes to the big upstream.
const ROUNDS: usize = 5;

/// Changes in each churn window: 5 s at 100/s.
const CHANGES_PER_WINDOW: usize = 500;

/// Length of each window without changes, as long as a churn window.
const WINDOW: Duration = Duration::from_secs(5);

/// The threads of `pid` that serve requests: Pingora names them after the process.
fn podgate_request_threads(pid: u32) -> Vec<String> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid = task.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // The main thread has the same name and only waits.
        if comm.trim() == "podgate" && tid != pid.to_string() {
            threads.push(tid);
        }
    }
    threads
}

/// Serves [`BODY`] over HTTP/1.1 to every connection `listener` accepts.
async fn serve_body(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(BODY),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Three backend Pods sharing one port on 127.0.0.1, .2 and .3, as a Service's Pods share a
/// port on distinct IPs; returns the port and the server tasks.
async fn start_backends() -> (u16, Vec<tokio::task::JoinHandle<()>>) {
    for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for last in 2..=3 {
            match TcpListener::bind((Ipv4Addr::new(127, 0, 0, last), port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => break,
            }
        }
        if listeners.len() == 3 {
            return (
                port,
                listeners
                    .into_iter()
                    .map(|l| tokio::spawn(serve_body(l)))
                    .collect(),
            );
        }
    }
    panic!("no port free on 127.0.0.1, .2 and .3 at once");
}

/// The EndpointSlice of the `local` Service: the three backends, ready.
fn local_slice(port: u16) -> EndpointSlice {
    let endpoints: Vec<_> = (1..=3)
        .map(|i| {
            json!({
                "addresses": [format!("127.0.0.{i}")],
                "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": format!("local-{i}"), "namespace": "default"},
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "local-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "local"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

/// CPU time all CPUs of the machine spent busy so far (anything but idle and I/O wait), in
/// seconds: what is left after podgate's and the harness' share is other processes and
/// interrupts, which on a shared machine says whether a run was disturbed.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .take(8) // user nice system idle iowait irq softirq steal
        .map(|t| t.parse().unwrap())
        .collect();
    (ticks.iter().sum::<f64>() - ticks[3] - ticks[4]) / 100.0
}

/// Requests/s, failed requests, podgate CPU s, harness CPU s and the rest of the machine's busy
/// CPU s over one window of the throughput run.
type Window = (f64, u64, f64, f64, f64);

/// Counters at one moment of the throughput run.
struct Sample {
    at: Instant,
    ok: u64,
    failed: u64,
    podgate_cpu: f64,
    harness_cpu: f64,
    machine_busy: f64,
}

impl Sample {
    fn take(counts: &support::LoadCounts, pid: u32) -> Sample {
        Sample {
            at: Instant::now(),
            ok: counts.ok(),
            failed: counts.failed(),
            podgate_cpu: cpu_seconds_of(&pid.to_string()),
            harness_cpu: cpu_seconds(),
            machine_busy: machine_busy_seconds(),
        }
    }

    /// What happened from `self` to `end`.
    fn until(&self, end: &Sample) -> Window {
        let podgate = end.podgate_cpu - self.podgate_cpu;
        let harness = end.harness_cpu - self.harness_cpu;
        (
            (end.ok - self.ok) as f64 / (end.at - self.at).as_secs_f64(),
            end.failed - self.failed,
            podgate,
            harness,
            end.machine_busy - self.machine_busy - podgate - harness,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by benches/discovery.sh"]
async fn discovery_at_scale_throughput_during_churn() {
    let dir = tempfile::tempdir().unwrap();
    // The fake API servers, and the churn they are fed, run on a runtime of their own: building
    // and sending a 100-endpoint slice takes milliseconds, which on the clients' runtime would
    // hold up their tasks. (A real API server runs elsewhere; here it still shares the CPUs.)
    let api = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fake-api")
        .enable_all()
        .build()
        .unwrap();
    let path = dir.path().to_owned();
    let (fakes, mut body) = api.spawn(async move { setup(&path).await }).await.unwrap();
    let fakes = Arc::new(fakes);
    let (port, _backends) = start_backends().await;
    fakes[0].apply_service(&service("local"));
    fakes[0].apply_slice(&local_slice(port));
    // Requests only ever go to `local` (loopback); `big` gets the changes, as in the latency test.
    body.push_str("  - {name: local, services: [{cluster: c0, service: local, port: 8000}]}\n");
    body.push_str("routes:\n  - {name: local, path_prefix: /, upstream: local}\n");
    body.push_str("access_log:\n  enabled: false\n");
    let gw = support::Gateway::start_full(dir, "", "threads: 2\n  grace_period: 1s", &body).await;
    let start = Instant::now();
    loop {
        let v = gw.upstreams_json().await;
        let live: usize = v["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["backends"].as_array().map_or(0, Vec::len))
            .sum();
        if live == 10_003 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "only {live} live"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = gw.get("load.test", "/").await;
    assert_eq!((first.status, &first.body[..]), (200, &BODY[..]));

    let stop = Arc::new(AtomicBool::new(false));
    let (counts, clients) = support::steady_load(gw.addr, "/", CLIENTS, 0, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await; // warm-up: connections, pools, caches
                                                      // Rounds of three windows, so that drift and a noisy neighbour hit all three alike: no
                                                      // changes; changes to Services nobody watches (the fake API servers do all their work,
                                                      // podgate gets no event: what the harness itself costs on these shared CPUs); the same
                                                      // changes to the big upstream's Services.
    let churn = |watched: bool, changes: std::ops::Range<usize>| {
        let fakes = fakes.clone();
        api.spawn(async move {
            let mut next = Instant::now();
            for n in changes {
                // The changes of the latency test: 100 per second, one endpoint each.
                next += Duration::from_millis(10);
                tokio::time::sleep_until(next.into()).await;
                apply_change(&fakes, n, watched);
            }
        })
    };
    let request_threads = podgate_request_threads(gw.pid());
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let changes = round * CHANGES_PER_WINDOW..(round + 1) * CHANGES_PER_WINDOW;
        let quiet = Sample::take(&counts, gw.pid());
        tokio::time::sleep(WINDOW).await;
        let control = Sample::take(&counts, gw.pid());
        churn(false, changes.clone()).await.unwrap();
        let watched = Sample::take(&counts, gw.pid());
        churn(true, changes).await.unwrap();
        let end = Sample::take(&counts, gw.pid());
        rounds.push([
            quiet.until(&control),
            control.until(&watched),
            watched.until(&end),
        ]);
    }
    let split = request_threads
        .iter()
        .map(|tid| cpu_seconds_of(&format!("{}/task/{tid}", gw.pid())))
        .collect::<Vec<_>>();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    // The last change reached the proxy.
    let n = ROUNDS * CHANGES_PER_WINDOW - 1;
    let (s, k) = (n % 20, n % slices_of(n % 20));
    let moved = format!("10.{s}.{k}.{}:8080", 101 + (n + 1) % 150);
    support::wait_for("the last change to be live in podgate", || async {
        let v = gw.upstreams_json().await;
        v["upstreams"].as_array().unwrap().iter().any(|u| {
            u["name"] == "big"
                && u["backends"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|b| b["address"] == moved.as_str()))
        })
    })
    .await;

    let names = [
        "no churn",
        "churn to unwatched Services",
        "churn to the big upstream",
    ];
    for (round, windows) in rounds.iter().enumerate() {
        for (name, (rps, failed, podgate, harness, rest)) in names.iter().zip(windows) {
            println!(
                "RESULT   round {}, {name}: {rps:.0} req/s, {failed} failed; CPU s podgate \
                 {podgate:.2}, harness (clients, backends, fake API servers) {harness:.2}, rest of \
                 the machine {rest:.2}",
                round + 1
            );
        }
    }
    let median = |f: &dyn Fn(&[Window; 3]) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let quiet = median(&|w| w[0].0);
    println!(
        "RESULT request throughput, {CLIENTS} keep-alive clients → podgate (2 request threads, \
         CPU split {}) → 3 backends on loopback, medians of {ROUNDS} rounds: no churn {quiet:.0} \
         req/s; 100 changes/s to unwatched Services {:.3} of no churn (the harness' own cost); \
         the same to the big upstream {:.3} of no churn, {:.3} of the unwatched churn; failed {}, \
         resent {}",
        split
            .iter()
            .map(|s| format!("{:.0}%", s / split.iter().sum::<f64>() * 100.0))
            .collect::<Vec<_>>()
            .join("/"),
        median(&|w| w[1].0 / w[0].0),
        median(&|w| w[2].0 / w[0].0),
        median(&|w| w[2].0 / w[1].0),
        counts.failed(),
        counts.resent(),
    );
    api.shutdown_background();
    let failures = counts
        .failures
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    if !failures.is_empty() {
        println!("first failures: {failures:?}");
    }
}
