#!/usr/bin/env bash
# End-to-end tests: real binaries on loopback, driven by the official `openai` Python package.
#
# Installs tests/e2e/requirements.txt into ~/.cache/air/python (a private --target directory: no
# virtualenv needed, the system Python untouched), builds `air` unless AIR_BIN names one, and
# runs tests/e2e with unittest (or the tests named as arguments). Needs the default model (scripts/fetch-models.sh).
set -euo pipefail
[ -z "${AIR_BIN:-}" ] || AIR_BIN="$(realpath "$AIR_BIN")"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/air"
site="$cache/python"
stamp="$site/.requirements.sha256"
want=$(sha256sum tests/e2e/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$site"
  python3 -m pip install --quiet --disable-pip-version-check --target "$site" -r tests/e2e/requirements.txt
  echo "$want" > "$stamp"
fi
if [ -z "${AIR_BIN:-}" ]; then
  cargo build --locked -p air
  AIR_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/air"
fi
export AIR_BIN PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
cd tests/e2e
# Arguments name tests (e.g. test_openai_api.Overload); none: all of them.
[ $# -gt 0 ] || exec python3 -m unittest discover -v -p 'test_*.py'
exec python3 -m unittest -v "$@"
