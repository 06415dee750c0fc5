"""Quantization methods on top of the engine: ``rtn``, ``omniquant`` (block-wise LWC+LET, MSE),
``realign`` (block-wise LWC+LET, probe push on malicious samples) and the llm-compressor
baselines (``gptq``, ``awq``, ``smoothquant+gptq``). Each returns the quantized model (in place
where possible) and a JSON-able report; :func:`save_quantized` writes the deployable checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from safeptq.data.calib import CalibSet
from safeptq.errors import ConfigError, UnknownNameError
from safeptq.objectives.base import BlockObjective
from safeptq.quant.args import Scheme
from safeptq.quant.deploy import rtn_quantize
from safeptq.quant.engine import BlockwiseConfig, CalibResult, calibrate_blockwise, peak_memory_mb

__all__ = ["BUILTIN", "LLMCOMPRESSOR", "METHODS", "by_llmcompressor", "run_method", "save_quantized"]

BUILTIN = ("rtn", "omniquant", "realign")
LLMCOMPRESSOR = ("gptq", "awq", "smoothquant+gptq")
METHODS = BUILTIN + LLMCOMPRESSOR


def run_method(method: str, model: nn.Module, tokenizer, scheme: Scheme, calib: CalibSet | None, *,
               cfg: BlockwiseConfig | None = None, objective: BlockObjective | None = None,
               work_dir: str | Path | None = None, resume: bool = False, progress: bool = True) -> tuple[nn.Module, dict]:
    """Quantize ``model`` with ``method``; returns ``(model, report)``. ``report['qparams']`` holds
    the exact integer parameters of built-in methods (for the exporter)."""
    if method not in METHODS:
        raise UnknownNameError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    t0 = time.time()
    if method == "rtn":
        qparams = rtn_quantize(model, scheme)
        rss, acc = peak_memory_mb()
        return model, {"method": "rtn", "qparams": qparams, "wall_time_s": round(time.time() - t0, 1),
                       "peak_rss_mb": round(rss, 1), "peak_accel_mb": acc}
    if method in ("omniquant", "realign"):
        from safeptq.objectives import MSE

        if method == "realign" and objective is None:
            raise ConfigError("method 'realign' needs its probe objective (see safeptq.objectives.ProbePush)")
        objective = objective or MSE()
        cfg = cfg or BlockwiseConfig(scheme=scheme)
        res: CalibResult = calibrate_blockwise(model, calib, objective, cfg, work_dir=work_dir,
                                               resume=resume, progress=progress)
        return model, {"method": method, "qparams": res.qparams, **res.summary(), "objective": objective.describe()}
    from safeptq.baselines.llmcompressor import run_llmcompressor

    ids = calib.token_lists()
    model = run_llmcompressor(model, tokenizer, method, scheme, ids, nsamples=len(ids),
                              seqlen=int(calib.input_ids.shape[1]))
    rss, acc = peak_memory_mb()
    return model, {"method": f"llmcompressor:{method}", "qparams": None, "wall_time_s": round(time.time() - t0, 1),
                   "peak_rss_mb": round(rss, 1), "peak_accel_mb": acc}


def by_llmcompressor(report: dict) -> bool:
    """Whether llm-compressor produced the weights (``method`` "llmcompressor:gptq", or
    "aaq+llmcompressor:gptq"): its own exporter, and its own activation quantization in the model."""
    return "llmcompressor:" in str(report.get("method", ""))


def save_quantized(model: nn.Module, tokenizer, scheme: Scheme, out: str | Path, report: dict,
                   metadata: dict | None = None) -> Path:
    """Write the quantized model: compressed-tensors for servable schemes, dense fake-quant
    otherwise (see :mod:`safeptq.export`). ``report`` comes from :func:`run_method`."""
    meta = {k: v for k, v in report.items() if k != "qparams"}
    meta.update(metadata or {})
    if by_llmcompressor(report):
        from safeptq.baselines.llmcompressor import save_baseline

        return save_baseline(model, tokenizer, out, report["method"].split("llmcompressor:", 1)[1], scheme,
                             meta.get("nsamples", 0), meta.get("seqlen", 0))
    from safeptq.export import export_compressed

    return export_compressed(model, tokenizer, scheme, out, qparams=report.get("qparams"), metadata=meta)
