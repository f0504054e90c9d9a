#!/usr/bin/env bash
# Runs every test of the workspace (unit, integration over loopback sockets, doc tests).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/build-deps.sh
ensure_build_deps
ensure_test_deps
cargo test --workspace --all-targets "$@"
