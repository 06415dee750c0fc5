#!/usr/bin/env bash
# Re-score the exports of benchmarks/engine_quality.sh on the same WikiText-2 windows with `safeptq eval`, which
# reports the window-bootstrap 95% interval (the exports reload to the in-memory quantized models exactly:
# quantize.json "verify"). Usage: bash benchmarks/engine_ppl_ci.sh; writes runs/bench/engine/*/ppl.json
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SAFEPTQ:-.venv/bin/safeptq}
OUT=${OUT:-runs/bench/engine}
WINDOWS=${WINDOWS:-40}
for d in "$OUT"/*/; do
  r=$(basename "$d"); [ -f "$d/ppl.json" ] && continue
  m="$d"; [ "$r" = fp ] && m=default
  $S eval --model "$m" --suite wikitext2 --limit "$WINDOWS" --no-progress --out "$d/ppl.json"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    f = d / "ppl.json"
    if f.is_file():
        r = json.loads(f.read_text())["suites"]["wikitext2"]
        print(f"| {d.name} | {r['perplexity']:.2f} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] |")
# paired ratios on the same windows (windows resampled together): A/B perplexity and its 95% interval
import numpy as np
def nll(name):
    f = pathlib.Path(sys.argv[1]) / name / "ppl.json"
    return np.array(json.loads(f.read_text())["suites"]["wikitext2"]["window_nll"]) if f.is_file() else None
for a, b in [("rtn-w8a8", "fp"), ("omni-w8a8", "fp"), ("omni-w4a16", "rtn-w4a16"), ("omni-w4a16", "gptq-w4a16")]:
    x, y = nll(a), nll(b)
    if x is None or y is None:
        continue
    d = x - y
    idx = np.random.default_rng(0).integers(0, len(d), size=(2000, len(d)))
    lo, hi = np.exp(np.quantile(d[idx].mean(1), [0.025, 0.975]))
    print(f"| {a} / {b} | {np.exp(d.mean()):.4f} | [{lo:.4f}, {hi:.4f}] |")
PY
