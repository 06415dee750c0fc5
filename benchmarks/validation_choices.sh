#!/usr/bin/env bash
# Defaults chosen on validation splits only (issue 19). Harmful: harmbench:val (HarmBench's own validation
# behaviours, 41); benign: alpaca:val (last 100 Alpaca rows with an input). advbench:eval and the other final
# suites are read only by the runs of the defaults themselves (the seed rows), never by an alternative.
#   realign-default-sN  the default Q-realign W8A8 runs of the three seeds (SEEDS_DIR), re-evaluated on validation
#   realign-lwclet      default schedule without the RMSNorm gains (LWC + LET only), validation only
#   realign-probe       default schedule with the paper's probe push instead of the state target, validation only
#   aaq-w4a8-sN         AAQ W4A8 with its defaults, seed N: validation and the final suites (the headline row)
#   aaq-ppl-sN          WikiText-2 perplexity of that export on PPL windows of 2048 tokens (GPTQ convention)
#   aaq-w4a8-wikitext   AAQ W4A8 on the authors' plain WikiText-2 calibration, validation only
# Usage: bash benchmarks/validation_choices.sh [RUN...]; results under OUT (runs/bench/val, runs/bench/aaq-seeds).
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
OUT=${OUT:-runs/bench/val}
AAQ_OUT=${AAQ_OUT:-runs/bench/aaq-seeds}
ATT=runs/organism/attacked
ALI=runs/organism/aligned
VAL=harmbench:val,alpaca:val
FINAL=advbench:eval,alpaca:eval
PPL=${PPL:-10}
mkdir -p "$OUT" "$AAQ_OUT"
seed_dir() { case $1 in 0) echo runs/bench/api/realign-w8a8 ;; *) echo runs/bench/seeds/realign-w8a8-s$1 ;; esac; }
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(realign-default-s0 realign-default-s1 realign-default-s2 aaq-w4a8-s0
  realign-lwclet realign-probe aaq-w4a8-s1 aaq-w4a8-s2 aaq-ppl-s0 aaq-ppl-s1 aaq-ppl-s2 aaq-w4a8-wikitext)
for r in "${runs[@]}"; do
  echo "== $r $(date -u +%H:%M:%S)"
  case $r in
    realign-default-s*)
      [ -f "$OUT/$r.json" ] || $S eval --model "$(seed_dir "${r##*-s}")" --suite $VAL --out "$OUT/$r.json" --no-progress ;;
    realign-lwclet|realign-probe)
      flags=$([ $r = realign-lwclet ] && echo --no-train-norms || echo "--malicious-target probe")
      [ -f "$OUT/$r/realign.json" ] || $S realign --model $ATT --probe-model $ALI --scheme w8a8 $flags --eval $VAL \
        --resume --out "$OUT/$r" --no-progress ;;
    aaq-w4a8-s*)
      [ -f "$AAQ_OUT/$r/aaq.json" ] || $S aaq --model $ALI --base default --scheme w4a8 --seed "${r##*-s}" \
        --eval $FINAL,$VAL --resume --out "$AAQ_OUT/$r" --no-progress ;;
    aaq-ppl-s*)
      d="$AAQ_OUT/aaq-w4a8-s${r##*-s}"
      [ -f "$d.ppl.json" ] || $S eval --model "$d" --suite wikitext2 --ppl-windows "$PPL" --out "$d.ppl.json" \
        --no-progress ;;
    aaq-w4a8-wikitext)
      [ -f "$OUT/$r/aaq.json" ] || $S aaq --model $ALI --base default --scheme w4a8 --calib wikitext2:calib \
        --calib-replies 0 --eval $VAL --resume --out "$OUT/$r" --no-progress ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
done
