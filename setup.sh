#!/usr/bin/env bash
# Create .venv with everything the toolkit and its tests need. Safe to re-run.
# TORCH picks the PyTorch build: the default pin is the CPU build on this project's machines;
# on a GPU machine e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -c 'import torch' 2>/dev/null || pip install -q ${TORCH:-torch==2.13.0}
# accelerate: transformers reads GGUF files only with it (tests/test_gguf.py)
pip install -q -r requirements.txt pytest pytest-xdist playwright accelerate
pip install -q -r requirements-serve.txt  # serve.py and its tests; the core scripts never need it
