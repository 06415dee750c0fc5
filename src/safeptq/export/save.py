"""Write a quantized model in the format its method and scheme call for: llm-compressor's own exporter
for its baselines, else compressed-tensors for servable schemes and a dense fake-quant copy otherwise."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from safeptq.quant.args import Scheme

__all__ = ["by_llmcompressor", "save_quantized"]


def by_llmcompressor(report: dict) -> bool:
    """Whether llm-compressor produced the weights (``method`` "llmcompressor:gptq", or
    "aaq+llmcompressor:gptq"): its own exporter, and its own activation quantization in the model."""
    return "llmcompressor:" in str(report.get("method", ""))


def save_quantized(model: nn.Module, tokenizer, scheme: Scheme, out: str | Path, report: dict,
                   metadata: dict | None = None) -> Path:
    """Write the quantized model; ``report`` is the method's (``qparams`` for safeptq's exporter)."""
    meta = {k: v for k, v in report.items() if k != "qparams"}
    meta.update(metadata or {})
    if by_llmcompressor(report):
        from safeptq.baselines.llmcompressor import save_baseline

        return save_baseline(model, tokenizer, out, report["method"].split("llmcompressor:", 1)[1], scheme,
                             meta.get("nsamples", 0), meta.get("seqlen", 0))
    from safeptq.export import export_compressed

    return export_compressed(model, tokenizer, scheme, out, qparams=report.get("qparams"), metadata=meta)
