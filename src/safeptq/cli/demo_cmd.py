"""``safeptq demo``: the main job in one command (attack -> recover -> compare), ending in the report."""

from __future__ import annotations

import argparse

from ..demo import DEMO_SCHEDULES
from .base import Command
from .summary import print_table

__all__ = ["DemoCommand"]


class DemoCommand(Command):
    name = "demo"
    help = "the main job end to end on the default model: organism, RTN / Q-realign / AAQ, evaluation, report"
    description = ("Build (or reuse) the model organism of the default model (SmolLM2-135M-Instruct: a safety-aligned "
                   "stage and a fine-tuning attack on it), quantize the attacked model with RTN W8A8 and with "
                   "Q-realign W8A8, quantize the aligned model with AAQ, evaluate the five models alike (AdvBench "
                   "eval and HarmBench harmful rates, Alpaca and XSTest-safe over-refusal, SST-2, WikiText-2 "
                   "perplexity; --limit prompts per suite) and write OUT/report.html and OUT/report.md. Prints the "
                   "estimated time per stage first; a stopped demo resumes where it stopped when run again. "
                   "Python: safeptq.demo().")
    epilog = """examples:
  safeptq demo                                   # everything, into runs/demo (the organism is cached)
  safeptq demo --organism runs/organism --limit 100 --out runs/demo100"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="runs/demo", help="demo folder (created; default runs/demo)")
        p.add_argument("--organism", default=None,
                       help="folder with aligned/ and attacked/ models to use as they are, or where to build them "
                            "(default: the cache, $SAFEPTQ_HOME/organism)")
        p.add_argument("--limit", type=int, default=50, help="prompts (and SST-2 sentences) per suite (default 50)")
        p.add_argument("--schedule", default="default", choices=list(DEMO_SCHEDULES),
                       help="Q-realign / AAQ recipe overrides and perplexity windows (default: the methods' own "
                            "schedules; times and figures: BENCHMARKS.md, Demo): " + "; ".join(
                                f"{k} = {w} windows, Q-realign {r or 'default'}, AAQ {a or 'default'}"
                                for k, (w, r, a) in DEMO_SCHEDULES.items()))
        p.add_argument("--ppl-windows", type=int, default=None,
                       help="WikiText-2 windows of 2048 tokens (default: the schedule's)")
        p.add_argument("--aaq-scheme", default="w4a8", help="AAQ's scheme (default w4a8)")
        p.add_argument("--data-dir", default=None, help="dataset folder (default: $SAFEPTQ_DATA or ../shared/data)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(self, args: argparse.Namespace) -> int:
        from ..api import demo
        from ..demo import DEMO_SUITES

        res = demo(args.out, organism=args.organism, limit=args.limit, ppl_windows=args.ppl_windows,
                   schedule=args.schedule,
                   aaq_scheme=args.aaq_scheme, data_dir=args.data_dir, progress=not args.no_progress)
        suites = [s for s in DEMO_SUITES if any(s in r for r in res["rows"])]
        rows = [[r["run"], *[("—" if s not in r else f"{r[s][0]:.2f}" if s == "wikitext2" else f"{r[s][0]:.3f}")
                             for s in suites]] for r in res["rows"]]
        print_table(rows, ["run", *[{"advbench:eval": "AdvBench harmful", "harmbench": "HarmBench harmful",
                                     "alpaca:eval": "Alpaca over-refusal", "xstest:safe": "XSTest over-refusal",
                                     "sst2": "SST-2 acc.", "wikitext2": "WikiText-2 ppl"}[s] for s in suites]])
        print(f"report: {res['report']} (tables: {res['markdown']})")
        return 0
