#!/usr/bin/env bash
# The GPU checks and benchmarks, run on a machine with an NVIDIA GPU and no Rust, from what
# scripts/gpu-package.sh put in .device-carry/. Each stage appends JSON lines to
# $OUT/report.jsonl; the whole log goes to $OUT/log.txt.
#
# Usage: scripts/gpu-suite.sh STAGE...
#   stash      keep the model parts carried in this call (they arrive a few per call)
#   real       each real model whose parts have all arrived (checked by sha256): `air check`,
#              CUDA against the CPU, 256 greedy steps for each reference prompt
#   exact      each real model whose parts have all arrived, with --gpu-numerics cpu (the CPU's
#              arithmetic): `air check` for each reference prompt, which must agree everywhere
#   exact-speed  decode with --gpu-numerics fast and cpu, SmolLM2 and the 8B-shape Q4_0 model
#   unit       air-model's unit tests whose names hold "exact" or "gemv" (the GPU kernels against
#              the host code, and the real models' logits once their parts have arrived), from
#              the packed test binary
#   streamed-real  SmolLM2 with every layer streamed over PCIe (--vram-budget 1MiB): `air check`
#   synth-check  the 8B-shape models (Q4_0, Q4_K), whose matrices all take Air's GEMV kernels:
#              `air check`, CUDA against the CPU, 32 greedy steps; Q4_0 also after a long prompt
#   resident   synthetic Llama-3-8B shape, Q4_0 then Q4_K, all in VRAM: prompt 512 and decode
#   streamed   the Q4_0 model with half of its layers streamed over PCIe: batch 1 and batch 32
#   staged     as `streamed` and `huge` at batch 1, with --memory-budget 1GiB: the streamed layers
#              no longer stay pinned; a ring of staging buffers is refilled from the page cache
#   huge       a ~39 GB synthetic model (Llama-70B shape, Q4_0) under --vram-budget 4GiB
#   engine     requests through the engine on the GPU: `air generate` of SmolLM2 (when its parts
#              have arrived) on the GPU and the CPU; `air bench --concurrency 1,16` on the
#              8B-shape Q4_0 model resident and half streamed
#   engine-c1  where a single request's token time goes on the 8B-shape Q4_0 model: the model
#              driven directly against the engine at concurrency 1, after 1, 128 and 1024 prompt
#              tokens (the engine reports its pass and sampling time per step)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/air-out}
mkdir -p "$OUT"
work=${AIR_GPU_WORK:-/tmp/air-gpu}
mkdir -p "$work"
log() { echo "$@" | tee -a "$OUT/log.txt" >&2; }

# cuBLAS/cuRAND of CUDA 13 come with the machine's Python packages.
nvidia_libs=$(python3 -c 'import nvidia, glob, os; print(":".join(d for b in nvidia.__path__ for d in sorted(glob.glob(os.path.join(b, "*", "lib")))))' 2>/dev/null || true)
export LD_LIBRARY_PATH="${nvidia_libs}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
air=$work/air
if [ -f .device-carry/air.xz ]; then xz -dc .device-carry/air.xz >"$air" && chmod +x "$air"; fi
# Every stage but stash needs the binary (carried once; it stays while the machine is held).
[ -x "$air" ] || [ "$*" = stash ] || { log "no air binary (run scripts/gpu-package.sh and carry .device-carry/air.xz)"; exit 1; }

# Runs `air ARGS...` with JSON output, appending {"stage", "label", "result" | "error"} to the report.
record() {
  local stage=$1 label=$2; shift 2
  log "== $stage/$label: air $*"
  local started=$SECONDS out
  out=$("$air" "$@" --format json 2>>"$OUT/log.txt")
  local rc=$?
  python3 - "$stage" "$label" "$rc" "$((SECONDS - started))" "$out" >>"$OUT/report.jsonl" <<'PY'
import json, sys
stage, label, rc, seconds, out = sys.argv[1:6]
try:
    result = json.loads(out)
except Exception:
    try:  # one JSON object per line (bench --concurrency: one per level)
        result = [json.loads(line) for line in out.splitlines() if line.strip()]
    except Exception:
        result = None
print(json.dumps({"stage": stage, "label": label, "exit": int(rc), "seconds": int(seconds), "result": result}))
PY
  log "   exit $rc in $((SECONDS - started)) s: $(echo "$out" | head -c 600)"
}

synth() { # name args...
  local path=$work/$1.gguf; shift
  [ -f "$path" ] || "$air" synth "$@" -o "$path" >>"$OUT/log.txt" 2>&1
  echo "$path"
}
# Assembles model $1 from its carried parts into $work/$1.gguf once they have all arrived
# (sha256 $2) and prints the path; prints nothing while parts are missing.
assemble() {
  local path=$work/$1.gguf
  cp .device-carry/"$1".part.* "$work"/ 2>/dev/null
  [ -f "$path" ] || cat "$work/$1".part.* >"$path" 2>/dev/null
  if echo "$2  $path" | sha256sum -c --quiet - 2>/dev/null; then echo "$path"; else rm -f "$path"; fi
}
# The real models and their sha256.
MODELS='SmolLM2-135M-Instruct.Q4_1 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gemma-3-270m-q4_k_m a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
qwen2.5-coder-0.5b-instruct-q4_k_m 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32'
smollm2() { assemble $(echo "$MODELS" | head -1); }
# The reference prompts, one per line.
prompts() { python3 -c 'import json; [print(p) for p in json.load(open("tests/reference/prompts_public.json"))]'; }

llama8b() { synth "llama8b-$1" --layers 32 --hidden 4096 --ffn 14336 --heads 32 --kv-heads 8 --vocab 128256 --ctx 8192 --type "$1"; }

for stage in "$@"; do
  case $stage in
    stash)
      cp .device-carry/*.part.* "$work"/ 2>/dev/null
      log "stashed: $(ls "$work" | tr '\n' ' ')"
      ;;
    real)
      echo "$MODELS" | while read -r model sum; do
        path=$(assemble "$model" "$sum")
        [ -n "$path" ] || { log "$model: not all parts have arrived"; continue; }
        prompts | while IFS= read -r prompt; do
          record real "$model: $prompt" check -m "$path" --device cuda --prompt "$prompt" --steps 256
        done
      done
      ;;
    exact)
      echo "$MODELS" | while read -r model sum; do
        path=$(assemble "$model" "$sum")
        [ -n "$path" ] || { log "$model: not all parts have arrived"; continue; }
        prompts | while IFS= read -r prompt; do
          record exact "$model, CPU numerics: $prompt" check -m "$path" --device cuda --gpu-numerics cpu \
            --prompt "$prompt" --steps 256 --min-agreement 1
        done
      done
      ;;
    exact-speed)
      smol=$(smollm2)
      model=$(llama8b q4_0)
      for numerics in fast cpu; do
        [ -z "$smol" ] || record exact-speed "SmolLM2 $numerics" bench -m "$smol" --device cuda \
          --gpu-numerics $numerics --prompt-tokens 32 --gen-tokens 128 --runs 3
        record exact-speed "llama8b-q4_0 $numerics" bench -m "$model" --device cuda --gpu-numerics $numerics \
          --prompt-tokens 32 --gen-tokens 32 --runs 2
      done
      ;;
    unit)
      tests=$work/air-model-tests
      if [ -f .device-carry/air-model-tests.xz ]; then xz -dc .device-carry/air-model-tests.xz >"$tests" && chmod +x "$tests"; fi
      echo "$MODELS" | while read -r model sum; do assemble "$model" "$sum" >/dev/null; done
      log "== unit: air-model tests matching exact or gemv"
      AIR_MODELS_DIR=$work "$tests" exact gemv --test-threads 1 2>&1 | tee -a "$OUT/log.txt" | tail -40 >&2
      ;;
    streamed-real)
      smol=$(smollm2)
      [ -n "$smol" ] || { log "SmolLM2: not all parts have arrived"; continue; }
      prompts | while IFS= read -r prompt; do
          record streamed-real "SmolLM2, all layers streamed: $prompt" check -m "$smol" --device cuda \
            --vram-budget 1MiB --prompt "$prompt" --steps 256
        done
      ;;
    synth-check)
      for ty in q4_0 q4_k; do
        record synth-check "llama8b-$ty" check -m "$(llama8b $ty)" --device cuda \
          --prompt "The quick brown fox jumps over the lazy dog" --steps 32
      done
      # A cache past 256 positions: attention in several splits and their merge.
      long=$(printf 'The quick brown fox jumps over the lazy dog. %.0s' $(seq 40))
      record synth-check "llama8b-q4_0, long prompt" check -m "$(llama8b q4_0)" --device cuda \
        --prompt "$long" --steps 16
      ;;
    resident)
      for ty in q4_0 q4_k; do
        model=$(llama8b $ty)
        record resident "llama8b-$ty" bench -m "$model" --device cuda --prompt-tokens 512 --gen-tokens 128 --runs 3
      done
      ;;
    streamed)
      model=$(llama8b q4_0)
      record streamed "llama8b-q4_0-half-batch1" bench -m "$model" --device cuda --vram-budget 3GiB \
        --prompt-tokens 0 --gen-tokens 64 --runs 2
      record streamed "llama8b-q4_0-half-batch32" bench -m "$model" --device cuda --vram-budget 3GiB \
        --prompt-tokens 0 --gen-tokens 32 --runs 2 --batch 32
      ;;
    staged)
      model=$(llama8b q4_0)
      record staged "llama8b-q4_0-half-staged" bench -m "$model" --device cuda --vram-budget 3GiB \
        --memory-budget 1GiB --prompt-tokens 0 --gen-tokens 32 --runs 2
      model=$(synth llama70b-q4_0 --layers 80 --hidden 8192 --ffn 28672 --heads 64 --kv-heads 8 --vocab 32000 --type q4_0)
      record staged "llama70b-q4_0-4GiB-staged" bench -m "$model" --device cuda --vram-budget 4GiB \
        --memory-budget 1GiB --prompt-tokens 0 --gen-tokens 3 --runs 1
      ;;
    huge)
      model=$(synth llama70b-q4_0 --layers 80 --hidden 8192 --ffn 28672 --heads 64 --kv-heads 8 --vocab 32000 --type q4_0)
      log "huge model: $(du -h "$model" | cut -f1)"
      record huge "llama70b-q4_0-4GiB-batch1" bench -m "$model" --device cuda --vram-budget 4GiB \
        --prompt-tokens 0 --gen-tokens 4 --runs 1
      record huge "llama70b-q4_0-4GiB-batch32" bench -m "$model" --device cuda --vram-budget 4GiB \
        --prompt-tokens 0 --gen-tokens 4 --runs 1 --batch 32
      ;;
    engine)
      smol=$(smollm2)
      if [ -n "$smol" ]; then
        for device in cuda cpu; do
          record engine "SmolLM2 generate on $device" generate -m "$smol" --device "$device" \
            --prompt "The capital of France is" -n 48 --temperature 0
        done
        record engine "SmolLM2 concurrency" bench -m "$smol" --device cuda --concurrency 1,16,64 \
          --prompt-tokens 32 --gen-tokens 64 --runs 1
      else
        log "SmolLM2: not all parts have arrived"
      fi
      model=$(llama8b q4_0)
      record engine "llama8b-q4_0 resident, model driven directly" bench -m "$model" --device cuda \
        --prompt-tokens 0 --gen-tokens 64 --runs 2
      record engine "llama8b-q4_0 resident concurrency" bench -m "$model" --device cuda --concurrency 1,16,64 \
        --prompt-tokens 128 --gen-tokens 64 --runs 1
      record engine "llama8b-q4_0 half streamed concurrency" bench -m "$model" --device cuda --vram-budget 3GiB \
        --concurrency 1,16 --prompt-tokens 16 --gen-tokens 32 --runs 1
      ;;
    engine-c1)
      model=$(llama8b q4_0)
      for prompt in 1 128 1024; do
        record engine-c1 "direct, prompt $prompt" bench -m "$model" --device cuda --prompt-tokens "$prompt" \
          --gen-tokens 64 --runs 2
        record engine-c1 "engine, prompt $prompt" bench -m "$model" --device cuda --concurrency 1 \
          --prompt-tokens "$prompt" --gen-tokens 64 --runs 1
      done
      ;;
    *) log "unknown stage $stage"; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$OUT/log.txt" 2>&1
log "done: $*"
