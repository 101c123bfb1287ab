#!/usr/bin/env bash
# Set everything up (idempotent; minutes with the cached mmcv wheel) and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${MIMBENCH_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
