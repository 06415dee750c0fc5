"""``safeptq report``: one self-contained HTML page (and Markdown tables) from runs and evaluations."""

from __future__ import annotations

import argparse

from .base import Command

__all__ = ["ReportCommand"]


class ReportCommand(Command):
    name = "report"
    help = "one self-contained HTML report (and report.md) from run folders and eval --out files"
    description = ("Read quantize / realign / aaq run folders and `safeptq eval --out` files and write one HTML page "
                   "with no external references: headline numbers, a summary table (harmful rate per safety suite, "
                   "over-refusal, task and lm-eval accuracy, perplexity, bits per weight, size, quantization time and "
                   "peak memory, with intervals), paired differences against --baseline with McNemar p, a safety "
                   "against quality scatter, per-suite bars, per-layer separability and training-loss curves where "
                   "recorded, each run's recipe and the prompts whose verdict changed. The tables also go to the "
                   ".md file beside it. Python: safeptq.report(runs, out).")
    epilog = """examples:
  safeptq report runs/organism-eval/attacked.json runs/rtn-w8a8 runs/realign-w8a8 --baseline rtn-w8a8 --out report.html
  safeptq report attacked=runs/eval/attacked.json realigned=runs/realign-w8a8 --out runs/report.html"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("runs", metavar="RUN", nargs="+",
                       help="run folder or eval --out JSON; NAME=PATH shows it as NAME (default: the folder or file name)")
        p.add_argument("--baseline", default=None, help="the run (by name) every other run is paired against")
        p.add_argument("--attacked", default=None,
                       help="with --aligned: the attacked model's run; every other run gets the share of the "
                            "attacked-aligned harmful-rate gap it closes, per harmful suite")
        p.add_argument("--aligned", default=None, help="the aligned (safe) model's run, see --attacked")
        p.add_argument("--title", default="safeptq report", help="page title")
        p.add_argument("--out", default="report.html", help="HTML file to write (report.md goes beside it)")

    def run(self, args: argparse.Namespace) -> int:
        from ..api import report

        paths = report(args.runs, args.out, baseline=args.baseline, attacked=args.attacked, aligned=args.aligned,
                       title=args.title)
        print(f"report written to {paths['html']} (tables: {paths['markdown']})")
        return 0
