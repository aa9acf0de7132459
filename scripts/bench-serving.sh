#!/usr/bin/env bash
# Continuous batching in one run: `air bench --concurrency 1,16` on the default model (CPU,
# resident), then on a synthetic model larger than RAM streamed under a 1 GiB budget
# (S.L.I.P.), each printing the aggregate tokens/s ratios of concurrency 16 to 1 (decode phase,
# and overall with the prompt pass).
#
# Usage: scripts/bench-serving.sh [-d DIR] [-t THREADS] [-n ggml|fast] [-s]
#   -s: skip the streamed model; -n: the CPU numerics (--cpu-numerics, default ggml)
# DIR (default models/synth) needs ~33 GB free for the synthetic file, written once and kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=models/synth
threads=$(nproc)
streamed=1
while getopts "d:t:n:s" opt; do
  case $opt in
    d) dir=$OPTARG ;;
    t) threads=$OPTARG ;;
    n) export AIR_CPU_NUMERICS=$OPTARG ;;
    s) streamed=0 ;;
    *) echo "usage: $0 [-d DIR] [-t THREADS] [-n ggml|fast] [-s]" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet
air="${CARGO_TARGET_DIR:-target}/release/air"
scripts/fetch-models.sh >/dev/null

# Runs the serving test at concurrency 1 and 16 (extra arguments: the model and its options,
# e.g. --runs) and prints both levels and their ratio: with several runs, the median of each
# round's ratio.
levels() {
  local name=$1; shift
  "$air" bench --concurrency 1,16 -t "$threads" --format json "$@" 2>/dev/null | python3 -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin]
for r in rows:
    print("%-22s c=%-3d decode %9.3f tok/s, overall %9.3f tok/s  TTFT p50 %8.0f ms p99 %8.0f ms  ITL p50 %8.1f ms p99 %8.1f ms  preemptions %d"
          % (sys.argv[1], r["concurrency"], r["aggregate_decode_tokens_per_s"], r["aggregate_tokens_per_s"],
             r["ttft_ms_p50"], r["ttft_ms_p99"], r["itl_ms_p50"] or 0, r["itl_ms_p99"] or 0, r["preemptions"]))
for kind in ["decode", "overall"]:
    print("%-22s concurrency 16 / 1, %s: %.2fx (median of %d rounds: %s)" % (sys.argv[1], kind,
          rows[1][kind + "_ratio_to_first_level"], rows[1]["runs"],
          ", ".join("%.2fx" % r for r in rows[1][kind + "_ratio_to_first_level_runs"])))
' "$name"
}

echo "== default model, resident, CPU ($threads threads, ${AIR_CPU_NUMERICS:-ggml} numerics)"
levels SmolLM2-135M-Q4_1 -m models/SmolLM2-135M-Instruct.Q4_1.gguf --prompt-tokens 32 --gen-tokens 64

if [ "$streamed" = 1 ]; then
  mkdir -p "$dir"
  big=$dir/synth-30g-q4_0.gguf
  [ -f "$big" ] || "$air" synth --layers 248 --hidden 4096 --ffn 14336 --heads 32 --kv-heads 8 --type q4_0 -o "$big"
  echo "== larger than RAM: $(du -h "$big" | cut -f1) file, $(free -g | awk '/Mem:/{print $2}') GiB RAM, 1 GiB budget"
  dd if="$big" iflag=nocache count=0 status=none
  levels synth-30g-Q4_0 -m "$big" --memory-budget 1GiB --prompt-tokens 4 --gen-tokens 3 --runs 1
fi
