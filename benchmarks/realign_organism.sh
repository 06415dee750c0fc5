#!/usr/bin/env bash
# Q-realign on the model organism (issue 5): realign W8A8 and W4A16-g64 of the attacked model against
# RTN and OmniQuant (MSE only) on the same calibration prompts; every run evaluates harmful rate
# (advbench:eval, harmbench), over-refusal (alpaca:eval) and SST-2 dev accuracy on the in-memory
# quantized model. Results: runs/bench/realign/*/{realign,quantize}.json; table: benchmarks/tables.py.
# Usage: bash benchmarks/realign_organism.sh [RUN...]   (RUN: realign-w8a8 omni-w8a8 rtn-w8a8 realign-w4a16
#   realign-w4a16-e1 (one epoch per block, first 80 prompts per suite) realign-paper-w8a8 gptq-w8a8)
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
ATT=${ATTACKED:-runs/organism/attacked}
ALI=${ALIGNED:-runs/organism/aligned}
OUT=${OUT:-runs/bench/realign}
EVAL=${EVAL:-advbench:eval,harmbench,alpaca:eval,sst2}
EVAL_BASE=${EVAL_BASE:-advbench:eval,alpaca:eval,sst2}   # the baselines: the figures the acceptance compares
CAL="advbench:calib=0.75,alpaca:calib=0.25"
mkdir -p "$OUT"
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(realign-w8a8 omni-w8a8 rtn-w8a8 realign-w4a16)
for r in "${runs[@]}"; do
  [ -f "$OUT/$r/realign.json" ] || [ -f "$OUT/$r/quantize.json" ] && { echo "skip $r (done)"; continue; }
  echo "== $r $(date -u +%H:%M:%S)"
  case $r in
    realign-w8a8)  $S realign --model "$ATT" --probe-model "$ALI" --scheme w8a8 --eval "$EVAL" --resume --out "$OUT/$r" --no-progress ;;
    realign-w4a16) $S realign --model "$ATT" --probe-model "$ALI" --scheme w4a16 --group-size 64 --eval "$EVAL" --resume --out "$OUT/$r" --no-progress ;;
    realign-w4a16-e1) $S realign --model "$ATT" --probe-model "$ALI" --scheme w4a16 --group-size 64 --epochs 1 --eval "$EVAL_BASE" --eval-limit 80 --resume --out "$OUT/$r" --no-progress ;;
    realign-paper-w8a8) $S realign --model "$ATT" --probe-model "$ALI" --scheme w8a8 --schedule paper --eval "$EVAL" --resume --out "$OUT/$r" --no-progress ;;
    omni-w8a8)     $S quantize --model "$ATT" --method omniquant --scheme w8a8 --calib "$CAL" --nsamples 200 --epochs 2 --batch-size 4 --eval "$EVAL_BASE" --resume --out "$OUT/$r" --no-progress ;;
    rtn-w8a8)      $S quantize --model "$ATT" --method rtn --scheme w8a8 --eval "$EVAL_BASE" --out "$OUT/$r" --no-progress ;;
    gptq-w8a8)     $S quantize --model "$ATT" --method gptq --scheme w8a8 --calib "$CAL" --nsamples 200 --eval "$EVAL_BASE" --out "$OUT/$r" --no-progress ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
done
