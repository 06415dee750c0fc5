"""``safeptq quantize``: quantize a model with one method and scheme, export it, record the run.

Order of work, so that bad input fails in seconds and a half-done run never looks finished:

1. every option, the output folder (:func:`safeptq.export.folder.check_target`), the work
   folder, the model, its architecture and the group size against every layer are checked
   before any calibration starts;
2. the calibration (checkpointed per block in the work folder for ``omniquant``, so
   ``--resume`` continues a killed run);
3. the export (written to a temporary folder renamed into place), a reload check of it, the
   optional evaluation;
4. only then ``quantize.json`` (recipe, wall time, peak memory, per-block report) is written
   into the output folder and the work folder removed.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Command, add_data_options, print_table, write_json_atomic

__all__ = ["QuantizeCommand", "RunContext", "Calibrated", "RUN_FILE", "parse_epochs", "calib_is_text",
           "check_size_and_eval_args"]

log = logging.getLogger(__name__)

RUN_FILE = "quantize.json"
"""Written into the output folder last: its presence marks a complete run."""

_VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. Quantization keeps the answer."
# weights-only logits of the reloaded export vs the in-process model: float32 models must agree to
# 1e-3; bf16/fp16 models round the dequantized weights (int codes x a bf16 scale on reload) and every
# activation to 8 mantissa bits, which moves random 2-layer models' logits by ~1e-2
_VERIFY_MAX_REL_ERR = {"float32": 1e-3, "low": 5e-2}


def parse_epochs(value: str) -> int | tuple[int, int]:
    """``"2"`` → 2; ``"5,15"`` → (5, 15) (first half of the blocks, second half)."""
    from ..errors import ConfigError

    parts = [p.strip() for p in str(value).split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--epochs must be N or A,B (first half, second half of the blocks), got {value!r}") from None
    if len(nums) not in (1, 2) or any(n < 0 for n in nums):
        raise ConfigError(f"--epochs must be N or A,B with non-negative integers, got {value!r}")
    return nums[0] if len(nums) == 1 else (nums[0], nums[1])


_CALIBRATED = ("omniquant", "realign")  # built-in methods that train per block (work folder, resume)


def text_sets(spec: str) -> tuple[list[str], set[str]]:
    """The set names of a ``--calib`` spec, and those of them that are plain text (``wikitext2``)."""
    from ..data.calib import parse_calib_spec
    from ..data.registry import REGISTRY

    names = [name for name, _ in parse_calib_spec(spec)]
    return names, {n for n in names if n in REGISTRY and REGISTRY[n].kind == "text"}


def calib_is_text(spec: str) -> bool:
    """Whether every set of a ``--calib`` spec is plain text (``wikitext2``): no chat turns, so no
    chat template needed. A spec that does not parse answers ``False`` (loading reports it)."""
    from ..errors import SafePTQError

    try:
        names, text = text_sets(spec)
    except SafePTQError:
        return False
    return len(text) == len(set(names))


def check_size_and_eval_args(args) -> None:
    """The calibration size and evaluation options every quantizing command shares."""
    from ..errors import ConfigError

    for flag, v, low in (("--nsamples", args.nsamples, 1), ("--seqlen", args.seqlen, 2),
                         ("--batch-size", args.batch_size, 1)):
        if v < low:
            raise ConfigError(f"{flag} must be at least {low}, got {v}")
    if args.eval_limit is not None and args.eval_limit <= 0:
        raise ConfigError(f"--eval-limit must be positive, got {args.eval_limit}")
    if args.ppl_windows is not None and args.ppl_windows <= 0:
        raise ConfigError(f"--ppl-windows must be positive, got {args.ppl_windows}")
    if args.calib_replies < 0:
        raise ConfigError(f"--calib-replies must be non-negative, got {args.calib_replies}")
    if args.calib_replies and args.calib and calib_is_text(args.calib):
        raise ConfigError(f"--calib-replies needs chat prompts in --calib; plain text ({args.calib}) has none")


@dataclass
class RunContext:
    """What :meth:`QuantizeCommand.setup` checked and loaded before any calibration."""

    t0: float
    out: Path
    work: Path
    uses_work: bool
    device: Any
    lm: Any  # safeptq.models.LoadedModel
    scheme: Any  # safeptq.quant.args.Scheme
    calib: Any  # safeptq.data.calib.CalibSet | None
    chat: bool
    suites: Any


@dataclass
class Calibrated:
    """What :meth:`QuantizeCommand.calibrate` hands to :meth:`QuantizeCommand.finish`: the quantized
    model, the method's report (``qparams`` for the exporter), the recipe, the engine config
    fingerprint and extra run-record entries."""

    model: Any
    report: dict
    recipe: dict
    config: dict | None
    quant_s: float
    record: dict = field(default_factory=dict)


class QuantizeCommand(Command):
    """Also the base of ``safeptq realign`` and ``safeptq aaq``: subclasses fix the method and add
    their objective through :meth:`add_method_arguments`, :meth:`make_objective` and
    :meth:`extra_record`; one with another engine replaces :meth:`add_training_arguments` and
    :meth:`calibrate`. :meth:`run` is :meth:`setup` → :meth:`calibrate` → :meth:`finish`."""

    name = "quantize"
    fixed_method: str | None = None
    run_file = RUN_FILE
    # what the calibration engine may leave in the work folder (anything else there: refuse it)
    work_files: tuple[str, ...] = ("state.pt", "state.pt.tmp")
    work_dirs: tuple[str, ...] = ("blocks", "streams")
    device_help = ("calibration device: cpu, cuda, cuda:N or auto (default); the model stays on the CPU in "
                   "--dtype, one block at a time goes to the device")
    calib_default = "alpaca:calib"
    calib_replies_default = 0
    nsamples_default = 128
    epochs_default: str | None = "2"
    batch_size_default: int | None = 4
    # block-wise training knobs left unset on the command line (OmniQuant's learning rates)
    train_defaults = {"lr_lwc": 1e-2, "lr_let": 1e-3, "train_norms": False, "lr_norm": 1e-3}
    help = "quantize a model (RTN, OmniQuant-style LWC+LET, or llm-compressor GPTQ/AWQ) and export it"
    description = ("Quantize the decoder linears of a Llama-shaped causal LM to a scheme and export the result: "
                   "compressed-tensors (pack-quantized / int-quantized, servable by vLLM) where the scheme has a "
                   "serving format, else a dense fake-quant checkpoint. Methods: rtn (round to nearest, no data); "
                   "omniquant (block-wise learnable weight clipping + learnable equivalent transformation "
                   "trained to reconstruct each block's full-precision output; checkpointed per block, --resume "
                   "continues a killed run); gptq, awq, smoothquant+gptq (llm-compressor baselines on the same "
                   "calibration tokens). The output folder gets quantize.json (recipe, wall time, peak memory, "
                   "per-block losses) only when everything succeeded.")
    epilog = """examples:
  safeptq quantize --model default --method rtn --scheme w8a8 --out runs/q/rtn-w8a8
  safeptq quantize --model default --method omniquant --scheme w4a16 --calib alpaca:calib --out runs/q/omni-w4a16
  safeptq quantize --model default --method omniquant --scheme w4a8 --epochs 5,15 --batch-size 1 --resume --out runs/q/o
  safeptq quantize --model default --method gptq --scheme w4a16 --group-size 32 --eval wikitext2 --out runs/q/gptq
  safeptq ls   # lists the calibration sets and scheme presets"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.add_model_arguments(p)
        self.add_calib_arguments(p)
        self.add_method_arguments(p)
        self.add_training_arguments(p)
        self.add_eval_arguments(p)
        self.add_output_arguments(p)

    def add_model_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("model and method" if self.fixed_method is None else "model and scheme")
        g.add_argument("--model", required=True, metavar="MODEL",
                       help="local HF folder, .gguf file, hub id (online), or 'default' (SmolLM2-135M-Instruct)")
        if self.fixed_method is None:
            g.add_argument("--method", required=True,
                           help="rtn | omniquant | gptq | awq | smoothquant+gptq")
        g.add_argument("--scheme", required=True,
                       help="w8a8 | w8a16 | w4a16 | w4a16-asym | w4a8 | w4a4 | w4a4kv4 (see `safeptq ls`)")
        g.add_argument("--group-size", type=int, default=None,
                       help="weight group size of grouped schemes (w4a16 default 64); must divide every layer")
        g.add_argument("--device", default="auto", help=self.device_help)
        g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="dtype the model is loaded and kept in (auto = bfloat16 when calibrating on CUDA, "
                            "float32 on a CPU); the block being trained and the learnable parameters are float32")
        g.add_argument("--precision", default="auto", choices=("auto", "fp32", "tf32", "bf16"),
                       help="matrix products of the training steps: fp32, tf32 (CUDA) or bf16 autocast "
                            "(auto = bf16 on CUDA, fp32 on a CPU); learnable parameters stay float32")
        g.add_argument("--max-memory", default=None, metavar="SIZE",
                       help="override the memory check made before loading: host=SIZE,device=SIZE (e.g. "
                            "host=64GiB,device=70GiB), SIZE for the host only, or none; default: what the machine "
                            "has (the plan is printed either way)")

    def add_calib_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("calibration data" + (" (not used by rtn)" if self.fixed_method is None else ""))
        g.add_argument("--calib", default=self.calib_default,
                       help=f"prompt set(s) with shares (default {self.calib_default}), e.g. alpaca:calib, "
                            "advbench:calib=0.75,alpaca:calib=0.25, wikitext2, "
                            "or a file [harmful:|benign:]PATH[@COLUMN]")
        g.add_argument("--nsamples", type=int, default=self.nsamples_default,
                       help=f"calibration samples ({self.nsamples_default})")
        g.add_argument("--seqlen", type=int, default=128,
                       help="tokens per sample (128): prompts keep their last SEQLEN tokens, text is cut in windows")
        g.add_argument("--no-chat", action="store_true",
                       help="tokenize prompts as raw text instead of chat turns (base models without a template)")
        g.add_argument("--calib-replies", type=int, default=self.calib_replies_default, metavar="TOKENS",
                       help="append the full-precision model's own greedy reply (up to TOKENS tokens) to every "
                            "prompt of the calibration set (on top of --seqlen), so the answer tokens are "
                            "calibrated too "
                            f"(self-distillation data; 0 = prompts only; default {self.calib_replies_default})")
        add_data_options(g)

    def add_training_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("block-wise training (omniquant, realign)")
        g.add_argument("--epochs", default=self.epochs_default,
                       help="epochs per block: N, or A,B for the first and second half of the blocks "
                            f"({self.epochs_default or 'from --schedule'})")
        g.add_argument("--batch-size", type=int, default=self.batch_size_default,
                       help=f"samples per step ({self.batch_size_default or 'from --schedule'})")
        g.add_argument("--lr-lwc", type=float, default=None,
                       help=f"learning rate of the clipping factors ({self._default_text('lr_lwc')})")
        g.add_argument("--lr-let", type=float, default=None,
                       help=f"learning rate of the smoothing scales ({self._default_text('lr_let')})")
        g.add_argument("--no-lwc", action="store_true", help="no learnable weight clipping (min/max ranges)")
        g.add_argument("--no-let", action="store_true", help="no learnable equivalent transformation (smoothing)")
        g.add_argument("--train-norms", action=argparse.BooleanOptionalAction, default=None,
                       help="also learn each block's two RMSNorm gains (not an equivalent transform: an extra "
                            f"lever for objectives that must change behaviour, e.g. realign; {self._default_text('train_norms')})")
        g.add_argument("--lr-norm", type=float, default=None,
                       help=f"learning rate of the norm gains ({self._default_text('lr_norm')})")
        g.add_argument("--stream-budget", type=float, default=None, metavar="MIB",
                       help="RAM for the two calibration streams (float32, 2 x N x T x hidden); above it they go to "
                            "memory-mapped files in the work folder (default: always in RAM)")
        g.add_argument("--let-alpha", type=float, default=0.5,
                       help="SmoothQuant migration strength that initialises the smoothing scales (0.5)")
        self.add_resume_arguments(g, "per-block checkpoint")

    @staticmethod
    def add_resume_arguments(g, what: str) -> None:
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--resume", action="store_true",
                       help=f"continue from the {what} in the work folder (same recipe and data only)")
        g.add_argument("--work-dir", default=None,
                       help="checkpoint folder (default OUT.work); removed after a successful run")

    def add_eval_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("evaluation (optional)")
        g.add_argument("--eval", default=None, metavar="SUITES",
                       help="evaluate the quantized model on these suites after export, e.g. wikitext2 or "
                            f"advbench:eval,wikitext2 (results go into {self.run_file})")
        g.add_argument("--eval-limit", type=int, default=None,
                       help="first N prompts of each suite / N perplexity windows")
        g.add_argument("--ppl-windows", type=int, default=None,
                       help="cap on perplexity windows only (overrides --eval-limit for text suites), e.g. 40")

    def add_output_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("output")
        g.add_argument("--out", required=True, help="output folder (a new folder or an earlier safeptq export)")
        g.add_argument("--no-progress", action="store_true")

    def _default_text(self, key: str) -> str:
        if self.epochs_default is None:  # a subclass whose --schedule sets the training knobs
            return "default from --schedule"
        v = self.train_defaults[key]
        return ("default on" if v else "default off") if isinstance(v, bool) else f"{v:g}"

    # -- hooks for subclasses -------------------------------------------------------------------
    def add_method_arguments(self, p: argparse.ArgumentParser) -> None:
        """Extra option groups of a subclass's method."""

    def resolve_defaults(self, args: argparse.Namespace) -> None:
        """Fill options whose defaults depend on others (e.g. a schedule); a subclass sets its own
        values first and calls this last, which fills what is still unset from ``train_defaults``."""
        for key, value in self.train_defaults.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        if self.fixed_method is not None:
            args.method = self.fixed_method
        elif args.method == "realign":
            from ..errors import ConfigError

            raise ConfigError("method 'realign' needs probes: run `safeptq realign` instead of `safeptq quantize`")

    def make_objective(self, args, lm, calib, device):
        """The block objective of the method (``None``: the method's own default)."""
        return None

    def extra_record(self, args, lm, stage: str, device) -> dict:
        """Called with ``stage='before'`` on the full-precision model and ``'after'`` on the
        quantized one; the returned entries go into the run record."""
        return {}

    def uses_work_dir(self, args) -> bool:
        """Whether the method checkpoints into the work folder (and so honours ``--resume``)."""
        return args.method in _CALIBRATED

    def needs_calibration(self, args) -> bool:
        return args.method != "rtn"

    def check_models(self, args, lm, device) -> None:
        """Further checks once the model is loaded, before the calibration data is (e.g. a second
        model's vocabulary); raise a :class:`~safeptq.errors.SafePTQError` to refuse."""

    # -- checks ---------------------------------------------------------------------------------
    @staticmethod
    def _check_args(args) -> None:
        from ..errors import ConfigError, UnknownNameError
        from ..quant.methods import METHODS

        if args.method not in METHODS:
            raise UnknownNameError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
        check_size_and_eval_args(args)
        for flag, v in (("--lr-lwc", args.lr_lwc), ("--lr-let", args.lr_let), ("--lr-norm", args.lr_norm)):
            if not v > 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        if not 0 <= args.let_alpha <= 1:
            raise ConfigError(f"--let-alpha must be in [0, 1], got {args.let_alpha}")
        parse_epochs(args.epochs)
        if args.stream_budget is not None and args.stream_budget < 0:
            raise ConfigError(f"--stream-budget must be non-negative, got {args.stream_budget}")

    @classmethod
    def _check_work_dir(cls, work: Path, out: Path) -> None:
        from ..errors import ConfigError

        if work.resolve() == out.resolve():
            raise ConfigError("--work-dir must differ from --out")
        if work.is_file():
            raise ConfigError(f"work folder {work} is a file")
        if work.is_dir():
            known = set(cls.work_files) | set(cls.work_dirs)
            foreign = sorted(p.name for p in work.iterdir() if p.name not in known)
            if foreign:
                raise ConfigError(f"refusing to use {work} as work folder: it holds other files "
                                  f"({', '.join(foreign[:3])}); choose another --work-dir")

    @classmethod
    def _remove_work_dir(cls, work: Path) -> None:
        """Delete only what the engine wrote (checkpoints, state), then the empty folders."""
        for name in cls.work_dirs:
            sub = work / name
            if sub.is_dir():
                for pattern in ("*.pt*", "*.f32"):
                    for f in sub.glob(pattern):
                        f.unlink(missing_ok=True)
        for name in cls.work_files:
            (work / name).unlink(missing_ok=True)
        for d in [work / name for name in cls.work_dirs] + [work]:
            try:
                d.rmdir()
            except OSError:
                pass

    # -- run --------------------------------------------------------------------------------------
    # peak memory per phase in the run record (``memory_phases``); a command whose calibrate() measures its
    # own sub-phases (aaq) turns the calibration one off: phase measurements do not nest
    measure_calibration_phase = True

    def run(self, args: argparse.Namespace) -> int:
        from ..memory import phase_peak

        self._phases = {}
        with phase_peak() as mem:
            ctx = self.setup(args)
        self._phases["setup"] = mem.as_dict()
        if self.measure_calibration_phase:
            with phase_peak() as mem:
                cal = self.calibrate(args, ctx)
            self._phases["calibration"] = mem.as_dict()
        else:
            cal = self.calibrate(args, ctx)
        return self.finish(args, ctx, cal)

    def setup(self, args: argparse.Namespace) -> RunContext:
        """Check every option, the output and work folders, load the model, resolve the scheme
        against it and load the calibration set: everything that can fail before calibrating."""
        import torch

        from ..errors import ModelError
        from ..export.folder import SIDE_FILE, check_target
        from ..models import load_model, pick_device, pick_dtype
        from ..quant.args import check_group_size, resolve_scheme
        from ..quant.methods import LLMCOMPRESSOR

        t0 = time.time()
        self.resolve_defaults(args)
        self._check_args(args)
        if args.no_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        resolve_scheme(args.scheme, group_size=args.group_size)  # fail on a bad name before loading anything
        suites = None
        if args.eval:
            from ..eval import parse_suites

            suites = parse_suites(args.eval)
        out = Path(args.out).expanduser()
        check_target(out)  # before the long calibration, not only at export time
        work = Path(args.work_dir).expanduser() if args.work_dir else out.with_name(out.name + ".work")
        uses_work = self.uses_work_dir(args)
        if uses_work:
            self._check_work_dir(work, out)
        elif args.resume or args.work_dir:
            log.warning("--resume/--work-dir apply to %s only; %s runs in one go", " and ".join(_CALIBRATED),
                        args.method)
        device = pick_device(args.device)
        lc = None
        if args.method in LLMCOMPRESSOR:
            from ..baselines import llmcompressor as lc

            lc.require_llmcompressor()

        torch.manual_seed(args.seed)
        args.dtype = str(pick_dtype(args.dtype, device)).removeprefix("torch.")
        self._plan = self._memory_plan(args, device)
        lm = load_model(args.model, dtype=args.dtype, device="cpu")
        if (Path(lm.path) / SIDE_FILE).exists():
            raise ModelError(f"{args.model} is already a safeptq quantized export; quantize the original model")
        model, tok = lm.model, lm.tokenizer
        head_dim = getattr(model.config, "head_dim", None) or (
            model.config.hidden_size // model.config.num_attention_heads)
        scheme = resolve_scheme(args.scheme, group_size=args.group_size, head_dim=head_dim)
        if lc is None:
            from ..quant.engine import check_architecture

            check_architecture(model)
        else:
            lc.build_recipe(args.method, scheme)  # refuses e.g. AWQ with activation quantization
        if scheme.weights is not None:
            from ..export import quantized_linears

            for name, lin in quantized_linears(model).items():
                check_group_size(name, lin.in_features, scheme.weights.group_size)
        self.check_models(args, lm, device)

        calib = None
        chat = not args.no_chat
        if self.needs_calibration(args):
            from ..data.calib import load_calibration

            chat = chat and not calib_is_text(args.calib)
            if chat and not getattr(tok, "chat_template", None):
                raise ModelError(f"model {args.model} has no chat template; pass --no-chat to calibrate on raw prompts")
            calib = load_calibration(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, chat=chat,
                                     data_dir=args.data_dir, seed=args.seed)
            if args.calib_replies:
                calib = self._add_replies(args, lm, calib)
        return RunContext(t0=t0, out=out, work=work, uses_work=uses_work, device=device, lm=lm, scheme=scheme,
                          calib=calib, chat=chat, suites=suites)

    def _memory_plan(self, args, device):
        """Print the run's memory and time plan from the model's config and refuse one that cannot fit
        (before any weight is loaded); ``None`` where the config cannot be read without loading."""
        from transformers import AutoConfig

        from ..models import resolve_model
        from ..plan import machine_memory_mb, model_shape, parse_max_memory

        path, gguf = resolve_model(args.model)
        try:
            cfg = AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
            shape = model_shape(cfg)
        except Exception as e:  # noqa: BLE001 - an unknown config: the load below reports it properly
            log.warning("no memory plan for %s (%s)", args.model, str(e).splitlines()[0] if str(e) else e)
            return None
        plan = self.make_plan(args, shape, device)
        log.info("%s", plan.describe())
        limits = parse_max_memory(args.max_memory)
        plan.check(limits if limits is not None else machine_memory_mb(str(device)))
        return plan

    def make_plan(self, args, shape, device):
        """The memory plan of this command's method (see :mod:`safeptq.plan`)."""
        from ..plan import plan_blockwise
        from ..quant.args import resolve_scheme

        scheme = resolve_scheme(args.scheme, group_size=args.group_size)
        bits = scheme.weights.num_bits if scheme.weights is not None else 16
        calibrated = args.method in _CALIBRATED
        return plan_blockwise(shape, dtype=args.dtype, device=str(device), nsamples=args.nsamples if calibrated else 0,
                              seqlen=args.seqlen, batch_size=args.batch_size or 1,
                              epochs=parse_epochs(args.epochs) if calibrated else 0, weight_bits=bits,
                              probe_model=self.plan_probe_model(args), separability=self.plan_separability(args),
                              stream_budget_mb=args.stream_budget)

    def plan_probe_model(self, args) -> bool:
        return False

    def plan_separability(self, args) -> bool:
        return False

    @staticmethod
    def _add_replies(args, lm, calib):
        """``--calib-replies``: the full-precision model answers every calibration prompt (greedy)."""
        from ..data.calib import add_responses

        text = text_sets(args.calib)[1]
        t = time.time()
        out = add_responses(calib, lm.model, lm.tokenizer, args.calib_replies, text_sources=text,
                            progress=not args.no_progress)
        log.info("calibration replies: %d tokens added to %d prompts (%.1f s)", out.n_tokens - calib.n_tokens,
                 sum(s not in text for s in calib.sources), time.time() - t)
        return out

    def calibrate(self, args: argparse.Namespace, ctx: RunContext) -> Calibrated:
        """Run the method on the model (in place where possible)."""
        from ..quant.methods import run_method

        lm, calib, scheme, device = ctx.lm, ctx.calib, ctx.scheme, ctx.device
        epochs = parse_epochs(args.epochs)
        objective = self.make_objective(args, lm, calib, device)
        record = self.extra_record(args, lm, "before", device)
        cfg = None
        if args.method in _CALIBRATED:
            from ..quant.engine import BlockwiseConfig
            from ..quant.precision import resolve_precision

            cfg = BlockwiseConfig(scheme=scheme, lwc=not args.no_lwc, let=not args.no_let, let_alpha=args.let_alpha,
                                  epochs=epochs, batch_size=args.batch_size, lr_lwc=args.lr_lwc,
                                  lr_let=args.lr_let, train_norms=args.train_norms, lr_norm=args.lr_norm,
                                  device=str(device), seed=args.seed,
                                  precision=resolve_precision(args.precision, device),
                                  stream_budget_mb=args.stream_budget)
        recipe = {"method": args.method, "scheme": scheme.name, "group_size": args.group_size,
                  "calib": args.calib if calib is not None else None,
                  "nsamples": args.nsamples if calib is not None else None,
                  "seqlen": args.seqlen if calib is not None else None,
                  "chat": ctx.chat if calib is not None else None,
                  "calib_replies": args.calib_replies if calib is not None else None, "seed": args.seed,
                  "dtype": args.dtype}
        if cfg is not None:
            recipe.update({"epochs": list(epochs) if isinstance(epochs, tuple) else epochs,
                           "batch_size": args.batch_size, "lr_lwc": args.lr_lwc, "lr_let": args.lr_let,
                           "lwc": cfg.lwc, "let": cfg.let, "let_alpha": args.let_alpha,
                           "train_norms": cfg.train_norms, "lr_norm": args.lr_norm if cfg.train_norms else None,
                           "precision": cfg.precision})
        log.info("quantizing %s with %s to %s%s", args.model, args.method, scheme.name,
                 f" on {len(calib)} calibration samples" if calib is not None else "")

        tq = time.time()
        model, report = run_method(args.method, lm.model, lm.tokenizer, scheme, calib, cfg=cfg, objective=objective,
                                   work_dir=ctx.work if ctx.uses_work else None, resume=args.resume,
                                   progress=not args.no_progress)
        return Calibrated(model=model, report=report, recipe=recipe,
                          config=cfg.fingerprint() if cfg is not None else None, quant_s=time.time() - tq,
                          record=record)

    def finish(self, args: argparse.Namespace, ctx: RunContext, cal: Calibrated) -> int:
        """Export, reload check, optional evaluation, then the run record (written last)."""
        import json

        import torch

        from .. import __version__
        from ..errors import ExportError
        from ..export.folder import SIDE_FILE
        from ..quant.engine import peak_memory_mb
        from ..quant.methods import by_llmcompressor, save_quantized

        out, lm, calib, scheme, device = ctx.out, ctx.lm, ctx.calib, ctx.scheme, ctx.device
        model, tok, report, recipe, record = cal.model, lm.tokenizer, cal.report, cal.recipe, cal.record
        metadata = {"model": args.model, "model_path": lm.path, "recipe": recipe,
                    "calib_set": calib.describe() if calib is not None else None,
                    "nsamples": len(calib) if calib is not None else 0,
                    "seqlen": int(calib.input_ids.shape[1]) if calib is not None else 0,
                    "config": cal.config}
        from ..memory import phase_peak

        with phase_peak() as mem:
            save_quantized(model, tok, scheme, out, report, metadata)
            verify = self._verify(out, model, tok, not by_llmcompressor(report), scheme)
        phases = getattr(self, "_phases", {})
        phases["export"] = mem.as_dict()
        tol = _VERIFY_MAX_REL_ERR["float32" if next(model.parameters()).dtype == torch.float32 else "low"]
        verify["tolerance"] = tol
        if verify["weights_only_max_rel_err"] > tol:
            raise ExportError(f"the export in {out} does not reload to the quantized model (weights-only logits "
                              f"max rel err {verify['weights_only_max_rel_err']:.3g} > {tol}); "
                              f"it is incomplete (no {self.run_file})")
        for k, v in self.extra_record(args, lm, "after", device).items():
            record[k] = {**record.get(k, {}), **v} if isinstance(v, dict) and isinstance(record.get(k), dict) else v
        from ..eval.samples import SAMPLES_FILE, pop_samples, write_samples

        results = None
        (out / SAMPLES_FILE).unlink(missing_ok=True)  # never an earlier run's verdicts beside this run's results
        if ctx.suites:
            results = self._evaluate(model, tok, ctx.suites, args, device)
            samples = pop_samples(results)
            if samples:  # per-prompt verdicts, for `safeptq compare`
                write_samples(out / SAMPLES_FILE, samples)

        rss, acc = peak_memory_mb()
        info = json.loads((out / SIDE_FILE).read_text())
        doc = {
            "safeptq_version": __version__,
            "model": args.model,
            "model_path": lm.path,
            "recipe": recipe,
            "scheme": scheme.model_dump(mode="json"),
            "config": cal.config,
            "calib_set": metadata["calib_set"],
            "wall_time_s": round(time.time() - ctx.t0, 1),
            "quantize_time_s": round(cal.quant_s, 1),
            "peak_rss_mb": round(rss, 1),
            "peak_accel_mb": None if acc is None else round(acc, 1),
            "memory_plan": self._plan.as_dict() if getattr(self, "_plan", None) is not None else None,
            "memory_phases": phases,
            "calibration": {k: v for k, v in report.items() if k != "qparams"},
            "export": {"path": str(out), "format": info.get("format"), "fake_quant": info.get("fake_quant"),
                       "bits_per_weight": verify.get("bits_per_weight")},
            "verify": verify,
            "eval": results,
            **record,
        }
        write_json_atomic(out / self.run_file, doc)
        if ctx.uses_work:
            self._remove_work_dir(ctx.work)
        self._summary(doc, report, results)
        return 0

    @staticmethod
    def _verify(out: Path, model, tok, builtin: bool, scheme) -> dict:
        """Reload the export and compare its logits with the in-process model (activation hooks off
        on our side: ``reload_check`` applies the reference activation quantization itself)."""
        from ..export import reload_check
        from ..quant.deploy import attach_act_quant, detach_act_quant
        from ..quant.rotation import decoder_parts

        ids = tok(_VERIFY_TEXT, return_tensors="pt")["input_ids"][:, :32]
        layers = decoder_parts(model)[1] if builtin else []
        for layer in layers:
            detach_act_quant(layer)
        try:
            res = reload_check(out, model, ids)
        finally:
            for layer in layers:
                attach_act_quant(layer, scheme)
        res.pop("bits_per_weight_by_layer", None)
        return res

    @staticmethod
    def _evaluate(model, tok, suites, args, device) -> dict:
        from ..eval import EvalConfig, evaluate

        model.to(device)
        cfg = EvalConfig(limit=args.eval_limit, data_dir=args.data_dir, progress=not args.no_progress,
                         ppl_windows=getattr(args, "ppl_windows", None),
                         use_chat_template=bool(getattr(tok, "chat_template", None)))
        res = evaluate(model, tok, suites, cfg)
        model.to("cpu")
        return res

    @staticmethod
    def _summary(doc: dict, report: dict, results: dict | None) -> None:
        blocks = report.get("blocks") or []
        if blocks:
            def f(x):
                return "-" if x is None else f"{x:.4g}"

            print_table([[b["block"], b["epochs"], f(b["loss_first"]), f(b["loss_last"]), b["seconds"]]
                         for b in blocks], ["block", "epochs", "loss first", "loss last", "s"])
            if report.get("resumed_from_block"):
                print(f"(resumed at block {report['resumed_from_block']})")
        if results:
            from .eval_cmd import format_metric

            print_table([[name, *format_metric(res)] for name, res in results.items()],
                        ["suite", "metric", "value", "95% CI", "n"])
        ex, v = doc["export"], doc["verify"]
        bpw = ex["bits_per_weight"]
        print(f"{doc['recipe']['method']} {doc['scheme']['name']}: {ex['format']}"
              f"{' (dense fake-quant, not a serving format)' if ex['fake_quant'] else ''}, "
              f"{'' if bpw is None else f'{bpw:.2f} bits/weight, '}reload max rel err {v['max_rel_err']:.2g}, "
              f"{doc['wall_time_s']} s, peak RSS {doc['peak_rss_mb']:.0f} MiB")
        print(f"quantized model written to {ex['path']}")
