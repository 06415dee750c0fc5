"""The calibrated model as it runs at inference: plain linears holding quantized-dequantized
weights, with dynamic activation (and KV-cache) fake quantization as forward hooks.

Hooks, not wrapper modules, so that the state dict keeps the plain HF keys (export and
``save_pretrained`` see an ordinary model) while in-process evaluation still sees the activation
quantization a W8A8 / W4A4 runtime applies.
"""

from __future__ import annotations

import torch
from torch import nn

from safeptq.quant.args import Scheme, check_group_size
from safeptq.quant.qlinear import decoder_linears
from safeptq.quant.quantizer import ActQuantizer, QuantizedWeight, quantize_weight
from safeptq.quant.rotation import decoder_parts

__all__ = ["attach_act_quant", "detach_act_quant", "has_act_quant", "rtn_quantize_layer", "rtn_quantize"]

_HANDLES = "_safeptq_act_quant"


def attach_act_quant(layer: nn.Module, scheme: Scheme) -> int:
    """Fake-quantize the inputs of every linear of a decoder ``layer`` (and k/v outputs for a KV
    scheme) dynamically; returns the number of hooks. Idempotent: old hooks are replaced."""
    detach_act_quant(layer)
    handles = []
    if scheme.input_activations is not None:
        aq = ActQuantizer(scheme.input_activations)
        for rel in decoder_linears(layer):
            lin = layer.get_submodule(rel)
            handles.append(lin.register_forward_pre_hook(lambda m, a, q=aq: (q(a[0]), *a[1:])))
    if scheme.kv_cache is not None:
        kq = ActQuantizer(scheme.kv_cache)
        qk = getattr(layer.self_attn, "qk_transform", None)
        # K is quantized after RoPE by the attention's q/k transform when it has one (safeptq.quant.attention)
        rels = ("self_attn.v_proj",) if qk is not None and qk.k_quant is not None else ("self_attn.k_proj",
                                                                                        "self_attn.v_proj")
        for rel in rels:
            handles.append(layer.get_submodule(rel).register_forward_hook(lambda m, a, out, q=kq: q(out)))
    if handles:
        object.__setattr__(layer, _HANDLES, handles)
    return len(handles)


def detach_act_quant(module: nn.Module) -> None:
    """Remove hooks installed by :func:`attach_act_quant` on ``module`` and below."""
    for m in module.modules():
        for h in m.__dict__.pop(_HANDLES, []):
            h.remove()


def has_act_quant(module: nn.Module) -> bool:
    return any(_HANDLES in m.__dict__ for m in module.modules())


@torch.no_grad()
def rtn_quantize_layer(layer: nn.Module, scheme: Scheme, prefix: str = "") -> dict[str, QuantizedWeight]:
    """Round-to-nearest: replace each linear weight of ``layer`` by its quantized-dequantized
    value (min/max ranges, no clipping), attach activation hooks; returns the qparams by name."""
    out = {}
    if scheme.weights is not None:
        for rel in decoder_linears(layer):
            lin = layer.get_submodule(rel)
            check_group_size(prefix + rel, lin.in_features, scheme.weights.group_size)
            qw = quantize_weight(lin.weight, scheme.weights)
            lin.weight.copy_(qw.dequantized.to(lin.weight.dtype))
            out[prefix + rel] = qw
    attach_act_quant(layer, scheme)
    return out


def rtn_quantize(model: nn.Module, scheme: Scheme) -> dict[str, QuantizedWeight]:
    """RTN for every decoder layer of ``model`` (in place)."""
    _, layers, _, _ = decoder_parts(model)
    params = {}
    for i, layer in enumerate(layers):
        params.update(rtn_quantize_layer(layer, scheme, prefix=f"model.layers.{i}."))
    return params
