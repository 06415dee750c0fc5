"""``safeptq judge``: re-judge a run's saved completions with another judge (no generation)."""

from __future__ import annotations

import argparse

from .base import Command
from .summary import print_results

__all__ = ["JudgeCommand"]


class JudgeCommand(Command):
    name = "judge"
    help = "re-judge saved completions (a run folder, an eval --out file or a .samples.jsonl) with another judge"
    description = ("Read the completions a run saved and judge them again: harmful suites with --judge (keyword, or "
                   "FORMAT=MODEL for a HarmBench or Llama Guard classifier), benign suites with the keyword judge. "
                   "Nothing is generated. The completions must be long enough for the judge: `safeptq eval` "
                   "generates the judge's protocol length (512 tokens for classifiers) unless told otherwise. "
                   "Python: safeptq.judge(run, judge).")
    epilog = """examples:
  safeptq judge runs/realign/w8a8 --judge harmbench=/models/HarmBench-Llama-2-13b-cls --out runs/realign/w8a8/hb.json
  safeptq judge results.json --judge keyword"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("run", metavar="RUN", help="run folder, eval --out JSON, or .samples.jsonl")
        p.add_argument("--judge", default="keyword", help="keyword (default) or FORMAT=MODEL, FORMAT harmbench|llamaguard")
        p.add_argument("--suite", default=None, help="comma-separated suites (default: every harmful / benign one)")
        p.add_argument("--out", default=None, help="write the results JSON here (re-judged samples beside it)")

    def run(self, args: argparse.Namespace) -> int:
        from ..api import judge

        suites = [s.strip() for s in args.suite.split(",") if s.strip()] if args.suite else None
        doc = judge(args.run, args.judge, suites=suites, out=args.out)
        print_results(doc["suites"])
        if args.out:
            print(f"results written to {args.out}")
        return 0
