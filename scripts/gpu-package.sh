#!/usr/bin/env bash
# Builds Air for NVIDIA GPUs here (no GPU needed) and packs what a run on a GPU machine needs
# into .device-carry/: the stripped, xz-compressed binary, and the real models in parts of 60 MiB,
# small enough to travel one per call with the repository (a lent GPU machine receives at most
# 64 MiB per call).
#
# Usage: scripts/gpu-package.sh [--tests]   then, on the GPU machine: scripts/gpu-suite.sh STAGE...
#   --tests  also packs air-model's unit-test binary (the GPU kernels' tests; stage `unit`)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/setup-cuda.sh --env)"
target="${AIR_CUDA_TARGET_DIR:-$HOME/.cache/air/target-cuda}"
CARGO_TARGET_DIR="$target" cargo build --release --locked -p air --features cuda
mkdir -p .device-carry
strip -o .device-carry/air "$target/release/air"
xz -T0 -f .device-carry/air
if [ "${1:-}" = --tests ]; then
  tests=$(CARGO_TARGET_DIR="$target" cargo test --release --locked -p air-model --features cuda --lib --no-run \
    --message-format json | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])')
  strip -o .device-carry/air-model-tests "$tests"
  xz -T0 -f .device-carry/air-model-tests
fi
for model in SmolLM2-135M-Instruct.Q4_1 gemma-3-270m-q4_k_m qwen2.5-coder-0.5b-instruct-q4_k_m; do
  if [ -f "models/$model.gguf" ] && [ ! -f ".device-carry/$model.part.aa" ]; then
    split -b 60M "models/$model.gguf" ".device-carry/$model.part."
  fi
done
ls -la .device-carry
