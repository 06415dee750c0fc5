"""``safeptq compare``: paired comparison of two evaluated runs, prompt by prompt."""

from __future__ import annotations

import argparse

from .base import Command
from .summary import print_table

__all__ = ["CompareCommand"]


class CompareCommand(Command):
    name = "compare"
    help = "paired difference of two runs' harmful / over-refusal rates with its 95%% interval"
    description = ("Compare the per-prompt verdicts of two runs judged on the same prompts (quantize / realign / "
                   "aaq output folders with eval.samples.jsonl, or `safeptq eval --out` files with their "
                   ".samples.jsonl). For every shared harmful or benign suite: both rates, their difference B - A "
                   "with a 95% paired-bootstrap interval over prompts, the discordant prompts and McNemar's "
                   "exact p-value. Runs judged with another judge, generation length, template or limit are "
                   "refused. \"B is lower than A beyond the noise\" means the whole interval is below 0.")
    epilog = """examples:
  safeptq compare runs/rtn-w4a16 runs/aaq-w4a16
  safeptq compare fp.json runs/aaq-w4a16 --suite advbench:eval --out diff.json"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("run_a", metavar="A", help="first run (the baseline)")
        p.add_argument("run_b", metavar="B", help="second run")
        p.add_argument("--suite", default=None, help="comma-separated suites (default: every shared one)")
        p.add_argument("--out", default=None, help="write the comparison JSON here")

    def run(self, args: argparse.Namespace) -> int:
        from ..api import compare
        from ..runs import write_json_atomic

        suites = [s.strip() for s in args.suite.split(",") if s.strip()] if args.suite else None
        res = compare(args.run_a, args.run_b, suites)
        rows = []
        for s, r in res.items():
            lo, hi = r["ci95"]
            verdict = "B lower" if hi < 0 else "B higher" if lo > 0 else "no difference"
            rows.append([s, r["metric"], f"{r['a']:.3f}", f"{r['b']:.3f}", f"{r['diff']:+.3f}",
                         f"[{lo:+.3f}, {hi:+.3f}]", f"{r['only_a']}/{r['only_b']}", f"{r['mcnemar_p']:.2g}",
                         r["n"], verdict])
        print(f"A = {args.run_a}\nB = {args.run_b}")
        print_table(rows, ["suite", "metric", "A", "B", "B - A", "95% CI (paired)", "A only / B only",
                           "McNemar p", "n", "verdict"])
        if args.out:
            write_json_atomic(args.out, {"a": str(args.run_a), "b": str(args.run_b), "suites": res})
        return 0
