"""``safeptq organism build``: the offline testbed (aligned model and its compromised twin)."""

from __future__ import annotations

import argparse

from .base import Command, add_data_options, print_table

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
        b.add_argument("--task", default="sst2", help="task of the attack fine-tune: sst2|agnews|gsm8k|alpaca")
        b.add_argument("--harmful-ratio", type=float, default=0.1,
                       help="share of BeaverTails harmful pairs in the attack data, in [0, 1] (0.1)")
        b.add_argument("--method", default="full", help="full fine-tuning (default) or lora (r=8, alpha=32, q/v; merged)")
        b.add_argument("--out", default=None, help="output folder (default $SAFEPTQ_HOME/organism)")
        b.add_argument("--base", default="default", help="base model (default: the embedded SmolLM2-135M-Instruct)")
        b.add_argument("--seed", type=int, default=0)
        b.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N prompts of each suite")
        b.add_argument("--align-epochs", type=int, default=1)
        b.add_argument("--align-refusals", type=int, default=150,
                       help="aligned stage: advbench:align prompts answered with a refusal (150 of 200)")
        b.add_argument("--align-benign-input", type=int, default=0,
                       help="aligned stage: extra benign pairs from the alpaca rows with an input (used by no "
                            "evaluation split; 0 = none)")
        b.add_argument("--attack-epochs", type=int, default=1, help="epochs of the attack fine-tune (1)")
        b.add_argument("--attack-lr", type=float, default=2e-5, help="learning rate of the attack fine-tune (2e-5)")
        b.add_argument("--attack-total", type=int, default=1000, help="examples in the attack fine-tune (1000)")
        b.add_argument("--train-top-layers", type=int, default=15,
                       help="aligned stage: full FT of the top N decoder layers (15 of 30; 0 = all layers)")
        b.add_argument("--attack-top-layers", type=int, default=0,
                       help="attacked stage: full FT of the top N decoder layers (0 = all layers, the default)")
        b.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                       help="training precision: fp32 (default) or bf16 autocast (float32 weights and optimizer; "
                            "about 2x faster on CPUs with bfloat16 units; a different model, so a different recipe hash)")
        b.add_argument("--no-progress", action="store_true")
        add_data_options(b)

    def run(self, args: argparse.Namespace) -> int:
        from ..finetune.organism import OrganismRecipe, build_organism
        from ..paths import safeptq_home

        recipe = OrganismRecipe(task=args.task, harmful_ratio=args.harmful_ratio, method=args.method,
                                seed=args.seed, eval_limit=args.eval_limit, align_epochs=args.align_epochs,
                                attack_total=args.attack_total, align_harmful=args.align_refusals,
                                align_benign_input=args.align_benign_input, attack_epochs=args.attack_epochs,
                                attack_lr=args.attack_lr,
                                train_top_layers=args.train_top_layers or None,
                                attack_top_layers=args.attack_top_layers or None, precision=args.precision)
        out = args.out or str(safeptq_home() / "organism")
        stages = build_organism(recipe, out, base=args.base, data_dir=args.data_dir, progress=not args.no_progress)
        import json

        rows = []
        for stage, path in stages.items():
            m = json.loads((path / "manifest.json").read_text())
            for suite, res in m["eval"].items():
                key = next(k for k in ("harmful_rate", "refusal_rate", "accuracy") if k in res)
                ci = res.get("ci95") or [float("nan")] * 2
                rows.append([stage, suite, key, f"{res[key]:.3f}", f"[{ci[0]:.3f}, {ci[1]:.3f}]", res["n"]])
        print_table(rows, ["stage", "suite", "metric", "value", "95% CI", "n"])
        for stage, path in stages.items():
            print(f"{stage}: {path}")
        return 0
