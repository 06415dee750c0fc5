#!/usr/bin/env bash
# Capability next to the field's numbers (issue 19): the default model (SmolLM2-135M-Instruct) in full precision and
# quantized (RTN W8A8, RTN / GPTQ / OmniQuant W4A16-g64) on the seven lm-eval tasks (zero-shot, lm-eval 0.4.13 prompts,
# local data) and WikiText-2 perplexity in the GPTQ convention (2048-token windows).
# LIMIT examples per task (per subject for MMLU), PPL windows of 2048 tokens; both stated in the table.
# Results: runs/bench/lmeval/*.json; table: python benchmarks/tables.py --lm-eval runs/bench/lmeval/*
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
OUT=${OUT:-runs/bench/lmeval}
LIMIT=${LIMIT:-100}
PPL=${PPL:-40}
EV="lm-eval:arc_easy,arc_challenge,piqa,winogrande,boolq,lambada_openai,mmlu,wikitext2"
mkdir -p "$OUT"
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(fp rtn-w8a8 rtn-w4a16 gptq-w4a16 omni-w4a16)
for r in "${runs[@]}"; do
  [ -f "$OUT/$r.json" ] || [ -f "$OUT/$r/quantize.json" ] && { echo "skip $r (done)"; continue; }
  echo "== $r $(date -u +%H:%M:%S)"
  case $r in
    fp) $S eval --model default --suite "$EV" --limit "$LIMIT" --ppl-windows "$PPL" --out "$OUT/fp.json" --no-progress ;;
    rtn-*)  $S quantize --model default --method rtn --scheme "${r#rtn-}" --eval "$EV" --eval-limit "$LIMIT" --ppl-windows "$PPL" --out "$OUT/$r" --no-progress ;;
    gptq-*) $S quantize --model default --method gptq --scheme "${r#gptq-}" --eval "$EV" --eval-limit "$LIMIT" --ppl-windows "$PPL" --out "$OUT/$r" --no-progress ;;
    omni-*) $S quantize --model default --method omniquant --scheme "${r#omni-}" --epochs 2 --eval "$EV" --eval-limit "$LIMIT" --ppl-windows "$PPL" --resume --out "$OUT/$r" --no-progress ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
done
