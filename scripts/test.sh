#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine: Debian's Chromium for the dashboard's browser test, a
# virtual environment with the project and its test extras, then pytest (arguments are passed on to it).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
  as_root=$([ "$(id -u)" = 0 ] || echo sudo)
  $as_root apt-get install -y -q chromium >/dev/null || { $as_root apt-get update -q && $as_root apt-get install -y -q chromium; }
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/pytest "$@"
