"""Markdown tables from safeptq run records (realign.json / quantize.json / eval JSON).

    python benchmarks/tables.py runs/bench/realign/*        # one row per run folder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safeptq.cli.eval_cmd import format_metric

SUITES = ["advbench:eval", "harmbench", "alpaca:eval", "sst2", "wikitext2"]


def load(folder: Path) -> dict | None:
    for name in ("realign.json", "quantize.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    if (folder / "eval.json").is_file():  # a full-precision reference from `safeptq eval`
        ev = json.loads((folder / "eval.json").read_text())
        return {"recipe": {"method": "fp"}, "scheme": {"name": "fp"}, "eval": ev.get("suites", ev)}
    return None


def main(folders: list[str]) -> None:
    rows = []
    for f in map(Path, folders):
        doc = load(f)
        if doc is None:
            continue
        rec = doc["recipe"]
        cells = [f.name, rec["method"], doc["scheme"]["name"] + (f"-g{rec['group_size']}" if rec.get("group_size") else "")]
        for s in SUITES:
            res = (doc.get("eval") or {}).get(s)
            cells.append("—" if res is None else "{1} {2}".format(*format_metric(res)).strip())
        sep = doc.get("separability") or {}
        after = (sep.get("after") or {}).get("mean_late_layers") or {}
        cells.append(f"{after['malicious_on_malicious_side']:.2f}" if after else "—")
        cal = doc.get("calibration") or {}
        cells += ["—" if "quantize_time_s" not in doc else f"{doc['quantize_time_s']:.0f}",
                  "—" if not cal.get("peak_rss_mb") else f"{cal['peak_rss_mb']:.0f}"]
        rows.append(cells)
    head = ["run", "method", "scheme", *SUITES, "mal. on mal. side (after)", "quantize s", "peak RSS MiB (calibration)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
