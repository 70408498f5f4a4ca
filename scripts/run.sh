#!/usr/bin/env bash
# The main job: set up, then run the embedded default experiment end to end
# (every family in `families`: the LLM loop, V-DPO, COrAL, VL-CoT) and print where each report is.
# Extra arguments go to snakemake, e.g. `bash scripts/run.sh --configfile configs/smoke.yaml`
# (the printed report paths are the default experiment's).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
snakemake --cores "${CORES:-$(nproc)}" "$@"
echo
echo "reports:"
closedloop show-config --report-path
