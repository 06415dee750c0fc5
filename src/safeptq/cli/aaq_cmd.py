"""``safeptq aaq``: AAQ (Alignment-Aware Quantization) — quantize an instruction-tuned model end to
end so that its next-token distribution stays close to the instruct model's and away from the
pre-trained base model's.

It is ``safeptq quantize`` (checks, work folder and resume, export, reload check, evaluation) with
the end-to-end engine (:mod:`safeptq.quant.e2e`) in place of the block-wise one, in two phases:

1. references: the top-K log-probabilities of the instruct model (``--model`` in full precision,
   before it is touched) and of the base model on every calibration token, computed once into a
   :class:`~safeptq.objectives.ReferenceCache` (``--ref-cache PATH``, else
   ``$SAFEPTQ_HOME/references/``, keyed by models, calibration tokens and K, so reruns reuse it)
   after which the base model is freed; ``--no-ref-cache`` keeps a copy of the instruct model and
   the base model resident instead (:class:`~safeptq.objectives.LiveReferences`), to compare memory;
2. training: rotation + smoothing + learnable clipping trained jointly on the objective, folded
   into the weights, weights rounded to nearest with the learned clipping.

The run record ``aaq.json`` holds the recipe, the reference cache used (built or reused), wall time
and peak memory of each phase, and the loss and its terms at the start and end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

from .quantize_cmd import Calibrated, QuantizeCommand, RunContext, check_size_and_eval_args

__all__ = ["AAQCommand", "OBJECTIVES", "reference_model_id"]

log = logging.getLogger(__name__)

OBJECTIVES = ("contrastive", "kl_top")
FOLDED = "folded"  # work sub-folder: the trained, folded full-precision model that --weights gptq rounds
_ALIASES = {"contrastive": "contrastive", "contrastive-kl-top": "contrastive", "aaq": "contrastive",
            "kl-top": "kl_top"}
_OBJECTIVE_DEFAULTS = {"lam": 0.1, "push": "bounded", "tau": "ref"}  # used by the contrastive objective only


def reference_model_id(path: str) -> str:
    """A model's identity for the reference cache: its absolute folder plus a short hash of the
    names, sizes and modification times of its weight and config files (so a model retrained into
    the same folder does not reuse stale references); a hub id as is."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return path
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf", ".json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{p.resolve()}#{h.hexdigest()[:12]}"


def _formula(args) -> str:
    """The objective as one line, e.g.
    ``KL_top1000+tail(instruct ‖ q) − 0.1 · min(KL_top1000+tail(base ‖ q), τ)``
    (``+tail``: the rest of the vocabulary as one more bin)."""
    kl = f"KL_top{args.topk}" + ("" if args.no_tail else "+tail")
    pull = f"{kl}(instruct ‖ q)"
    if args.objective == "kl_top":
        return pull
    push = f"{kl}(base ‖ q)"
    if args.push != "unbounded":
        tau = f"{kl}(base ‖ instruct) per token" if args.tau == "ref" else f"{args.tau:g} nats"
        diff = f"{push} − {pull}" if args.push == "margin" else push
        push = f"min({diff}, τ = {tau})"
    return f"{pull} − {args.lam:g} · {push}"


class AAQCommand(QuantizeCommand):
    name = "aaq"
    fixed_method = "aaq"
    run_file = "aaq.json"
    # half plain text, half benign chat prompts answered by the instruct model itself: WikiText-2 alone
    # keeps perplexity but not the refusals (BENCHMARKS.md, "AAQ on organism v7"); still no safety data
    calib_default = "alpaca:calib=0.5,wikitext2:calib=0.5"
    calib_replies_default = 64
    nsamples_default = 128
    epochs_default = None
    batch_size_default = 4
    train_defaults = {"lr_rotation": 1e-3, "lr_smoothing": 1e-3, "lr_lwc": 1e-2}
    work_files = ("e2e_state.pt", "e2e_state.pt.tmp")
    measure_calibration_phase = False  # calibrate() records references / search / training / gptq phases
    work_dirs = (FOLDED,)
    device_help = ("device of the reference models and of the training (cpu, cuda, cuda:N or auto, the "
                   "default): the whole model goes there while training, in float32 or, with --precision bf16, "
                   "in its own bf16 weights")
    help = "AAQ: quantize an instruct model end to end with a contrastive KL (pull to instruct, push from base)"
    description = ("Alignment-Aware Quantization (arXiv 2511.07842): learn a residual-stream rotation, "
                   "smoothing scales and weight clipping jointly, end to end, so that the quantized model's "
                   "next-token distribution stays close to the instruct model (--model, full precision) and "
                   "moves away from the pre-trained --base model: KL_topK(instruct ‖ q) − λ·push(base ‖ q) "
                   "over every calibration token. Default calibration (no safety data): 64 WikiText-2 windows "
                   "from the second half of the test text and 64 benign chat prompts (alpaca:calib) each "
                   "followed by the instruct model's own greedy reply (--calib-replies 64); the authors' plain "
                   "text is --calib wikitext2:calib --calib-replies 0. Rotation and smoothing are kept or dropped "
                   "by their initial KL (--rotation/--smoothing auto). The references' top-K log-probabilities are "
                   "computed once and cached, so training holds only the model being quantized. Weights are then "
                   "rounded by GPTQ on the folded model, as the authors' code does (or to nearest with the learned "
                   "clipping, --weights rtn, the default for KV-cache schemes); activations are "
                   "quantized per token, the KV cache where the scheme says. "
                   "--objective kl_top is the reconstruction-only baseline on the same pipeline (no base "
                   "model). Exports like `safeptq quantize` and writes aaq.json.")
    epilog = """examples:
  safeptq aaq --model runs/organism/aligned --base default --scheme w4a4 --out runs/aaq/w4a4 \\
      --eval advbench:eval,alpaca:eval
  safeptq aaq --model INSTRUCT --objective kl_top --scheme w4a4 --out runs/aaq/kltop   # baseline, no base
  safeptq aaq --model INSTRUCT --base BASE --scheme w4a16 --group-size 32 --lam 0.5 --steps 200 --out runs/aaq/w4
  safeptq aaq --model INSTRUCT --base BASE --scheme w4a4 --push unbounded --no-tail --out o   # the authors' loss
  safeptq aaq --model INSTRUCT --base BASE --scheme w4a4 --no-ref-cache --out o   # references live (memory)"""

    # -- options --------------------------------------------------------------------------------------
    def add_method_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("AAQ objective")
        g.add_argument("--base", default=None, metavar="MODEL",
                       help="the pre-trained (unaligned) model the instruct model was tuned from; must share its "
                            "tokenizer (required by --objective contrastive)")
        g.add_argument("--objective", default="contrastive",
                       help="contrastive (default): KL_topK(instruct ‖ q) − λ·push(base ‖ q); kl_top: "
                            "KL_topK(instruct ‖ q) only, the reconstruction baseline (no --base needed)")
        g.add_argument("--lam", type=float, default=None,
                       help=f"λ, weight of the push away from the base (default {_OBJECTIVE_DEFAULTS['lam']}; "
                            "the authors use 0.1 to 1.0)")
        g.add_argument("--topk", type=int, default=1000,
                       help="K: each reference keeps its K most likely next tokens per position (1000)")
        g.add_argument("--push", default=None,
                       help="bounded (default): push = min(KL_topK(base ‖ q), τ) per token, so a token stops "
                            "pushing once the quantized model is τ away from the base and the loss stays bounded "
                            "below; unbounded: the authors' form, push = KL_topK(base ‖ q), which the quantized "
                            "model can grow without limit by starving the base's top-K tokens; margin: push = "
                            "min(KL_topK(base ‖ q) − KL_topK(instruct ‖ q), τ), a hinge on how much closer the "
                            "quantized model is to the instruct model than to the base (keeps a gradient when "
                            "quantization noise puts it far from both)")
        g.add_argument("--tau", default=None,
                       help="cap of the bounded and margin pushes: 'ref' (default) = per token "
                            "KL_topK(base ‖ instruct), push no further from the base than the instruct model itself "
                            "is; or a number of nats")
        g.add_argument("--no-tail", action="store_true",
                       help="the authors' plain truncated KL over the top-K ids only. It is not a divergence: it "
                            "drops below 0 when the quantized model puts more mass on those ids than the "
                            "reference, and the optimiser exploits that (an over-confident model scores better "
                            "than an exact copy). By default the rest of the vocabulary is one more bin: the exact "
                            "KL of the two distributions coarse-grained to K+1 outcomes, >= 0, 0 only on a match")
        g = p.add_argument_group("references")
        g.add_argument("--ref-cache", default=None, metavar="PATH",
                       help="reference cache file (.pt): loaded when it exists and matches the models, "
                            "calibration tokens and K (else refused), built and saved there when it does not "
                            "(default: $SAFEPTQ_HOME/references/, keyed by all three)")
        g.add_argument("--no-ref-cache", action="store_true",
                       help="no cache: the instruct (a copy) and base models stay resident and run on every "
                            "training batch (three models in memory; for memory comparisons)")

    def add_training_arguments(self, p: argparse.ArgumentParser) -> None:
        d = self.train_defaults
        g = p.add_argument_group("end-to-end training")
        g.add_argument("--steps", type=int, default=100, help="optimizer steps (100)")
        g.add_argument("--batch-size", type=int, default=self.batch_size_default,
                       help=f"calibration samples per step, also per reference batch ({self.batch_size_default})")
        g.add_argument("--lr-rotation", type=float, default=None,
                       help=f"learning rate of the residual rotation (Cayley parameter; {d['lr_rotation']:g})")
        g.add_argument("--lr-smoothing", type=float, default=None,
                       help=f"learning rate of the smoothing scales ({d['lr_smoothing']:g})")
        g.add_argument("--lr-lwc", type=float, default=None,
                       help=f"learning rate of the weight clipping factors ({d['lr_lwc']:g})")
        g.add_argument("--rotation", default="auto", choices=("auto", "on", "off"),
                       help="residual-stream rotation (a random Hadamard with a learned rotation on top): auto "
                            "(default) = on or off, whichever starts closer to the instruct model (lower initial "
                            "KL on the first batch, one forward pass per candidate; recorded in the run file)")
        g.add_argument("--smoothing", default="auto", choices=("auto", "on", "off"),
                       help="learned smoothing scales (SmoothQuant-initialised): auto (default) | on | off, as "
                            "--rotation; the two are searched together")
        g.add_argument("--no-rotation", dest="rotation", action="store_const", const="off",
                       help="= --rotation off")
        g.add_argument("--no-smoothing", dest="smoothing", action="store_const", const="off",
                       help="= --smoothing off")
        g.add_argument("--no-lwc", action="store_true", help="no learnable weight clipping (min/max ranges)")
        g.add_argument("--smooth-alpha", type=float, default=0.5,
                       help="SmoothQuant migration strength that initialises the smoothing scales (0.5)")
        g.add_argument("--weights", default="auto", choices=("auto", "rtn", "gptq"),
                       help="how the weights are rounded after training: gptq = llm-compressor's GPTQ on the folded "
                            "(rotated, smoothed) model with the same calibration tokens, its own ranges instead of "
                            "the learned clipping (as the authors' code does; needs safeptq[baselines]); rtn = round "
                            "to nearest with the learned clipping; auto (default) = gptq, except rtn for KV-cache "
                            "schemes (llm-compressor's GPTQ does not take safeptq's KV quantizer)")
        g.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"),
                       help="recompute each decoder layer's activations in the backward pass (memory grows "
                            "with one layer instead of the depth, at about one more forward per step); "
                            "auto (default) = on with CUDA, off on a CPU")
        g.add_argument("--save-every", type=int, default=20,
                       help="checkpoint the transforms every N steps into the work folder (20; 0 = at the end)")
        self.add_resume_arguments(g, "end-to-end checkpoint")

    # -- defaults and checks --------------------------------------------------------------------------
    def resolve_defaults(self, args: argparse.Namespace) -> None:
        from ..errors import ConfigError, UnknownNameError
        from ..objectives.kl import PUSH_FORMS

        key = str(args.objective).strip().lower().replace("_", "-")
        if key not in _ALIASES:
            raise UnknownNameError(f"unknown --objective {args.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        args.objective = _ALIASES[key]
        contrastive = args.objective == "contrastive"
        if not contrastive:
            given = [f for f, v in (("--base", args.base), ("--lam", args.lam), ("--push", args.push),
                                    ("--tau", args.tau)) if v is not None]
            if given:
                log.warning("%s not used by --objective kl_top (it reads the instruct model only)", ", ".join(given))
            args.base = args.lam = args.push = args.tau = None
        else:
            for k, v in _OBJECTIVE_DEFAULTS.items():
                if getattr(args, k) is None:
                    setattr(args, k, v)
            if not args.base:
                raise ConfigError("--objective contrastive needs --base MODEL, the pre-trained model the instruct "
                                  "model was tuned from; or use --objective kl_top (no base model)")
            if not (math.isfinite(args.lam) and args.lam >= 0):
                raise ConfigError(f"--lam must be a finite number >= 0, got {args.lam:g}")
            if args.push not in PUSH_FORMS:
                raise ConfigError(f"unknown --push {args.push!r}; choose one of {', '.join(PUSH_FORMS)}")
            if args.tau != "ref":
                try:
                    tau = float(args.tau)
                except ValueError:
                    raise ConfigError(f"--tau must be 'ref' or a positive number of nats, got {args.tau!r}") from None
                if not (math.isfinite(tau) and tau > 0):
                    raise ConfigError(f"--tau must be 'ref' or a positive number of nats, got {args.tau!r}")
                args.tau = tau
            if args.push == "unbounded" and args.tau != "ref":
                log.warning("--tau applies to --push bounded and margin only; ignored")
        if args.topk < 1:
            raise ConfigError(f"--topk must be at least 1, got {args.topk}")
        if args.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {args.steps}")
        if args.save_every < 0:
            raise ConfigError(f"--save-every must be non-negative, got {args.save_every}")
        if args.ref_cache and args.no_ref_cache:
            raise ConfigError("give either --ref-cache PATH or --no-ref-cache, not both")
        if args.ref_cache and Path(args.ref_cache).expanduser().is_dir():
            raise ConfigError(f"--ref-cache {args.ref_cache} is a folder; give a file path (e.g. refs.pt)")
        super().resolve_defaults(args)
        self.make_objective(args, None, None, None)  # any remaining objective error, before loading

    @staticmethod
    def _check_args(args) -> None:
        from ..errors import ConfigError

        check_size_and_eval_args(args)
        for flag, v in (("--lr-rotation", args.lr_rotation), ("--lr-smoothing", args.lr_smoothing),
                        ("--lr-lwc", args.lr_lwc)):
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{flag} must be positive, got {v}")
        if not 0 <= args.smooth_alpha <= 1:
            raise ConfigError(f"--smooth-alpha must be in [0, 1], got {args.smooth_alpha}")
        from ..quant.args import resolve_scheme

        scheme = resolve_scheme(args.scheme, group_size=args.group_size)
        if args.weights == "auto":
            args.weights = "rtn" if scheme.kv_cache is not None else "gptq"
        if args.weights == "gptq":
            from ..baselines import llmcompressor as lc

            lc.require_llmcompressor()
            lc.build_recipe("gptq", scheme)  # refuses KV schemes

    def uses_work_dir(self, args) -> bool:
        return True

    def needs_calibration(self, args) -> bool:
        return True

    def check_models(self, args, lm, device) -> None:
        """The base model must score the same tokens: same logit width and the same tokenizer."""
        if not args.base:
            return
        from transformers import AutoConfig

        from ..errors import ConfigError, ModelError
        from ..models import load_tokenizer, resolve_model

        path, gguf = resolve_model(args.base)
        try:
            cfg = AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read the config of --base {args.base}: {str(e).splitlines()[0]}") from e
        va, vb = lm.model.config.vocab_size, getattr(cfg, "vocab_size", None)
        if va != vb:
            raise ConfigError(f"--base {args.base} has a vocabulary of {vb} tokens but --model {args.model} has {va}; "
                              "AAQ compares the two next-token distributions token by token, so the base must "
                              "share the instruct model's tokenizer")
        ta, tb = lm.tokenizer, load_tokenizer(args.base)
        ids_a = {i: t for t, i in ta.get_vocab().items()}
        ids_b = {i: t for t, i in tb.get_vocab().items()}
        added = set(ta.get_added_vocab()) | set(tb.get_added_vocab())
        differ = [i for i in ids_a.keys() & ids_b.keys() if ids_a[i] != ids_b[i]]
        plain = [i for i in differ if ids_a[i] not in added and ids_b[i] not in added]
        if plain:
            i = min(plain)
            raise ConfigError(f"--base {args.base} uses a different tokenizer than --model {args.model}: "
                              f"{len(plain)} token ids mean other tokens (id {i} is {ids_a[i]!r} vs {ids_b[i]!r})")
        if differ:
            log.warning("--base and --model differ in %d added/special tokens; the comparison is token-id based",
                        len(differ))

    def make_objective(self, args, lm, calib, device):
        from ..objectives import ContrastiveKLTop, KLTop

        tail = not args.no_tail
        if args.objective == "kl_top":
            return KLTop(k=args.topk, teacher="instruct", tail=tail)
        return ContrastiveKLTop(k=args.topk, lam=args.lam, push=args.push, tau=args.tau, tail=tail)

    # -- run --------------------------------------------------------------------------------------------
    def calibrate(self, args: argparse.Namespace, ctx: RunContext) -> Calibrated:
        from ..memory import phase_peak
        from ..quant.e2e import E2EConfig, calibrate_end_to_end, choose_transforms
        from ..quant.precision import resolve_precision

        lm, calib, scheme = ctx.lm, ctx.calib, ctx.scheme
        objective = self.make_objective(args, lm, calib, ctx.device)
        cfg = E2EConfig(scheme=scheme, steps=args.steps, batch_size=args.batch_size, lr_rotation=args.lr_rotation,
                        lr_smoothing=args.lr_smoothing, lr_lwc=args.lr_lwc, rotation=args.rotation != "off",
                        online_hadamard=False, smoothing=args.smoothing != "off", smooth_alpha=args.smooth_alpha,
                        lwc=not args.no_lwc, save_every=args.save_every, seed=args.seed, device=str(ctx.device),
                        precision=resolve_precision(args.precision, ctx.device),
                        checkpointing=self._checkpointing(args, ctx.device))
        notes = self._notes(args, scheme)
        for n in notes:
            log.warning("%s", n)
        log.info("AAQ %s on %d calibration samples: %s", scheme.name, len(calib), _formula(args))

        t_ref = time.time()
        with phase_peak() as ref_mem:
            refs, ref_info = self._references(args, ctx, objective.references)
        ref_s = time.time() - t_ref
        init_search, search_phase = None, {}
        if "auto" in (args.rotation, args.smoothing):
            t_init = time.time()
            with phase_peak() as search_mem:
                cfg, init_search = choose_transforms(lm.model, calib, objective, refs, cfg, **{
                    k: (False, True) if getattr(args, k) == "auto" else (getattr(args, k) == "on",)
                    for k in ("rotation", "smoothing")})
            search_phase = {"transform_search": {"wall_time_s": round(time.time() - t_init, 2),
                                                 **search_mem.as_dict()}}
            log.info("transform search (initial KL to the instruct model, first batch): %s -> rotation %s, "
                     "smoothing %s (%.1f s)", ", ".join(
                         f"rot {'on' if r['rotation'] else 'off'}/smooth {'on' if r['smoothing'] else 'off'} "
                         f"{r['initial_kl']:.4g}" for r in init_search),
                     "on" if cfg.rotation else "off", "on" if cfg.smoothing else "off", time.time() - t_init)
        t_train = time.time()
        with phase_peak() as train_mem:
            res = calibrate_end_to_end(lm.model, calib, objective, refs, cfg, work_dir=ctx.work, resume=args.resume,
                                       progress=not args.no_progress, finalize=args.weights == "rtn")
        train_s = time.time() - t_train
        del refs  # live reference models go now
        phases = {"references": {"wall_time_s": round(ref_s, 2), **ref_mem.as_dict()}, **search_phase,
                  "training": {"wall_time_s": round(train_s, 2), **train_mem.as_dict()}}

        model, method = lm.model, "aaq"
        if args.weights == "gptq":
            t_gptq = time.time()
            with phase_peak() as gptq_mem:
                model = self._gptq_weights(ctx)
            phases["gptq"] = {"wall_time_s": round(time.time() - t_gptq, 2), **gptq_mem.as_dict()}
            method = "aaq+llmcompressor:gptq"  # the llm-compressor exporter and reload check
        report = {"method": method, "qparams": res.qparams, **res.summary(),
                  "objective": objective.describe()}
        recipe = {
            "method": "aaq", "scheme": scheme.name, "group_size": args.group_size,
            "objective": args.objective, "formula": _formula(args), "k": args.topk, "lambda": args.lam,
            "push": args.push, "tau": args.tau if args.push != "unbounded" else None, "tail": not args.no_tail,
            "base": args.base, "references": "live" if args.no_ref_cache else "cache",
            "steps": args.steps, "batch_size": args.batch_size,
            "lr": {"rotation": args.lr_rotation, "smoothing": args.lr_smoothing, "lwc": args.lr_lwc},
            "transforms": {"rotation": cfg.rotation, "online_hadamard": cfg.use_online_hadamard,
                           "smoothing": cfg.smoothing, "smooth_alpha": cfg.smooth_alpha, "lwc": cfg.lwc},
            "weights": ("round to nearest with the learned clipping" if args.weights == "rtn" else
                        "llm-compressor GPTQ on the folded model (learned clipping not used)"),
            "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "chat": ctx.chat,
            "calib_replies": args.calib_replies, "seed": args.seed,
            "dtype": args.dtype, "precision": cfg.precision, "checkpointing": cfg.checkpointing,
        }
        record = {
            "references": ref_info,
            "phases": phases,
            "transform_search": init_search,
            "loss": {"start": res.loss_start, "end": res.loss_end,
                     "terms_start": _terms(res.terms_start), "terms_end": _terms(res.terms_end),
                     "measured_on": "the first training batch, before the first step and after the last",
                     "per_step": [_terms(r, keep=("step", "seconds")) for r in res.records]},
            "notes": notes,
        }
        return Calibrated(model=model, report=report, recipe=recipe, config=cfg.fingerprint(),
                          quant_s=sum(p["wall_time_s"] for p in phases.values()), record=record)

    def make_plan(self, args, shape, device):
        from ..plan import plan_end_to_end
        from ..quant.args import resolve_scheme
        from ..quant.precision import resolve_precision

        scheme = resolve_scheme(args.scheme, group_size=args.group_size)
        bits = scheme.weights.num_bits if scheme.weights is not None else 16
        return plan_end_to_end(shape, dtype=args.dtype, device=str(device), nsamples=args.nsamples,
                               seqlen=args.seqlen + args.calib_replies, batch_size=args.batch_size,
                               steps=args.steps, weight_bits=bits,
                               precision=resolve_precision(args.precision, device),
                               checkpointing=self._checkpointing(args, device), topk=args.topk,
                               n_references=2 if args.base and args.objective != "kl_top" else 1)

    @staticmethod
    def _checkpointing(args, device) -> bool:
        return args.checkpointing == "on" or (args.checkpointing == "auto" and device.type == "cuda")

    @staticmethod
    def _gptq_weights(ctx: RunContext):
        """GPTQ the trained model: unwrap it to plain full-precision linears (transforms already
        folded), save it in the work folder (llm-compressor re-reads the config from disk, and the
        rotation untied the embeddings), and run llm-compressor's GPTQ on the calibration tokens."""
        from ..baselines.llmcompressor import run_llmcompressor
        from ..models import save_model
        from ..quant.qlinear import set_quantizers_enabled, unwrap_decoder_layer
        from ..quant.rotation import decoder_parts

        model, tok, calib = ctx.lm.model, ctx.lm.tokenizer, ctx.calib
        set_quantizers_enabled(model, False)
        for layer in decoder_parts(model)[1]:
            unwrap_decoder_layer(layer, fold=True)  # quantizers off: the folded full-precision weights
        folded = save_model(model, tok, ctx.work / FOLDED)
        ids = calib.token_lists()
        # the folder stays until the export (llm-compressor reads it again when saving); see _remove_work_dir
        return run_llmcompressor(str(folded), tok, "gptq", ctx.scheme, ids, nsamples=len(ids),
                                 seqlen=int(calib.input_ids.shape[1]))

    @classmethod
    def _remove_work_dir(cls, work: Path) -> None:
        shutil.rmtree(work / FOLDED, ignore_errors=True)  # the folded copy --weights gptq wrote
        super()._remove_work_dir(work)

    @staticmethod
    def _notes(args, scheme) -> list[str]:
        from ..data.calib import parse_calib_spec

        notes = []
        if scheme.kv_cache is not None:
            notes.append("KV cache: K is quantized at the k_proj output, before RoPE (an approximation of a runtime "
                         "that quantizes the rotated K), V exactly; the dense export does not store it")
        calib = {name for name, _ in parse_calib_spec(args.calib)}
        if args.eval and "wikitext2" in calib and "wikitext2" in [s.strip() for s in args.eval.split(",")]:
            notes.append("calibration and the wikitext2 evaluation read the same WikiText-2 test text, so the "
                         "perplexity is optimistic (wikitext2:calib, the text half of the default calibration, "
                         "avoids that)")
        return notes

    def _references(self, args, ctx: RunContext, names: tuple[str, ...]):
        """The references the objective reads, and what the run record says about them."""
        import copy
        import gc

        import torch

        from ..models import load_model, resolve_model
        from ..objectives import LiveReferences, ReferenceCache
        from ..objectives.references import calib_digest
        from ..paths import safeptq_home

        lm, calib, device, k = ctx.lm, ctx.calib, ctx.device, args.topk
        ids = {"instruct": reference_model_id(lm.path)}
        if "base" in names:
            ids["base"] = reference_model_id(resolve_model(args.base)[0])

        def base_model():
            return load_model(args.base, dtype=args.dtype, device=str(device)).model

        if args.no_ref_cache:
            models = {"instruct": copy.deepcopy(lm.model).to(device)}
            if "base" in names:
                models["base"] = base_model()
            return LiveReferences(models, k, model_ids=ids), {"mode": "live", "k": k, "models": ids}

        if args.ref_cache:
            path, explicit = Path(args.ref_cache).expanduser(), True
        else:
            key = hashlib.sha256(json.dumps({"models": ids, "calib": calib_digest(calib), "k": k},
                                            sort_keys=True).encode()).hexdigest()[:16]
            path, explicit = safeptq_home() / "references" / f"top{k}-{key}.pt", False
        t0 = time.time()
        cache = None
        if path.is_file():
            try:
                cache = ReferenceCache.load(path, calib, k, ids)
            except Exception as e:  # noqa: BLE001 - ours to rebuild; a user's file is refused
                if explicit:
                    raise
                log.warning("rebuilding the reference cache %s (%s)", path, e)
        reused = cache is not None
        if cache is None:
            lm.model.to(device)
            models = {"instruct": lm.model}
            if "base" in names:
                models["base"] = base_model()
            cache = ReferenceCache.build(models, calib, k, model_ids=ids, batch_size=args.batch_size,
                                         progress=not args.no_progress, path=path)
            del models
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            lm.model.to("cpu")
        log.info("%s reference cache %s (%.1f MiB)", "reused" if reused else "built", path, cache.nbytes / 2**20)
        info = {"mode": "cache", "path": str(path), "reused": reused, "k": k, "models": ids,
                "size_mb": round(cache.nbytes / 2**20, 2),
                ("load_s" if reused else "build_s"): round(time.time() - t0, 2)}
        return cache, info

    @staticmethod
    def _summary(doc: dict, report: dict, results: dict | None) -> None:
        loss, ph, refs = doc["loss"], doc["phases"], doc["references"]

        def terms(t):
            return ", ".join(f"{k} {v:.4g}" for k, v in (t or {}).items())

        print(f"AAQ {doc['recipe']['formula']}")
        print(f"loss start: {terms(loss['terms_start'])}")
        print(f"loss end:   {terms(loss['terms_end'])}")
        where = "live (no cache)" if refs["mode"] == "live" else \
            f"{'reused' if refs['reused'] else 'built'} {refs['path']}"
        print(f"references: {where}; phases: references {ph['references']['wall_time_s']} s, peak RSS "
              f"{ph['references']['peak_rss_mb']} MiB; training {ph['training']['wall_time_s']} s, peak RSS "
              f"{ph['training']['peak_rss_mb']} MiB")
        QuantizeCommand._summary(doc, report, results)


def _terms(rec: dict | None, keep: tuple[str, ...] = ()) -> dict | None:
    """An objective's terms for the record; ``kl_teacher`` of kl_top is named ``kl_instruct`` like the
    contrastive objective's pull term, so the two objectives' records compare directly."""
    if rec is None:
        return None
    out = {k: rec[k] for k in keep if k in rec}
    for k, v in rec.items():
        if k not in keep:
            out["kl_instruct" if k == "kl_teacher" else k] = v
    return out
