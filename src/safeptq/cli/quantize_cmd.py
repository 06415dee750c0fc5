"""``safeptq quantize``: flags → :class:`~safeptq.recipes.QuantizeRecipe` → the pipeline → summary."""

from __future__ import annotations

import argparse

from ..recipes import QuantizeRecipe as R
from .base import Command
from .common import (add_calib_group, add_eval_group, add_model_group, add_output_group, add_resume_flags,
                     run_quantizing)
from .flags import default_text, option_flag, recipe_flag

__all__ = ["QuantizeCommand"]


def add_blockwise_training(p: argparse.ArgumentParser, cls, title: str) -> None:
    """The block-wise engine's flags (shared by quantize and realign)."""
    def d(field):
        return default_text(cls, field) if cls is R else "default from --schedule"

    g = p.add_argument_group(title)
    recipe_flag(g, "--epochs", field="training.epochs",
                help=f"epochs per block: N, or A,B for the first and second half of the blocks ({d('training.epochs')})")
    recipe_flag(g, "--batch-size", field="training.batch_size", type=int,
                help=f"samples per step ({d('training.batch_size')})")
    recipe_flag(g, "--lr-lwc", field="training.lr_lwc", type=float,
                help=f"learning rate of the clipping factors ({d('training.lr_lwc')})")
    recipe_flag(g, "--lr-let", field="training.lr_let", type=float,
                help=f"learning rate of the smoothing scales ({d('training.lr_let')})")
    recipe_flag(g, "--no-lwc", field="training.lwc", action="store_const", const=False,
                help="no learnable weight clipping (min/max ranges)")
    recipe_flag(g, "--no-let", field="training.let", action="store_const", const=False,
                help="no learnable equivalent transformation (smoothing)")
    recipe_flag(g, "--train-norms", field="training.train_norms", action=argparse.BooleanOptionalAction,
                help="also learn each block's two RMSNorm gains (not an equivalent transform: an extra lever for "
                     f"objectives that must change behaviour, e.g. realign; {d('training.train_norms')})")
    recipe_flag(g, "--lr-norm", field="training.lr_norm", type=float,
                help=f"learning rate of the norm gains ({d('training.lr_norm')})")
    recipe_flag(g, "--let-alpha", field="training.let_alpha", type=float,
                help="SmoothQuant migration strength that initialises the smoothing scales (0.5)")
    option_flag(g, "--stream-budget", field="stream_budget_mb", type=float, metavar="MIB",
                help="RAM for the two calibration streams (float32, 2 x N x T x hidden); above it they go to "
                     "memory-mapped files in the work folder (default: always in RAM)")
    add_resume_flags(g)


class QuantizeCommand(Command):
    name = "quantize"
    help = "quantize a model (RTN, OmniQuant-style LWC+LET, or llm-compressor GPTQ/AWQ) and export it"
    description = ("Quantize the decoder linears of a causal LM to a scheme and export the result: compressed-tensors "
                   "(pack-quantized / int-quantized, servable by vLLM) where the scheme has a serving format, else a "
                   "dense fake-quant checkpoint. Methods (`safeptq ls`): rtn (no data); omniquant (block-wise "
                   "learnable weight clipping + equivalent transformation reconstructing each block's full-precision "
                   "output; checkpointed per block, --resume continues a killed run); gptq, awq, smoothquant+gptq "
                   "(llm-compressor baselines on the same calibration tokens). The output folder gets the model, "
                   "README.md (model card), recipe.yaml and quantize.json, all at once, only when everything "
                   "succeeded. Python: safeptq.quantize(model, method=..., scheme=...).")
    epilog = """examples:
  safeptq quantize --model default --method rtn --scheme w8a8 --out runs/q/rtn-w8a8
  safeptq quantize --model default --method omniquant --scheme w4a16 --calib alpaca:calib --out runs/q/omni-w4a16
  safeptq quantize --model default --method omniquant --scheme w4a8 --epochs 5,15 --batch-size 1 --resume --out runs/q/o
  safeptq quantize --model default --method gptq --scheme w4a16 --group-size 32 --eval wikitext2 --out runs/q/gptq
  safeptq run runs/q/gptq/recipe.yaml --out runs/q/gptq-again   # replay a run from its recipe"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        from ..methods import METHODS

        g = add_model_group(p, "model and method", "calibration device: cpu, cuda, cuda:N or auto (default); the "
                            "model stays on the CPU in --dtype, one block at a time goes to the device")
        recipe_flag(g, "--method", field="method", required=True,
                    help=" | ".join(n for n in METHODS.names() if n not in ("realign", "aaq")))
        add_calib_group(p, R, "calibration data (not used by rtn)")
        add_blockwise_training(p, R, "block-wise training (omniquant)")
        add_eval_group(p, "quantize.json")
        add_output_group(p)

    def run(self, args: argparse.Namespace) -> int:
        return run_quantizing(args, R)
