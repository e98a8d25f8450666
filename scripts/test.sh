#!/usr/bin/env bash
# The whole test suite from a fresh machine: makes .venv, installs eopd with its dev and peft extras
# (torch pinned to the local CPU wheel first so nothing pulls a CUDA build), then ruff and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,peft]"  # peft: the LoRA tests run too
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/python -m pytest "$@"
