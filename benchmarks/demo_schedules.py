"""Shorter demo schedules against the default one, on a built organism (issue 20: the cached demo's ≤ 20 min target).

Each variant is a whole demo in OUT/VARIANT with its own Q-realign / AAQ settings and perplexity windows; the stages
whose settings a variant shares with an earlier one (the two full-precision evaluations and RTN W8A8, at the same
--limit and windows) are copied from it instead of recomputed. Prints, per variant, each stage's wall time and the
headline numbers, and writes OUT/schedules.json. Choose on validation-like criteria only: the variants differ in
settings, and each demo's figures are on the evaluation splits, so read the table as "does the short schedule
reproduce the default's figures within their intervals", not as a search.

Usage: python benchmarks/demo_schedules.py --organism runs/organism --out runs/bench/demo_sched [VARIANT ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from safeptq.demo import DEMO_SCHEDULES, DemoOptions, _claim, run_demo

# name -> (ppl_windows, realign overrides, aaq overrides): the demo's schedules and the default's with 4 windows
VARIANTS: dict[str, tuple[int, dict, dict]] = {**DEMO_SCHEDULES, "ppl4": (4, {}, {})}
SHARED = ("attacked.json", "aligned.json", "rtn-w8a8")


def run_variant(name: str, a: argparse.Namespace, root: Path, done: dict) -> dict:
    ppl, ro, ao = VARIANTS[name]
    ro, ao = {**ro, **json.loads(a.set_realign)}, {**ao, **json.loads(a.set_aaq)}
    out = root / name
    opts = DemoOptions(out=out, organism=a.organism, limit=a.limit, ppl_windows=ppl, realign_overrides=ro,
                       aaq_overrides=ao, base=a.base, data_dir=a.data_dir, progress=False)
    src = done.get(ppl)  # the shared stages depend on the windows only (--limit is the same for every variant)
    if src is not None and not (out / "attacked.json").exists():
        _claim(out, opts)
        for item in SHARED:
            s = src / item
            if s.is_dir():
                shutil.copytree(s, out / item, dirs_exist_ok=True)
            elif s.is_file():
                shutil.copy2(s, out / item)
    said: list[str] = []
    t0 = time.time()
    res = run_demo(opts, say=lambda m: (said.append(m), print(m, flush=True)))
    done.setdefault(ppl, out)
    return {"variant": name, "ppl_windows": ppl, "realign": ro, "aaq": ao, "wall_s": round(time.time() - t0, 1),
            "stages": [m for m in said if "] done in" in m], "copied": list(SHARED) if src is not None else [],
            "rows": res["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", required=True)
    ap.add_argument("--out", default="runs/bench/demo_sched")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--base", default="default", help="the aligned model's base (AAQ's push), default: default")
    ap.add_argument("--set-realign", default="{}", help="JSON of recipe fields added to every variant's Q-realign")
    ap.add_argument("--set-aaq", default="{}", help="JSON of recipe fields added to every variant's AAQ")
    ap.add_argument("variants", nargs="*", default=list(VARIANTS))
    a = ap.parse_args()
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    done: dict = {}
    results = [run_variant(v, a, root, done) for v in a.variants]
    (root / "schedules.json").write_text(json.dumps(results, indent=2, default=str))
    for r in results:
        print(f"\n{r['variant']}: {r['wall_s']:.0f} s (copied: {', '.join(r['copied']) or 'nothing'})")
        for row in r["rows"]:
            cells = "  ".join(f"{s}={v[0]:.3f}" for s, v in row.items() if s != "run")
            print(f"  {row['run']:<16} {cells}")


if __name__ == "__main__":
    main()
