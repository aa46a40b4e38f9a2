#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine: Debian's Chromium (the dashboard's browser test) and
# Prometheus (promtool, and the real-stack test), Debian's Docker engine and debootstrap (the image test, which is
# skipped if they cannot be installed or the engine cannot run), a virtual environment with the project and its test
# extras, then pytest (arguments are passed on to it).
set -euo pipefail
cd "$(dirname "$0")/.."
as_root=$([ "$(id -u)" = 0 ] || echo sudo)
apt_install() {
  $as_root apt-get install -y -q "$@" >/dev/null \
    || { $as_root apt-get update -q >/dev/null && $as_root apt-get install -y -q "$@" >/dev/null; }
}
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v prometheus >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt_install docker.io debootstrap || echo "scripts/test.sh: docker.io not installed: the image test will be skipped" >&2
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/pytest "$@"
