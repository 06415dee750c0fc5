"""Evaluation of one model as a library call (``safeptq.evaluate``; ``safeptq eval`` is a thin shell
over it): load or take the model, pick the generation backend, run the suites, and return — and
optionally write — the same document as ``safeptq eval --out``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["EvalOptions", "evaluate_model", "needs_hf_model", "classifier_judge", "write_eval", "check_eval_out"]

log = logging.getLogger(__name__)

KEYWORD_JUDGE = "keyword (GCG refusal list, case-insensitive)"
KEYWORD_TOKENS = 32  # a refusal opens the answer: DESIGN.md measured the organism with 32
CLASSIFIER_TOKENS = 512  # HarmBench's protocol: the classifier reads completions of up to 512 new tokens


@dataclass
class EvalOptions:
    """Generation and judging settings (``safeptq eval``'s flags)."""

    limit: int | None = None
    data_dir: str | None = None
    max_new_tokens: int | None = None  # None: the judge's protocol (keyword 32; HarmBench / Llama Guard 512)
    batch_size: int = 32
    context_length: int | None = None
    ppl_windows: int | None = None
    margin: bool = False
    judge: str = "keyword"
    full_responses: bool = False
    backend: str = "auto"
    chat_template: bool = True
    device: str = "auto"
    dtype: str = "auto"
    system_prompt: str | None = None  # None: keep what the tokenizer carries (a quantizing run's own)
    chat_template_kwargs: dict | None = None
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    progress: bool = True

    def check(self) -> None:
        for name in ("limit", "max_new_tokens", "batch_size", "ppl_windows", "tensor_parallel_size", "max_model_len"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"`{name}` must be positive, got {v}")
        if self.context_length is not None and self.context_length < 2:
            raise ConfigError(f"`context_length` must be at least 2, got {self.context_length}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"`gpu_memory_utilization` must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.backend not in ("auto", "hf", "vllm"):
            raise ConfigError(f"`backend` must be auto, hf or vllm, got {self.backend!r}")
        if self.judge != "keyword":
            _parse_judge(self.judge)

    def generation_length(self) -> int:
        """Tokens generated per safety prompt: as asked, else what the judge's protocol reads."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return KEYWORD_TOKENS if self.judge == "keyword" else CLASSIFIER_TOKENS

    def record(self, tokenizer=None) -> dict:
        """What the results depend on (``compare`` refuses runs whose settings differ)."""
        from ..data.chat import chat_options

        chat = chat_options(tokenizer) if tokenizer is not None else {"system": None, "template_kwargs": {}}
        return {"limit": self.limit, "max_new_tokens": self.generation_length(),
                "system_prompt": chat["system"], "chat_template_kwargs": chat["template_kwargs"],
                "judge": KEYWORD_JUDGE if self.judge == "keyword" else self.judge, "greedy": True,
                "chat_template": self.chat_template, "context_length": self.context_length,
                "ppl_windows": self.ppl_windows}


def needs_hf_model(suites: list[str], margin: bool) -> bool:
    """Whether the transformers model scores anything itself (perplexity, refusal margins, label
    choice): if not, it can stay off the GPU while vLLM generates."""
    from ..data.registry import REGISTRY
    from .tasks import TASKS

    if margin or any(n.startswith("lm-eval:") for n in suites):  # lm-eval scores log-likelihoods itself
        return True
    for name in suites:
        spec = REGISTRY.get(name)  # None: a user file of harmful/benign prompts, generation only
        task = TASKS.get(name.split(":")[0]) if spec is not None and spec.kind == "task" else None
        if (spec is not None and spec.kind == "text") or (task is not None and task.labels is not None):
            return True
    return False


def _parse_judge(spec: str) -> tuple[str, str]:
    from .judges import ClassifierJudge

    if "=" not in spec:
        raise ConfigError(f"`judge` {spec!r}: use keyword or FORMAT=MODEL (FORMAT harmbench|llamaguard)")
    fmt, path = spec.split("=", 1)
    if fmt not in ClassifierJudge.FORMATS:
        raise ConfigError(f"`judge` {spec!r}: unknown format {fmt!r}; choose harmbench or llamaguard")
    return fmt, path


def classifier_judge(spec: str):
    from .judges import ClassifierJudge

    fmt, path = _parse_judge(spec)
    return ClassifierJudge.from_pretrained(path, fmt)


def evaluate_model(model: Any, suites: str | list[str], *, tokenizer: Any = None,
                   options: EvalOptions | None = None) -> tuple[dict, dict]:
    """``(document, samples)``: the ``safeptq eval --out`` document of ``model`` (a path / hub id /
    ``"default"``, an in-memory model with ``tokenizer``, or a :class:`~safeptq.result.QuantizedModel`)
    on ``suites``, and the per-prompt samples by suite."""
    from ..methods.pipeline import resolve_model_arg
    from ..models import load_model, require_chat_template
    from . import EvalConfig, make_generator, parse_suites
    from . import evaluate as run_suites
    from .samples import pop_samples

    opts = options or EvalOptions()
    opts.check()
    names = parse_suites(suites)
    if not names:
        raise ConfigError("no suites to evaluate")
    from ..data.registry import check_prompt_set
    from ..models import pick_device

    from .lmeval import check_lm_eval_data, is_lm_eval_suite

    for name in names:  # every suite's data is there: checked before the model loads
        if is_lm_eval_suite(name):
            check_lm_eval_data(name, opts.data_dir)
        else:
            check_prompt_set(name, opts.data_dir)
    pick_device(opts.device)
    if hasattr(model, "model") and hasattr(model, "record") and hasattr(model, "save"):  # a QuantizedModel
        model, tokenizer = model.model, model.tokenizer
    spec, lm = resolve_model_arg(model, tokenizer)
    if spec is not None:
        if opts.backend == "vllm":  # refuse before the model is loaded, not after
            from ..models import resolve_model
            from .generation import check_vllm_folder

            check_vllm_folder(resolve_model(spec)[0])
        lm = load_model(spec, dtype=opts.dtype, device=opts.device)
    else:  # an in-memory model runs where --device says (auto: CUDA when present) and goes back after
        home = next(lm.model.parameters()).device
        lm.model.to(pick_device(opts.device))
    if opts.system_prompt is not None or opts.chat_template_kwargs is not None:
        from ..data.chat import chat_options, set_chat_options

        cur = chat_options(lm.tokenizer)
        set_chat_options(lm.tokenizer, opts.system_prompt if opts.system_prompt is not None else cur["system"],
                         opts.chat_template_kwargs if opts.chat_template_kwargs is not None else cur["template_kwargs"])
    from ..data.registry import REGISTRY

    text_only = all((n in REGISTRY and REGISTRY[n].kind == "text") or n.startswith("lm-eval:") for n in names)
    if opts.chat_template and not text_only:  # perplexity needs no template (base models have none)
        require_chat_template(lm.tokenizer, spec or lm.path)
    cfg = EvalConfig(limit=opts.limit, data_dir=opts.data_dir, max_new_tokens=opts.generation_length(),
                     batch_size=opts.batch_size, context_length=opts.context_length, ppl_windows=opts.ppl_windows,
                     use_chat_template=opts.chat_template, margin=opts.margin, progress=opts.progress,
                     early_stop=not opts.full_responses)
    if opts.judge != "keyword":
        cfg.judge = classifier_judge(opts.judge)
    gen = make_generator(lm.model, lm.tokenizer, opts.backend if spec is not None else "hf", model_path=lm.path,
                         batch_size=opts.batch_size, progress=opts.progress,
                         restore_model=needs_hf_model(names, opts.margin),
                         tensor_parallel_size=opts.tensor_parallel_size,
                         gpu_memory_utilization=opts.gpu_memory_utilization, max_model_len=opts.max_model_len)
    t0 = time.time()
    try:
        results = run_suites(lm.model, lm.tokenizer, names, cfg, generator=gen)
    finally:
        if spec is None:
            lm.model.to(home)
    samples = pop_samples(results)
    doc = {"model": spec or lm.path, "model_path": lm.path, "suites": results, "config": opts.record(lm.tokenizer),
           "wall_time_s": round(time.time() - t0, 1)}
    return doc, samples


def write_eval(out: str | Path, doc: dict, samples: dict) -> Path:
    """Write ``doc`` to ``out`` and the samples beside it (``X.samples.jsonl``); an older samples file
    of another run is removed, never left to be paired with these results."""
    from ..runs import write_json_atomic
    from .samples import write_samples

    import hashlib

    out = Path(out).expanduser()
    side = out.with_suffix(".samples.jsonl")
    if samples:
        write_samples(side, samples)
        # the results name their samples by content: a crash between the two writes cannot pair them wrongly
        doc = {**doc, "samples_file": {"name": side.name,
                                       "sha256": hashlib.sha256(side.read_bytes()).hexdigest()}}
    else:
        side.unlink(missing_ok=True)
    return write_json_atomic(out, doc)


def check_eval_out(out: str | Path) -> None:
    """Refuse an ``--out`` that cannot take the results, before any generation."""
    from ..runs import _check_parent_writable

    p = Path(out).expanduser()
    if p.is_dir():
        raise ConfigError(f"eval output {p} is a folder; give a file path such as {p / 'eval.json'}")
    if p.exists() and not p.is_file():
        raise ConfigError(f"eval output {p} is not a regular file")
    _check_parent_writable(p)

