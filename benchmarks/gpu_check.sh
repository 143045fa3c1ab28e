#!/usr/bin/env bash
# One device check of the GPU path (see benchmarks/gpu_check.py and benchmarks/README.md):
#   bash benchmarks/gpu_check.sh                # one GPU: resnet50_vd at 224 px, <= 8 minutes
#   bash benchmarks/gpu_check.sh --device cpu   # tiny sizes on the CPU, ~2 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
exec "$python" benchmarks/gpu_check.py "$@"
