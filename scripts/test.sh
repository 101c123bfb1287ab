#!/usr/bin/env bash
# Set everything up (idempotent; minutes with the cached mmcv wheel), then lint (ruff), type-check
# the harness (mypy) and run the whole test suite, the layering check included
# (tests/test_layering.py). Any failure stops the run with a non-zero status.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
PY="${MIMBENCH_VENV:-$ROOT/.venv}/bin"
echo "== ruff check"
"$PY/ruff" check .
echo "== mypy (harness)"
"$PY/mypy"
echo "== pytest"
exec "$PY/python" -m pytest -q "$@"
