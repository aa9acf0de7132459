#!/usr/bin/env bash
# Air vs llama.cpp, side by side in one run, same machine, same thread count.
#
# Usage: scripts/bench-vs-llamacpp.sh [-t THREADS] [-r RUNS] [MODEL.gguf...]
# (default: the SmolLM2 model from scripts/fetch-models.sh, threads = nproc, 3 runs)
# For each model: prompt processing of 128 and 512 tokens and generation of 128 tokens, with
# `air bench` and `llama-bench` (weight repacking off), then a table with Air/llama.cpp ratios.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
threads=$(nproc)
runs=3
while getopts "t:r:" opt; do
  case $opt in
    t) threads=$OPTARG ;;
    r) runs=$OPTARG ;;
    *) echo "usage: $0 [-t THREADS] [-r RUNS] [MODEL.gguf...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || set -- models/SmolLM2-135M-Instruct.Q4_1.gguf
bin=$(scripts/build-llamacpp.sh | tail -1)
cargo build --release --quiet
air="${CARGO_TARGET_DIR:-target}/release/air"

printf '%-40s %-7s %12s %12s %7s\n' model test "air t/s" "llama.cpp" ratio
for model in "$@"; do
  name=$(basename "$model" .gguf)
  for test in pp128 pp512 tg128; do
    n=${test#??}
    if [[ $test == pp* ]]; then
      a=$($air bench -m "$model" -t "$threads" --runs "$runs" --prompt-tokens "$n" --gen-tokens 0 --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["prompt_tokens_per_s"])')
      l=$("$bin/llama-bench" -m "$model" -t "$threads" -r "$runs" --repack 0 -p "$n" -n 0 -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])')
    else
      a=$($air bench -m "$model" -t "$threads" --runs "$runs" --prompt-tokens 0 --gen-tokens "$n" --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tokens_per_s"])')
      l=$("$bin/llama-bench" -m "$model" -t "$threads" -r "$runs" --repack 0 -p 0 -n "$n" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])')
    fi
    python3 -c "import sys; a,l=float(sys.argv[3]),float(sys.argv[4]); print(f'{sys.argv[1]:<40} {sys.argv[2]:<7} {a:12.1f} {l:12.1f} {a/l:6.2f}x')" "$name" "$test" "$a" "$l"
  done
done
