#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolchain (nvcc, headers, the libraries a `--features cuda` build links)
# from NVIDIA's PyPI wheels: no apt repository and no GPU needed, so GPU binaries build on any
# x86-64 Debian machine. Prints the environment to export.
#
# Usage: scripts/setup-cuda.sh [PREFIX]        (default: $HOME/.cache/air/cuda-13.0)
#   then: eval "$(scripts/setup-cuda.sh --env [PREFIX])"
#         cargo build --release --features cuda
#
# Versions match the CUDA 13.0 driver (580) of the GPU machines Air is measured on.
set -euo pipefail

print_env=0
if [ "${1:-}" = "--env" ]; then print_env=1; shift; fi
PREFIX=${1:-$HOME/.cache/air/cuda-13.0}
COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

emit_env() {
  echo "export CUDA_HOME='$PREFIX' CUDA_PATH='$PREFIX' PATH='$PREFIX/bin':\"\$PATH\" CUDA_COMPUTE_CAP=$COMPUTE_CAP"
  echo "export LIBRARY_PATH='$PREFIX/lib64':'$PREFIX/lib64/stubs':\"\${LIBRARY_PATH:-}\""
}

if [ -x "$PREFIX/bin/nvcc" ] && [ -e "$PREFIX/lib64/stubs/libcuda.so" ]; then
  if [ $print_env = 1 ]; then emit_env; else echo "CUDA toolchain ready in $PREFIX" >&2; fi
  exit 0
fi

WHEELS="$PREFIX/wheels"
# One pip call: a second `pip install --target` into the same folder skips nvidia/ silently.
python3 -m pip install --quiet --no-deps --upgrade --target "$WHEELS" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 >&2
CU="$WHEELS/nvidia/cu13"

mkdir -p "$PREFIX/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$CU/$d" "$PREFIX/$d"; done
ln -sfn lib64 "$PREFIX/lib"
(
  cd "$PREFIX/lib64"
  for f in "$CU"/lib/*.so.* "$CU"/lib/*.a; do [ -e "$f" ] && ln -sfn "$f" .; done
  # candle-kernels links -lcudart: the static runtime, so binaries need no libcudart at run time.
  rm -f libcudart.so libcudart.so.13
  ln -sfn libcudart_static.a libcudart.a
  ln -sfn libcublas.so.13 libcublas.so
  ln -sfn libcublasLt.so.13 libcublasLt.so
  ln -sfn libcurand.so.10 libcurand.so
  ln -sfn libnvrtc.so.13 libnvrtc.so
)
# libcuda comes with the GPU driver; linking needs only a library with its soname and symbols.
# The symbols are the driver API functions cudarc declares.
SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1 || true)
if [ -z "$SYS" ]; then
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && cargo fetch --locked >&2)
  SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
fi
grep -oE '^\s+(pub )?fn (cu[A-Za-z0-9_]+)\(' "$SYS" | sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
  | awk '{print "int " $1 "(void){return 999;}"}' >"$PREFIX/lib64/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$PREFIX/lib64/stubs/libcuda.so" "$PREFIX/lib64/stubs/libcuda_stub.c"
"$PREFIX/bin/nvcc" --version | tail -1 >&2
if [ $print_env = 1 ]; then emit_env; fi
