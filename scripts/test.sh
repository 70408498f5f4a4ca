#!/usr/bin/env bash
# The test suite: set up, lint, then pytest (unit tests, each stage on a tiny model, the smoke DAG).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check src tests bench scripts
# A real single-node Slurm for tests/test_slurm.py. A Slurm that already answers is used and left alone.
# Otherwise one is started (scripts/slurm/up.sh; stopped by PID on exit, also when tests fail) only on a
# machine this run may change: CI=true (throwaway CI machines) or CLOSEDLOOP_START_SLURM=1, as root with
# apt-get. Anywhere else the Slurm tests skip, saying why. CLOSEDLOOP_SLURM=off: never touch Slurm.
if [ "${CLOSEDLOOP_SLURM:-auto}" != off ]; then
  if command -v sinfo >/dev/null && sinfo -h >/dev/null 2>&1; then
    echo "test.sh: using the Slurm that is already running (not stopped afterwards)"
    export CLOSEDLOOP_REQUIRE_SLURM=1
  elif [ "${CI:-}" != true ] && [ "${CLOSEDLOOP_START_SLURM:-}" != 1 ]; then
    echo "test.sh: no Slurm answers and this run may not install one here (set CLOSEDLOOP_START_SLURM=1 to" \
         "let scripts/slurm/up.sh install and start a local Slurm): the Slurm tests will be skipped" >&2
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    trap 'bash scripts/slurm/down.sh' EXIT
    trap 'exit 130' INT TERM
    SLURM_CI_CPUS=${SLURM_CI_CPUS:-4} bash scripts/slurm/up.sh
    export CLOSEDLOOP_REQUIRE_SLURM=1
  else
    echo "test.sh: not root or no apt-get: no local Slurm, the Slurm tests will be skipped" >&2
  fi
fi
# Debian's chromium for tests/test_report_html.py (the HTML report in a real headless browser), installed like
# Slurm: only as root with apt-get, and only in CI (CI=true) or when asked (CLOSEDLOOP_CHROMIUM=1); otherwise
# the browser tests skip and say why.
if command -v chromium >/dev/null; then
  export CLOSEDLOOP_REQUIRE_CHROMIUM=1
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && { [ "${CI:-}" = true ] || [ "${CLOSEDLOOP_CHROMIUM:-}" = 1 ]; }; then
  echo "test.sh: installing chromium (Debian) for the HTML report test"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  export CLOSEDLOOP_REQUIRE_CHROMIUM=1
else
  echo "test.sh: no chromium (install it, or run as root with CI=true or CLOSEDLOOP_CHROMIUM=1): the browser tests will be skipped" >&2
fi
python -m pytest -q "$@"
