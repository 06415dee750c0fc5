"""Transforms inside attention, after RoPE (QuaRot's / SpinQuant's R3, OSTQuant's Q/K transform): an orthogonal
Hadamard-like ``H`` on every head's query and key (``(qH)(kH)ᵀ = qkᵀ``, so the model is unchanged) and the KV-cache
quantization of K in that rotated, post-RoPE basis — the keys a runtime that quantizes its KV cache stores. Without
it, safeptq quantizes K at the k_proj output, before RoPE (an approximation).

transformers looks the attention function up by ``config._attn_implementation`` in a global registry, so the
transform registers ``safeptq_<base>`` (e.g. ``safeptq_sdpa``): the base function (or the family's own eager
function), called after the module's :class:`QKTransform`. The mask builder of the base is registered under the
same name, so masks are unchanged.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from safeptq.errors import ConfigError
from safeptq.quant.args import QuantArgs
from safeptq.quant.quantizer import ActQuantizer

__all__ = ["QKTransform", "attach_qk_transform", "detach_qk_transform", "qk_transform_of", "PREFIX"]

PREFIX = "safeptq_"
_REGISTERED: set[str] = set()


class QKTransform(nn.Module):
    """``q, k ↦ q Hᵀ, quant(k Hᵀ)`` on ``[batch, heads, tokens, head_dim]`` (``H`` or the quantizer may be absent)."""

    def __init__(self, h: torch.Tensor | None, k_quant: QuantArgs | None) -> None:
        super().__init__()
        self.register_buffer("h", None if h is None else h.detach().clone().float(), persistent=False)
        self.k_quant = None if k_quant is None else ActQuantizer(k_quant)
        # nothing of it in the model's state dict: a checkpoint keeps the plain HF keys (the export stores H apart)
        self._register_state_dict_hook(_drop_own_keys)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.h is not None:
            dt = torch.promote_types(q.dtype, torch.float32)
            h = self.h.to(q.device, dt)
            q, k = (q.to(dt) @ h.T).to(q.dtype), (k.to(dt) @ h.T).to(k.dtype)
        if self.k_quant is not None:
            k = self.k_quant(k)
        return q, k


def _drop_own_keys(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[k]


def _family_eager(module: nn.Module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ConfigError(f"{type(module).__name__} has no eager attention function to wrap")
    return fn


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = PREFIX + base
    if name in _REGISTERED:
        return name
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ConfigError(f"attention implementation {base!r} cannot carry the q/k transform")

    def attention(module, query, key, value, attention_mask, **kwargs):
        t = getattr(module, "qk_transform", None)
        if t is not None:
            query, key = t(query, key)
        fn = _family_eager(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    _REGISTERED.add(name)
    return name


def attach_qk_transform(model: nn.Module, attn: nn.Module, h: torch.Tensor | None, k_quant: QuantArgs | None) -> None:
    """Give attention module ``attn`` of ``model`` the post-RoPE transform; switches the model's attention
    implementation to the wrapping one (once)."""
    cfg = model.config
    impl = cfg._attn_implementation or "eager"
    if not impl.startswith(PREFIX):
        cfg._attn_implementation = _register(impl)
    if h is not None:
        hd = attn.head_dim
        if h.shape != (hd, hd):
            raise ConfigError(f"q/k transform of shape {tuple(h.shape)} for head_dim {hd}")
        eye = torch.eye(hd, dtype=torch.float64)
        if not torch.allclose(h.double() @ h.double().T, eye, atol=1e-6):
            raise ConfigError("the q/k transform must be orthogonal")
    attn.qk_transform = QKTransform(h, k_quant).to(next(attn.parameters()).device)


def qk_transform_of(attn: nn.Module) -> QKTransform | None:
    return getattr(attn, "qk_transform", None)


def detach_qk_transform(model: nn.Module) -> None:
    """Remove every q/k transform and restore the base attention implementation."""
    for m in model.modules():
        if isinstance(getattr(m, "qk_transform", None), QKTransform):
            del m.qk_transform
    impl = model.config._attn_implementation or ""
    if impl.startswith(PREFIX):
        model.config._attn_implementation = impl[len(PREFIX):]
