#!/usr/bin/env bash
# The test suite: installs what the tests need, fetches the real models they run, and runs
# every test of the workspace. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh
scripts/fetch-models.sh all
cargo test --workspace --locked
