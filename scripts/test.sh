#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check: ruff, strict mypy, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
set +e
.venv/bin/pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: for us that is a failure, never a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
