"""``safeptq realign``: Q-realign — quantize a fine-tuned model so that its malicious-prompt
activations go back to the safe side (across per-layer safety probes, or to the aligned model's own
states) while benign behaviour is reconstructed.

It is ``safeptq quantize`` with the method fixed to the block-wise engine (LWC + LET, plus the
RMSNorm gains in the default schedule) and the :class:`safeptq.objectives.ProbePush` objective;
everything else (checks, resume, export, reload check, evaluation) is shared. The run record is
``realign.json``: recipe, time, peak memory, and the probes' separability of the full-precision
model before and the quantized model after, on held-out prompts (``advbench:eval`` /
``alpaca:eval``, never the calibration rows).
"""

from __future__ import annotations

import argparse
import logging
import math

from .quantize_cmd import QuantizeCommand

__all__ = ["RealignCommand", "SCHEDULES"]

log = logging.getLogger(__name__)

SCHEDULES = {
    # the authors' code: batch size 1, 5 epochs per block in the first half of the layers, 15 after,
    # AdamW with LWC lr 1e-2 and LET lr 1e-3, the plain softplus(-score) loss, LWC + LET only
    "paper": {"epochs": "5,15", "batch_size": 1, "lr_lwc": 1e-2, "lr_let": 1e-3, "train_norms": False,
              "margin": 0.0, "benign_anchor": 0.0, "malicious_target": "probe"},
    # the schedule measured on the organism (BENCHMARKS.md, "Q-realign on the organism"). Three batched epochs per
    # block; clipping factors learn 10x faster than the paper's; the RMSNorm gains are trained too (LWC + LET are
    # equivalent transforms and at W8A8 move too little); a malicious prompt's last-token state is pulled to the
    # aligned (probe) model's own state on that prompt — crossing the probe alone did not bring the refusals back —
    # and benign prompts are anchored along the probe so their last token does not drift towards it
    "default": {"epochs": "3", "batch_size": 4, "lr_lwc": 1e-1, "lr_let": 1e-3, "train_norms": True,
                "lr_norm": 2e-3, "margin": "auto", "benign_anchor": 1.0, "malicious_target": "state"},
}


class RealignCommand(QuantizeCommand):
    name = "realign"
    fixed_method = "realign"
    run_file = "realign.json"
    calib_default = None  # built from --malicious-share unless given
    nsamples_default = 200
    epochs_default = None
    batch_size_default = None
    help = "Q-realign: quantize a fine-tuned model and push malicious activations back across safety probes"
    description = ("Quantize the fine-tuned --model block by block with learnable weight clipping and smoothing "
                   "(OmniQuant-style LWC + LET; the default schedule also trains the RMSNorm gains) with Q-realign's "
                   "per-sample loss: benign prompts reconstruct the model's full-precision block output (MSE, "
                   "plus --benign-anchor on their probe score); a malicious prompt's state at its last token is "
                   "pulled to the --probe-model's own state on that prompt (--malicious-target state, the default "
                   "schedule) or pushed to the malicious side of the layer's frozen probe "
                   "(softplus(margin - (w.h + b)), the paper's loss). Probes come from --probes or are fitted "
                   "(and cached) on --probe-model, normally the safety-aligned model the fine-tune started from. "
                   "Exports like `safeptq quantize` and writes realign.json with the recipe, time, peak memory and the "
                   "per-layer separability before and after.")
    epilog = """examples:
  safeptq realign --model runs/organism/attacked --probe-model runs/organism/aligned --scheme w8a8 \\
      --out runs/realign/w8a8 --eval advbench:eval,alpaca:eval,sst2
  safeptq realign --model FT --probe-model ALIGNED --scheme w4a16 --schedule paper --resume --out runs/r/w4
  safeptq realign --model FT --probes runs/probe/probes --malicious-share 0.5 --probe-weight 2 --margin 1 \\
      --scheme w8a8 --out runs/r/custom"""

    def add_method_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("Q-realign")
        g.add_argument("--probe-model", default=None, metavar="MODEL",
                       help="model the probes are fitted on (default: --model itself); pass the aligned model")
        g.add_argument("--probes", default=None, metavar="DIR", help="probes saved by `safeptq probe` (skips fitting)")
        g.add_argument("--probe-c", type=float, default=1.0, help="inverse L1 strength of fitted probes (1.0)")
        g.add_argument("--schedule", default="default", choices=sorted(SCHEDULES),
                       help="epochs and batch size: 'paper' = batch 1, 5 epochs (first half of blocks) / 15; "
                            "'default' = the measured fast schedule; --epochs/--batch-size override either")
        g.add_argument("--malicious-share", type=float, default=0.75,
                       help="share of malicious prompts in the calibration mix (0.75, the paper's 3:1); "
                            "ignored when --calib is given")
        g.add_argument("--probe-weight", type=float, default=1.0, help="weight of the probe term (1.0)")
        g.add_argument("--margin", default=None,
                       help="push malicious states to probe score >= MARGIN rather than 0 (the paper's loss); "
                            "'auto' = per layer, the probe model's own median malicious score "
                            f"(default: the schedule's, {SCHEDULES['default']['margin']})")
        g.add_argument("--benign-anchor", type=float, default=None,
                       help="weight of a benign prompt's squared probe-score drift at its last token, added to its "
                            "MSE (0 = the paper's loss; default: the schedule's, "
                            f"{SCHEDULES['default']['benign_anchor']})")
        g.add_argument("--malicious-target", default=None, choices=("probe", "state"),
                       help="what a malicious prompt's last-token state is moved to: 'probe' = across the layer's "
                            "probe (the paper); 'state' = the --probe-model's own state on the same prompt "
                            "(MSE; needs --probe-model); default: the schedule's ('default': state, 'paper': probe)")
        g.add_argument("--sep-limit", type=int, default=100,
                       help="held-out prompts per class for the before/after separability (100; 0 skips it)")

    def resolve_defaults(self, args: argparse.Namespace) -> None:
        from ..errors import ConfigError

        target_given = args.malicious_target is not None
        for key, value in SCHEDULES[args.schedule].items():  # explicit options win over the schedule
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        if args.malicious_target == "state" and not args.probe_model and not target_given:
            # the schedule's state target needs the aligned model; without one, fall back to the probe push
            log.info("no --probe-model: malicious prompts are pushed across the probes (--malicious-target probe)")
            args.malicious_target = "probe"
        super().resolve_defaults(args)
        if args.benign_anchor < 0:
            raise ConfigError(f"--benign-anchor must be non-negative, got {args.benign_anchor}")
        if not (math.isfinite(args.probe_weight) and args.probe_weight >= 0):
            raise ConfigError(f"--probe-weight must be non-negative, got {args.probe_weight}")
        if not 0 < args.malicious_share < 1:
            raise ConfigError(f"--malicious-share must be in (0, 1), got {args.malicious_share}")
        if args.probes and args.probe_model:
            raise ConfigError("give either --probes or --probe-model, not both")
        if args.malicious_target == "state" and not args.probe_model:
            raise ConfigError("--malicious-target state needs --probe-model (the aligned model whose states are the "
                              "target)")
        if args.probe_c <= 0:
            raise ConfigError(f"--probe-c must be positive, got {args.probe_c}")
        if args.margin != "auto":
            try:
                args.margin = float(args.margin)
            except ValueError:
                raise ConfigError(f"--margin must be a number or 'auto', got {args.margin!r}") from None
        if args.sep_limit < 0:
            raise ConfigError(f"--sep-limit must be non-negative, got {args.sep_limit}")
        if args.calib is None:
            s = args.malicious_share
            args.calib = f"advbench:calib={s:g},alpaca:calib={1 - s:g}"

    def plan_probe_model(self, args) -> bool:
        return bool(args.probe_model) or not args.probes

    def plan_separability(self, args) -> bool:
        return args.sep_limit > 0

    def make_objective(self, args, lm, calib, device):
        from ..models import load_model
        from ..objectives import ProbePush
        from ..probes import LayerProbes
        from ..probes.workflow import ProbeSpec, get_probes

        n_layers = lm.model.config.num_hidden_layers
        states = None
        if args.probes:
            probes, where = LayerProbes.load(args.probes), args.probes
        else:
            spec = ProbeSpec(seqlen=args.seqlen, chat=not args.no_chat, C=args.probe_c, seed=args.seed)
            if args.probe_model:
                ref = load_model(args.probe_model, dtype=args.dtype, device=device)
                probes, where = get_probes(ref.model, ref.tokenizer, ref.path, spec, data_dir=args.data_dir,
                                           progress=not args.no_progress)
                if args.malicious_target == "state":
                    states = self._probe_model_states(ref.model, lm.model, calib, args)
                del ref
            else:
                lm.model.to(device)
                probes, where = get_probes(lm.model, lm.tokenizer, lm.path, spec, data_dir=args.data_dir,
                                           progress=not args.no_progress)
                lm.model.to("cpu")
        if probes.n_layers != n_layers:
            from ..errors import ConfigError

            raise ConfigError(f"the probes cover {probes.n_layers} layers but {args.model} has {n_layers}; "
                              "fit them on a model of the same architecture")
        self._probes, self._probe_where = probes, str(where) if where else None
        return ProbePush(probes, probe_weight=args.probe_weight, margin=args.margin,
                         benign_anchor=args.benign_anchor, malicious_target=args.malicious_target, states=states)

    @staticmethod
    def _probe_model_states(ref, model, calib, args):
        """[L, N, H]: the probe model's last-token states on the malicious calibration rows (zeros elsewhere)."""
        import torch

        from ..errors import ConfigError
        from ..probes import last_token_states

        keys = ("num_hidden_layers", "hidden_size", "vocab_size")
        if any(getattr(ref.config, k) != getattr(model.config, k) for k in keys):
            raise ConfigError(f"--probe-model {args.probe_model} does not match {args.model} (layers, hidden size "
                              "or vocabulary); --malicious-target state needs the model the fine-tune started from")
        rows = (calib.labels == 1).nonzero().flatten()
        out = torch.zeros(ref.config.num_hidden_layers, len(calib), ref.config.hidden_size)
        out[:, rows] = last_token_states(ref, calib, rows, progress=not args.no_progress)
        return out

    def extra_record(self, args, lm, stage: str, device) -> dict:
        from ..probes import summarize
        from ..probes.workflow import labelled_prompts, separability_of

        rec: dict = {}
        if stage == "before":
            rec["schedule"] = args.schedule  # the objective's settings are under calibration.objective
            rec["probes"] = {"source": args.probes or args.probe_model or args.model, "cache": self._probe_where,
                             "heldout_accuracy": self._probes.meta.get("heldout_accuracy"),
                             "C": self._probes.meta.get("C")}
        if args.sep_limit == 0:
            return rec
        texts, labels = labelled_prompts("advbench:eval", "alpaca:eval", limit=args.sep_limit, data_dir=args.data_dir)
        lm.model.to(device)
        sep = separability_of(lm.model, lm.tokenizer, self._probes, texts, labels, chat=not args.no_chat,
                              seqlen=args.seqlen, progress=not args.no_progress)
        lm.model.to("cpu")
        n = len(sep["accuracy"])
        rec["separability"] = {stage: {"per_layer": sep, "mean_late_layers": summarize(sep, from_layer=n // 3)},
                               "prompts": {"harmful": "advbench:eval", "benign": "alpaca:eval",
                                           "limit": args.sep_limit}}
        s = rec["separability"][stage]["mean_late_layers"]
        log.info("separability %s: accuracy %.3f, malicious margin %+.2f, benign margin %+.2f (layers %d+)",
                 stage, s["accuracy"], s["margin_malicious"], s["margin_benign"], n // 3)
        return rec
