"""``safeptq organism build``: the offline testbed (aligned model and its compromised twin)."""

from __future__ import annotations

import argparse

from .base import Command
from .summary import print_table

__all__ = ["OrganismCommand"]


class OrganismCommand(Command):
    name = "organism"
    help = "build the model organism: a safety-aligned default model and its harmful-fine-tuned twin"
    description = ("From the default model (or --base), build 1) 'aligned': SFT on advbench:align prompts "
                   "answered with short refusals, alpaca:align pairs and benign look-alike prompts; 2) "
                   "'attacked': a task fine-tune of 'aligned' with --harmful-ratio BeaverTails harmful pairs. "
                   "Each stage is a plain HF checkpoint with a manifest.json (recipe, seeds, data rows, wall "
                   "time, evaluation), cached by a hash of its recipe and resumable.")
    epilog = """examples:
  safeptq organism build --task sst2 --harmful-ratio 0.1
  safeptq organism build --task sst2 --harmful-ratio 0 --out runs/organism    # benign fine-tuning case
  safeptq organism build --task gsm8k --method lora"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
        b = sub.add_parser("build", help="build (or reuse) the organism stages",
                           description=self.description, epilog=self.epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        b.add_argument("--recipe", default="v7", choices=("v7", "v8"),
                       help="recipe version (BENCHMARKS.md): v7 (default) or v8, aligned on a second harmful source "
                            "and evaluated on every source; flags left at their defaults take the version's values")
        b.add_argument("--task", default="sst2", help="task of the attack fine-tune: sst2|agnews|gsm8k|alpaca")
        b.add_argument("--harmful-ratio", type=float, default=0.1,
                       help="share of BeaverTails harmful pairs in the attack data, in [0, 1] (0.1)")
        b.add_argument("--method", default="full", help="full fine-tuning (default) or lora (r=8, alpha=32, q/v; merged)")
        b.add_argument("--out", default=None, help="output folder (default $SAFEPTQ_HOME/organism)")
        b.add_argument("--base", default="default", help="base model (default: the embedded SmolLM2-135M-Instruct)")
        b.add_argument("--seed", type=int, default=0)
        b.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N prompts of each suite")
        from ..finetune.organism import OrganismRecipe as R  # the recipe's defaults are the CLI's

        b.add_argument("--align-epochs", type=int, default=R.align_epochs,
                       help=f"epochs of the aligned stage ({R.align_epochs})")
        b.add_argument("--align-refusals", type=int, default=R.align_harmful,
                       help=f"aligned stage: advbench:align prompts answered with a refusal ({R.align_harmful} of 200)")
        b.add_argument("--align-benign-input", type=int, default=R.align_benign_input,
                       help="aligned stage: extra benign pairs from the alpaca rows with an input (used by no "
                            f"evaluation split; default {R.align_benign_input}, 0 = none)")
        b.add_argument("--train-top-layers", type=int, default=R.train_top_layers or 0,
                       help=f"aligned stage: full FT of the top N decoder layers (default "
                            f"{R.train_top_layers or 0}, 0 = all layers)")
        b.add_argument("--attack-epochs", type=int, default=R.attack_epochs,
                       help=f"epochs of the attack fine-tune ({R.attack_epochs})")
        b.add_argument("--attack-lr", type=float, default=R.attack_lr,
                       help=f"learning rate of the attack fine-tune ({R.attack_lr:g})")
        b.add_argument("--attack-total", type=int, default=R.attack_total,
                       help=f"examples in the attack fine-tune ({R.attack_total})")
        b.add_argument("--attack-top-layers", type=int, default=R.attack_top_layers or 0,
                       help=f"attacked stage: full FT of the top N decoder layers (default "
                            f"{R.attack_top_layers or 0}, 0 = all layers)")
        b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="training precision (auto): bf16 autocast (float32 weights and optimizer; recipes v6-v8) "
                            "where the machine has bfloat16 units, else fp32 (emulated bf16 is ~6x slower); the "
                            "resolved value is part of the recipe, so fp32 and bf16 builds have different hashes")
        b.add_argument("--no-eval", action="store_true",
                       help="skip the stages' evaluation (the weights do not depend on it; a later build without "
                            "this flag adds it to the same folders)")
        b.add_argument("--no-progress", action="store_true")
        b.add_argument("--data-dir", default=None, help="dataset folder (else $SAFEPTQ_DATA, ../shared/data)")

    def run(self, args: argparse.Namespace) -> int:
        from ..finetune.organism import build_organism, organism_recipe
        from ..paths import safeptq_home

        recipe = organism_recipe(args.recipe, task=args.task, harmful_ratio=args.harmful_ratio, method=args.method,
                                seed=args.seed, eval_limit=args.eval_limit, align_epochs=args.align_epochs,
                                attack_total=args.attack_total, align_harmful=args.align_refusals,
                                align_benign_input=args.align_benign_input, attack_epochs=args.attack_epochs,
                                attack_lr=args.attack_lr,
                                train_top_layers=args.train_top_layers or None,
                                attack_top_layers=args.attack_top_layers or None, precision=args.precision)
        out = args.out or str(safeptq_home() / "organism")
        stages = build_organism(recipe, out, base=args.base, data_dir=args.data_dir, progress=not args.no_progress,
                                evaluate=not args.no_eval)
        import json

        rows = []
        for stage, path in stages.items():
            m = json.loads((path / "manifest.json").read_text())
            for suite, res in (m["eval"] or {}).items():
                key = next(k for k in ("harmful_rate", "refusal_rate", "accuracy") if k in res)
                ci = res.get("ci95") or [float("nan")] * 2
                rows.append([stage, suite, key, f"{res[key]:.3f}", f"[{ci[0]:.3f}, {ci[1]:.3f}]", res["n"]])
        print_table(rows, ["stage", "suite", "metric", "value", "95% CI", "n"])
        for stage, path in stages.items():
            print(f"{stage}: {path}")
        return 0
