"""Markdown tables from safeptq run records (realign.json / quantize.json / aaq.json / eval JSON).

    python benchmarks/tables.py runs/bench/realign/*        # one row per run folder
    python benchmarks/tables.py --aaq runs/bench/aaq/fp-aligned.json runs/bench/aaq/*/   # AAQ table
    python benchmarks/tables.py --lm-eval runs/bench/lmeval/*.json   # capability table (RUN.mmlu.json merged)
    python benchmarks/tables.py --transforms runs/bench/w4a4/*/      # W4A4 transform rows (aaq --objective kl_top)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safeptq.eval.metrics import format_metric

SUITES = ["advbench:eval", "harmbench", "alpaca:eval", "sst2", "wikitext2"]


def load(folder: Path) -> dict | None:
    for name in ("realign.json", "quantize.json", "aaq.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    ev_file = folder if folder.suffix == ".json" else folder / "eval.json"
    if ev_file.is_file():  # a full-precision reference from `safeptq eval`
        ev = json.loads(ev_file.read_text())
        return {"recipe": {"method": "fp"}, "scheme": {"name": "fp"}, "eval": ev.get("suites", ev)}
    return None


def _cell(res: dict | None) -> str:
    return "—" if res is None else "{1} {2}".format(*format_metric(res)).strip()


def aaq_table(paths: list[str]) -> None:
    """Harmful rate, over-refusal, perplexity (ratio to the FP row), training time and peak RSS."""
    docs = [(Path(p), load(Path(p))) for p in paths]
    docs = [(p, d) for p, d in docs if d is not None]
    fp = next((d for _, d in docs if d["recipe"]["method"] == "fp"), None)
    fp_ppl = ((fp or {}).get("eval") or {}).get("wikitext2", {}).get("perplexity")
    head = ["run", "method", "scheme", "transforms", "λ", "calibration", "advbench:eval harmful", "alpaca:eval over-refusal", "WikiText-2 ppl",
            "ppl / FP", "calibration s", "peak RSS MiB (calibration)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p, d in docs:
        rec, ev = _flat_recipe(d), d.get("eval") or {}
        method = rec["method"] if rec["method"] != "aaq" else rec.get("objective", "aaq")
        if method == "contrastive":
            method = f"aaq ({rec.get('push')})"
        lam = f"{rec['lambda']:g}" if rec.get("objective") == "contrastive" else "—"
        scheme = d["scheme"]["name"] + (f"-g{rec['group_size']}" if rec.get("group_size") else "")
        ppl = (ev.get("wikitext2") or {}).get("perplexity")
        ratio = f"{ppl / fp_ppl:.2f}" if ppl and fp_ppl else "—"
        train = (d.get("phases") or {}).get("training") or d.get("calibration") or {}
        t = train.get("wall_time_s", d.get("quantize_time_s"))
        rss = train.get("peak_rss_mb")
        tf = rec.get("transforms") or {}
        tf = " + ".join(k for k in ("rotation", "smoothing", "lwc") if tf.get(k)) or "—"
        if rec.get("weights", "").startswith("llm-compressor"):
            tf += ", GPTQ weights"
        cal = rec.get("calib") or "—"
        if rec.get("calib_replies"):
            cal += f" + replies ≤ {rec['calib_replies']}"
        print("| " + " | ".join([p.name.removesuffix(".json"), method, scheme, tf, lam, cal,
                                 _cell(ev.get("advbench:eval")),
                                 _cell(ev.get("alpaca:eval")), _cell(ev.get("wikitext2")), ratio,
                                 "—" if t is None else f"{t:.0f}", "—" if not rss else f"{rss:.0f}"]) + " |")


def _flat_recipe(doc: dict) -> dict:
    """The run record's recipe as the flat dict of safeptq 0.1 records (0.2 nests it in sections)."""
    r = doc["recipe"]
    if not isinstance(r.get("calib"), dict) and "training" not in r:
        return r
    o, c, t = r.get("objective") or {}, r.get("calib") or {}, r.get("training") or {}
    flat = {"method": r["method"], "group_size": r.get("group_size"), "calib": c.get("data"),
            "calib_replies": c.get("replies")}
    if r["method"] == "aaq":
        flat.update(objective=o.get("kind"), push=o.get("push"), **{"lambda": o.get("lam")},
                    transforms=doc.get("transforms"),
                    weights="llm-compressor GPTQ" if t.get("weights") == "gptq" else "round to nearest")
    return flat


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
            cells.append(_cell(res))
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


LM_EVAL = ["arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "lambada_openai", "mmlu"]


def lm_eval_table(paths: list[str]) -> None:
    """Capability table: lm-eval accuracies (with Wilson intervals and n) and GPTQ-convention perplexity."""
    head = ["run", *LM_EVAL, "WikiText-2 ppl (GPTQ conv.)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for f in map(Path, paths):
        if f.name.endswith((".mmlu.json", ".ppl.json")):
            continue  # merged into its row below
        doc = load(f)
        if doc is None:
            continue
        ev = dict(doc.get("eval") or {})
        name = f.name.removesuffix(".json")
        if name in ("aaq", "quantize", "realign"):  # a run record: the run's folder names the row
            name = f.parent.name
        for part in ("mmlu", "ppl"):  # MMLU at its own per-subject limit, perplexity at its own window count
            side = f.with_name(f"{name}.{part}.json")
            if side.is_file():
                ev.update(load(side)["eval"])
        cells = [name]
        for t in LM_EVAL:
            r = ev.get(f"lm-eval:{t}")
            cells.append("—" if not r else f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] n={r['n']}")
        w = ev.get("wikitext2")
        cells.append("—" if not w else f"{w['perplexity']:.2f} ({w['windows']}×{w['context_length']})")
        print("| " + " | ".join(cells) + " |")


def _transforms(t: dict) -> str:
    """R1 residual rotation, R2 per-head v/o, R3 q/k Hadamard, R4 online down_proj Hadamard, S smoothing pairs."""
    parts = [name for key, name in (("rotation", "R1"), ("vo_rotation", "R2"), ("qk_hadamard", "R3"),
                                    ("online_hadamard", "R4")) if t.get(key)]
    if t.get("smoothing"):
        parts.append("S(" + ",".join(t.get("smooth_pairs") or []) + ")")
    if t.get("lwc"):
        parts.append("LWC")
    return " + ".join(parts) or "none"


def transforms_table(paths: list[str]) -> None:
    """W4A4 transform study: what each row applies, steps, weights, KL to the instruct model, perplexity, LAMBADA."""
    head = ["run", "scheme", "transforms", "steps", "weights", "KL start → end (first batch)", "WikiText-2 ppl",
            "LAMBADA acc.", "wall s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in map(Path, paths):
        d = load(p)
        if d is None or "transforms" not in d:
            continue
        ev, tr = d.get("eval") or {}, d["recipe"]["training"]
        w, lam = ev.get("wikitext2"), ev.get("lm-eval:lambada_openai")
        loss = d.get("loss") or {}
        print("| " + " | ".join([
            p.name.rstrip("/") or p.parent.name, d["scheme"]["name"], _transforms(d["transforms"]), str(tr["steps"]),
            d["calibration"].get("method", "").replace("aaq+llmcompressor:", "") if tr["weights"] != "rtn" else "rtn",
            f"{loss.get('start', float('nan')):.4f} → {loss.get('end', float('nan')):.4f}",
            "—" if not w else f"{w['perplexity']:.2f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}] ({w['windows']}×{w['context_length']})",
            "—" if not lam else f"{lam['accuracy']:.3f} [{lam['ci95'][0]:.3f}, {lam['ci95'][1]:.3f}] n={lam['n']}",
            f"{d.get('wall_time_s', float('nan')):.0f}"]) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--aaq"]:
        aaq_table(sys.argv[2:])
    elif sys.argv[1:2] == ["--lm-eval"]:
        lm_eval_table(sys.argv[2:])
    elif sys.argv[1:2] == ["--transforms"]:
        transforms_table(sys.argv[2:])
    else:
        main(sys.argv[1:])
