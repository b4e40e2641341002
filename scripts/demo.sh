#!/usr/bin/env bash
# The main job: set up, start a local multi-node gpumesh testnet, show it working, tear it down.
#   bash scripts/demo.sh            # 5 nodes, stops them at the end
#   KEEP=1 bash scripts/demo.sh     # leave the testnet running (stop: gpumesh testnet down --dir ...)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
NODES=${NODES:-5}
if [ -z "${DIR:-}" ]; then
  DIR=$(mktemp -d /tmp/gpumesh-demo.XXXXXX)
  MADE_DIR=1 # ours to remove at the end (its nodes' data and the 64 MiB job's files, ~200 MB)
fi
export PATH="$PWD/.venv/bin:$PATH"
cleanup() {
  [ "${KEEP:-0}" = 1 ] && return
  gpumesh testnet down --dir "$DIR" >/dev/null 2>&1 || true
  if [ "${MADE_DIR:-0}" = 1 ]; then rm -rf "$DIR"; fi
}
trap cleanup EXIT
.venv/bin/python -m node.demo --dir "$DIR" --nodes "$NODES"
echo
echo "== the dashboard and explorer of node0 (open in a browser on this machine):"
gpumesh dashboard --home "$DIR/node0"
if [ "${KEEP:-0}" = 1 ]; then
  echo "the testnet keeps running; stop it with: gpumesh testnet down --dir $DIR"
else
  echo "(the testnet stops now and its directory is removed; KEEP=1 keeps both and the dashboard up)"
fi
