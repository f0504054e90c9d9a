#!/usr/bin/env bash
# Proxy throughput and latency: podgate against nginx, HAProxy and a bare Pingora proxy, all in
# front of the same three upstream servers, on loopback only.
#   benches/load/run.sh                  # pinned (1 worker on CPU 1) and unpinned (2 workers)
#   ROUNDS=5 DURATION=15 benches/load/run.sh pinned
#   PORT_BASE=28080 ...      # other ports (default 18080) when something else listens there
#   PODGATE=/path/to/podgate ...   # that binary (run.sh still builds; run.py alone does not)
#   LOGS=on | LOGS=off ...   # only the part with access logs on for both (printed first), or off
#   SYSCALLS=1 ...           # also futex calls, writes and context switches per request (perf stat)
# Needs (Debian): wrk nginx-light haproxy. Results are printed; see benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/build-deps.sh
ensure_build_deps
for tool in wrk nginx haproxy taskset; do
  command -v "$tool" >/dev/null || { echo "load bench needs $tool (apt-get install -y wrk nginx-light haproxy)" >&2; exit 1; }
done
cargo build --release --bin podgate --example bare-pingora
exec python3 benches/load/run.py "$@"
