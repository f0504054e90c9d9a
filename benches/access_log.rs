//! The access log's cost per line: the previous way (`old`: a `serde_json::json!` map written to
//! a fresh `Vec`, a fresh RFC 3339 `String`, the line sent through a bounded channel to a writer
//! thread that flushed whenever the channel was empty) against the current one (`new`: the line
//! written by hand into the thread's batch, batches of 64 KiB handed to the writer). Both write to
//! `/dev/null`, so no disk is measured, only the proxy's own work. The line is a routed request's
//! (route, upstream, cluster, Pod, Pod address, client address, a 32-digit request id).
//!
//! - `access_line/format`: the formatting alone.
//! - `access_line/log`: formatting and hand-over, one line after the other.
//! - `access_line/log_spaced`: one line per ~5 µs of other work (a spin), as lines come from a
//!   busy worker: here the old writer found the channel empty and was woken for nearly every
//!   line. `spin_only` is the spin alone, to subtract. Run it pinned to one CPU
//!   (`taskset -c 1 cargo bench --bench access_log`) to count the writer thread's time as well,
//!   as when the proxy runs on one core.
//!
//! Instructions per line, for a figure that does not depend on the machine's load:
//! `ACCESS_LOG_LINES=200000 ACCESS_LOG_WAY=new valgrind --tool=callgrind target/release/deps/access_log-*`
//! runs 200,000 lines of one way (`old` or `new`) and exits; with `ACCESS_LOG_LINES=0` it runs
//! the set-up alone. The difference of the two totals over the lines is the cost per line (every
//! thread counted, the writer's too; the kernel's work in `write(2)` and futex calls is not).

use criterion::Criterion;
use podgate_gateway::config::{AccessLogSettings, AccessLogSink};
use podgate_gateway::proxy::log_line::{write_line, RequestLog};
use podgate_gateway::proxy::{GatewayRoute, LogFields, Target};
use podgate_gateway::telemetry::access_log::AccessLog;
use podgate_gateway::telemetry::metrics::RouteMetrics;
use podgate_gateway::upstream::balance::{Backend, BackendInfo};
use podgate_gateway::upstream::Upstream;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The previous access log, as it was before per-thread batches (commit 2acc082), kept here to
/// measure against.
mod old {
    use super::LogFields;
    use std::io::Write;
    use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
    use std::time::{SystemTime, UNIX_EPOCH};

    pub struct AccessLog {
        pub tx: Option<SyncSender<Vec<u8>>>,
        pub writer: Option<std::thread::JoinHandle<()>>,
        pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    impl AccessLog {
        pub fn start(path: &str) -> AccessLog {
            let mut out = std::fs::OpenOptions::new().append(true).open(path).unwrap();
            let (tx, rx) = sync_channel::<Vec<u8>>(16 * 1024);
            let writer = std::thread::spawn(move || {
                let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
                while let Ok(line) = rx.recv() {
                    let _ = buf.write_all(&line);
                    while let Ok(more) = rx.try_recv() {
                        let _ = buf.write_all(&more);
                    }
                    let _ = buf.flush();
                }
            });
            AccessLog {
                tx: Some(tx),
                writer: Some(writer),
                dropped: Default::default(),
            }
        }

        pub fn write(&self, mut line: Vec<u8>) {
            let Some(tx) = &self.tx else { return };
            line.push(b'\n');
            match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }

        pub fn stop(&mut self) {
            self.tx = None;
            if let Some(w) = self.writer.take() {
                w.join().unwrap();
            }
        }
    }

    pub fn rfc3339(t: SystemTime) -> String {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs() as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        )
    }

    pub fn access_line(f: &LogFields) -> Vec<u8> {
        let line = serde_json::json!({
            "time": rfc3339(SystemTime::now()),
            "request_id": f.request_id,
            "client": f.client.map(|a| a.to_string()),
            "method": f.method,
            "host": f.host,
            "path": f.path,
            "route": f.route.map(|r| r.name.as_str()),
            "upstream": f.route.map(|r| r.upstream.upstream.conf.name.as_str()),
            "cluster": f.backend.and_then(|b| b.info.cluster.as_deref()),
            "pod": f.backend.and_then(|b| b.info.pod.as_deref()),
            "pod_address": f.backend.map(|b| b.addr.to_string()),
            "status": f.status,
            "bytes": f.bytes,
            "duration_ms": f.took.as_secs_f64() * 1000.0,
            "upstream_ms": f.first_byte.map(|d| d.as_secs_f64() * 1000.0),
            "retries": f.retries,
            "grpc_status": f.grpc_status,
            "ended": f.ended,
        });
        serde_json::to_vec(&line).unwrap_or_default()
    }
}

/// A route and a Pod as a request through podgate has them.
fn route_and_backend() -> (GatewayRoute, Backend) {
    let config = podgate_gateway::config::parse(
        "bench.yaml",
        "listeners: [{address: \"127.0.0.1:1\"}]\n\
         upstreams:\n  - {name: httpbin, nodes: [{address: \"127.0.0.1:2\"}]}\n\
         routes:\n  - {name: httpbin-api, path_prefix: /, upstream: httpbin}\n",
        std::path::Path::new("/"),
    )
    .expect("valid config");
    let upstream = Upstream::new(config.upstreams[0].clone()).expect("upstream");
    let route = podgate_gateway::proxy::routing::Route {
        name: "httpbin-api".into(),
        path_prefix: "/".into(),
        methods: Vec::new(),
        strip_prefix: false,
        answers_preflights: false,
        upstream: Target {
            upstream: Arc::new(upstream),
            metrics: RouteMetrics::new("httpbin-api", "httpbin"),
            policies: podgate_gateway::policies::Policies::default(),
            trusted: Default::default(),
        },
    };
    let backend = Backend {
        addr: "10.1.2.3:80".parse().unwrap(),
        weight: 1,
        info: Arc::new(BackendInfo {
            cluster: Some("prod-a".into()),
            pod: Some("httpbin-v1-6d8f9c7b5-x2k4q".into()),
            ..Default::default()
        }),
    };
    (route, backend)
}

fn fields<'a>(route: &'a GatewayRoute, backend: &'a Backend) -> LogFields<'a> {
    LogFields {
        request_id: "6a0c7b26d266c4e10000000000012345",
        client: Some("10.0.3.7:51234".parse().unwrap()),
        method: "GET",
        host: "api.example.com",
        path: "/httpbin/get/users/42",
        route: Some(route),
        backend: Some(backend),
        status: 200,
        bytes: 312,
        took: Duration::from_nanos(1_934_512),
        first_byte: Some(Duration::from_nanos(1_201_377)),
        retries: 0,
        grpc_status: None,
        ended: None,
        consumer: None,
    }
}

fn new_log() -> (RequestLog, AccessLog) {
    let log = AccessLog::start(&AccessLogSettings {
        sink: AccessLogSink::File("/dev/null".into()),
        ..AccessLogSettings::default()
    })
    .expect("open /dev/null");
    (RequestLog::new(log.clone()), log)
}

/// Busy work standing in for the rest of a request.
fn spin(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

const SPACING: Duration = Duration::from_micros(5);

fn benches(c: &mut Criterion) {
    let (route, backend) = route_and_backend();
    let f = fields(&route, &backend);

    let mut g = c.benchmark_group("access_line/format");
    g.bench_function("old", |b| {
        b.iter(|| black_box(old::access_line(black_box(&f))))
    });
    let mut out = Vec::with_capacity(1024);
    g.bench_function("new", |b| {
        b.iter(|| {
            out.clear();
            write_line(black_box(&f), &mut out);
            black_box(&out);
        })
    });
    g.finish();

    let mut old_log = old::AccessLog::start("/dev/null");
    let (new_log, new_handle) = new_log();
    let mut g = c.benchmark_group("access_line/log");
    g.bench_function("old", |b| {
        b.iter(|| old_log.write(old::access_line(black_box(&f))))
    });
    g.bench_function("new", |b| b.iter(|| new_log.log(black_box(&f))));
    g.finish();

    let mut g = c.benchmark_group("access_line/log_spaced");
    g.bench_function("spin_only", |b| b.iter(|| spin(SPACING)));
    g.bench_function("old", |b| {
        b.iter(|| {
            old_log.write(old::access_line(black_box(&f)));
            spin(SPACING);
        })
    });
    g.bench_function("new", |b| {
        b.iter(|| {
            new_log.log(black_box(&f));
            spin(SPACING);
        })
    });
    g.finish();
    old_log.stop();
    let dropped = old_log.dropped.load(std::sync::atomic::Ordering::Relaxed);
    new_handle.close();
    // A tight loop can outrun a writer; a line dropped is a line not paid for.
    println!(
        "lines dropped by a full queue: old {dropped}, new {}",
        new_handle.dropped()
    );
}

/// `ACCESS_LOG_LINES` lines of `ACCESS_LOG_WAY`, for callgrind.
fn lines_only(n: usize, way: &str) {
    let (route, backend) = route_and_backend();
    let f = fields(&route, &backend);
    match way {
        "old" => {
            let mut log = old::AccessLog::start("/dev/null");
            for _ in 0..n {
                log.write(old::access_line(black_box(&f)));
            }
            log.stop();
        }
        "new" => {
            let (log, handle) = new_log();
            for _ in 0..n {
                log.log(black_box(&f));
            }
            handle.close();
        }
        other => panic!("ACCESS_LOG_WAY is old or new, not {other:?}"),
    }
}

fn main() {
    if let Ok(n) = std::env::var("ACCESS_LOG_LINES") {
        let way = std::env::var("ACCESS_LOG_WAY").unwrap_or_default();
        lines_only(n.parse().expect("ACCESS_LOG_LINES is a number"), &way);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
