#!/usr/bin/env bash
# Safety across harmful-prompt sources (issue 23) on organism v7 (runs/organism). Final figures on the `safety:harmful`
# group (AdvBench eval, HarmBench standard + contextual, Do-Not-Answer eval, XSTest unsafe), whole suites; choices
# on validation sources the calibration does not read (harmbench:val; over-refusal alpaca:val).
#   fp-aligned, fp-attacked   the organism's two stages in full precision (safety group)
#   realign-default           the default Q-realign W8A8 run of seed 0 (REALIGNED), re-evaluated on the safety group
#   aaq-default               the default AAQ W4A8 run of seed 0 (AAQ), re-evaluated on the safety group
#   realign-mix               Q-realign W8A8 calibrated on several harmful sources (validation only):
#                             advbench:calib 35 %, beavertails:calib 20 %, donotanswer:calib 20 %, alpaca:calib 25 %
# Usage: bash benchmarks/generalization.sh [RUN...]; results in OUT (runs/bench/general) and runs/bench/val.
# Table: safeptq report OUT/fp-attacked.json OUT/fp-aligned.json OUT/realign-default.json OUT/aaq-default.json
#        --attacked fp-attacked --aligned fp-aligned --out OUT/report.html
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
OUT=${OUT:-runs/bench/general}
REALIGNED=${REALIGNED:-runs/bench/api/realign-w8a8}
AAQ=${AAQ:-runs/bench/aaq-seeds/aaq-w4a8-s0}
mkdir -p "$OUT" runs/bench/val
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(realign-mix fp-attacked fp-aligned realign-default aaq-default)
for r in "${runs[@]}"; do
  echo "== $r $(date -u +%H:%M:%S)"
  case $r in
    fp-aligned) m=runs/organism/aligned ;;
    fp-attacked) m=runs/organism/attacked ;;
    realign-default) m=$REALIGNED ;;
    aaq-default) m=$AAQ ;;
    realign-mix)
      [ -f runs/bench/val/$r/realign.json ] || $S realign --model runs/organism/attacked \
        --probe-model runs/organism/aligned --scheme w8a8 \
        --calib advbench:calib=0.35,beavertails:calib=0.2,donotanswer:calib=0.2,alpaca:calib=0.25 \
        --eval harmbench:val,alpaca:val --resume --out runs/bench/val/$r --no-progress
      continue ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
  [ -f "$OUT/$r.json" ] || $S eval --model "$m" --suite safety:harmful --out "$OUT/$r.json" --no-progress
done
