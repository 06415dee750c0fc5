"""safeptq's Python API; every command of the CLI is a thin shell over one of these functions.

A model is a path, a hub id (online), ``"default"`` (the embedded SmolLM2-135M-Instruct), or an
in-memory transformers model with its ``tokenizer`` (quantized in place). A method's settings are
its typed recipe (:mod:`safeptq.recipes`): pass ``recipe=`` (object, dict or YAML path) and/or
keyword overrides of its fields (``epochs=3``, ``training={"epochs": 3}``, ``**{"training.epochs": 3}``).
Run-time keywords (``device``, ``progress``, ``work_dir``, ``resume``, ``max_memory``,
``stream_budget_mb``, ``checkpointing``, ``save_every``) change where and how fast a run goes, never
its result, and are not part of the recipe.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

__all__ = ["load_model", "quantize", "realign", "aaq", "run", "evaluate", "judge", "probe", "build_organism",
           "compare", "report", "demo"]


def _split_options(kw: dict[str, Any]):
    from .methods import RunOptions

    names = {f.name for f in fields(RunOptions)}
    opts = RunOptions(**{k: kw.pop(k) for k in list(kw) if k in names})
    return opts, kw


def _run(cls, model, tokenizer, recipe, out, overwrite, kw: dict[str, Any]):
    from .methods.pipeline import run as run_pipeline
    from .recipes import make_recipe

    options, overrides = _split_options(dict(kw))
    if isinstance(overrides.get("calib"), (str, Path)):  # calib="advbench:calib=0.75,..." is the data spec
        overrides["calib"] = {"data": str(overrides["calib"])}
    if isinstance(model, (str, Path)):
        overrides["model"] = str(model)
    r = make_recipe(cls, recipe, **overrides)
    return run_pipeline(r, model, tokenizer, options=options, out=out, overwrite=overwrite)


def load_model(model: str = "default", *, dtype: str = "auto", device: str = "auto"):
    """Load a causal LM and its tokenizer: ``LoadedModel(model, tokenizer, path)``."""
    from .models import load_model as _load

    return _load(model, dtype=dtype, device=device)


def quantize(model: Any, *, scheme: str, method: str = "rtn", calib: str | dict | None = None, tokenizer: Any = None,
             recipe: Any = None, out: str | Path | None = None, overwrite: bool = False, **overrides: Any):
    """Quantize ``model`` with ``method`` (rtn, omniquant, gptq, awq, smoothquant+gptq) to ``scheme``;
    ``calib`` is a calibration spec (``"alpaca:calib"``) or a dict of calibration fields. With
    ``out``, the result is also saved there. Returns a :class:`~safeptq.result.QuantizedModel`."""
    from .recipes import QuantizeRecipe

    if calib is not None:
        overrides["calib"] = calib
    return _run(QuantizeRecipe, model, tokenizer, recipe, out, overwrite,
                {"scheme": scheme, "method": method, **overrides})


def realign(model: Any, *, probe_model: str | None = None, scheme: str = "w8a8", schedule: str = "default",
            tokenizer: Any = None, recipe: Any = None, out: str | Path | None = None, overwrite: bool = False,
            **overrides: Any):
    """Q-realign the fine-tuned ``model``: block-wise quantization whose objective reconstructs benign
    prompts and moves malicious ones back to the safe side of ``probe_model`` (the aligned model the
    fine-tune started from; probes are fitted on it and cached). ``schedule``: ``default`` (measured
    on the organism) or ``paper`` (the authors' code)."""
    from .recipes import RealignRecipe

    kw = {"scheme": scheme, "schedule": schedule, **overrides}
    if probe_model is not None:
        kw["probes.model"] = str(probe_model)
    return _run(RealignRecipe, model, tokenizer, recipe, out, overwrite, kw)


def aaq(model: Any, *, base: str | None = None, scheme: str = "w4a8", tokenizer: Any = None, recipe: Any = None,
        out: str | Path | None = None, overwrite: bool = False, **overrides: Any):
    """AAQ-quantize the instruct ``model``: transforms trained end to end to stay close to the instruct
    model and away from its pre-trained ``base`` (same tokenizer). ``objective="kl_top"`` is the
    reconstruction-only baseline (no base)."""
    from .recipes import AAQRecipe

    kw = {"scheme": scheme, **overrides}
    if isinstance(kw.get("objective"), str):
        kw["objective"] = {"kind": kw["objective"]}
    if base is not None:
        kw["base"] = str(base)
    return _run(AAQRecipe, model, tokenizer, recipe, out, overwrite, kw)


def run(recipe: Any, *, model: Any = None, tokenizer: Any = None, out: str | Path | None = None,
        overwrite: bool = False, **options: Any):
    """Run a recipe (object, dict or ``recipe.yaml`` path — a finished run's replays it) as is."""
    from .methods.pipeline import run as run_pipeline
    from .recipes import load_recipe, recipe_class

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = recipe_class(recipe.get("method", "rtn")).build(recipe)
    opts, extra = _split_options(dict(options))
    if extra:
        recipe = recipe.replace(**extra)
    return run_pipeline(recipe, model, tokenizer, options=opts, out=out, overwrite=overwrite)


def evaluate(model_or_result: Any, suites: str | list[str], *, limit: int | None = None, tokenizer: Any = None,
             out: str | Path | None = None, **opts: Any) -> dict:
    """Evaluate a model (or a :class:`~safeptq.result.QuantizedModel`) on ``suites``; returns the
    ``safeptq eval --out`` document (``suites``: metrics with 95% intervals and n). ``opts``: fields
    of :class:`~safeptq.eval.api.EvalOptions`; with ``out``, the JSON and its samples are written."""
    from .eval.api import EvalOptions, check_eval_out, evaluate_model, write_eval

    if out is not None:
        check_eval_out(out)
    if hasattr(model_or_result, "record") and hasattr(model_or_result, "save"):
        opts.setdefault("chat_template", bool(getattr(model_or_result.tokenizer, "chat_template", None)))
        opts.setdefault("backend", "hf")
    doc, samples = evaluate_model(model_or_result, suites, tokenizer=tokenizer,
                                  options=EvalOptions(limit=limit, **opts))
    if out is not None:
        write_eval(out, doc, samples)
    return doc


def judge(run: str | Path, judge: str = "keyword", *, suites: list[str] | None = None,
          out: str | Path | None = None) -> dict:
    """Re-judge the completions ``run`` saved (no generation); returns ``{"run", "judge", "suites"}``.
    With ``out``, writes it and the re-judged samples beside it."""
    from .eval.api import check_eval_out, write_eval
    from .eval.rejudge import rejudge

    if out is not None:
        check_eval_out(out)
    results, samples = rejudge(run, judge, suites)
    doc = {"run": str(run), "judge": judge, "suites": results, "config": {"judge": judge, "rejudged": True}}
    if out is not None:
        write_eval(out, doc, samples)
    return doc


def probe(model: Any, *, out: str | Path, probe_model: str | None = None, probes: str | None = None,
          compare: dict[str, str] | None = None, **opts: Any) -> dict:
    """Fit per-layer probes on ``probe_model`` (default: ``model``) and measure how well they separate
    malicious from benign held-out prompts on ``model`` and on every ``compare`` model; writes
    probes, ``separability.json`` and plots to ``out`` and returns the document."""
    from .probes.analysis import ProbeOptions, analyse

    return analyse(str(model), out, probe_model=probe_model, probes=probes, compare=compare or {},
                   options=ProbeOptions(**opts))


def build_organism(out: str | Path | None = None, *, base: str = "default", data_dir: str | None = None,
                   progress: bool = True, evaluate: bool = True, **recipe: Any) -> dict[str, Path]:
    """Build (or reuse) the model organism: ``{"aligned": path, "attacked": path}``. ``recipe``:
    fields of :class:`~safeptq.finetune.organism.OrganismRecipe` (task, harmful_ratio, method, ...).
    ``evaluate=False`` skips the stages' evaluation (a later evaluated build completes it)."""
    from .finetune.organism import OrganismRecipe
    from .finetune.organism import build_organism as _build
    from .paths import safeptq_home

    r = OrganismRecipe(**recipe)
    return _build(r, out or str(safeptq_home() / "organism"), base=base, data_dir=data_dir, progress=progress,
                  evaluate=evaluate)


def compare(run_a: str | Path, run_b: str | Path, suites: list[str] | None = None) -> dict:
    """Paired per-prompt comparison of two evaluated runs: ``{suite: {a, b, diff, ci95, mcnemar_p, n}}``;
    refuses runs judged with other settings."""
    from .eval.samples import compare_runs

    return compare_runs(run_a, run_b, suites)


def report(runs: list[str | Path], out: str | Path = "report.html", *, baseline: str | None = None,
           attacked: str | None = None, aligned: str | None = None, names: list[str] | None = None,
           title: str = "safeptq report") -> dict[str, Path]:
    """One self-contained HTML page (and ``.md`` tables beside it) from run folders and ``eval --out`` files:
    rates with intervals, paired differences to ``baseline``, the share of the ``attacked``−``aligned`` gap each
    other run closes per harmful suite, figures, recipes and the prompts whose verdict changed. A run given as
    ``"NAME=PATH"`` is shown as NAME. Returns ``{"html": path, "markdown": path}``."""
    from .reporting import build_report

    return build_report(runs, out, baseline=baseline, attacked=attacked, aligned=aligned, names=names, title=title)


def demo(out: str | Path = "runs/demo", *, organism: str | Path | None = None, limit: int = 50, **opts: Any) -> dict:
    """The main job end to end: organism (built or reused), RTN W8A8 and Q-realign W8A8 of its attacked model,
    AAQ of its aligned model, all evaluated alike, and the report. Resumes where it stopped. ``opts``: fields of
    :class:`~safeptq.demo.DemoOptions`. Returns ``{"report", "markdown", "rows"}``."""
    from .demo import DemoOptions, run_demo

    return run_demo(DemoOptions(out=out, organism=organism, limit=limit, **opts))
