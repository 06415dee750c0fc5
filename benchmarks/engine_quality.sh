#!/usr/bin/env bash
# Quantization engine on the default model (issue 4): WikiText-2 perplexity of FP, RTN, OmniQuant (built in)
# and llm-compressor GPTQ, and wall time / peak RSS of the calibration, all on the same calibration tokens
# (alpaca:calib, 128 samples x up to 128 tokens: prompts never drawn from WikiText-2, so the perplexity text is
# unseen). Perplexity: the first $WINDOWS non-overlapping 512-token windows of the WikiText-2 test text.
# Usage: bash benchmarks/engine_quality.sh [RUN...]; table: python benchmarks/tables.py runs/bench/engine/*
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
OUT=${OUT:-runs/bench/engine}
WINDOWS=${WINDOWS:-40}
CAL=(--calib alpaca:calib --nsamples 128 --seqlen 128)
EV=(--eval wikitext2 --eval-limit "$WINDOWS" --no-progress)
mkdir -p "$OUT"
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(fp rtn-w8a8 rtn-w4a16 omni-w4a16 gptq-w4a16 omni-w8a8)
for r in "${runs[@]}"; do
  [ -f "$OUT/$r/quantize.json" ] || [ -f "$OUT/$r/eval.json" ] && { echo "skip $r (done)"; continue; }
  echo "== $r $(date -u +%H:%M:%S)"
  case $r in
    fp)         mkdir -p "$OUT/fp"; $S eval --model default --suite wikitext2 --limit "$WINDOWS" --out "$OUT/fp/eval.json" ;;
    rtn-w8a8)   $S quantize --model default --method rtn --scheme w8a8 "${EV[@]}" --out "$OUT/$r" ;;
    rtn-w4a16)  $S quantize --model default --method rtn --scheme w4a16 --group-size 64 "${EV[@]}" --out "$OUT/$r" ;;
    omni-w4a16) $S quantize --model default --method omniquant --scheme w4a16 --group-size 64 "${CAL[@]}" "${EV[@]}" --resume --out "$OUT/$r" ;;
    omni-w8a8)  $S quantize --model default --method omniquant --scheme w8a8 "${CAL[@]}" "${EV[@]}" --resume --out "$OUT/$r" ;;
    gptq-w4a16) $S quantize --model default --method gptq --scheme w4a16 --group-size 64 "${CAL[@]}" "${EV[@]}" --out "$OUT/$r" ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
done
