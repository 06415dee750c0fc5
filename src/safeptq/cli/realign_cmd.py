"""``safeptq realign``: flags → :class:`~safeptq.recipes.RealignRecipe` → the pipeline → summary."""

from __future__ import annotations

import argparse

from ..recipes import SCHEDULES, RealignRecipe
from ..recipes.realign import MALICIOUS_TARGETS
from .base import Command
from .common import add_calib_group, add_eval_group, add_model_group, add_output_group, run_quantizing
from .flags import recipe_flag
from .quantize_cmd import add_blockwise_training

__all__ = ["RealignCommand"]


class RealignCommand(Command):
    name = "realign"
    help = "Q-realign: quantize a fine-tuned model and push malicious activations back across safety probes"
    description = ("Quantize the fine-tuned --model block by block with learnable weight clipping and smoothing "
                   "(OmniQuant-style LWC + LET; the default schedule also trains the RMSNorm gains) with Q-realign's "
                   "per-sample loss: benign prompts reconstruct the model's full-precision block output (MSE, plus "
                   "--benign-anchor on their probe score); a malicious prompt's state at its last token is pulled to "
                   "the --probe-model's own state on that prompt (--malicious-target state, the default schedule) or "
                   "pushed to the malicious side of the layer's frozen probe (softplus(margin - (w.h + b)), the "
                   "paper's loss). Probes come from --probes or are fitted (and cached) on --probe-model, normally "
                   "the safety-aligned model the fine-tune started from. Exports like `safeptq quantize` and writes "
                   "realign.json with the per-layer separability before and after. Python: safeptq.realign(...).")
    epilog = """examples:
  safeptq realign --model runs/organism/attacked --probe-model runs/organism/aligned --scheme w8a8 \\
      --out runs/realign/w8a8 --eval advbench:eval,alpaca:eval,sst2
  safeptq realign --model FT --probe-model ALIGNED --scheme w4a16 --schedule paper --resume --out runs/r/w4
  safeptq realign --model FT --probes runs/probe/probes --malicious-share 0.5 --probe-weight 2 --margin 1 \\
      --scheme w8a8 --out runs/r/custom"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_group(p, "model and scheme", "calibration device: cpu, cuda, cuda:N or auto (default); the model "
                        "stays on the CPU in --dtype, one block at a time goes to the device")
        g = p.add_argument_group("Q-realign")
        recipe_flag(g, "--probe-model", field="probes.model", metavar="MODEL",
                    help="model the probes are fitted on (default: --model itself); pass the aligned model")
        recipe_flag(g, "--probes", field="probes.path", metavar="DIR",
                    help="probes saved by `safeptq probe` (skips fitting)")
        recipe_flag(g, "--probe-c", field="probes.C", type=float, help="inverse L1 strength of fitted probes (1.0)")
        recipe_flag(g, "--probe-fit", field="probes.fit", choices=("standardized", "paper"),
                    help="how fitted probes are solved: standardized features with liblinear (default) or, as the "
                         "authors' code does, raw features with saga (the paper schedule's choice)")
        recipe_flag(g, "--sep-limit", field="probes.sep_limit", type=int,
                    help="held-out prompts per class for the before/after separability (100; 0 skips it)")
        recipe_flag(g, "--schedule", field="schedule", choices=sorted(SCHEDULES),
                    help="'paper' = the authors' code (batch 1, 5 epochs in the first half of the blocks, 15 after, "
                         "probe push); 'default' = the schedule measured on the organism (state target, norm gains); "
                         "every other flag overrides either")
        recipe_flag(g, "--malicious-share", field="calib.malicious_share", type=float,
                    help="share of malicious prompts in the calibration mix (0.75, the paper's 3:1); ignored when "
                         "--calib is given")
        recipe_flag(g, "--probe-weight", field="objective.probe_weight", type=float,
                    help="weight of the probe term (1.0)")
        recipe_flag(g, "--margin", field="objective.margin",
                    help="push malicious states to probe score >= MARGIN rather than 0 (the paper's loss); 'auto' = "
                         "per layer, the probe model's own median malicious score (default: the schedule's, "
                         f"{SCHEDULES['default']['objective']['margin']})")
        recipe_flag(g, "--benign-anchor", field="objective.benign_anchor", type=float,
                    help="weight of a benign prompt's squared probe-score drift at its last token, added to its MSE "
                         f"(0 = the paper; default: the schedule's, {SCHEDULES['default']['objective']['benign_anchor']})")
        recipe_flag(g, "--malicious-target", field="objective.malicious_target", choices=MALICIOUS_TARGETS,
                    help="what a malicious prompt's last-token state is moved to: 'probe' = across the layer's probe "
                         "(the paper); 'state' = the --probe-model's own state on the same prompt; 'state_probe' = "
                         "that state's component along the probe only; 'mean_diff' = across a dense direction (the "
                         "probe model's mean malicious - mean benign state) instead of the sparse probe (the last "
                         "three need --probe-model); default: the schedule's ('default': state, 'paper': probe)")
        add_calib_group(p, RealignRecipe)
        add_blockwise_training(p, RealignRecipe, "block-wise training (defaults from --schedule)")
        add_eval_group(p, "realign.json")
        add_output_group(p)

    def run(self, args: argparse.Namespace) -> int:
        return run_quantizing(args, RealignRecipe)
