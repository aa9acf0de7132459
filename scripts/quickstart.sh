#!/usr/bin/env bash
# From a fresh clone to generated text: installs the few system tools the model download needs
# (Debian/Ubuntu), fetches the default model (SmolLM2-135M-Instruct Q4_1), builds Air in release
# mode and generates a continuation. Extra arguments go to `air generate`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh
scripts/fetch-models.sh smollm2
cargo build --release
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ $# -eq 0 ]; then
  set -- --prompt "Once upon a time, in a small village," --max-tokens 64 --temperature 0
fi
exec "${CARGO_TARGET_DIR:-target}/release/air" generate --model "$model" "$@"
