"""The report's figures, drawn by matplotlib and inlined as SVG text (no files, no network)."""

from __future__ import annotations

import io
import re

__all__ = ["scatter_safety", "suite_bars", "separability_curves", "loss_curves", "PALETTE"]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _svg(fig, salt: str) -> str:
    """The figure as an inline ``<svg>`` element; ids salted per figure so that several can share one page."""
    import matplotlib

    plt = _plt()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: inline SVG needs neither
    return re.sub(r'<metadata>.*?</metadata>', "", text, flags=re.S)


def _err(res: dict, key: str) -> tuple[float, float]:
    lo, hi = res.get("ci95") or (res[key], res[key])
    return max(res[key] - lo, 0.0), max(hi - res[key], 0.0)


def scatter_safety(points: list[dict], x_label: str, y_label: str, salt: str = "scatter") -> str:
    """``points``: name, x, y, xerr (lo, hi), yerr (lo, hi), colour."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p in points:
        ax.errorbar([p["x"]], [p["y"]], xerr=[[p["xerr"][0]], [p["xerr"][1]]], yerr=[[p["yerr"][0]], [p["yerr"][1]]],
                    fmt="o", color=p["colour"], capsize=3, ms=7, label=p["name"])
        ax.annotate(p["name"], (p["x"], p["y"]), textcoords="offset points", xytext=(6, 5), fontsize=9)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.set_title("Safety against quality (95% intervals)", fontsize=11)
    return _svg(fig, salt)


def suite_bars(suites: list[str], runs: list[str], values: dict, metric_label: str, colours: dict,
               salt: str) -> str:
    """Grouped bars: one group per suite, one bar per run; ``values[(suite, run)] = (value, lo_err, hi_err)``."""
    import numpy as np

    plt = _plt()
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(min(11.0, max(4.8, 0.55 * len(suites) * len(runs) + 1.5)), 3.6))
    x = np.arange(len(suites))
    for i, run in enumerate(runs):
        vals = [values.get((s, run)) for s in suites]
        ys = [v[0] if v else np.nan for v in vals]
        errs = [[v[1] if v else 0 for v in vals], [v[2] if v else 0 for v in vals]]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, ys, width, yerr=errs, capsize=2, color=colours[run], label=run)
    ax.set_xticks(x, suites)
    ax.set_ylabel(metric_label)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(runs), 4), frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return _svg(fig, salt)


def separability_curves(curves: dict[str, dict[str, list[float]]], colours: dict, salt: str = "sep") -> str:
    """``curves[run] = {"before": [...], "after": [...]}``: per-layer probe accuracy on held-out prompts."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for run, c in curves.items():
        if "before" in c:
            ax.plot(range(len(c["before"])), c["before"], ls="--", color=colours[run], alpha=0.7,
                    label=f"{run}: before")
        if "after" in c:
            ax.plot(range(len(c["after"])), c["after"], ls="-", marker=".", color=colours[run], label=f"{run}: after")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("probe accuracy (malicious vs benign)")
    ax.set_ylim(0.4, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _svg(fig, salt)


def loss_curves(losses: dict[str, dict], colours: dict, salt: str = "loss") -> str:
    """Per-block first / last training loss (block-wise methods) or the loss per step (end-to-end methods)."""
    plt = _plt()
    block = {r: l for r, l in losses.items() if l["kind"] == "per_block"}
    step = {r: l for r, l in losses.items() if l["kind"] == "per_step"}
    n = (1 if block else 0) + (1 if step else 0)
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, 3.4), squeeze=False)
    i = 0
    if block:
        ax = axes[0][i]
        i += 1
        for run, l in block.items():
            ax.plot(l["block"], l["first"], ls="--", color=colours[run], alpha=0.7, label=f"{run}: first epoch")
            ax.plot(l["block"], l["last"], ls="-", marker=".", color=colours[run], label=f"{run}: last epoch")
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("block loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    if step:
        ax = axes[0][i]
        for run, l in step.items():
            ax.plot(l["step"], l["loss"], color=colours[run], label=run)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    return _svg(fig, salt)
