#!/usr/bin/env bash
# The GPU benchmark: mimbench bench at ViT-B and ViT-L (bf16, eager and compiled), MAE ViT-L under
# FSDP on one device, and the data benchmark; CSVs and a summary of img/s and MFU under
# results/bench/gpu-<device>-<date>/. Without a CUDA device it stops with "no GPU: ...".
# See harness/gpu_bench.py; --dry-run prints the commands, --help the options.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
exec "$PY" -m harness.gpu_bench "$@"
