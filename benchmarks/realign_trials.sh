#!/usr/bin/env bash
# One Q-realign W8A8 trial on the organism, evaluated on the first 80 prompts of advbench:eval and alpaca:eval
# (the schedule search in BENCHMARKS.md). Usage: bash benchmarks/realign_trials.sh NAME [realign options...]
# PROBES="--probes DIR" uses saved probes instead of fitting them on the aligned model.
set -euo pipefail
cd "$(dirname "$0")/.."
n=$1; shift
mkdir -p runs/exp
.venv/bin/safeptq realign ${PROBES:---probe-model runs/organism/aligned} --model ${ATT:-runs/organism/attacked} --scheme w8a8 \
  --eval advbench:eval,alpaca:eval --eval-limit 80 --sep-limit 50 --no-progress --out "runs/exp/$n" "$@" > "runs/exp/$n.log" 2>&1
