"""Load benchmark driver: see run.sh. Only 127.0.0.1 is ever a target.

Each round runs every proxy once, in turn (A B C D A B C D ...), so that drift of the machine
hits all of them alike; ratios are taken within a round and the median across rounds reported.

Each mode (pinned, unpinned) runs twice, like with like: first with access logs on for both
proxies, as users run them (podgate's default JSON line to a file, nginx's default `combined`
line to a file: `access_log FILE combined;`), then with access logs off for all. HAProxy (which
logs to syslog only) and the bare Pingora proxy (no access log) run only in the logs-off part.
LOGS="on" or LOGS="off" runs one part only.

POLICY=NAME adds a contestant "podgate-policy": the same podgate binary whose one route carries
route policies, beside plain "podgate", so a policy's cost is a ratio within one run. NAME:
api_key (every request sends a valid `x-api-key`), jwt (an HS256 bearer token, verified once and
then from podgate's cache), rate_local (a local `client_ip` limit high enough to admit all),
rate_exact and rate_batched (the same limit in a redis-server started for the run, one Redis call
per request or leases of 100). For the rate limits nginx gets a second server, "nginx-limit",
with `limit_req` (local, `$binary_remote_addr`, as high a rate): nginx's peer figure. Every
proxy gets the same request headers. Run with PROXIES="nginx podgate podgate-policy".

SYSCALLS=1 counts, with `perf stat` on each proxy while wrk runs, its futex calls, writes
(write, writev, pwrite64) and context switches per request. The counting slows every proxy, so
its req/s are not the ones to quote.

Every round's row also shows how busy each CPU was while wrk ran (pinned: CPU 1 the proxy's, CPU 0
wrk's and the upstreams') and the CPU the upstreams and wrk spent per request. When CPU 0 is near
100 % too, the round's req/s is bounded by the load generator as much as by the proxy, and the
proxy's CPU µs per request is the fairer comparison.
"""
import os, re, resource, statistics, subprocess, sys, tempfile, time, socket

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "64"))
BODY = "x" * 63 + "\n"  # 64 bytes
# Every port is PORT_BASE + a fixed offset, so that runs can move out of another program's way.
BASE = int(os.environ.get("PORT_BASE", "18080"))
UPSTREAMS = [BASE + 21, BASE + 22, BASE + 23]
PORTS = {"nginx": BASE + 1, "haproxy": BASE + 2, "bare-pingora": BASE + 3, "podgate": BASE + 4}
PODGATE_ADMIN = BASE + 10  # one per podgate contestant, counting up
# A/B of a change in the same run: BASELINE=/path/to/an/older/podgate adds it as a contestant,
# with the same config.
BASELINE = os.environ.get("BASELINE")
if BASELINE:
    PORTS["podgate-baseline"] = BASE + 6
POLICY = os.environ.get("POLICY")
if POLICY:
    PORTS["podgate-policy"] = BASE + 7
    if POLICY.startswith("rate"):
        PORTS["nginx-limit"] = BASE + 8
REDIS_PORT = BASE + 9
# The credential every request carries (to every proxy alike, so all parse the same bytes).
API_KEY = "bench-key-4f1c9a2e7d3b8a60"
JWT_SECRET = "bench-secret-of-at-least-32-bytes-0123456789"
# PROXIES="nginx podgate" runs only those (nginx always: ratios are to it).
PROXIES = os.environ.get("PROXIES")
if PROXIES:
    PORTS = {n: p for n, p in PORTS.items() if n == "nginx" or n in PROXIES.split()}
# Binaries: cargo's target directory (CARGO_TARGET_DIR, as run.sh built them), or PODGATE.
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))
PODGATE = os.environ.get("PODGATE", os.path.join(TARGET, "release", "podgate"))
BARE_PINGORA = os.environ.get("BARE_PINGORA",
                              os.path.join(TARGET, "release", "examples", "bare-pingora"))
LOGS = os.environ.get("LOGS", "on off").split()
# Proxies that write an access log file like nginx does; the others run with logs off only.
LOGGING = {"nginx", "podgate", "podgate-baseline", "podgate-policy", "nginx-limit"}
SYSCALLS = os.environ.get("SYSCALLS") == "1"
PERF_EVENTS = ["syscalls:sys_enter_futex", "syscalls:sys_enter_write",
               "syscalls:sys_enter_writev", "syscalls:sys_enter_pwrite64", "context-switches"]


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def ensure_free(ports):
    """A port another program listens on would have its server measured instead of ours."""
    for port in ports:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
        except OSError:
            continue
        raise SystemExit(f"127.0.0.1:{port} is in use by another program: "
                         f"choose other ports with PORT_BASE (now {BASE})")


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def cpu_split(pids):
    """(user, system) CPU seconds of the processes so far (all their threads). System time is
    the kernel's work for the proxy's system calls, and on loopback also the receive path of
    what it sends (the kernel delivers a packet in the sender's context)."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
        except FileNotFoundError:
            pass
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def core_ticks():
    """(busy, total) clock ticks of each CPU so far, from /proc/stat."""
    ticks = []
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in values]
                idle = v[3] + v[4]  # idle + iowait
                ticks.append((sum(v[:8]) - idle, sum(v[:8])))
    return ticks


def core_busy(before, after):
    """Percent busy of each CPU between two `core_ticks`: pinned, CPU 1 is the proxy's core and
    CPU 0 wrk's and the upstreams'. A proxy core below ~100 % means the round's req/s was set by
    CPU 0 (the load generator), not by the proxy; both near 100 % means both bound it."""
    return [100.0 * (b1 - b0) / max(1, t1 - t0) for (b0, t0), (b1, t1) in zip(before, after)]


def children_cpu():
    """User + system CPU seconds of this script's finished children (wrk runs as one)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_seconds(pids):
    """User + system CPU time of the processes so far (all their threads)."""
    return sum(cpu_split(pids))


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def start_upstreams(d):
    servers = "\n".join(
        f"  server {{ listen 127.0.0.1:{p} reuseport; access_log off; "
        f"location / {{ default_type text/plain; return 200 '{BODY[:-1]}\\n'; }} }}"
        for p in UPSTREAMS
    )
    conf = f"""daemon off; master_process off; worker_processes 1; pid {d}/up.pid;
error_log {d}/up-error.log; events {{ worker_connections 4096; }}
http {{ keepalive_requests 1000000;
{servers}
}}
"""
    write(f"{d}/upstreams.conf", conf)
    p = subprocess.Popen(["taskset", "-c", "0", "nginx", "-p", d, "-c", f"{d}/upstreams.conf"])
    for port in UPSTREAMS:
        wait_port(port)
    return p


def access_log_path(d, name):
    return f"{d}/{name}-access.log"


def nginx_limit():
    """nginx's peer of a local rate limit: a second server with `limit_req` (same process)."""
    if "nginx-limit" not in PORTS:
        return ""
    return (f"  limit_req_zone $binary_remote_addr zone=bench:10m rate=10000000r/s;\n"
            f"  server {{ listen 127.0.0.1:{PORTS['nginx-limit']}; location / {{ "
            f"limit_req zone=bench burst=1000000 nodelay; proxy_pass http://pods; "
            f"proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n")


def jwt_token():
    """An HS256 token for `JWT_SECRET`, valid for a day."""
    import base64, hashlib, hmac, json
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "bench", "exp": int(time.time()) + 86400}).encode())
    sig = b64(hmac.new(JWT_SECRET.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


def request_headers():
    """What every request carries (wrk -H), whatever the proxy."""
    if POLICY == "api_key":
        return [f"x-api-key: {API_KEY}"]
    if POLICY == "jwt":
        return [f"authorization: Bearer {jwt_token()}"]
    return []


def policy_conf(d):
    """Top-level config and the route's `policies:` for POLICY."""
    write(f"{d}/bench.keys", API_KEY + "\n")
    write(f"{d}/bench.secret", JWT_SECRET)
    rule = "{key: client_ip, rate: 100000000/s, burst: 1000000"
    top = {
        "api_key": "consumers: [{name: bench, api_keys_file: bench.keys}]\n",
        "jwt": "jwt_providers: [{name: bench, secret_file: bench.secret}]\n",
        "rate_local": "",
        "rate_exact": "rate_limit_stores: [{name: r, redis: "
                      f"\"redis://127.0.0.1:{REDIS_PORT}/0\", timeout: 100ms}}]\n",
        "rate_batched": "rate_limit_stores: [{name: r, redis: "
                        f"\"redis://127.0.0.1:{REDIS_PORT}/0\", timeout: 100ms, mode: batched, "
                        "lease: 100}]\n",
    }
    route = {
        "api_key": "{auth: {api_key: {}}}",
        "jwt": "{auth: {jwt: bench}}",
        "rate_local": f"{{rate_limit: [{rule}}}]}}",
        "rate_exact": f"{{rate_limit: [{rule}, store: r}}]}}",
        "rate_batched": f"{{rate_limit: [{rule}, store: r}}]}}",
    }
    if POLICY not in top:
        raise SystemExit(f"POLICY={POLICY}: one of {', '.join(top)}")
    return top[POLICY], route[POLICY]


def start_proxies(d, threads, pin, procs, names, logs):
    """Starts the proxies `names` into `procs` (filled as they start, so a failure stops the
    others), with access logs to files in `d` if `logs`."""
    pre = ["taskset", "-c", "1"] if pin else []
    nginx_log = f"access_log {access_log_path(d, 'nginx')} combined;" if logs else "access_log off;"
    ups = "\n".join(f"    server 127.0.0.1:{p};" for p in UPSTREAMS)
    write(f"{d}/nginx.conf", f"""daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;
error_log {d}/nginx-error.log; events {{ worker_connections 4096; }}
http {{ {nginx_log} keepalive_requests 1000000;
  upstream pods {{
{ups}
    keepalive 64;
  }}
  server {{ listen 127.0.0.1:{PORTS['nginx']}; location / {{ proxy_pass http://pods;
    proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
{nginx_limit()}}}
""")
    if threads > 1:
        # master_process off runs a single worker; with several, nginx needs its master.
        text = open(f"{d}/nginx.conf").read().replace("master_process off; worker_processes 1;",
                                                      f"worker_processes {threads};")
        write(f"{d}/nginx.conf", text)
    procs["nginx"] = subprocess.Popen(pre + ["nginx", "-p", d, "-c", f"{d}/nginx.conf"])
    if "nginx-limit" in names:
        # The same nginx process serves both; each is measured while only it has traffic.
        procs["nginx-limit"] = procs["nginx"]

    servers = "\n".join(f"  server u{i} 127.0.0.1:{p}" for i, p in enumerate(UPSTREAMS))
    write(f"{d}/haproxy.cfg", f"""global
  nbthread {threads}
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:{PORTS.get('haproxy', 0)}
  default_backend pods
backend pods
  balance roundrobin
{servers}
""")
    if "haproxy" in names:
        procs["haproxy"] = subprocess.Popen(pre + ["haproxy", "-f", f"{d}/haproxy.cfg"])

    if "bare-pingora" in names:
        procs["bare-pingora"] = subprocess.Popen(
            pre + [BARE_PINGORA, f"127.0.0.1:{PORTS['bare-pingora']}",
                   str(threads)] + [f"127.0.0.1:{p}" for p in UPSTREAMS],
            stderr=subprocess.DEVNULL)

    nodes = ", ".join(f'{{address: "127.0.0.1:{p}"}}' for p in UPSTREAMS)
    builds = {"podgate": PODGATE, "podgate-baseline": BASELINE, "podgate-policy": PODGATE}
    builds = {n: b for n, b in builds.items() if n in names}
    for i, (name, binary) in enumerate(builds.items()):
        # podgate's access log as users have it: the default (JSON lines), to a file.
        log_conf = f"path: {access_log_path(d, name)}" if logs else "enabled: false"
        top, policies = policy_conf(d) if name == "podgate-policy" else ("", "")
        write(f"{d}/{name}.yaml", f"""listeners:
  - address: 127.0.0.1:{PORTS[name]}
admin:
  address: 127.0.0.1:{PODGATE_ADMIN + i}
server:
  threads: {threads}
  grace_period: 1s
  upgrade_sock: {d}/{name}-upgrade.sock
  pid_file: {d}/{name}.pid
access_log:
  {log_conf}
upstreams:
  - name: pods
    nodes: [{nodes}]
{top}routes:
  - name: all
    path_prefix: /
    upstream: pods
""" + (f"    policies: {policies}\n" if policies else ""))
        env = dict(os.environ, RUST_LOG="warn")
        procs[name] = subprocess.Popen(
            pre + [binary, "-c", f"{d}/{name}.yaml"],
            stderr=open(f"{d}/{name}.log", "w"), env=env)
    for name in names:
        try:
            wait_port(PORTS[name])
        except SystemExit:
            # podgate says why it did not start.
            if os.path.exists(f"{d}/{name}.log"):
                sys.stderr.write(open(f"{d}/{name}.log").read()[-2000:])
            raise


def to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def wrk(port, seconds, pin):
    pre = ["taskset", "-c", "0"] if pin else []
    headers = [a for h in request_headers() for a in ("-H", h)]
    out = subprocess.run(pre + ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
                         + headers + [f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True).stdout
    if "Requests/sec" not in out or "99%" not in out:
        raise SystemExit(f"wrk against 127.0.0.1:{port} gave no result:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    # The latency distribution lines only: a stdev column such as "88.99%" must not match.
    p50 = to_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = to_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    return rps, p50, p99, (errors.group(0) if errors else ""), total


def count_lines(path):
    """Lines in the file at `path` (0 when there is none), then empties it for the next run."""
    n = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
        os.truncate(path, 0)
    except FileNotFoundError:
        pass
    return n


def perf_stat(pid, seconds):
    """`perf stat` of the process `pid` (all its threads) for `seconds`."""
    return subprocess.Popen(["perf", "stat", "-x,", "-e", ",".join(PERF_EVENTS), "-p", str(pid),
                             "--", "sleep", str(seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def perf_counts(p):
    """The counts of a finished `perf_stat`, by event."""
    _, err = p.communicate()
    counts = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in PERF_EVENTS:
            counts[fields[2]] = int(fields[0]) if fields[0].isdigit() else 0
    return counts


def run(mode, logs):
    pin = mode == "pinned"
    threads = 1 if pin else 2
    names = [n for n in PORTS if n in LOGGING or logs == "off"]
    ensure_free(UPSTREAMS + list(PORTS.values())
                + [PODGATE_ADMIN + i for i in range(len(PORTS))])
    with tempfile.TemporaryDirectory() as d:
        up = start_upstreams(d)
        procs = {}
        if POLICY in ("rate_exact", "rate_batched"):
            # Redis on CPU 0 with wrk and the upstreams, as a shared store would be elsewhere.
            procs["redis"] = subprocess.Popen(
                (["taskset", "-c", "0"] if pin else []) + [
                    "redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", d],
                stdout=subprocess.DEVNULL)
            wait_port(REDIS_PORT)
        try:
            # Inside the try: whatever started is stopped, even when a later start fails.
            start_proxies(d, threads, pin, procs, names, logs == "on")
            for n in names:  # warm-up: pools, caches, JIT-free but page-faulty
                wrk(PORTS[n], 2, pin)
                count_lines(access_log_path(d, n))
            results = {n: [] for n in names}
            what = ("access logs on for both (podgate: default JSON line to a file; nginx: "
                    "default combined line to a file)" if logs == "on" else "access logs off")
            print(f"\n## {mode}, {what}: {threads} worker thread(s) per proxy"
                  + (", proxies on CPU 1, wrk and upstreams on CPU 0" if pin else ", unpinned"))
            print(f"wrk -t1 -c{CONNECTIONS} -d{DURATION}s, 64-byte bodies, {ROUNDS} rounds\n")
            # CPU µs per request: the proxy's own CPU time over the requests it served. Less
            # sensitive than req/s to other load on the machine (which takes CPU away from the
            # proxy but adds little to its cost per request).
            extra = " futex/req | writes/req | switches/req |" if SYSCALLS else ""
            print("| round | proxy | req/s | p50 ms | p99 ms | vs nginx | CPU µs/req | user | system "
                  f"| log lines/req | CPU 0 / 1 busy % | upstreams µs/req | wrk µs/req |{extra}")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if SYSCALLS else ""))
            for r in range(1, ROUNDS + 1):
                row = {}
                for n in names:
                    perf = None
                    if os.environ.get("PROFILE") == n and r == 1:
                        # Samples of the proxy while wrk runs: where its CPU time goes.
                        perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o",
                                                 f"{TARGET}/perf-{n}.data", "-p",
                                                 str(procs[n].pid), "--", "sleep", str(DURATION)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    stat = perf_stat(procs[n].pid, DURATION) if SYSCALLS else None
                    pids = [procs[n].pid] + children(procs[n].pid)
                    before = cpu_split(pids)
                    cores = core_ticks()
                    others = cpu_seconds([up.pid]), children_cpu()
                    rps, p50, p99, err, total = wrk(PORTS[n], DURATION, pin)
                    busy = core_busy(cores, core_ticks())
                    # What the rest of the bench (wrk, the upstreams) spent per request meanwhile.
                    upstream_us = (cpu_seconds([up.pid]) - others[0]) * 1e6 / max(1, total)
                    wrk_us = (children_cpu() - others[1]) * 1e6 / max(1, total)
                    busy = busy + [upstream_us, wrk_us]
                    user, system = ((b - a) * 1e6 / max(1, total)
                                    for a, b in zip(before, cpu_split(pids)))
                    cpu = user + system
                    counts = perf_counts(stat) if stat else {}
                    # podgate's last lines may still sit in its buffers (up to access_log.flush).
                    lines = count_lines(access_log_path(d, n)) / max(1, total)
                    row[n] = (rps, p50, p99, err, cpu, lines, counts, total, user, system, busy)
                    results[n].append(row[n])
                    if perf:
                        perf.wait()
                for n in names:
                    rps, p50, p99, err, cpu, lines, counts, total, user, system, busy = row[n]
                    ratio = rps / row["nginx"][0]
                    per = lambda *events: sum(counts.get(e, 0) for e in events) / max(1, total)
                    sys_cols = (f" {per(PERF_EVENTS[0]):.3f} | {per(*PERF_EVENTS[1:4]):.3f} | "
                                f"{per(PERF_EVENTS[4]):.3f} |") if SYSCALLS else ""
                    print(f"| {r} | {n} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {ratio:.2f} | {cpu:.1f} "
                          f"| {user:.1f} | {system:.1f} "
                          f"| {lines:.2f} | {busy[0]:.0f} / {busy[1]:.0f} | {busy[-2]:.1f} | {busy[-1]:.1f} |{sys_cols}" + (f" {err}" if err else ""))
            print("\n| proxy | median req/s | median ratio to nginx | median p50 ms | median p99 ms "
                  "| median CPU µs/req | user | system | RSS MiB |")
            print("|---|---|---|---|---|---|---|---|---|")
            for n in names:
                ratios = [results[n][i][0] / results["nginx"][i][0] for i in range(ROUNDS)]
                pids = [procs[n].pid] + children(procs[n].pid)
                print(f"| {n} | {statistics.median(x[0] for x in results[n]):,.0f} | "
                      f"{statistics.median(ratios):.2f} | "
                      f"{statistics.median(x[1] for x in results[n]):.2f} | "
                      f"{statistics.median(x[2] for x in results[n]):.2f} | "
                      f"{statistics.median(x[4] for x in results[n]):.1f} | "
                      f"{statistics.median(x[8] for x in results[n]):.1f} | "
                      f"{statistics.median(x[9] for x in results[n]):.1f} | "
                      f"{rss_kib(pids) / 1024:.1f} |")
            nginx_rps = statistics.median(x[0] for x in results["nginx"])
            print(f"\nnginx on this machine ({mode}, access logs {logs}): {nginx_rps:,.0f} req/s")
            print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            unique = list({id(p): p for p in procs.values()}.values())
            for p in unique + [up]:
                p.terminate()
            for p in unique + [up]:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
            # The next mode binds the same ports: wait until nothing answers on them.
            for port in list(PORTS.values()) + UPSTREAMS:
                end = time.time() + 10
                while time.time() < end:
                    try:
                        socket.create_connection(("127.0.0.1", port), 0.2).close()
                        time.sleep(0.05)
                    except OSError:
                        break


if __name__ == "__main__":
    modes = sys.argv[1:] or ["pinned", "unpinned"]
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for m in modes:
        # The default configuration (access logs on) first.
        for logs in [x for x in ("on", "off") if x in LOGS]:
            run(m, logs)
