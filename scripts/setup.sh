#!/usr/bin/env bash
# Creates .venv with a CPU build of torch (installed first, so pip never pulls a CUDA build) and
# petals_like with its test extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION}"
fi
if ! .venv/bin/python -c "import petals_like, hivemind, pytest, transformers, peft" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.petals_like_installed ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
  touch .venv/.petals_like_installed
fi
