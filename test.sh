#!/usr/bin/env bash
# Set up .venv and run the test suite, offline: tiktoken's GPT-2 files come from
# ../shared/tiktoken-cache when it is there, and the Hugging Face hub is never asked.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
. .venv/bin/activate
[ -d ../shared/tiktoken-cache ] && export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$(cd ../shared/tiktoken-cache && pwd)}"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
# the tests' models are tiny: one thread each, and two test processes (pytest-xdist; a module's tests
# share one), keep both cores busy
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n 2 --dist loadscope tests "$@"
