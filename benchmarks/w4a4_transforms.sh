#!/usr/bin/env bash
# Does the full OSTQuant transform set rescue W4A4 at 135M? (issue 21, scope 3, capability half). The default model
# (SmolLM2-135M-Instruct) quantized by `safeptq aaq` with the pull term only (--objective kl_top: the instruct
# model is its own teacher; the default model's pre-trained base is not available offline, so no push term and no
# safety figures here), every row on the same calibration (the AAQ default preset: 64 WikiText-2 windows and 64
# Alpaca chat prompts with the model's own 64-token replies) and evaluated alike: WikiText-2 perplexity (GPTQ
# convention, PPL windows of 2048 tokens) and lm-eval's LAMBADA (OpenAI) on its first LIMIT examples.
# Rows (SCHEME w4a4 or w4a4kv4 as the suffix, e.g. quarot-w4a4kv4):
#   rtn     no transform, round to nearest                      (--steps 0, every transform off, --weights rtn)
#   gptq    no transform, GPTQ                                  (--steps 0, every transform off, --weights gptq)
#   quarot  fixed random Hadamards: residual rotation, per-head v/o, online down_proj input, q/k after RoPE, nothing
#           learnt (QuaRot's recipe), weights to nearest (QuaRot-RTN)           (--steps 0)
#   kltopr  the AAQ engine as measured before (rotation and smoothing kept by their initial KL, LWC, 100 steps),
#           weights to nearest
#   full    kltopr with the rotation always on, + up->down smoothing, per-head v/o rotation, online Hadamard, q/k Hadamard (OSTQuant's set),
#           weights to nearest
#   kltop   kltopr with GPTQ weights (the AAQ default)
# The rows with the online Hadamard round to nearest: safeptq refuses it with GPTQ weights (llm-compressor's exporter
# does not store the run-time op), so GPTQ's share is read from gptq - rtn and kltop - kltopr.
# On the organism (safety beside perplexity; the contrastive objective, pushed from the unaligned base):
#   MODEL=~/.cache/safeptq/organism/aligned-HASH AAQ_ARGS="--base default" LIMIT=50 PPL=8 \
#   EVAL=advbench:eval,harmbench,alpaca:eval,xstest:safe,sst2,wikitext2 OUT=runs/bench/w4a4-org bash benchmarks/w4a4_transforms.sh
# Usage: bash benchmarks/w4a4_transforms.sh [ROW-SCHEME...]; table: python benchmarks/tables.py --lm-eval OUT/*/aaq.json
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
OUT=${OUT:-runs/bench/w4a4}
LIMIT=${LIMIT:-100}
PPL=${PPL:-10}
MODEL=${MODEL:-default}
read -r -a aaq_args <<< "${AAQ_ARGS:---objective kl_top}"
EVAL=${EVAL:-wikitext2,lm-eval:lambada_openai}
mkdir -p "$OUT"
runs=("$@"); [ ${#runs[@]} -eq 0 ] && runs=(rtn-w4a4 quarot-w4a4 full-w4a4 kltopr-w4a4 gptq-w4a4 kltop-w4a4
                                            rtn-w4a4kv4 quarot-w4a4kv4 full-w4a4kv4)
ev=(--eval "$EVAL" --eval-limit "$LIMIT" --ppl-windows "$PPL")
none=(--rotation off --no-smoothing --no-lwc)
qr=(--rotation on --vo-rotation --online-hadamard --qk-hadamard --no-smoothing --no-lwc)
full=(--rotation on --up-down --vo-rotation --online-hadamard --qk-hadamard)
for r in "${runs[@]}"; do
  d="$OUT/$r"; row=${r%%-*}; scheme=${r#*-}
  [ -f "$d/aaq.json" ] && { echo "skip $r (done)"; continue; }
  w=gptq; [ "$scheme" = w4a4kv4 ] && w=rtn
  echo "== $r $(date -u +%H:%M:%S)"
  case $row in
    rtn)    flags=(--steps 0 "${none[@]}" --weights rtn) ;;
    gptq)   flags=(--steps 0 "${none[@]}" --weights gptq) ;;
    quarot) flags=(--steps 0 "${qr[@]}" --weights rtn) ;;
    kltopr) flags=(--weights rtn) ;;
    full)   flags=("${full[@]}" --weights rtn) ;;
    kltop)  flags=(--weights "$w") ;;
    *) echo "unknown row $r"; exit 2 ;;
  esac
  $S aaq --model "$MODEL" "${aaq_args[@]}" --scheme "$scheme" "${flags[@]}" "${ev[@]}" --resume --out "$d" --no-progress
done
