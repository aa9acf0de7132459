#!/usr/bin/env bash
# Build llama.cpp, the reference engine Air is compared against, from a registry package.
#
# The PyPI sdist of llama-cpp-python 0.3.36 vendors llama.cpp commit 0c1e570, the commit behind the
# reference outputs in tests/reference/. Builds its CPU tools (llama-bench, llama-perplexity,
# llama-tokenize, llama-completion, llama-server) with -DGGML_NATIVE=ON into $AIR_LLAMACPP_DIR/build/bin
# (default ~/.cache/air/llamacpp). Takes ~15 minutes on 2 cores; a finished build is reused.
# Prints the bin directory on its last line.
#
# Run its tools with weight repacking off (`-nr`, llama-bench `--repack 0`): the AMX path crashes
# on the development machines.
set -euo pipefail

dir="${AIR_LLAMACPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/air/llamacpp}"
ver=0.3.36
sdist="llama_cpp_python-$ver.tar.gz"
sum=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/$sdist"
tools=(llama-bench llama-perplexity llama-tokenize llama-completion llama-server)

mkdir -p "$dir"
cd "$dir"
bin="$dir/build/bin"
built=1
for tool in "${tools[@]}"; do [ -x "$bin/$tool" ] || built=0; done
if [ "$built" = 1 ]; then echo "$bin"; exit 0; fi
command -v cmake >/dev/null || python3 -m pip install --quiet cmake
command -v ninja >/dev/null || python3 -m pip install --quiet ninja
[ -f "$sdist" ] || curl -fsSL -o "$sdist" "$url"
echo "$sum  $sdist" | sha256sum -c --quiet -
[ -d "llama_cpp_python-$ver" ] || tar xzf "$sdist"
src="$dir/llama_cpp_python-$ver/vendor/llama.cpp"
cmake -S "$src" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
cmake --build build --target "${tools[@]}" -j "$(nproc)" >&2
echo "$bin"
