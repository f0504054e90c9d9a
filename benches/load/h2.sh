#!/usr/bin/env bash
# h2 and gRPC throughput: podgate against nginx (grpc_pass for gRPC), h2load as the client, all
# on loopback. See h2.py for the modes and the set-up.
#   benches/load/h2.sh                     # h2c, tls, tls-h1 and grpc
#   ROUNDS=5 DURATION=15 benches/load/h2.sh grpc
#   PORT_BASE=28080 ...      # other ports (default 18080) when something else listens there
# Needs (Debian): nghttp2-client (h2load) nginx-light openssl wrk. Results: benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/build-deps.sh
ensure_build_deps
for tool in h2load nginx openssl taskset; do
  command -v "$tool" >/dev/null || { echo "the h2 bench needs $tool (apt-get install -y nghttp2-client nginx-light openssl)" >&2; exit 1; }
done
cargo build --release --bin podgate --bin demo-grpc-pod
exec python3 benches/load/h2.py "$@"
