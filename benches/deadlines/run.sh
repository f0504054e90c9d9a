#!/usr/bin/env bash
# Deadlines at the edge (issue 21): half-open TLS connections (memory each, time to close), a
# client that stops reading (HTTP/1.1) or never reads (h2), and the stop time of an idle gateway;
# podgate against nginx 1.22 with the same timeouts. Loopback only. About 2 minutes per podgate
# build with the defaults (more with CAP for builds that never close).
#   benches/deadlines/run.sh
#   GATEWAYS="nginx before=/tmp/podgate-main after=target/release/podgate" benches/deadlines/run.sh
#   CASES=tls FLOOD_SILENT=4000 benches/deadlines/run.sh
# Needs (Debian): nginx-light, openssl. Results are printed; see benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v nginx >/dev/null || { echo "needs nginx (apt-get install -y nginx-light)" >&2; exit 1; }
command -v openssl >/dev/null || { echo "needs openssl (apt-get install -y openssl)" >&2; exit 1; }
if [ -z "${GATEWAYS:-}" ]; then
  . scripts/build-deps.sh
  ensure_build_deps
  cargo build --release --bin podgate
fi
exec python3 benches/deadlines/run.py "$@"
