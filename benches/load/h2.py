"""h2 and gRPC load benchmark: podgate against nginx in front of the same upstreams, h2load as
the client. Only 127.0.0.1 is ever a target. Run through h2.sh (which builds podgate).

Modes (arguments; all by default):
  h2c   h2 by prior knowledge to the proxy, HTTP/1.1 upstreams (nginx returning 64 bytes)
  tls   the same over TLS with ALPN h2 (self-signed certificate), the issue's production shape
  tls-h1  HTTP/1.1 over TLS 1.3 (h2load --h1: ALPN http/1.1, one request at a time on each of
        the connections), HTTP/1.1 upstreams: TLS as most HTTPS clients (curl, browsers'
        fallback, load balancers' health checks, service meshes' HTTP/1.1) use it
  grpc  unary gRPC calls (h2load with gRPC framing: one 5-byte message, `te: trailers`) to
        gRPC upstreams speaking h2c; nginx proxies them with `grpc_pass`, podgate with
        `protocol: h2c`. The upstreams are demo-grpc-pod (hyper's h2 server answering
        grpc.health.v1 Check with SERVING and `grpc-status: 0` in trailers, about 87k calls/s
        on one core), so that neither proxy waits on a slow Pod. (nginx as a fake gRPC
        upstream answered before reading the request, and nginx's grpc_pass then failed on
        the late frames of those streams: "upstream sent frame for unknown stream".)

The proxies run one worker pinned to CPU 1; h2load and the upstreams share CPU 0. Each round
runs nginx, then podgate; ratios are taken within a round, and the median across rounds reported.
nginx keeps 512 idle connections to each upstream group (more than the 320 requests in flight,
so that it never closes one it will need again; podgate's pool keeps 1024 per thread).
PROFILE=podgate (or nginx) records `perf` samples of that proxy in round 1 into target/;
PERF_ARGS replaces perf's call-graph option (default `-g`; Rust frames need `--call-graph dwarf,16384`).
"""
import os, re, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the HTTP/1.1 bench: its upstreams, helpers and binaries)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "32"))
STREAMS = int(os.environ.get("STREAMS", "10"))
BASE = run.BASE
NGINX, PODGATE_PORT, ADMIN = BASE + 31, BASE + 32, BASE + 33
GRPC_UPSTREAMS = [BASE + 34, BASE + 35, BASE + 36]
# grpc.health.v1.HealthCheckRequest{} (empty message) in a gRPC frame.
GRPC_REQUEST = bytes([0, 0, 0, 0, 0])
GRPC_PATH = "/grpc.health.v1.Health/Check"
GRPC_POD = os.environ.get("GRPC_POD", os.path.join(run.TARGET, "release", "demo-grpc-pod"))


def start_grpc_upstreams(d):
    """Three demo gRPC Pods (src/bin/demo-grpc-pod.rs), on CPU 0 like the other upstreams."""
    procs = [subprocess.Popen(["taskset", "-c", "0", GRPC_POD, f"127.0.0.1:{p}"],
                              stderr=subprocess.DEVNULL) for p in GRPC_UPSTREAMS]
    for port in GRPC_UPSTREAMS:
        run.wait_port(port)
    return procs


def make_cert(d):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", f"{d}/key.pem", "-out",
                    f"{d}/cert.pem"], check=True, capture_output=True)


def start_proxies(d, tls):
    ups = "\n".join(f"    server 127.0.0.1:{p};" for p in run.UPSTREAMS)
    gups = "\n".join(f"    server 127.0.0.1:{p};" for p in GRPC_UPSTREAMS)
    listen = f"127.0.0.1:{NGINX} ssl http2" if tls else f"127.0.0.1:{NGINX} http2"
    ssl = (f"ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;"
           " ssl_protocols TLSv1.3;") if tls else ""
    run.write(f"{d}/nginx.conf", f"""daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/nginx-error.log; events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream pods {{
{ups}
    keepalive 512;
  }}
  upstream grpcpods {{
{gups}
    keepalive 512;
  }}
  server {{ listen {listen}; {ssl}
    location {GRPC_PATH} {{ grpc_pass grpc://grpcpods; }}
    location / {{ proxy_pass http://pods; proxy_http_version 1.1;
      proxy_set_header Connection ""; }}
  }}
}}
""")
    procs = {"nginx": subprocess.Popen(["taskset", "-c", "1", "nginx", "-p", d, "-c",
                                        f"{d}/nginx.conf"])}
    nodes = ", ".join(f'{{address: "127.0.0.1:{p}"}}' for p in run.UPSTREAMS)
    gnodes = ", ".join(f'{{address: "127.0.0.1:{p}"}}' for p in GRPC_UPSTREAMS)
    listener = (f"    tls: {{cert: {d}/cert.pem, key: {d}/key.pem}}\n" if tls
                else "    h2c: true\n")
    run.write(f"{d}/podgate.yaml", f"""listeners:
  - address: 127.0.0.1:{PODGATE_PORT}
{listener}admin:
  address: 127.0.0.1:{ADMIN}
server:
  threads: 1
  grace_period: 1s
  upgrade_sock: {d}/podgate-upgrade.sock
  pid_file: {d}/podgate.pid
access_log:
  enabled: false
upstreams:
  - name: pods
    nodes: [{nodes}]
  - name: grpc
    protocol: h2c
    nodes: [{gnodes}]
routes:
  - name: grpc
    path_prefix: /grpc.health.v1.Health/
    upstream: grpc
  - name: all
    path_prefix: /
    upstream: pods
""")
    env = dict(os.environ, RUST_LOG="warn")
    procs["podgate"] = subprocess.Popen(
        ["taskset", "-c", "1", run.PODGATE, "-c", f"{d}/podgate.yaml"],
        stderr=open(f"{d}/podgate.log", "w"), env=env)
    for port in (NGINX, PODGATE_PORT):
        run.wait_port(port)
    return procs


def h2load(port, tls, grpc, seconds, d, h1=False):
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}" + (GRPC_PATH if grpc else "/")
    # HTTP/1.1: one request at a time per connection (h2load would pipeline with -m > 1).
    streams = ["--h1", "-m1"] if h1 else [f"-m{STREAMS}"]
    args = ["taskset", "-c", "0", "h2load", "-t1", f"-c{CONNECTIONS}", *streams,
            f"-D{seconds}", "--warm-up-time=1"]
    if grpc:
        args += ["-d", f"{d}/grpc-request", "-H", "content-type: application/grpc",
                 "-H", "te: trailers"]
    out = subprocess.run(args + [url], capture_output=True, text=True).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if not m or not codes or not done:
        raise SystemExit(f"h2load against {url} gave no result:\n{out}")
    bad = int(done.group(1)) - int(codes.group(1))
    return float(m.group(1)), bad, int(done.group(1))


def bench(mode):
    tls, grpc, h1 = mode in ("tls", "tls-h1"), mode == "grpc", mode == "tls-h1"
    run.ensure_free(run.UPSTREAMS + GRPC_UPSTREAMS + [NGINX, PODGATE_PORT, ADMIN])
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/grpc-request", "wb") as f:
            f.write(GRPC_REQUEST)
        if tls:
            make_cert(d)
        ups = [run.start_upstreams(d)] + start_grpc_upstreams(d)
        procs = {}
        try:
            procs = start_proxies(d, tls)
            ports = {"nginx": NGINX, "podgate": PODGATE_PORT}
            for n, p in ports.items():
                h2load(p, tls, grpc, 2, d, h1)
            what = {"h2c": "h2 prior knowledge, HTTP/1.1 upstreams",
                    "tls": "h2 over TLS 1.3 (ALPN), HTTP/1.1 upstreams",
                    "tls-h1": "HTTP/1.1 over TLS 1.3 (ALPN http/1.1), HTTP/1.1 upstreams",
                    "grpc": "unary gRPC over h2c, h2c gRPC upstreams (nginx: grpc_pass)"}[mode]
            print(f"\n## {mode}: {what}")
            streams = "--h1 -m1" if h1 else f"-m{STREAMS}"
            print(f"h2load -t1 -c{CONNECTIONS} {streams} -D{DURATION}, 1 proxy worker on CPU 1, "
                  f"h2load and upstreams on CPU 0, {ROUNDS} rounds\n")
            print("| round | proxy | req/s | vs nginx | CPU µs/req | user | system | not 2xx |")
            print("|---|---|---|---|---|---|---|---|")
            ratios, rps_all = [], {n: [] for n in ports}
            cpu_all = {n: [] for n in ports}
            for r in range(1, ROUNDS + 1):
                row = {}
                for n, p in ports.items():
                    pids = [procs[n].pid] + run.children(procs[n].pid)
                    perf = None
                    if os.environ.get("PROFILE") == n and r == 1:
                        # Where the proxy's CPU time goes while h2load runs (perf report -i).
                        perf = subprocess.Popen(
                            ["perf", "record", "-F", "499", *os.environ.get("PERF_ARGS", "-g").split(), "-o",
                             f"{run.TARGET}/perf-h2-{mode}-{n}.data", "-p", str(procs[n].pid),
                             "--", "sleep", str(DURATION)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    before = run.cpu_split(pids)
                    rps, bad, done = h2load(p, tls, grpc, DURATION, d, h1)
                    if perf:
                        perf.wait()
                    # h2load's warm-up second is in the CPU time too: a small overestimate,
                    # alike for both proxies.
                    user, system = ((b - a) * 1e6 / max(1, done)
                                    for a, b in zip(before, run.cpu_split(pids)))
                    cpu = user + system
                    row[n] = (rps, bad, cpu, user, system)
                    rps_all[n].append(rps)
                    cpu_all[n].append(cpu)
                ratios.append(row["podgate"][0] / row["nginx"][0])
                for n in ports:
                    rps, bad, cpu, user, system = row[n]
                    print(f"| {r} | {n} | {rps:,.0f} | {rps / row['nginx'][0]:.2f} | "
                          f"{cpu:.1f} | {user:.1f} | {system:.1f} | {bad} |")
            print(f"\n**{mode}: podgate / nginx req/s, median of {ROUNDS} rounds: "
                  f"{statistics.median(ratios):.2f}** (rounds: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)}); median CPU µs/req nginx "
                  f"{statistics.median(cpu_all['nginx']):.1f}, podgate "
                  f"{statistics.median(cpu_all['podgate']):.1f}")
            print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            for p in list(procs.values()) + ups:
                p.terminate()
            for p in list(procs.values()) + ups:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
            time.sleep(0.5)


if __name__ == "__main__":
    modes = sys.argv[1:] or ["h2c", "tls", "tls-h1", "grpc"]
    for mode in modes:
        if mode not in ("h2c", "tls", "tls-h1", "grpc"):
            raise SystemExit(f"unknown mode {mode}: use h2c, tls, tls-h1 or grpc")
        bench(mode)
