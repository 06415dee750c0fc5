"""The one quantization pipeline under every method, API call and command.

Order of work, so that bad input fails in seconds and a half-done run never looks finished:

1. the recipe is already valid (pydantic); run options, the output folder (ownership, lock) and
   the work folder are checked, then the memory plan from the model's config (before any weight
   is loaded), then the model, its architecture, the group size against every layer and the
   method's own model checks;
2. the calibration data, then the method's calibration (checkpointed in the work folder where the
   method supports ``resume``);
3. :meth:`QuantizedModel.save <safeptq.result.QuantizedModel.save>`: export, reload check,
   evaluation, model card, recipe and run record into a staged folder, committed by one rename.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from .base import Method, RunOptions, Session

__all__ = ["run", "resolve_model_arg"]

log = logging.getLogger(__name__)


def resolve_model_arg(model: Any, tokenizer: Any = None) -> tuple[str | None, Any]:
    """``(spec, loaded)``: a path / hub id / ``"default"`` gives ``(spec, None)``; an in-memory HF
    model (with ``tokenizer``), a ``(model, tokenizer)`` pair or a ``LoadedModel`` gives
    ``(None, LoadedModel)``."""
    from ..models import LoadedModel

    if isinstance(model, (str, Path)):
        return str(model), None
    if isinstance(model, LoadedModel):
        return None, model
    if isinstance(model, tuple) and len(model) == 2:
        model, tokenizer = model
    if hasattr(model, "config") and hasattr(model, "forward"):
        if tokenizer is None:
            raise ModelError("an in-memory model needs its tokenizer: pass tokenizer=... or (model, tokenizer)")
        from ..models import ensure_pad_token

        ensure_pad_token(tokenizer)
        return None, LoadedModel(model=model, tokenizer=tokenizer,
                                 path=getattr(model.config, "_name_or_path", "") or "<in-memory>")
    raise ModelError(f"cannot use {type(model).__name__} as a model: give a path, a hub id, 'default', "
                     "or an in-memory transformers model with its tokenizer")


def _read_config(spec: str | None, loaded):
    """The model's config without loading weights (``None`` where it cannot be read that way)."""
    from transformers import AutoConfig

    from ..models import resolve_model

    if loaded is not None:
        return loaded.model.config
    try:
        path, gguf = resolve_model(spec)
        return AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - an unknown config: the load reports it properly
        log.warning("cannot read the config of %s before loading (%s)", spec, str(e).splitlines()[0] if str(e) else e)
        return None


def _check_family(method: Method, recipe, cfg) -> None:
    """The family is supported and the scheme and method's transforms are legal on it (before loading)."""
    from ..archs import spec_for_config

    family = spec_for_config(cfg)
    if family.fused and recipe.resolved_scheme().kv_cache is not None:
        raise ConfigError(f"KV-cache schemes quantize k_proj and v_proj outputs; {family.family} fuses them into "
                          "qkv_proj; choose a scheme without a KV cache")
    method.check_family(recipe, family)


def _memory_plan(method: Method, recipe, options: RunOptions, cfg, loaded, device, dtype: str):
    """Print the plan and refuse one that cannot fit, before any weight is loaded."""
    from ..plan import machine_memory_mb, model_shape, parse_max_memory

    if cfg is None:
        return None
    try:
        shape = model_shape(cfg)
    except Exception as e:  # noqa: BLE001 - a config the meta-device build cannot take: no plan
        log.warning("no memory plan (%s)", str(e).splitlines()[0] if str(e) else e)
        return None
    plan = method.plan(recipe, options, shape, device, dtype)
    if plan is None:
        return None
    log.info("%s", plan.describe())
    limits = parse_max_memory(options.max_memory)
    if loaded is None:  # an in-memory model is already there
        plan.check(limits if limits is not None else machine_memory_mb(str(device)))
    return plan


def _setup(method: Method, recipe, options: RunOptions, spec: str | None, loaded, run_id: str, t0: float,
           out: Path | None) -> Session:
    import torch

    from ..export.folder import SIDE_FILE
    from ..identity import model_identity, tensors_identity
    from ..models import load_model, pick_device, pick_dtype
    from ..quant.args import check_group_size
    from ..runs import WorkFolder

    options.check()
    _check_data(recipe)
    if not options.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    method.check(recipe, options)
    work = None
    if method.uses_work(recipe):
        wd = options.work_dir or (out.with_name(out.name + ".work") if out is not None else None)
        if wd is None and method.requires_work(recipe):
            import tempfile

            wd = tempfile.mkdtemp(prefix="safeptq-work-")
        if wd is not None:
            work = WorkFolder(wd, out, method.work_files, method.work_dirs, method.work_trees)
    elif options.resume or options.work_dir:
        log.warning("resume/work_dir apply to methods that checkpoint; %s runs in one go", recipe.method)
    device = pick_device(options.device)
    dtype = str(pick_dtype(recipe.dtype, device)).removeprefix("torch.")
    torch.manual_seed(recipe.seed)
    cfg = _read_config(spec, loaded)
    if cfg is not None:
        _check_family(method, recipe, cfg)
    plan = _memory_plan(method, recipe, options, cfg, loaded, device, dtype)
    if loaded is None:
        lm = load_model(spec, dtype=dtype, device="cpu")
        label = spec
        model_id = model_identity(lm.path)
    else:
        lm, label = loaded, getattr(loaded, "path", None) or "<in-memory>"
        dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        model_id = tensors_identity(lm.model)
    from ..data.chat import set_chat_options

    set_chat_options(lm.tokenizer, recipe.system_prompt, recipe.chat_template_kwargs)  # eval, calibration, probes
    if (Path(str(lm.path)) / SIDE_FILE).exists():
        raise ModelError(f"{label} is already a safeptq quantized export; quantize the original model")
    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads)
    scheme = recipe.resolved_scheme(head_dim=head_dim)
    if method.exporter == "builtin":
        from ..quant.engine import check_architecture

        check_architecture(lm.model)
    if scheme.weights is not None:
        from ..export import quantized_linears

        for name, lin in quantized_linears(lm.model).items():
            check_group_size(name, lin.in_features, scheme.weights.group_size)
    s = Session(recipe=recipe, options=options, run_id=run_id, t0=t0, device=device, dtype=dtype, lm=lm,
                model_label=label, model_id=model_id, scheme=scheme, work=work, plan=plan)
    method.check_models(s)
    if recipe.uses_calibration:
        _load_calibration(s)
    if work is not None:
        work.create(run_id, {"model": model_id, "method": recipe.method})
    return s


def _check_data(recipe) -> None:
    """Every prompt set the run will read (calibration, evaluation) exists: checked before the model loads."""
    from ..data.calib import parse_calib_spec
    from ..data.registry import check_prompt_set
    from ..eval.lmeval import check_lm_eval_data, is_lm_eval_suite

    names = [n for n, _ in parse_calib_spec(recipe.calib.data)] if recipe.uses_calibration else []
    for name in names + list(recipe.eval.suites):
        if is_lm_eval_suite(name):
            check_lm_eval_data(name, recipe.data_dir)
        else:
            check_prompt_set(name, recipe.data_dir)


def _load_calibration(s: Session) -> None:
    from ..data.calib import add_responses, load_calibration

    r, tok = s.recipe, s.lm.tokenizer
    s.chat = r.calib.chat and not r.calib.is_text()
    if s.chat and not getattr(tok, "chat_template", None):
        raise ModelError(f"model {s.model_label} has no chat template; set calib.chat false (--no-chat) to calibrate "
                         "on raw prompts")
    calib = load_calibration(r.calib.data, tok, nsamples=r.calib.nsamples, seqlen=r.calib.seqlen, chat=s.chat,
                             data_dir=r.data_dir, seed=r.seed)
    if r.calib.replies:
        t = time.time()
        full = add_responses(calib, s.lm.model, tok, r.calib.replies, text_sources=r.calib.text_sets(),
                             progress=s.progress)
        log.info("calibration replies: %d tokens added to %d prompts (%.1f s)", full.n_tokens - calib.n_tokens,
                 sum(src not in r.calib.text_sets() for src in calib.sources), time.time() - t)
        calib = full
    s.calib = calib


def run(recipe, model: Any = None, tokenizer: Any = None, *, options: RunOptions | None = None,
        out: str | Path | None = None, overwrite: bool = False):
    """Run ``recipe`` on ``model`` (default: ``recipe.model``); with ``out``, save the result there
    (the folder is checked and locked before any work starts). Returns a
    :class:`~safeptq.result.QuantizedModel`."""
    from ..memory import phase_peak
    from ..result import QuantizedModel
    from ..runs import FolderLock, check_out_target, new_run_id
    from . import METHODS

    options = options or RunOptions()
    method = METHODS.get(recipe.method)
    spec, loaded = resolve_model_arg(model if model is not None else recipe.model, tokenizer)
    if spec is None and loaded is None:
        raise ModelError("no model: pass one or set the recipe's model field")
    if spec is not None and recipe.model != spec:
        recipe = recipe.replace(model=spec)
    run_id, t0 = new_run_id(), time.time()
    out_path = Path(out).expanduser() if out is not None else None
    locks = []
    try:
        if out_path is not None:
            check_out_target(out_path, overwrite)
            locks.append(FolderLock(out_path).acquire())
        if options.work_dir is not None:
            locks.append(FolderLock(options.work_dir).acquire())
        phases: dict = {}
        with phase_peak() as mem:
            s = _setup(method, recipe, options, spec, loaded, run_id, t0, out_path)
        phases["setup"] = mem.as_dict()
        s.phases = phases
        try:
            if method.measure_calibration_phase:
                with phase_peak() as mem:
                    cal = method.calibrate(s)
                phases["calibration"] = mem.as_dict()
            else:
                cal = method.calibrate(s)
            qm = QuantizedModel._from_session(method, s, cal)
        except BaseException:
            if s.work is not None:
                s.work.discard_if_unused()  # nothing to resume from: leave no folder behind
            raise
        if s.work is not None and out_path is None and options.work_dir is None:
            import weakref

            weakref.finalize(qm, s.work.remove)  # a temporary work folder goes with the result
        if out_path is not None:
            qm.save(out_path, overwrite=overwrite)
        return qm
    except KeyboardInterrupt:
        work = options.work_dir or (out_path.with_name(out_path.name + ".work") if out_path is not None else None)
        if work is not None and Path(work).is_dir() and method.uses_work(recipe):
            log.error("interrupted; checkpoints are in %s: rerun the same command with --resume to continue", work)
        raise
    finally:
        for lock in reversed(locks):
            lock.release()

