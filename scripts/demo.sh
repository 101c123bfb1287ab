#!/usr/bin/env bash
# Set everything up (idempotent) and run the main job: the end-to-end demo suite on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${MIMBENCH_VENV:-$ROOT/.venv}/bin/mimbench" run configs/suites/demo.yaml "$@"
