"""``safeptq run``: run a recipe file as is (``safeptq run OUT/recipe.yaml`` replays a finished run)."""

from __future__ import annotations

import argparse

from .base import Command
from .flags import option_flag, run_options

__all__ = ["RunCommand"]


class RunCommand(Command):
    name = "run"
    help = "run a recipe.yaml (a finished run's replays it)"
    description = ("Run the recipe in RECIPE (a recipe.yaml, or a run folder holding one): the method, model, scheme, "
                   "calibration, training, objective and evaluation all come from the file, every default already "
                   "resolved. Run-time flags (device, memory, resume) do not change results and are given here.")
    epilog = """examples:
  safeptq run runs/realign/w8a8/recipe.yaml --out runs/realign/w8a8-replay
  safeptq run my-recipe.yaml --model runs/organism/attacked --out runs/r/mine"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", metavar="RECIPE", help="recipe.yaml, or a run folder holding one")
        p.add_argument("--out", required=True, help="output folder (as for quantize / realign / aaq)")
        p.add_argument("--model", default=None, help="run the recipe on another model than the one it names")
        p.add_argument("--overwrite", action="store_true", help="replace --out even when it holds other files")
        option_flag(p, "--device", field="device", help="cpu, cuda, cuda:N or auto (default)")
        option_flag(p, "--max-memory", field="max_memory", metavar="SIZE", help="override the memory check")
        option_flag(p, "--resume", field="resume", action="store_const", const=True,
                    help="continue from the checkpoint in the work folder")
        option_flag(p, "--work-dir", field="work_dir", help="checkpoint folder (default OUT.work)")
        option_flag(p, "--no-progress", field="progress", action="store_const", const=False)

    def run(self, args: argparse.Namespace) -> int:
        from ..methods.pipeline import run
        from ..recipes import load_recipe
        from .summary import print_run

        recipe = load_recipe(args.recipe)
        if args.model:
            recipe = recipe.replace(model=args.model)
        qm = run(recipe, options=run_options(args), out=args.out, overwrite=args.overwrite)
        print_run(qm.record)
        return 0
