"""The reload check every export passes before a run is called complete: load the written folder
back and compare its logits with the in-process quantized model on a fixed text."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from safeptq.errors import ExportError

__all__ = ["VERIFY_TEXT", "MAX_REL_ERR", "verify_export"]

VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. Quantization keeps the answer."
# weights-only logits of the reloaded export vs the in-process model: float32 models must agree to
# 1e-3; bf16/fp16 models round the dequantized weights (int codes x a bf16 scale on reload) and every
# activation to 8 mantissa bits, which moves random 2-layer models' logits by ~1e-2
MAX_REL_ERR = {"float32": 1e-3, "low": 5e-2}


def verify_export(out: Path, model: nn.Module, tokenizer, scheme, *, builtin: bool) -> dict:
    """Reload ``out`` and compare with ``model`` (safeptq's activation hooks off on our side:
    ``reload_check`` applies the reference activation quantization itself). Raises
    :class:`ExportError` above the tolerance of the model's dtype; returns the measurements."""
    from safeptq.export import reload_check
    from safeptq.quant.deploy import attach_act_quant, detach_act_quant
    from safeptq.quant.rotation import decoder_parts

    ids = tokenizer(VERIFY_TEXT, return_tensors="pt")["input_ids"][:, :32]
    layers = decoder_parts(model)[1] if builtin else []
    # the post-RoPE K quantizers of q/k transforms are activation quantization too: off for the weights-only check
    k_quants = [m.qk_transform.k_quant for m in model.modules()
                if getattr(m, "qk_transform", None) is not None and m.qk_transform.k_quant is not None]
    for layer in layers:
        detach_act_quant(layer)
    for q in k_quants:
        q.enabled = False
    try:
        res = reload_check(out, model, ids)
    finally:
        for q in k_quants:
            q.enabled = True
        for layer in layers:
            attach_act_quant(layer, scheme)
    res.pop("bits_per_weight_by_layer", None)
    tol = MAX_REL_ERR["float32" if next(model.parameters()).dtype == torch.float32 else "low"]
    res["tolerance"] = tol
    if res["weights_only_max_rel_err"] > tol:
        raise ExportError(f"the export does not reload to the quantized model (weights-only logits max rel err "
                          f"{res['weights_only_max_rel_err']:.3g} > {tol}); the run is not complete")
    return res
