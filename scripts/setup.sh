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
# Job sandboxing uses bubblewrap where it exists (network and filesystem isolation); without
# it jobs run in the plain process sandbox. Install it when we can; never fail setup over it.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing bubblewrap for job sandboxing" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } \
    >"$log" 2>&1 || echo "setup: bubblewrap not installed; jobs use the process sandbox" >&2
fi
