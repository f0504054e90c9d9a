"""Deadlines at the edge (issue 21): podgate (one or more builds) against nginx 1.22 with the same
timeouts, on loopback only. See run.sh. For each gateway, a fresh process in front of one
upstream (a Python server here: `/big` answers 50 MB as fast as it is taken, anything else a
few bytes), then four cases:

  tls      FLOOD_SILENT (2000) TCP connections to the TLS listener that never send a byte and
           FLOOD_HALF (500) that send half a ClientHello: the gateway's RSS before and once it
           holds them (the difference over the connections is the memory per half-open TLS
           connection), an HTTPS request during the flood, and the time from the flood's start
           until the gateway holds none of its sockets;
  slow     an HTTP/1.1 client asks for /big, reads 1 KB a second for 12 s, then stops reading:
           the time from the start until the gateway holds neither that connection nor the
           upstream one;
  h2       an h2 client (prior knowledge, largest windows, so flow control never holds the
           gateway back) asks for /big and never reads its socket: the time until the gateway
           holds neither connection;
  stop     the gateway with its stop defaults (podgate: drain_delay 5 s, grace_period 20 s;
           nginx: `kill -QUIT`), idle after one request: signal to exit.

Timeouts, both gateways: client_header_timeout 5 s, client_body_timeout 5 s (nginx also
send_timeout 5 s, which is what podgate's client_body_timeout covers for writes), keep-alive 60 s;
nginx relays without buffering (`proxy_buffering off`), as podgate does. "Holds" is the number of
sockets in /proc/PID/fd of the gateway's processes (nginx: master and one worker).

Environment: GATEWAYS (default "nginx podgate"; podgate=PATH names a build, e.g.
"nginx before=/tmp/podgate-main after=target/release/podgate"), CASES (default "tls slow h2
stop"), FLOOD_SILENT, FLOOD_HALF, CAP (seconds to wait for a close before reporting "> CAP",
default 70), PORT_BASE (default 18400).
"""
import os, signal, socket, socketserver, ssl, struct, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "benches", "load"))
import run as load  # noqa: E402  (process helpers: rss_kib, children, wait_port, write)

BASE = int(os.environ.get("PORT_BASE", "18400"))
UPSTREAM = BASE + 1
ADMIN = BASE + 2
PORTS = {"tls": BASE + 10, "h1": BASE + 11, "h2c": BASE + 12}
CASES = os.environ.get("CASES", "tls slow h2 stop").split()
SILENT = int(os.environ.get("FLOOD_SILENT", "2000"))
HALF = int(os.environ.get("FLOOD_HALF", "500"))
CAP = float(os.environ.get("CAP", "70"))
BIG = 50 << 20
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))


def gateways():
    out = []
    for g in os.environ.get("GATEWAYS", "nginx podgate").split():
        name, _, path = g.partition("=")
        if name == "nginx":
            out.append(("nginx", None))
        else:
            out.append((name, path or os.path.join(TARGET, "release", "podgate")))
    return out


class Upstream(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        while True:
            head = b""
            while b"\r\n\r\n" not in head:
                try:
                    chunk = s.recv(4096)
                except OSError:
                    return
                if not chunk:
                    return
                head += chunk
            if head.startswith(b"GET /big"):
                chunk = b"x" * 65536
                try:
                    s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
                    for _ in range(BIG // len(chunk)):
                        s.sendall(chunk)
                except OSError:
                    return
            else:
                try:
                    s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                except OSError:
                    return


def make_cert(d):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=gateway.test",
                    "-addext", "subjectAltName=DNS:gateway.test", "-days", "2",
                    "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem"],
                   check=True, capture_output=True)


def start_nginx(d):
    load.write(f"{d}/nginx.conf", f"""daemon off; worker_processes 1; pid {d}/nginx.pid;
worker_rlimit_nofile 20000; error_log {d}/nginx-error.log;
events {{ worker_connections 16000; }}
http {{ access_log off; keepalive_timeout 60s;
  client_header_timeout 5s; client_body_timeout 5s; send_timeout 5s;
  upstream pods {{ server 127.0.0.1:{UPSTREAM}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{PORTS['tls']} ssl http2 backlog=4096;
    listen 127.0.0.1:{PORTS['h1']} backlog=4096;
    ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
    location / {{ proxy_pass http://pods; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_buffering off; }} }}
  server {{ listen 127.0.0.1:{PORTS['h2c']} http2 backlog=4096;
    location / {{ proxy_pass http://pods; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_buffering off; }} }}
}}
""")
    return subprocess.Popen(["nginx", "-p", d, "-c", f"{d}/nginx.conf"])


def start_podgate(d, binary, stop_defaults):
    timing = "" if stop_defaults else "  grace_period: 2s\n  drain_delay: 0s\n"
    load.write(f"{d}/podgate.yaml", f"""listeners:
  - address: 127.0.0.1:{PORTS['tls']}
    tls: {{cert: {d}/cert.pem, key: {d}/key.pem}}
  - address: 127.0.0.1:{PORTS['h1']}
  - address: 127.0.0.1:{PORTS['h2c']}
    h2c: true
admin:
  address: 127.0.0.1:{ADMIN}
server:
  threads: 1
{timing}  client_header_timeout: 5s
  client_body_timeout: 5s
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
    return subprocess.Popen([binary, "-c", f"{d}/podgate.yaml"],
                            stderr=open(f"{d}/podgate.log", "w"), env=env)


def pids_of(proc):
    return [proc.pid] + load.children(proc.pid)


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


def wait_sockets(pids, cond, cap):
    """Polls the gateway's socket count every 50 ms until `cond(n)` or `cap` seconds."""
    end = time.time() + cap
    while time.time() < end:
        if cond(sockets_of(pids)):
            return True
        time.sleep(0.05)
    return False


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def https_get(port):
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", port), 10) as raw:
        with tls_context().wrap_socket(raw, server_hostname="gateway.test") as s:
            s.sendall(b"GET /x HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    return data.startswith(b"HTTP/1.1 200"), time.time() - t0


def client_hello():
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls_context().wrap_bio(inc, out, server_hostname="gateway.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def linger_reset(s):
    # Closing sends a reset: no TIME_WAIT left behind.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def case_tls(proc):
    pids = pids_of(proc)
    https_get(PORTS["tls"])
    time.sleep(0.5)
    base_socks, before = sockets_of(pids), load.rss_kib(pids)
    hello = client_hello()
    conns = []
    start = time.time()
    for i in range(SILENT + HALF):
        s = socket.socket()
        linger_reset(s)
        s.connect(("127.0.0.1", PORTS["tls"]))
        if i >= SILENT:
            s.sendall(hello[: len(hello) // 2])
        conns.append(s)
    opened_in = time.time() - start
    held = wait_sockets(pids, lambda n: n >= base_socks + len(conns) - 5, 5)
    time.sleep(0.5)
    after = load.rss_kib(pids)
    ok, took = https_get(PORTS["tls"])
    closed = wait_sockets(pids, lambda n: n <= base_socks + 1, CAP)
    closed_at = time.time() - start
    for s in conns:
        s.close()
    return {
        "per_conn": (after - before) * 1024 / len(conns), "held": held,
        "during": f"{'200' if ok else 'failed'} in {took * 1000:.0f} ms",
        "closed": f"{closed_at:.1f} s" if closed else f"> {CAP:.0f} s",
        "opened": len(conns), "hello": len(hello), "opened_in": opened_in,
    }


def case_slow(proc):
    """Polls the gateway's sockets while the client reads, so that a close during the 12 s
    of reading is timed when it happens, not when the reading ends."""
    pids = pids_of(proc)
    base = sockets_of(pids)
    s = socket.socket()
    linger_reset(s)
    s.connect(("127.0.0.1", PORTS["h1"]))
    s.settimeout(0.05)
    start = time.time()
    s.sendall(b"GET /big HTTP/1.1\r\nHost: slow.test\r\n\r\n")
    # Timed only once the gateway holds both connections (the client's, the upstream one).
    held = wait_sockets(pids, lambda n: n >= base + 2, 5)
    closed_at, next_read, reading = None, start, True
    while reading and time.time() - start < 12:
        if time.time() >= next_read:
            next_read += 1
            try:
                reading = bool(s.recv(1024))
            except socket.timeout:
                pass
            except OSError:
                reading = False
        if closed_at is None and sockets_of(pids) <= base:
            closed_at = time.time() - start
        time.sleep(0.05)
    stopped = time.time() - start
    if closed_at is None and wait_sockets(pids, lambda n: n <= base, CAP):
        closed_at = time.time() - start
    took = time.time() - start
    s.close()
    return {"closed": f"{closed_at:.1f} s" if closed_at is not None else f"> {took:.0f} s",
            "note": f"reading stopped at {stopped:.0f} s", "held": held}


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream & 0x7FFFFFFF) + payload


def case_h2(proc):
    pids = pids_of(proc)
    base = sockets_of(pids)
    s = socket.socket()
    linger_reset(s)
    s.connect(("127.0.0.1", PORTS["h2c"]))
    window = 0x7FFFFFFF
    path = b"/big"
    block = bytes([0x82, 0x86, 0x04, len(path)]) + path + bytes([0x01, 0x01]) + b"a"
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0, 0, struct.pack(">HI", 4, window))
              + frame(0x8, 0, 0, struct.pack(">I", window - 65535))
              + frame(0x1, 0x5, 1, block))
    start = time.time()
    held = wait_sockets(pids, lambda n: n >= base + 2, 5)
    closed = wait_sockets(pids, lambda n: n <= base, CAP)
    took = time.time() - start
    s.close()
    return {"closed": f"{took:.1f} s" if closed else f"> {took:.0f} s", "held": held}


def case_stop(proc, name):
    ok, _ = https_get(PORTS["tls"])
    time.sleep(0.5)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
    try:
        proc.wait(60)
        took = f"{time.time() - t0:.1f} s"
    except subprocess.TimeoutExpired:
        took = "> 60 s"
    return {"stopped": took}


def stop(proc):
    """Ends the gateway and every process of it: a SIGKILLed nginx master leaves its worker
    listening on the ports."""
    pids = pids_of(proc) if proc.poll() is None else []
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    end = time.time() + 10
    while any(os.path.exists(f"/proc/{p}/fd") for p in pids[1:]) and time.time() < end:
        time.sleep(0.05)


def run_case(case, name, binary):
    with tempfile.TemporaryDirectory() as d:
        make_cert(d)
        load.ensure_free(list(PORTS.values()))
        if name == "nginx":
            proc = start_nginx(d)
        else:
            proc = start_podgate(d, binary, stop_defaults=(case == "stop"))
        try:
            for p in PORTS.values():
                load.wait_port(p)
            # The ports must be this process's: one that failed to bind would have another's
            # server measured. nginx: its worker must exist before its sockets are counted.
            end = time.time() + 10
            while name == "nginx" and not load.children(proc.pid) and time.time() < end:
                time.sleep(0.05)
            time.sleep(0.3)
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited at start ({proc.returncode}): see {d}")
            if case == "tls":
                return case_tls(proc)
            if case == "slow":
                return case_slow(proc)
            if case == "h2":
                return case_h2(proc)
            return case_stop(proc, name)
        finally:
            stop(proc)


def main():
    import resource
    need = SILENT + HALF + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
    load.ensure_free([UPSTREAM, ADMIN] + list(PORTS.values()))
    up = Upstream(("127.0.0.1", UPSTREAM), Handler)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    results = {}
    la = os.getloadavg()
    for case in CASES:
        for name, binary in gateways():
            r = results[(case, name)] = run_case(case, name, binary)
            print(f"{case} {name}: {r}", file=sys.stderr)
    up.shutdown()
    print(f"\n## Deadlines at the edge, load average at start {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    print(", ".join(f"{n}: {b or 'nginx 1.22, master + 1 worker'}" for n, b in gateways()))
    print()
    print("| case | gateway | result |")
    print("|---|---|---|")
    for (case, name), r in results.items():
        if case == "tls":
            held = "" if r["held"] else " (never seen holding the flood: not measured)"
            text = (f"{r['per_conn']:,.0f} B per half-open connection ({r['opened']} open, "
                    f"ClientHello {r['hello']} B, opened in {r['opened_in']:.1f} s); all closed "
                    f"{r['closed']} after the flood began; "
                    f"HTTPS during the flood: {r['during']}{held}")
        elif case == "stop":
            text = f"idle, signal to exit: {r['stopped']}"
        else:
            text = f"both connections closed {r['closed']} after the request" + \
                (f" ({r['note']})" if "note" in r else "")
            if not r["held"]:
                text += " (never seen holding both connections: not measured)"
        print(f"| {case} | {name} | {text} |")


if __name__ == "__main__":
    main()
