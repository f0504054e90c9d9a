#!/usr/bin/env bash
# Runs podgate on conf/quickstart.yaml in front of three demo Pods — no cluster needed.
# Gateway on http://127.0.0.1:8080, admin on http://127.0.0.1:9901. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/build-deps.sh
ensure_build_deps
cargo build --release --bin podgate --bin demo-pods
./target/release/demo-pods &
pods=$!
trap 'kill $pods 2>/dev/null || true' EXIT
./target/release/podgate -c conf/quickstart.yaml
