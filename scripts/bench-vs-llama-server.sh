#!/usr/bin/env bash
# `air serve` against llama.cpp's `llama-server` in one run: the same model, threads and load
# (scripts/load.py: C concurrent streaming clients, distinct prompts, greedy, a fixed number of
# generated tokens each), one server at a time on loopback. Prints each server's JSON lines per
# concurrency level, then Air's aggregate tokens/s over llama-server's per level.
#
# Usage: scripts/bench-vs-llama-server.sh [-m MODEL.gguf] [-t THREADS] [-c 1,4,16] [-n GEN_TOKENS]
#                                         [-r REQUESTS_PER_CLIENT]
# llama-server runs with one slot per client (-np), continuous batching (its default), weight
# repacking off (-nr: its AMX path crashes on the development machines) and 512 context tokens
# per slot; Air with its defaults and --max-seqs the top level.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
threads=$(nproc)
levels=1,4,16
gen=128
requests=2
while getopts "m:t:c:n:r:" opt; do
  case $opt in
    m) model=$OPTARG ;;
    t) threads=$OPTARG ;;
    c) levels=$OPTARG ;;
    n) gen=$OPTARG ;;
    r) requests=$OPTARG ;;
    *) echo "usage: $0 [-m MODEL] [-t THREADS] [-c LEVELS] [-n GEN_TOKENS] [-r REQUESTS]" >&2; exit 2 ;;
  esac
done
scripts/fetch-models.sh >/dev/null
cargo build --release --locked --quiet -p air
air="${CARGO_TARGET_DIR:-target}/release/air"
llama_bin=$(scripts/build-llamacpp.sh | tail -n 1)
top=$(echo "$levels" | tr ',' '\n' | sort -n | tail -n 1)
port=18181
out=$(mktemp -d)
server=""
trap '[ -z "$server" ] || kill "$server" 2>/dev/null; rm -rf "$out"' EXIT

wait_ready() { # URL
  for _ in $(seq 1 600); do
    curl -fs "$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$server" 2>/dev/null || { echo "the server exited" >&2; exit 1; }
    sleep 0.2
  done
  echo "no answer from $1" >&2; exit 1
}

run() { # LABEL COMMAND...
  local label=$1; shift
  "$@" >"$out/$label.log" 2>&1 &
  server=$!
  wait_ready "http://127.0.0.1:$port"
  python3 scripts/load.py "http://127.0.0.1:$port" bench --label "$label" --concurrency "$levels" \
    --requests-per-client "$requests" --gen-tokens "$gen" | tee "$out/$label.jsonl"
  kill "$server"; wait "$server" 2>/dev/null || true
  server=""
}

echo "== $(basename "$model"), $threads threads, $gen tokens per request, $requests requests per client"
run llama-server "$llama_bin/llama-server" -m "$model" -t "$threads" -tb "$threads" -np "$top" \
  -c $((top * 512)) -nr --alias bench --host 127.0.0.1 --port "$port"
run air "$air" serve -m "bench=$model" --threads "$threads" --max-seqs "$top" --host 127.0.0.1 --port "$port"
python3 - "$out/air.jsonl" "$out/llama-server.jsonl" <<'PY'
import json, sys
air, llama = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
for a, l in zip(air, llama):
    print("c=%-3d aggregate tok/s: air %8.1f  llama-server %8.1f  ratio %.2fx   TTFT p50/p99 ms: air %s/%s  llama-server %s/%s"
          % (a["concurrency"], a["aggregate_tokens_per_s"], l["aggregate_tokens_per_s"],
             a["aggregate_tokens_per_s"] / l["aggregate_tokens_per_s"], a["ttft_ms_p50"], a["ttft_ms_p99"],
             l["ttft_ms_p50"], l["ttft_ms_p99"]))
PY
