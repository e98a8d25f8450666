#!/usr/bin/env bash
# The prepared GPU check (issues 14, 19), one command for a session with a lent GPU:
#   bash scripts/device_check.sh               # CUDA: the fused-loss benchmark + a 20-step paper-shaped run
#                                              #   + the sampler at Qwen3-0.6B's shape (eager, compiled, HF generate)
#   bash scripts/device_check.sh --only sampler  # the sampler part alone (a few minutes, compilation included)
#   bash scripts/device_check.sh --cpu-smoke   # the same code with tiny shapes on the CPU (CI runs this)
# It prints one block (=== eopd device check ... === end) to paste into docs/scaling.md. Nothing is
# downloaded: models are built from Qwen3's configs. It needs torch and transformers (the GPU machine's image
# has them) and eopd's source, put on the path here rather than installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/device_check.py "$@"
