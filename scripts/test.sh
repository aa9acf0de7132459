#!/usr/bin/env bash
# The test suite: installs what the tests need, fetches the real models they run, runs every
# test of the workspace, then the end-to-end tests (tests/e2e) on the `air` binary those built.
# CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh
scripts/fetch-models.sh all
cargo test --workspace --locked
AIR_BIN="${CARGO_TARGET_DIR:-target}/debug/air" scripts/e2e.sh
