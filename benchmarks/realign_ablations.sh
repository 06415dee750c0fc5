#!/usr/bin/env bash
# Q-realign ablations on organism v7 (issue 21, scope 2): what brings the refusals back, and how reliably.
# Malicious target x trained parameters, W8A8, one run per seed:
#   TARGET: push-paper (probe push, paper probes: raw features + saga), push (probe push, standardized probes),
#           state (the aligned model's last-token state; the default), state-probe (its component along the probe
#           only), mean-diff (push across the aligned model's dense mean-difference direction)
#   PARAMS: lwclet (LWC + LET only, the paper's), norms (+ the RMSNorm gains, the default schedule)
# RUN = TARGET-PARAMS-sSEED, e.g. state-lwclet-s1; W4A16-g64 variants: TARGET-PARAMS-w4a16-sSEED.
# Choices read the validation columns only (harmbench:val, alpaca:val); the final suites (advbench:eval, harmbench,
# alpaca:eval, xstest:safe, sst2, wikitext2 on PPL windows) are evaluated in the same run for the report.
# realign.json records per layer the separability and the shift cosine (realigned vs aligned shift from attacked).
# Usage: bash benchmarks/realign_ablations.sh RUN...   (default: the 10 W8A8 cells at seed 0)
# Table: python benchmarks/tables.py runs/bench/ablate/*/ ; report: safeptq report runs/bench/ablate/*/ --out ...
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
OUT=${OUT:-runs/bench/ablate}
PPL=${PPL:-10}
EVAL=harmbench:val,alpaca:val,advbench:eval,harmbench,alpaca:eval,xstest:safe,sst2,wikitext2
mkdir -p "$OUT"
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  for t in push-paper push state state-probe mean-diff; do for p in lwclet norms; do runs+=("$t-$p-s0"); done; done
fi
for r in "${runs[@]}"; do
  [ -f "$OUT/$r/realign.json" ] && { echo "skip $r (done)"; continue; }
  seed=${r##*-s}; rest=${r%-s*}
  scheme=w8a8; case $rest in *-w4a16) scheme=w4a16; rest=${rest%-w4a16} ;; esac
  params=${rest##*-}; target=${rest%-*}
  flags=()
  case $target in
    push-paper) flags+=(--malicious-target probe --probe-fit paper) ;;
    push) flags+=(--malicious-target probe) ;;
    state) flags+=(--malicious-target state) ;;
    state-probe) flags+=(--malicious-target state_probe) ;;
    mean-diff) flags+=(--malicious-target mean_diff) ;;
    *) echo "unknown target in $r"; exit 2 ;;
  esac
  case $params in
    lwclet) flags+=(--no-train-norms) ;;
    norms) flags+=(--train-norms) ;;
    *) echo "unknown parameter set in $r"; exit 2 ;;
  esac
  echo "== $r $(date -u +%H:%M:%S): ${flags[*]} --scheme $scheme --seed $seed"
  $S realign --model runs/organism/attacked --probe-model runs/organism/aligned --scheme "$scheme" --seed "$seed" \
    "${flags[@]}" --eval "$EVAL" --ppl-windows "$PPL" --resume --out "$OUT/$r" --no-progress
done
