#!/usr/bin/env bash
# Discovery at scale (see tests/discovery_scale.rs): 3 fake API servers, 10,000 endpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-deps.sh
ensure_build_deps
cargo test --release --test discovery_scale -- --ignored --nocapture --test-threads 1 2>&1 | grep -E "RESULT|test result|panicked"
