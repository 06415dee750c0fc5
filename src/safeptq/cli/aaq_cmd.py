"""``safeptq aaq``: flags → :class:`~safeptq.recipes.AAQRecipe` → the pipeline → summary."""

from __future__ import annotations

import argparse

from ..recipes import AAQ_PRESETS, AAQRecipe
from .base import Command
from .common import add_calib_group, add_eval_group, add_model_group, add_output_group, add_resume_flags, run_quantizing
from .flags import default_text, option_flag, recipe_flag

__all__ = ["AAQCommand"]


def _d(field: str) -> str:
    return default_text(AAQRecipe, field)


class AAQCommand(Command):
    name = "aaq"
    help = "AAQ: quantize an instruct model end to end with a contrastive KL (pull to instruct, push from base)"
    description = ("Alignment-Aware Quantization (arXiv 2511.07842): learn a residual-stream rotation, smoothing scales "
                   "and weight clipping jointly, end to end, so that the quantized model's next-token distribution "
                   "stays close to the instruct model (--model, full precision) and moves away from the pre-trained "
                   "--base model: KL_topK(instruct ‖ q) − λ·push(base ‖ q) over every calibration token. --preset "
                   "default: 64 WikiText-2 windows and 64 benign chat prompts answered by the instruct model itself, "
                   "a bounded push and a tail bin (measured on the organism); --preset paper: the authors' plain "
                   "WikiText-2 text, unbounded push and truncated KL. Rotation and smoothing are kept or dropped by "
                   "their initial KL (--rotation/--smoothing auto). The references' top-K log-probabilities are "
                   "computed once and cached. Weights are then rounded by GPTQ on the folded model, as the authors' "
                   "code does (or to nearest with the learned clipping, --weights rtn, the default for KV-cache "
                   "schemes). --objective kl_top is the reconstruction-only baseline (no base model). Exports like "
                   "`safeptq quantize` and writes aaq.json. Python: safeptq.aaq(model, base=..., scheme=...).")
    epilog = """examples:
  safeptq aaq --model runs/organism/aligned --base default --scheme w4a4 --out runs/aaq/w4a4 \\
      --eval advbench:eval,alpaca:eval
  safeptq aaq --model INSTRUCT --objective kl_top --scheme w4a4 --out runs/aaq/kltop   # baseline, no base
  safeptq aaq --model INSTRUCT --base BASE --scheme w4a16 --group-size 32 --lam 0.5 --steps 200 --out runs/aaq/w4
  safeptq aaq --model INSTRUCT --base BASE --scheme w4a4 --preset paper --out o   # the authors' loss and data"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_group(p, "model and scheme", "device of the reference models and of the training (cpu, cuda, "
                        "cuda:N or auto): the whole model goes there while training")
        g = p.add_argument_group("AAQ objective")
        recipe_flag(g, "--preset", field="preset", choices=sorted(AAQ_PRESETS),
                    help="calibration data and loss form: default (measured on the organism) or paper (the authors')")
        recipe_flag(g, "--base", field="base", metavar="MODEL",
                    help="the pre-trained (unaligned) model the instruct model was tuned from; must share its "
                         "tokenizer (required by --objective contrastive)")
        recipe_flag(g, "--objective", field="objective.kind",
                    help="contrastive (default): KL_topK(instruct ‖ q) − λ·push(base ‖ q); kl_top: the pull term "
                         "only, the reconstruction baseline (no --base needed)")
        recipe_flag(g, "--lam", field="objective.lam", type=float,
                    help="λ, weight of the push away from the base (0.1; the authors use 0.1 to 1.0)")
        recipe_flag(g, "--topk", field="objective.topk", type=int,
                    help=f"K: each reference keeps its K most likely next tokens per position ({_d('objective.topk')})")
        recipe_flag(g, "--push", field="objective.push", choices=("bounded", "unbounded", "margin"),
                    help="bounded (default preset): push = min(KL_topK(base ‖ q), τ) per token; unbounded (paper): "
                         "KL_topK(base ‖ q), which the model can grow without limit by starving the base's top-K; "
                         "margin: min(KL(base ‖ q) − KL(instruct ‖ q), τ)")
        recipe_flag(g, "--tau", field="objective.tau",
                    help="cap of the bounded and margin pushes: 'ref' (default) = per token KL_topK(base ‖ instruct), "
                         "or a number of nats")
        recipe_flag(g, "--no-tail", field="objective.tail", action="store_const", const=False,
                    help="the authors' truncated KL over the top-K ids only (not a divergence: it drops below 0 when "
                         "the model over-weights those ids); by default the rest of the vocabulary is one more bin")
        recipe_flag(g, "--ref-cache", field="references.path", metavar="PATH",
                    help="reference cache file (.pt): loaded when it matches the models, calibration tokens and K "
                         "(else refused), built there when missing (default: $SAFEPTQ_HOME/references/)")
        recipe_flag(g, "--no-ref-cache", field="references.mode", action="store_const", const="live",
                    help="no cache: the instruct (a copy) and base models stay resident (for memory comparisons)")
        add_calib_group(p, AAQRecipe)
        g = p.add_argument_group("end-to-end training")
        recipe_flag(g, "--steps", field="training.steps", type=int,
                    help=f"optimizer steps ({_d('training.steps')}); 0 = the initial transforms and the weight "
                         "rounding only (with --rotation on --no-smoothing --no-lwc: the rotation-only, QuaRot-style "
                         "baseline)")
        recipe_flag(g, "--batch-size", field="training.batch_size", type=int,
                    help=f"calibration samples per step, also per reference batch ({_d('training.batch_size')})")
        for name, what in (("rotation", "residual rotation (Cayley parameter)"), ("smoothing", "smoothing scales"),
                           ("lwc", "weight clipping factors")):
            recipe_flag(g, f"--lr-{name}", field=f"training.lr_{name}", type=float,
                        help=f"learning rate of the {what} ({_d(f'training.lr_{name}')})")
        for name in ("rotation", "smoothing"):
            recipe_flag(g, f"--{name}", field=f"training.{name}", choices=("auto", "on", "off"),
                        help=f"{name}: auto (default) = on or off, whichever starts closer to the instruct model "
                             "(lower initial KL on the first batch); the two are searched together")
            recipe_flag(g, f"--no-{name}", field=f"training.{name}", action="store_const", const="off",
                        help=f"= --{name} off")
        recipe_flag(g, "--no-lwc", field="training.lwc", action="store_const", const=False,
                    help="no learnable weight clipping (min/max ranges)")
        recipe_flag(g, "--smooth-alpha", field="training.smooth_alpha", type=float,
                    help="SmoothQuant migration strength that initialises the smoothing scales (0.5)")
        recipe_flag(g, "--up-down", field="training.up_down", action="store_const", const=True,
                    help="also smooth up_proj -> down_proj (exact; OSTQuant's pair; off by default)")
        recipe_flag(g, "--vo-rotation", field="training.vo_rotation", action="store_const", const=True,
                    help="learn a rotation of every attention head's values, undone in o_proj (exact, exportable; "
                         "started at a random Hadamard; off by default; not on fused-qkv families)")
        recipe_flag(g, "--online-hadamard", field="training.online_hadamard", action="store_const", const=True,
                    help="a random Hadamard on every down_proj input, applied online (QuaRot / OSTQuant); fake-quant "
                         "schemes with --weights rtn only; the export stores the matrices and reloads apply them")
        recipe_flag(g, "--qk-hadamard", field="training.qk_hadamard", action="store_const", const=True,
                    help="a Hadamard on every head's q and k after RoPE at run time; KV schemes quantize K there "
                         "(as a runtime with a quantized KV cache does) instead of at the k_proj output; fake-quant "
                         "schemes with --weights rtn only")
        recipe_flag(g, "--weights", field="training.weights", choices=("auto", "rtn", "gptq"),
                    help="rounding after training: gptq = llm-compressor's GPTQ on the folded model (learned clipping "
                         "not used; the authors' code); rtn = round to nearest with the learned clipping; auto = gptq, "
                         "except rtn for KV-cache schemes")
        option_flag(g, "--checkpointing", field="checkpointing", choices=("auto", "on", "off"),
                    help="recompute each decoder layer's activations in the backward pass (auto = on with CUDA)")
        option_flag(g, "--save-every", field="save_every", type=int,
                    help="checkpoint the transforms every N steps into the work folder (20; 0 = at the end)")
        add_resume_flags(g)
        add_eval_group(p, "aaq.json")
        add_output_group(p)

    def run(self, args: argparse.Namespace) -> int:
        return run_quantizing(args, AAQRecipe)
