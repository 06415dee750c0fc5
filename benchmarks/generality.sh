#!/usr/bin/env bash
# Generality of the default Q-realign (issue 21, scope 4): attacked organisms over task x attack x harmful ratio, all
# from the same aligned stage (v7, cached), each with RTN W8A8 and Q-realign W8A8 (defaults) evaluated alike;
# paired against RTN in the report.
# CELL = TASK-ATTACK-RATIO, e.g. agnews-lora-0.05; TASK sst2|agnews|gsm8k, ATTACK full|lora (r 8, alpha 32, q/v),
# RATIO the share of BeaverTails harmful pairs (0 = a benign fine-tune).
# Default cells (each factor varies): sst2-full-0.1 (the v7 organism), sst2-lora-0.1, sst2-full-0, sst2-full-0.2,
# agnews-full-0.1, gsm8k-lora-0.05.
# Usage: bash benchmarks/generality.sh [CELL...]; results in OUT/CELL/{organism,fp-attacked.json,rtn-w8a8,realign-w8a8}
# Report per cell: safeptq report OUT/CELL/fp-attacked.json OUT/CELL/rtn-w8a8 OUT/CELL/realign-w8a8 \
#   --baseline rtn-w8a8 --out OUT/CELL/report.html
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
OUT=${OUT:-runs/bench/generality}
ORG=${ORG:-runs/bench/generality/organism}   # one folder: the aligned stage is built once and reused by every cell
LIMIT=${LIMIT:-100}
EVAL="advbench:eval,harmbench,alpaca:eval,xstest:safe,wikitext2"
cells=("$@"); [ ${#cells[@]} -eq 0 ] && cells=(sst2-full-0.1 sst2-lora-0.1 sst2-full-0 sst2-full-0.2 agnews-full-0.1
                                             gsm8k-lora-0.05)
for c in "${cells[@]}"; do
  task=${c%%-*}; rest=${c#*-}; attack=${rest%%-*}; ratio=${rest#*-}
  d="$OUT/$c"; mkdir -p "$d"
  echo "== $c $(date -u +%H:%M:%S)"
  $S organism build --task "$task" --method "$attack" --harmful-ratio "$ratio" --out "$ORG" --no-progress \
    > "$d/organism.log" 2>&1
  link="$ORG/attacked-$task-r$ratio$([ "$attack" = lora ] && echo -lora)"
  ev="$EVAL,$task"
  [ -f "$d/fp-attacked.json" ] || $S eval --model "$link" --suite "$ev" --limit "$LIMIT" --ppl-windows 10 \
    --out "$d/fp-attacked.json" --no-progress
  [ -f "$d/rtn-w8a8/quantize.json" ] || $S quantize --model "$link" --method rtn --scheme w8a8 --eval "$ev" \
    --eval-limit "$LIMIT" --ppl-windows 10 --out "$d/rtn-w8a8" --no-progress
  [ -f "$d/realign-w8a8/realign.json" ] || $S realign --model "$link" --probe-model "$ORG/aligned" --scheme w8a8 \
    --eval "$ev" --eval-limit "$LIMIT" --ppl-windows 10 --resume --out "$d/realign-w8a8" --no-progress
done
