//! Least request against smooth WRR with one slow Pod of ten, through the real binary: the
//! latency distribution clients see (a benchmark that prints numbers, not a timed test).
//!
//! Ten Pods on loopback, nine answering at once and one after 20 ms; podgate (one worker
//! thread) with two upstreams over the same Pods, `round_robin` and `least_request`, one route
//! each by host. 16 keep-alive clients send requests in a closed loop, first to one upstream,
//! then to the other. WRR gives the slow Pod its tenth of the requests whatever happens; least
//! request sees its requests pile up and passes it over.
//!
//! Run: `cargo bench --bench least_request` (about 10 s).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

const PODS: usize = 10;
const SLOW: Duration = Duration::from_millis(20);
const CLIENTS: usize = 16;
const PER_CLIENT: usize = 1_500;

async fn pod(i: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    if i == 0 {
                        tokio::time::sleep(SLOW).await;
                    }
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header("x-pod", i.to_string())
                            .body(Full::new(Bytes::from_static(b"ok")))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Latencies of every request, and how many the slow Pod answered.
async fn run(gw: SocketAddr, host: &'static str) -> (Vec<Duration>, usize) {
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(gw).await.unwrap();
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut took = Vec::with_capacity(PER_CLIENT);
            let mut slow = 0;
            for _ in 0..PER_CLIENT {
                let req = http::Request::builder()
                    .uri("/")
                    .header("host", host)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let start = Instant::now();
                let resp = send.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                slow += usize::from(resp.headers()["x-pod"] == "0");
                resp.into_body().collect().await.unwrap();
                took.push(start.elapsed());
            }
            (took, slow)
        }));
    }
    let mut all = Vec::new();
    let mut slow = 0;
    for t in tasks {
        let (took, s) = t.await.unwrap();
        all.extend(took);
        slow += s;
    }
    all.sort();
    (all, slow)
}

fn at(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; a filter that does not match this bench skips it.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"least_request".contains(a.as_str()))
    {
        return;
    }
    let mut pods = Vec::new();
    for i in 0..PODS {
        pods.push(pod(i).await);
    }
    let nodes: String = pods
        .iter()
        .map(|a| format!("{{address: \"{a}\"}}, "))
        .collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let conf = format!(
        "listeners: [{{address: \"127.0.0.1:{port}\"}}]\nadmin: {{address: \"127.0.0.1:{admin}\"}}\n\
         server: {{threads: 1, grace_period: 1s}}\naccess_log: {{enabled: false}}\n\
         upstreams:\n  - {{name: rr, nodes: [{nodes}]}}\n  - {{name: lr, balance: least_request, nodes: [{nodes}]}}\n\
         routes:\n  - {{name: rr, hosts: [rr.test], path_prefix: /, upstream: rr}}\n  \
         - {{name: lr, hosts: [lr.test], path_prefix: /, upstream: lr}}\n"
    );
    let path = dir.path().join("podgate.yaml");
    std::fs::write(&path, conf).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_podgate"))
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start podgate");
    let gw: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(gw).await.is_err() {
        assert!(Instant::now() < deadline, "podgate did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{PODS} Pods, one answering after {SLOW:?}; {CLIENTS} clients x {PER_CLIENT} requests each"
    );
    println!("policy          p50 ms   p90 ms   p99 ms  p99.9 ms  slow Pod share");
    for (name, host) in [("round_robin", "rr.test"), ("least_request", "lr.test")] {
        run(gw, host).await; // warm-up: connections to the Pods, caches
        let (took, slow) = run(gw, host).await;
        println!(
            "{name:<14} {:>7.2}  {:>7.2}  {:>7.2}  {:>8.2}  {:>6.2} %",
            at(&took, 0.50),
            at(&took, 0.90),
            at(&took, 0.99),
            at(&took, 0.999),
            slow as f64 * 100.0 / took.len() as f64
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
