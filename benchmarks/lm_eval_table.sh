#!/usr/bin/env bash
# Capability next to the field's numbers (issue 19): lm-eval's seven tasks (zero-shot, lm-eval 0.4.13 prompts, local
# data) and WikiText-2 perplexity in the GPTQ convention (2048-token windows) for
#   the default model (SmolLM2-135M-Instruct): fp, rtn|gptq|omni - w8a8|w4a16 (w4a16 = group 64) on safeptq's default
#   calibration (128 Alpaca chat prompts); a trailing -text (gptq-w4a16-text) calibrates as the GPTQ papers do, on
#   plain text: TEXT_N windows of 2048 tokens of wikitext2:calib (the second half of the test text; the perplexity
#   windows are the first ones, see README),
#   the organism: org-aligned, org-attacked, org-realigned (REALIGNED, Q-realign W8A8), org-aaq (AAQ, AAQ W4A8).
# Each row is three evaluations of the same model (an export is reloaded with its activation quantizers):
#   RUN.json       ARC-e, ARC-c, PIQA, WinoGrande, BoolQ, LAMBADA on their first LIMIT examples;
#   RUN.mmlu.json  MMLU on its first MMLU examples of each of the 57 subjects (57 x MMLU questions; MMLU=0 skips it:
#                  at 135M every row answered at the "always A" level, BENCHMARKS "Capability");
#   RUN.ppl.json   WikiText-2 (GPTQ convention) on its first PPL windows of 2048 tokens.
# Quantized models are written to OUT/RUN/ first (no evaluation inside the quantize run).
# Usage: bash benchmarks/lm_eval_table.sh [RUN...]; table: python benchmarks/tables.py --lm-eval OUT/*.json
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
OUT=${OUT:-runs/bench/lmeval}
LIMIT=${LIMIT:-50}
MMLU=${MMLU:-10}
PPL=${PPL:-10}
REALIGNED=${REALIGNED:-runs/bench/api/realign-w8a8}
AAQ=${AAQ:-runs/bench/aaq-seeds/aaq-w4a8-s0}
TASKS="lm-eval:arc_easy,arc_challenge,piqa,winogrande,boolq,lambada_openai"
mkdir -p "$OUT"
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(fp rtn-w8a8 gptq-w8a8 omni-w8a8 rtn-w4a16 gptq-w4a16 omni-w4a16
                                            org-aligned org-attacked org-realigned org-aaq)
for r in "${runs[@]}"; do
  echo "== $r $(date -u +%H:%M:%S)"
  case $r in
    fp) m=default ;;
    org-aligned) m=runs/organism/aligned ;;
    org-attacked) m=runs/organism/attacked ;;
    org-realigned) m=$REALIGNED ;;
    org-aaq) m=$AAQ ;;
    rtn-*|gptq-*|omni-*)
      m=$OUT/$r; method=${r%%-*}; [ "$method" = omni ] && method="omniquant --epochs 2"
      scheme=${r#*-}; calib=()
      case $scheme in *-text) scheme=${scheme%-text}; calib=(--calib wikitext2:calib --nsamples "${TEXT_N:-32}" --seqlen 2048) ;; esac
      [ -f "$m/quantize.json" ] || $S quantize --model default --method $method --scheme "$scheme" "${calib[@]}" \
        --resume --out "$m" --no-progress ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
  [ -e "$m" ] || [ "$m" = default ] || { echo "skip $r: $m is missing"; continue; }
  [ -f "$OUT/$r.json" ] || $S eval --model "$m" --suite "$TASKS" --limit "$LIMIT" --out "$OUT/$r.json" --no-progress
  [ -f "$OUT/$r.ppl.json" ] || $S eval --model "$m" --suite wikitext2 --ppl-windows "$PPL" --out "$OUT/$r.ppl.json" \
    --no-progress
  [ "$MMLU" = 0 ] || [ -f "$OUT/$r.mmlu.json" ] || $S eval --model "$m" --suite lm-eval:mmlu --limit "$MMLU" \
    --out "$OUT/$r.mmlu.json" --no-progress
done
