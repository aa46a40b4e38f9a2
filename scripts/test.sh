#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine: Debian's Chromium (the dashboard's browser test) and
# Prometheus (promtool, and the real-stack test), a virtual environment with the project and its test extras, then
# pytest (arguments are passed on to it).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v prometheus >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  as_root=$([ "$(id -u)" = 0 ] || echo sudo)
  $as_root apt-get install -y -q "${missing[@]}" >/dev/null \
    || { $as_root apt-get update -q && $as_root apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/pytest "$@"
