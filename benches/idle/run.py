"""Memory per client connection: podgate against nginx, idle and mid-head. See run.sh.

Only loopback addresses are ever targets. For each phase and gateway, a fresh gateway process is
started in front of one upstream server (the load bench's nginx upstream), then:

  idle      N keep-alive connections each send one request, read the whole answer, and stay open
            (an edge gateway's ordinary state: mobile clients that keep a connection and go quiet);
  mid-head  N connections each send half a request head (`GET / HTTP/1.1\\r\\nHost: x\\r\\nX-A: `)
            and then nothing (a slow or malicious client, inside the 60 s head deadline);
  tls       as `idle`, over TLS (HTTP/1.1 by ALPN, TLS 1.3, the same self-signed P-256 certificate
            for both gateways; nginx with its default session settings: `ssl_session_cache none`,
            session tickets on, as podgate's rustls sends tickets too).

The gateway's RSS (VmRSS of all its processes: nginx master and worker) is read before the
connections open and after they settled; the difference over N is the cost per connection. The
number of sockets the gateway holds is counted too, so that a figure never rests on connections
the gateway did not accept.

Environment: N (default 8000), SETTLE seconds (default 2), PODGATE (a podgate binary; default
$CARGO_TARGET_DIR/release/podgate or target/release/podgate), PHASES (default "idle midhead"),
GATEWAYS (default "nginx podgate"); PHASES may add "tls". PORT_BASE
(default 18200) moves every port. The whole run stops itself after LIMIT seconds (default 110).
"""
import math, os, resource, signal, socket, ssl, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "benches", "load"))
import run as load  # noqa: E402  (the load bench: its upstream server and process helpers)

N = int(os.environ.get("N", "8000"))
SETTLE = float(os.environ.get("SETTLE", "2"))
LIMIT = int(os.environ.get("LIMIT", "110"))
PHASES = os.environ.get("PHASES", "idle midhead").split()
GATEWAYS = os.environ.get("GATEWAYS", "nginx podgate").split()
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))
PODGATE = os.environ.get("PODGATE", os.path.join(TARGET, "release", "podgate"))
# Ports apart from the load bench's, so both can run on one machine (not at the same time, though:
# they share the CPUs).
BASE = int(os.environ.get("PORT_BASE", "18200"))
UPSTREAM = BASE + 1
PORTS = {"nginx": BASE + 11, "podgate": BASE + 12}
PODGATE_ADMIN = BASE + 13
REQUEST = b"GET / HTTP/1.1\r\nHost: idle.test\r\nUser-Agent: idle-bench\r\nAccept: */*\r\n\r\n"
HALF_HEAD = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: "
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class TimeUp(Exception):
    pass


def raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        # Raising the hard limit needs CAP_SYS_RESOURCE; up to it, anyone may.
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError) as e:
        if hard < need:
            raise SystemExit(f"N={N} needs {need} open files; the hard limit is {hard} "
                             f"and cannot be raised here ({e}): lower N or raise it (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def source_ips():
    """Source addresses for the clients: more than one when one address has too few ports."""
    lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    per_ip = (hi - lo) // 2  # leave room for other users of the machine
    return [f"127.0.0.{1 + i}" for i in range(max(1, math.ceil(N / per_ip)))]


def sockets_of(pids):
    n = 0
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        n += 1
                except OSError:
                    pass
        except FileNotFoundError:
            pass
    return n


def pids_of(proc):
    return [proc.pid] + load.children(proc.pid)


def make_cert(d):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=idle.test",
                    "-addext", "subjectAltName=DNS:idle.test", "-days", "2",
                    "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem"],
                   check=True, capture_output=True)


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def start_nginx(d, tls):
    port = PORTS["nginx"]
    listen = f"listen 127.0.0.1:{port} ssl backlog=4096; ssl_certificate {d}/cert.pem; " \
             f"ssl_certificate_key {d}/key.pem;" if tls else f"listen 127.0.0.1:{port} backlog=4096;"
    # Master and one worker, as nginx runs in production; both count in the RSS.
    load.write(f"{d}/nginx.conf", f"""daemon off; worker_processes 1; pid {d}/nginx.pid;
worker_rlimit_nofile {N + 1024}; error_log {d}/nginx-error.log;
events {{ worker_connections {N + 1024}; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 75s;
  upstream pods {{ server 127.0.0.1:{UPSTREAM}; keepalive 64; }}
  server {{ {listen} location / {{ proxy_pass http://pods;
    proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}
""")
    return subprocess.Popen(["nginx", "-p", d, "-c", f"{d}/nginx.conf"])


def start_podgate(d, name, tls):
    port = PORTS[name]
    cert = f"\n    tls: {{cert: {d}/cert.pem, key: {d}/key.pem}}" if tls else ""
    load.write(f"{d}/podgate.yaml", f"""listeners:
  - address: 127.0.0.1:{port}{cert}
admin:
  address: 127.0.0.1:{PODGATE_ADMIN}
server:
  threads: 1
  grace_period: 1s
  upgrade_sock: {d}/podgate-upgrade.sock
  pid_file: {d}/podgate.pid
access_log:
  enabled: false
upstreams:
  - name: pods
    nodes: [{{address: "127.0.0.1:{UPSTREAM}"}}]
routes:
  - name: all
    path_prefix: /
    upstream: pods
""")
    env = dict(os.environ, RUST_LOG="warn")
    return subprocess.Popen([PODGATE, "-c", f"{d}/podgate.yaml"],
                            stderr=open(f"{d}/podgate.log", "w"), env=env)


def read_answer(s):
    """Reads one whole answer (Content-Length framed, as both gateways send it here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("closed before the answer's head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"unexpected answer: {head[:40]!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("closed inside the answer's body")
        body += chunk


def open_clients(port, phase, ips):
    """Opens N connections to `port`; returns them and how many failed."""
    conns, failed = [], 0
    ctx = tls_context() if phase == "tls" else None
    per_ip = math.ceil(N / len(ips))
    for i in range(N):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Closing sends a reset: no TIME_WAIT left behind to eat the next phase's ports.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.settimeout(5)
        try:
            if len(ips) > 1:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((ips[i // per_ip], 0))
            s.connect(("127.0.0.1", port))
            if ctx:
                s = ctx.wrap_socket(s, server_hostname="idle.test")
            if phase in ("idle", "tls"):
                s.sendall(REQUEST)
                read_answer(s)
            else:
                s.sendall(HALF_HEAD)
            conns.append(s)
        except OSError as e:
            failed += 1
            if failed <= 3:
                print(f"  connection {i} to {port}: {e}", file=sys.stderr)
            s.close()
    return conns, failed


def warm_up(port, tls):
    """A few requests on one connection: lazily built state (pools, statics) is not counted."""
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        s = tls_context().wrap_socket(raw, server_hostname="idle.test") if tls else raw
        for _ in range(20):
            s.sendall(REQUEST)
            read_answer(s)


def measure(gateway, phase, ips):
    with tempfile.TemporaryDirectory() as d:
        tls = phase == "tls"
        if tls:
            make_cert(d)
        proc = start_nginx(d, tls) if gateway == "nginx" else start_podgate(d, gateway, tls)
        conns = []
        try:
            load.wait_port(PORTS[gateway])
            warm_up(PORTS[gateway], tls)
            time.sleep(0.5)
            pids = pids_of(proc)
            before, socks_before = load.rss_kib(pids), sockets_of(pids)
            t0 = time.time()
            conns, failed = open_clients(PORTS[gateway], phase, ips)
            opened = time.time() - t0
            time.sleep(SETTLE)
            pids = pids_of(proc)
            after, socks_after = load.rss_kib(pids), sockets_of(pids)
            if proc.poll() is not None:
                raise SystemExit(f"{gateway} exited during the {phase} phase")
            return {
                "before": before, "after": after, "held": socks_after - socks_before,
                "opened": len(conns), "failed": failed, "seconds": opened,
                "per_conn": (after - before) * 1024 / max(1, len(conns)),
            }
        finally:
            for s in conns:
                s.close()
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            # The next start binds the same port: wait until nothing answers on it.
            end = time.time() + 10
            while time.time() < end:
                try:
                    socket.create_connection(("127.0.0.1", PORTS[gateway]), 0.2).close()
                    time.sleep(0.05)
                except OSError:
                    break


def on_alarm(_sig, _frame):
    raise TimeUp()


def main():
    if any(g.startswith("podgate") for g in GATEWAYS) and not os.access(PODGATE, os.X_OK):
        raise SystemExit(f"no podgate binary at {PODGATE} (build it, or set PODGATE)")
    # The clients' sockets here, and the gateways' (they inherit the limit).
    raise_fd_limit(N + 1024)
    ips = source_ips()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(LIMIT)
    load.BASE = BASE
    load.ensure_free([UPSTREAM, PODGATE_ADMIN] + list(PORTS.values()))
    load_avg = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        load.UPSTREAMS = [UPSTREAM]
        up = load.start_upstreams(d)
        try:
            for phase in PHASES:
                for gw in GATEWAYS:
                    r = results[(phase, gw)] = measure(gw, phase, ips)
                    print(f"{phase} {gw}: {r['opened']} connections in {r['seconds']:.1f} s, "
                          f"{r['per_conn']:,.0f} B each", file=sys.stderr)
        except TimeUp:
            print(f"stopped after {LIMIT} s (LIMIT); partial results below", file=sys.stderr)
        finally:
            signal.alarm(0)
            up.terminate()
            try:
                up.wait(5)
            except subprocess.TimeoutExpired:
                up.kill()
    print(f"\n## Memory per client connection, N={N}, source addresses {', '.join(ips)}")
    print(f"podgate: {PODGATE} (1 worker thread); nginx: master + 1 worker; settle {SETTLE:g} s; "
          f"load average at start {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}\n")
    print("| phase | gateway | connections held | RSS before MiB | RSS after MiB | bytes per connection | vs nginx |")
    print("|---|---|---|---|---|---|---|")
    for (phase, gw), r in results.items():
        base = results.get((phase, "nginx"))
        ratio = (f"{r['per_conn'] / base['per_conn']:.1f}×"
                 if base and base["per_conn"] > 0 else "—")
        note = f" ({r['failed']} failed)" if r["failed"] else ""
        print(f"| {phase} | {gw} | {r['held']:,} of {r['opened']:,}{note} | {r['before'] / 1024:.1f} | "
              f"{r['after'] / 1024:.1f} | {r['per_conn']:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
