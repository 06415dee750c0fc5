#!/usr/bin/env bash
# AAQ on the model organism (issue 6). The instruct model is the organism's aligned stage, its base the
# original default model. Each run evaluates the in-memory quantized model (activation quantizers on):
# harmful rate on advbench:eval, over-refusal on alpaca:eval, WikiText-2 perplexity on its first 40
# windows of 512 tokens (AAQ calibrates on wikitext2:calib, the second half of the text, never read there).
# Results: runs/bench/aaq/*/{aaq,quantize}.json and fp-aligned.json; table: benchmarks/tables.py aaq.
# Usage: bash benchmarks/aaq_organism.sh [RUN...]
#   RUN: fp-aligned | rtn-SCHEME | gptq-SCHEME | kltop-SCHEME | aaq-SCHEME[-lLAMBDA] | aaqu-SCHEME[-lLAMBDA]
#   | aaqg-SCHEME[-lLAMBDA] | kltopg-SCHEME | aaqm-SCHEME[-lLAMBDA] (aaqu: the authors' unbounded push; aaqm: the
#   margin push; aaqg/kltopg: GPTQ weights
#   after training),
#   SCHEME: w4a16 w4a8 w4a4 w4a4kv4 (w4a16 is group 64); without a suffix a run calibrates on WikiText-2 alone
#   (wikitext2:calib, the authors' choice); a trailing -chat calibrates on alpaca:calib (benign
#   chat prompts, chat template) instead of WikiText-2 (e.g. aaq-w4a8-chat); a trailing -sd on half WikiText-2
#   windows, half benign chat prompts each followed by the instruct model's own 64-token greedy reply
#   (--calib-replies 64: self-distillation data, still no safety data; safeptq aaq's default; e.g. aaqg-w4a8-sd);
#   memory runs (5 steps, no evaluation): mem-kltop, mem-aaq (cached references), mem-live (live references)
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
ALI=${ALIGNED:-runs/organism/aligned}
BASE=${BASE:-default}
OUT=${OUT:-runs/bench/aaq}
EVAL=${EVAL:-advbench:eval,alpaca:eval,wikitext2}
AAQ_ARGS=${AAQ_ARGS:-}   # extra flags for every aaq/kltop run, e.g. "--steps 50"
mkdir -p "$OUT"
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(fp-aligned rtn-w4a16 rtn-w4a8 rtn-w4a4 kltop-w4a4 aaq-w4a4)
for r in "${runs[@]}"; do
  d="$OUT/$r"
  [ -f "$d/aaq.json" ] || [ -f "$d/quantize.json" ] || [ -f "$d.json" ] && { echo "skip $r (done)"; continue; }
  echo "== $r $(date -u +%H:%M:%S)"
  scheme=${r#*-}; scheme=${scheme%%-*}
  gs=(); [ "$scheme" = w4a16 ] && gs=(--group-size 64)
  case $r in  # the calibration suffix; without one, the authors' plain-text calibration
    *-chat) cal=(--calib alpaca:calib --calib-replies 0) ;;
    *-sd)   cal=(--calib alpaca:calib=0.5,wikitext2:calib=0.5 --calib-replies 64) ;;
    *)      cal=(--calib wikitext2:calib --calib-replies 0) ;;
  esac
  r0=${r%-chat}; r0=${r0%-sd}
  lam=0.1; [[ $r0 == *-l* ]] && lam=${r0##*-l}
  ev=(--eval "$EVAL" --ppl-windows 40 --no-progress)
  mem=(--scheme w4a4 --steps 5 --no-progress --out "$d")
  case $r in
    mem-kltop) $S aaq --model "$ALI" --objective kl_top "${mem[@]}" ;;
    mem-aaq)   $S aaq --model "$ALI" --base "$BASE" "${mem[@]}" ;;
    mem-live)  $S aaq --model "$ALI" --base "$BASE" --no-ref-cache "${mem[@]}" ;;
    fp-aligned) $S eval --model "$ALI" --suite "$EVAL" --ppl-windows 40 --out "$d.json" ;;
    rtn-*)   $S quantize --model "$ALI" --method rtn --scheme "$scheme" "${gs[@]}" "${ev[@]}" --out "$d" ;;
    gptq-*)  $S quantize --model "$ALI" --method gptq --scheme "$scheme" "${gs[@]}" "${cal[@]}" \
               --nsamples 128 --seqlen 128 "${ev[@]}" --out "$d" ;;
    kltopg-*) $S aaq --model "$ALI" --objective kl_top --weights gptq --scheme "$scheme" "${gs[@]}" $AAQ_ARGS "${cal[@]}" --resume "${ev[@]}" --out "$d" ;;
    kltop-*) $S aaq --model "$ALI" --objective kl_top --scheme "$scheme" "${gs[@]}" $AAQ_ARGS "${cal[@]}" --resume "${ev[@]}" --out "$d" ;;
    aaq-*)   $S aaq --model "$ALI" --base "$BASE" --lam "$lam" --scheme "$scheme" "${gs[@]}" $AAQ_ARGS "${cal[@]}" --resume "${ev[@]}" --out "$d" ;;
    aaqg-*)  $S aaq --model "$ALI" --base "$BASE" --lam "$lam" --weights gptq --scheme "$scheme" "${gs[@]}" $AAQ_ARGS "${cal[@]}" --resume "${ev[@]}" --out "$d" ;;
    aaqm-*)  $S aaq --model "$ALI" --base "$BASE" --lam "$lam" --push margin --scheme "$scheme" "${gs[@]}" $AAQ_ARGS "${cal[@]}" --resume "${ev[@]}" --out "$d" ;;
    aaqu-*)  $S aaq --model "$ALI" --base "$BASE" --lam "$lam" --push unbounded --scheme "$scheme" "${gs[@]}" $AAQ_ARGS "${cal[@]}" --resume "${ev[@]}" --out "$d" ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
done
