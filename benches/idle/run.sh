#!/usr/bin/env bash
# Memory per client connection: podgate against nginx, N keep-alive connections idle after one
# request each, then N connections stopped in the middle of a request head. Loopback only; stops
# itself within LIMIT seconds (110 by default).
#   benches/idle/run.sh                 # N=8000, both phases, nginx and podgate
#   N=15000 PHASES=idle benches/idle/run.sh
#   N=2000 PHASES="idle tls" benches/idle/run.sh   # adds idle TLS HTTP/1.1 connections
#   PODGATE=/path/to/podgate benches/idle/run.sh   # another build, no cargo build
# Needs (Debian): nginx-light. N is bounded by `ulimit -Hn` (the gateways inherit the limit).
# Results are printed; see benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v nginx >/dev/null || { echo "idle bench needs nginx (apt-get install -y nginx-light)" >&2; exit 1; }
if [ -z "${PODGATE:-}" ]; then
  . scripts/build-deps.sh
  ensure_build_deps
  cargo build --release --bin podgate
fi
exec python3 benches/idle/run.py "$@"
