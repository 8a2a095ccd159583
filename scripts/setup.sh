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
  # the CPU build: a local wheel if pip's find-links has one, else PyTorch's CPU index (PyPI's torch for
  # Linux is the CUDA build, several GB); TORCH_INDEX_URL picks another index (e.g. a CUDA one)
  PIP=(.venv/bin/pip install --quiet --disable-pip-version-check)
  if "${PIP[@]}" --no-index --no-deps "torch==${TORCH_VERSION}" 2>/dev/null; then
    "${PIP[@]}" "torch==${TORCH_VERSION}"  # its dependencies
  else
    "${PIP[@]}" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
      --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"
  fi
fi
if ! .venv/bin/python -c "import petals_like, hivemind, pytest, transformers, peft" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.petals_like_installed ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
  touch .venv/.petals_like_installed
fi
