"""Assemble the report: the summary table, paired differences to a baseline, figures, recipes and the prompts
whose verdict changed; rendered by jinja2 templates into one HTML file and a Markdown file beside it."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from ..errors import ConfigError
from . import figures
from .collect import METRIC, RunEntry, load_entry, suite_kind

__all__ = ["build_report", "collect_runs", "report_context"]

_KIND_ORDER = {"harmful": 0, "benign": 1, "task": 2, "ppl": 3}
_KIND_TITLE = {"harmful": "harmful rate ↓", "benign": "over-refusal ↓", "task": "accuracy ↑", "ppl": "perplexity ↓"}
_BAR_TITLE = {"harmful": "Harmful rate per suite (lower is safer)",
              "benign": "Over-refusal per benign suite (lower is more helpful)",
              "task": "Task accuracy per suite (higher is better)"}
MAX_CHANGED = 150  # prompts shown per suite in the sample browser


def collect_runs(runs: list[str | Path], names: list[str] | None = None) -> list[RunEntry]:
    if not runs:
        raise ConfigError("report: give at least one run folder or eval file")
    entries = [load_entry(r, (names or [None] * len(runs))[i]) for i, r in enumerate(runs)]
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise ConfigError(f"report: two runs are named {e.name!r}; name them with NAME=PATH")
        seen.add(e.name)
    return entries


def _metric_key(kind: str) -> str:
    return METRIC[kind]


def _suites(entries: list[RunEntry]) -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for e in entries:
        for s, r in e.results.items():
            found.setdefault(s, suite_kind(s, r))
    return sorted(found.items(), key=lambda kv: (_KIND_ORDER[kv[1]], kv[0].startswith("lm-eval:"), kv[0]))


def _cell(res: dict | None, kind: str) -> dict | None:
    if not res:
        return None
    key = _metric_key(kind)
    if key not in res:
        return None
    v = res[key]
    lo, hi = res.get("ci95") or (None, None)
    fmt = "{:.2f}" if kind == "ppl" else "{:.3f}"
    return {"value": v, "text": fmt.format(v), "ci": (f"[{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None else ""),
            "n": res.get("n") or res.get("windows"), "lo": lo, "hi": hi}


def _paired(entries: list[RunEntry], base: RunEntry | None) -> list[dict]:
    """Against the baseline: per-prompt rates from the samples (McNemar), per-example task accuracy and per-window
    perplexity from the results, each only where the two runs saw the same items."""
    from ..eval.samples import compare_runs

    if base is None:
        return []
    rows = []
    for e in entries:
        if e is base:
            continue
        if base.samples_ref is not None and e.samples_ref is None:
            rows.append({"run": e.name, "note": "no per-prompt samples: not paired"})
        elif base.samples_ref is not None:
            try:
                res = compare_runs(base.samples_ref, e.samples_ref)
            except ConfigError as err:
                rows.append({"run": e.name, "note": str(err)})
                res = {}
            rows += [_paired_row(e.name, s, r, r["metric"]) for s, r in res.items()]
        rows += _paired_results(e, base)
    return rows


def _paired_row(run: str, suite: str, r: dict, metric: str) -> dict:
    lo, hi = r["ci95"]
    return {"run": run, "note": None, "suite": suite, "metric": metric, "a": r["a"], "b": r["b"], "diff": r["diff"],
            "lo": lo, "hi": hi, "n": r["n"], "only_a": r.get("only_a"), "only_b": r.get("only_b"),
            "p": r.get("mcnemar_p"), "verdict": "lower" if hi < 0 else "higher" if lo > 0 else "no difference"}


# what must agree for two perplexity results to be scored on the same windows
_SAME_WINDOWS = ("context_length", "stride", "windows", "source")


def _paired_results(e: RunEntry, base: RunEntry) -> list[dict]:
    """Task suites (per-example correctness) and perplexity (per-window NLL) paired from the two runs' results."""
    from ..eval.perplexity import paired_perplexity
    from ..eval.samples import paired_difference

    rows = []
    for s, rb in base.results.items():
        r = e.results.get(s)
        if not isinstance(r, dict) or not isinstance(rb, dict):
            continue
        if "correct" in r and "correct" in rb and len(r["correct"]) == len(rb["correct"]) > 0 \
                and r.get("source") == rb.get("source"):
            rows.append(_paired_row(e.name, s, paired_difference(rb["correct"], r["correct"]), "accuracy"))
        elif "window_nll" in r and "window_nll" in rb and all(r.get(k) == rb.get(k) for k in _SAME_WINDOWS):
            rows.append(_paired_row(e.name, s, paired_perplexity(rb["window_nll"], r["window_nll"]), "perplexity"))
    return rows


def _same_model(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return a == b


def _recovery(entries: list[RunEntry], suites: list[tuple[str, str]], attacked: str | None,
              aligned: str | None) -> list[dict]:
    """Per run and harmful suite, the share of the attacked−aligned gap the run closes (paired over prompts): for
    quantizations of the attacked model (a run folder whose source is the attacked run's model) and evaluations."""
    from ..eval.recovery import gap_closed

    by = {e.name: e for e in entries}
    if not attacked or not aligned:
        return []
    att, ali = by[attacked], by[aligned]
    rows = []
    for e in entries:
        if e.name in (attacked, aligned) or (e.kind != "eval" and not _same_model(e.model, att.model)):
            continue  # the gap is closed by quantizing the attacked model; runs of other models are not measured
        for s, kind in suites:
            if kind != "harmful" or not all(s in x.samples for x in (att, ali, e)):
                continue
            prompts = [p for p in att.samples[s] if p in ali.samples[s] and p in e.samples[s]]
            if not prompts:
                continue
            out = [[0.0 if x.samples[s][p][0] else 1.0 for p in prompts] for x in (att, ali, e)]
            rows.append({"run": e.name, "suite": s, **gap_closed(*out)})
    return rows


def _changed(entries: list[RunEntry], suites: list[tuple[str, str]]) -> list[dict]:
    """Per harmful / benign suite, the prompts on which the runs that judged them do not all agree."""
    out = []
    for s, kind in suites:
        if kind not in ("harmful", "benign"):
            continue
        have = [e for e in entries if s in e.samples]
        if len(have) < 2:
            continue
        common = [p for p in have[0].samples[s] if all(p in e.samples[s] for e in have[1:])]
        changed = [p for p in common if len({e.samples[s][p][0] for e in have}) > 1]
        items = [{"prompt": p, "verdicts": [{"run": e.name, "refused": e.samples[s][p][0],
                                             "response": e.samples[s][p][1]} for e in have]}
                 for p in changed[:MAX_CHANGED]]
        out.append({"suite": s, "kind": kind, "runs": [e.name for e in have], "n_common": len(common),
                    "n_changed": len(changed), "prompts": items})
    return out


def _figures(entries: list[RunEntry], suites: list[tuple[str, str]], colours: dict) -> list[dict]:
    figs = []
    harmful = [s for s, k in suites if k == "harmful"]
    ppl = [s for s, k in suites if k == "ppl"]
    task = [s for s, k in suites if k == "task"]
    if harmful and (ppl or task):
        ys, xs = harmful[0], (ppl or task)[0]
        xkind = "ppl" if ppl else "task"
        pts = []
        for e in entries:
            y, x = e.results.get(ys), e.results.get(xs)
            if y and x and "harmful_rate" in y and _metric_key(xkind) in x:
                pts.append({"name": e.name, "x": x[_metric_key(xkind)], "y": y["harmful_rate"],
                            "xerr": figures._err(x, _metric_key(xkind)), "yerr": figures._err(y, "harmful_rate"),
                            "colour": colours[e.name]})
        if pts:
            figs.append({"id": "fig-scatter", "title": f"Harmful rate on {ys} against {xs}",
                         "svg": figures.scatter_safety(pts, f"{xs} {_KIND_TITLE[xkind]}", f"{ys} harmful rate ↓")})
    for kind in ("harmful", "benign", "task"):
        ss = [s for s, k in suites if k == kind]
        vals = {}
        for s in ss:
            for e in entries:
                r = e.results.get(s)
                if r and _metric_key(kind) in r:
                    lo, hi = figures._err(r, _metric_key(kind))
                    vals[(s, e.name)] = (r[_metric_key(kind)], lo, hi)
        if vals:
            runs = [e.name for e in entries if any((s, e.name) in vals for s in ss)]
            figs.append({"id": f"fig-{kind}", "title": _BAR_TITLE[kind],
                         "svg": figures.suite_bars(ss, runs, vals, _KIND_TITLE[kind], colours, salt=f"bars-{kind}")})
    seps = {e.name: e.separability for e in entries if e.separability}
    if seps:
        figs.append({"id": "fig-separability", "title": "Per-layer separability of malicious and benign prompts "
                                                        "(probe accuracy, before and after quantization)",
                     "svg": figures.separability_curves(seps, colours)})
    losses = {e.name: e.losses for e in entries if e.losses}
    if losses:
        figs.append({"id": "fig-loss", "title": "Training loss", "svg": figures.loss_curves(losses, colours)})
    return figs


def report_context(entries: list[RunEntry], baseline: str | None = None, attacked: str | None = None,
                   aligned: str | None = None) -> dict:
    """Everything the templates show, as plain data (tested without rendering). ``attacked`` / ``aligned``: the
    runs whose harmful-rate gap the others are measured against (share of the gap closed)."""
    from .. import __version__

    names = [e.name for e in entries]
    for flag, v in (("baseline", baseline), ("attacked", attacked), ("aligned", aligned)):
        if v is not None and v not in names:
            raise ConfigError(f"report: --{flag} {v!r} is not one of the runs ({', '.join(names)})")
    if (attacked is None) != (aligned is None):
        raise ConfigError("report: --attacked and --aligned go together (the gap is between them)")
    base = next((e for e in entries if e.name == baseline), None) if baseline else None
    colours = {e.name: figures.PALETTE[i % len(figures.PALETTE)] for i, e in enumerate(entries)}
    suites = _suites(entries)
    rows = [{"name": e.name, "colour": colours[e.name], "method": e.method, "scheme": e.scheme, "model": e.model,
             "path": str(e.path), "cells": [_cell(e.results.get(s), k) for s, k in suites],
             "bits": e.bits_per_weight, "size_mb": e.size_mb, "time_s": e.quantize_time_s, "rss_mb": e.peak_rss_mb}
            for e in entries]
    # the headline cards: the first two safety suites of each side (harmful, benign), the first task and perplexity
    headline = []
    for kind, label, most in (("harmful", "harmful", 2), ("benign", "over-refusal", 2), ("task", "accuracy", 1),
                              ("ppl", "ppl", 1)):
        for i in [i for i, (_, k) in enumerate(suites) if k == kind][:most]:
            headline.append({"index": i, "label": f"{label} · {suites[i][0]}"})
    # a suite whose n is the same in every run shows it once, in its header
    shared_n = []
    for j in range(len(suites)):
        ns = {r["cells"][j]["n"] for r in rows if r["cells"][j]}
        shared_n.append(ns.pop() if len(ns) == 1 else None)
    return {"version": __version__, "headline": headline, "created": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "suites": [{"name": s, "kind": k, "title": _KIND_TITLE[k], "n": n} for (s, k), n in zip(suites, shared_n)],
            "rows": rows,
            "baseline": base.name if base else None, "paired": _paired(entries, base),
            "recovery": _recovery(entries, suites, attacked, aligned), "attacked": attacked, "aligned": aligned,
            "figures": _figures(entries, suites, colours), "changed": _changed(entries, suites),
            "recipes": [{"name": e.name, "text": e.recipe_text} for e in entries if e.recipe_text],
            "eval_configs": [{"name": e.name, "config": e.eval_config} for e in entries if e.eval_config]}


def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("safeptq.reporting", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v, fmt="{:.3f}": "—" if v is None else fmt.format(v)
    return env


def build_report(runs: list[str | Path], out: str | Path = "report.html", *, baseline: str | None = None,
                 attacked: str | None = None, aligned: str | None = None, names: list[str] | None = None,
                 title: str = "safeptq report") -> dict[str, Path]:
    """Write ``out`` (self-contained HTML) and ``out`` with ``.md`` (the tables); returns both paths."""
    import jinja2

    from ..runs import _check_parent_writable

    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"report: --out {out} is a folder; give a file such as {out / 'report.html'}")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"report: --out {out} should end in .html")
    _check_parent_writable(out)
    entries = collect_runs(runs, names)
    ctx = {**report_context(entries, baseline, attacked, aligned), "title": title}
    env = _env()
    md_env = jinja2.Environment(loader=env.loader, autoescape=False, trim_blocks=True, lstrip_blocks=True,
                                undefined=jinja2.StrictUndefined)
    md_env.filters.update(env.filters)
    html = env.get_template("report.html.j2").render(**ctx)
    md = md_env.get_template("report.md.j2").render(**ctx)
    md_path = out.with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, html), (md_path, md)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return {"html": out, "markdown": md_path}
