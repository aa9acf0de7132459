#!/usr/bin/env bash
# S.L.I.P. in one run: a synthetic model larger than RAM streamed under a 1 GiB budget (batch 1
# and batch 16) next to a cold sequential read of the same file, and a model that fits in RAM
# streamed with 25% of its size as budget next to the same model fully resident.
#
# Usage: scripts/bench-streaming.sh [-d DIR] [-t THREADS]
# DIR (default models/synth) needs ~33 GB free; the synthetic files are written once and kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=models/synth
threads=$(nproc)
while getopts "d:t:" opt; do
  case $opt in
    d) dir=$OPTARG ;;
    t) threads=$OPTARG ;;
    *) echo "usage: $0 [-d DIR] [-t THREADS]" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet
air="${CARGO_TARGET_DIR:-target}/release/air"
mkdir -p "$dir"
big=$dir/synth-30g-q4_0.gguf
small=$dir/synth-1.6g-q4_0.gguf
[ -f "$big" ] || $air synth --layers 248 --hidden 4096 --ffn 14336 --heads 32 --kv-heads 8 --type q4_0 -o "$big"
[ -f "$small" ] || $air synth --layers 64 --hidden 2048 --ffn 5632 --heads 32 --kv-heads 8 --type q4_0 -o "$small"

# Drops a file from the page cache (GNU dd: nocache with count=0 applies to the whole file).
evict() { dd if="$1" iflag=nocache count=0 status=none; }
# One bench, printing the figures that matter here.
bench() {
  local model=$1 budget=$2 batch=$3 gen=$4 runs=$5
  $air bench -m "$model" --memory-budget "$budget" --batch "$batch" --prompt-tokens 0 --gen-tokens "$gen" \
    --runs "$runs" -t "$threads" --format json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
mib = lambda k: "%.0f MiB" % (d[k] / 2**20) if d[k] is not None else "-"
print("%-26s budget %-7s batch %-3d %8.3f tok/s  step %8.1f ms  io-wait %5.1f%%  peak RSS %s  steady RSS %s  %d resident / %d streamed"
      % (sys.argv[1], sys.argv[2], d["batch"], d["decode_tokens_per_s"], d["decode_step_ms"],
         100 * (d["io_wait_fraction"] or 0), mib("peak_rss_bytes"), mib("steady_rss_bytes"),
         d["resident_layers"], d["streamed_layers"]))' "$(basename "$model")" "$budget"
}

echo "== larger than RAM ($(du -h "$big" | cut -f1) file, $(free -g | awk '/Mem:/{print $2}') GiB RAM)"
evict "$big"
start=$(date +%s.%N)
dd if="$big" of=/dev/null bs=8M status=none
end=$(date +%s.%N)
echo "cold sequential read (dd bs=8M): $(python3 -c "print('%.1f s' % ($end - $start))")"
evict "$big"
bench "$big" 1GiB 1 3 1
evict "$big"
bench "$big" 1GiB 16 3 1

echo "== fits in RAM, in the page cache ($(du -h "$small" | cut -f1) file)"
cat "$small" > /dev/null
quarter=$(( $(stat -c %s "$small") / 4 ))
for round in 1 2; do
  bench "$small" 64GiB 1 16 3
  bench "$small" "$quarter" 1 16 3
done
