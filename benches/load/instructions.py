"""Instructions per request, counted by valgrind's callgrind: a cost figure that stays put on a busy
machine (the load benches' ratios do not). Only 127.0.0.1 is ever a target.

    python3 benches/load/instructions.py [PODGATE_BINARY] [MODE ...]

Modes: `h1` (HTTP/1.1 keep-alive client, HTTP/1.1 Pod), `h2c` (h2 by prior knowledge, HTTP/1.1
Pod), `grpc` (unary gRPC over h2c to an h2c Pod), `h1-h2c` (HTTP/1.1 client, h2c Pod), `h1-log`
(`h1` with the default access log to a file: what a line costs, the writer thread included),
`tls-h1` (`h1` over TLS 1.3, ALPN http/1.1); all by default. podgate runs under callgrind with
one worker thread and the access log off but in `h1-log` (as in the load benches); h2load sends N1 and then N2 requests, the counters zeroed before and dumped after
each batch, and the figure is (I(N2) - I(N1)) / (N2 - N1): what one more request costs, without
start-up, connection set-up or the batch's first requests. The Pods are nginx (64-byte answers)
and `demo-grpc-pod`, neither under valgrind. KEEP=DIR keeps each batch's dump there, for
`callgrind_annotate`. Needs valgrind, nginx, h2load (nghttp2-client).
"""
import os, re, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release")
N1, N2 = int(os.environ.get("N1", "2000")), int(os.environ.get("N2", "10000"))
CONNECTIONS, STREAMS = 4, 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def total_ir(path):
    """The `summary:` (or `totals:`) line of a callgrind dump: instructions executed."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"{path}: no summary line")


def h2load(url, n, mode, d):
    args = ["h2load", "-n", str(n), "-c", str(CONNECTIONS), "-t", "1"]
    if mode in ("h1", "h1-h2c", "h1-log", "tls-h1"):
        args += ["--h1", "-m", "1"]
    else:
        args += ["-m", str(STREAMS)]
    if mode == "grpc":
        args += ["-d", f"{d}/grpc-request", "-H", "content-type: application/grpc",
                 "-H", "te: trailers"]
    out = subprocess.run(args + [url], capture_output=True, text=True).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    if not done or int(done.group(1)) != n or not codes or int(codes.group(1)) != n:
        raise SystemExit(f"h2load {url}: not {n} good answers:\n{out}")


def measure(podgate, mode):
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/grpc-request", "wb") as f:
            f.write(bytes([0, 0, 0, 0, 0]))
        pod, grpc_pod, plain, h2c, admin, tls = (free_port() for _ in range(6))
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-keyout", f"{d}/key.pem", "-out",
                        f"{d}/cert.pem"], check=True, capture_output=True)
        log = (f"path: {d}/access.log" if mode == "h1-log" else "enabled: false")
        with open(f"{d}/nginx.conf", "w") as f:
            f.write(f"""daemon off; master_process off; worker_processes 1; pid {d}/n.pid;
error_log {d}/n.log; events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{pod}; location / {{ default_type text/plain;
    return 200 '{"x" * 63}\\n'; }} }} }}
""")
        with open(f"{d}/podgate.yaml", "w") as f:
            f.write(f"""listeners:
  - address: 127.0.0.1:{plain}
  - address: 127.0.0.1:{h2c}
    h2c: true
  - address: 127.0.0.1:{tls}
    tls: {{cert: {d}/cert.pem, key: {d}/key.pem}}
admin:
  address: 127.0.0.1:{admin}
server:
  threads: 1
  grace_period: 1s
  upgrade_sock: {d}/up.sock
  pid_file: {d}/podgate.pid
access_log:
  {log}
upstreams:
  - name: pods
    nodes: [{{address: "127.0.0.1:{pod}"}}]
  - name: grpc
    protocol: h2c
    nodes: [{{address: "127.0.0.1:{grpc_pod}"}}]
routes:
  - name: grpc
    path_prefix: /grpc.health.v1.Health/
    upstream: grpc
  - name: h2pod
    path_prefix: /h2pod
    upstream: grpc
  - name: all
    path_prefix: /
    upstream: pods
""")
        procs = [subprocess.Popen(["nginx", "-p", d, "-c", f"{d}/nginx.conf"]),
                 subprocess.Popen([os.path.join(TARGET, "demo-grpc-pod"),
                                   f"127.0.0.1:{grpc_pod}"], stderr=subprocess.DEVNULL)]
        out = f"{d}/cg.out"
        gw = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", podgate,
             "-c", f"{d}/podgate.yaml"],
            stdout=subprocess.DEVNULL, stderr=open(f"{d}/podgate.log", "w"),
            env=dict(os.environ, RUST_LOG="warn"))
        procs.append(gw)
        try:
            for p in (pod, grpc_pod, plain, h2c, tls):
                wait_port(p)
            url = {"h1": f"http://127.0.0.1:{plain}/",
                   "h2c": f"http://127.0.0.1:{h2c}/",
                   "grpc": f"http://127.0.0.1:{h2c}/grpc.health.v1.Health/Check",
                   "h1-h2c": f"http://127.0.0.1:{plain}/h2pod",
                   "h1-log": f"http://127.0.0.1:{plain}/",
                   "tls-h1": f"https://127.0.0.1:{tls}/"}[mode]
            h2load(url, 200, mode, d)  # warm-up: pools, caches
            counts = []
            for n in (N1, N2):
                subprocess.run(["callgrind_control", "-z", str(gw.pid)], check=True,
                               capture_output=True)
                h2load(url, n, mode, d)
                before = set(os.listdir(d))
                subprocess.run(["callgrind_control", "-d", str(gw.pid)], check=True,
                               capture_output=True)
                dumps = sorted(set(os.listdir(d)) - before)
                if not dumps:
                    # callgrind_control returns once the dump is requested; wait for the file.
                    end = time.time() + 30
                    while not dumps and time.time() < end:
                        time.sleep(0.2)
                        dumps = sorted(f for f in set(os.listdir(d)) - before
                                       if f.startswith("cg.out"))
                counts.append(total_ir(os.path.join(d, dumps[-1])))
                if os.environ.get("KEEP"):
                    # The larger batch's dump, for callgrind_annotate.
                    os.makedirs(os.environ["KEEP"], exist_ok=True)
                    shutil.copy(os.path.join(d, dumps[-1]),
                                os.path.join(os.environ["KEEP"], f"{mode}-{n}.out"))
            return (counts[1] - counts[0]) / (N2 - N1)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


def main():
    args = sys.argv[1:]
    podgate = os.path.join(TARGET, "podgate")
    if args and os.path.sep in args[0]:
        podgate = args.pop(0)
    for mode in args or ["h1", "h2c", "grpc", "h1-h2c", "h1-log", "tls-h1"]:
        print(f"{mode}: {measure(podgate, mode):,.0f} instructions per request "
              f"({podgate}, N1={N1}, N2={N2})", flush=True)


if __name__ == "__main__":
    main()
