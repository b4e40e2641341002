#!/usr/bin/env bash
# Create .venv with Python 3.11 and install gpumesh with its dev tools. Idempotent and quiet;
# prints pip's log only when something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing gpumesh and its dependencies into .venv" >&2
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e '.[dev]'; } >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
  .venv/bin/python -W ignore -c 'import libp2p, trio, plyvel, msgpack, aiohttp, pynvml, cryptography'
  touch .venv/.installed
fi
# A node provides compute only where bubblewrap works (filesystem and network isolation), or
# where the operator chose [compute] sandbox = "process". The sandbox tests also run hostile
# jobs written in sh and python3 (setsid from util-linux); container images are unpacked by
# umoci and the image tests build one from busybox-static; a provider pulls images from a
# registry with skopeo. Installed as root from Debian; under
# CI=true a missing part fails setup (the tests would fail, never skip, anyway).
sandbox_missing() {
  command -v bwrap >/dev/null 2>&1 || return 0
  command -v setsid >/dev/null 2>&1 || return 0
  [ -x /usr/bin/python3 ] || return 0
  command -v umoci >/dev/null 2>&1 || return 0
  [ -x /bin/busybox ] || return 0
  command -v skopeo >/dev/null 2>&1 || return 0
  return 1
}
if sandbox_missing && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing bubblewrap, util-linux, python3, umoci, busybox-static and skopeo" >&2
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap util-linux python3 \
      umoci busybox-static skopeo; } \
    >"$log" 2>&1 || cat "$log" >&2
fi
if sandbox_missing; then
  if [ "${CI:-}" = true ]; then
    echo "setup: bwrap, setsid, /usr/bin/python3, umoci, busybox or skopeo missing; the sandbox and image tests need them" >&2
    exit 1
  fi
  echo "setup: bwrap, setsid, /usr/bin/python3, umoci, busybox or skopeo missing; those tests will skip" >&2
fi
# The dashboard tests (tests/e2e/test_dashboard.py) render every page in headless Chromium.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing chromium for the dashboard tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >"$log" 2>&1 || echo "setup: chromium not installed; the dashboard tests cannot run" >&2
fi
# The js-libp2p interop test (tests/p2p/test_js_interop.py) runs a stock js-libp2p peer:
# Node.js and npm from Debian, then the locked npm packages into tests/p2p/js_peer/node_modules.
if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Node.js and npm for the js-libp2p interop test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; } \
    >"$log" 2>&1 || echo "setup: Node.js not installed; the js interop test cannot run" >&2
fi
js_peer=tests/p2p/js_peer
if command -v npm >/dev/null 2>&1 &&
   { [ ! -d "$js_peer/node_modules" ] || [ "$js_peer/package-lock.json" -nt "$js_peer/node_modules" ]; }; then
  echo "setup: installing the js-libp2p interop peer's npm packages" >&2
  if (cd "$js_peer" && npm ci --no-audit --no-fund) >"$log" 2>&1; then
    touch "$js_peer/node_modules"
  else
    cat "$log" >&2
    echo "setup: npm ci failed; the js interop test cannot run" >&2
  fi
fi
