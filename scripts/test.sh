#!/usr/bin/env bash
# The test suite: set up, lint, then pytest (unit tests, each stage on a tiny model, the smoke DAG).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check src tests bench scripts
python -m pytest -q "$@"
