"""``QuantLinear``: an ``nn.Linear`` seen through learnable transforms and fake quantizers.

The wrapped linear's weight is never changed while training. Each forward computes

    W_eff, b_eff = t_n(...t_1(W, b))        # smoothing scales, rotations (learnable, in order)
    y = F.linear(act_q(input_transform(x)), weight_q(W_eff), b_eff)

so every learnable transform gets gradients through the quantizers. ``fold()`` bakes all of it
into a plain ``nn.Linear``; ``bake_transforms()`` bakes only the transforms (exact, no rounding).
Transforms are tagged with a key so the smoothing and rotation code can remove their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from safeptq.errors import ConfigError
from safeptq.quant.args import Scheme, check_group_size
from safeptq.quant.quantizer import ActQuantizer, QuantizedWeight, WeightQuantizer

__all__ = [
    "WeightTransform",
    "LLAMA_LINEARS",
    "decoder_linears",
    "QuantLinear",
    "attach_input_transform",
    "detach_input_transform",
    "base_linear",
    "wrap_linear",
    "wrap_decoder_layer",
    "unwrap_decoder_layer",
    "set_quantizers_enabled",
]

WeightTransform = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]
"""``(weight, bias) -> (weight, bias)``; must be exact and differentiable."""

LLAMA_LINEARS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
"""Linear layers of a Llama/Mistral/Qwen2 decoder layer, in execution order (other families: their
spec's ``linears``, see :func:`decoder_linears`)."""


def decoder_linears(layer: nn.Module) -> tuple[str, ...]:
    """The quantized linears of a decoder layer of any supported family (:mod:`safeptq.archs`)."""
    from safeptq.archs import spec_of_layer

    return spec_of_layer(layer).linears


class QuantLinear(nn.Module):
    """Fake-quantized view of ``linear`` (kept as ``self.linear``; its weight stays untouched)."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: WeightQuantizer | None = None,
        act_quantizer: ActQuantizer | None = None,
        output_quantizer: ActQuantizer | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.linear = linear
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.output_quantizer = output_quantizer
        self.input_transform: nn.Module | None = None
        self.name = name
        self._transforms: list[tuple[str, WeightTransform]] = []

    in_features = property(lambda self: self.linear.in_features)
    out_features = property(lambda self: self.linear.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The original (untransformed, unquantized) weight."""
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    # -- transforms -------------------------------------------------------------------------
    def add_weight_transform(self, key: str, fn: WeightTransform) -> None:
        """Append ``fn`` to the chain applied to (W, b) on every forward."""
        self._transforms.append((key, fn))

    def remove_weight_transforms(self, key: str) -> int:
        """Drop every transform tagged ``key``; returns how many were removed."""
        before = len(self._transforms)
        self._transforms = [(k, f) for k, f in self._transforms if k != key]
        return before - len(self._transforms)

    def transform_keys(self) -> list[str]:
        return [k for k, _ in self._transforms]

    def effective_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) after all transforms, before weight quantization. Low-precision (bf16/fp16)
        stored weights are read in float32: transforms and quantizers work on float32 values."""
        w, b = self.linear.weight, self.linear.bias
        if w.dtype in (torch.bfloat16, torch.float16):
            w = w.float()
            b = None if b is None else b.float()
        for _, fn in self._transforms:
            w, b = fn(w, b)
        return w, b

    @torch.no_grad()
    def bake_transforms(self, keys: Iterable[str] | None = None) -> None:
        """Fold the leading transforms (all, or those tagged ``keys``) into the stored weight.

        Transforms compose in order, so only a prefix of the chain can be baked; asking for a key
        that sits behind another one raises :class:`ConfigError`.
        """
        wanted = None if keys is None else set(keys)
        n = 0
        for k, _ in self._transforms:
            if wanted is not None and k not in wanted:
                break
            n += 1
        if wanted is not None and any(k in wanted for k, _ in self._transforms[n:]):
            raise ConfigError(
                f"{self.name or 'linear'}: transforms {sorted(wanted)} sit behind "
                f"{self._transforms[n][0]!r}; fold that one first (order: {self.transform_keys()})"
            )
        w = self.linear.weight.double()
        b = None if self.linear.bias is None else self.linear.bias.double()
        for _, fn in self._transforms[:n]:
            w, b = fn(w, b)
        self.linear.weight.copy_(w.to(self.linear.weight.dtype))
        if b is not None:
            self.linear.bias.copy_(b.to(self.linear.bias.dtype))
        self._transforms = self._transforms[n:]

    # -- forward / fold ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        w, b = self.effective_weight_bias()
        if self.weight_quantizer is not None:
            w = self.weight_quantizer(w)
        y = F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight | None:
        """Integer codes/scale/zero of the effective weight (``None`` without a weight quantizer)."""
        if self.weight_quantizer is None:
            return None
        w, _ = self.effective_weight_bias()
        return self.weight_quantizer.quantize(w)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the transformed weight, quantized-dequantized when the
        weight quantizer is enabled.

        Activation and KV quantizers are dropped: at inference the runtime quantizes them
        dynamically. An online Hadamard input transform is carried over as a pre-hook.
        """
        w, b = self.effective_weight_bias()
        if self.weight_quantizer is not None and self.weight_quantizer.enabled:
            w = self.weight_quantizer.quantize(w).dequantized
        lin = self.linear
        out = nn.Linear(lin.in_features, lin.out_features, bias=b is not None,
                        device=lin.weight.device, dtype=lin.weight.dtype)
        out.weight.copy_(w.to(lin.weight.dtype))
        if b is not None:
            out.bias.copy_(b.to(lin.weight.dtype))
        out.weight.requires_grad_(lin.weight.requires_grad)
        if self.input_transform is not None:
            attach_input_transform(out, self.input_transform)
        return out


def _run_input_transform(module: nn.Module, args: tuple) -> tuple:
    return (module.input_transform(args[0]), *args[1:])


def attach_input_transform(linear: nn.Linear, transform: nn.Module) -> None:
    """Run ``transform`` on the input of a plain ``linear`` (child module + forward pre-hook).

    The transform is a child named ``input_transform`` so it follows ``.to(device)``; its
    buffers should be non-persistent so the state dict keeps the plain linear's keys.
    """
    if getattr(linear, "_safeptq_input_hook", None) is not None:
        raise ConfigError("this linear already has an input transform")
    linear.input_transform = transform
    linear._safeptq_input_hook = linear.register_forward_pre_hook(_run_input_transform)


def detach_input_transform(linear: nn.Linear) -> nn.Module | None:
    """Remove and return the transform installed by :func:`attach_input_transform`, if any."""
    handle = getattr(linear, "_safeptq_input_hook", None)
    if handle is None:
        return None
    handle.remove()
    transform = linear.input_transform
    del linear.input_transform
    del linear._safeptq_input_hook
    return transform


def base_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` holding the stored weight of ``module`` (itself or a QuantLinear's)."""
    return module.linear if isinstance(module, QuantLinear) else module


def _build_quantizers(
    linear: nn.Linear, scheme: Scheme, name: str, lwc: bool, kv: bool
) -> tuple[WeightQuantizer | None, ActQuantizer | None, ActQuantizer | None]:
    dev = linear.weight.device
    wq = aq = oq = None
    if scheme.weights is not None:
        check_group_size(name, linear.in_features, scheme.weights.group_size)
        wq = WeightQuantizer(scheme.weights, tuple(linear.weight.shape), lwc=lwc).to(dev)
    if scheme.input_activations is not None:
        aq = ActQuantizer(scheme.input_activations).to(dev)
    if kv and scheme.kv_cache is not None:
        check_group_size(name + " (kv cache)", linear.out_features, scheme.kv_cache.group_size)
        oq = ActQuantizer(scheme.kv_cache).to(dev)
    return wq, aq, oq


def wrap_linear(
    linear: nn.Module,
    scheme: Scheme | None,
    name: str = "",
    *,
    lwc: bool = False,
    kv: bool = False,
) -> QuantLinear:
    """Wrap ``linear`` for ``scheme`` (``None``: no quantizers, only transforms).

    ``kv`` marks k_proj/v_proj: their output gets the scheme's KV-cache quantizer. That quantizes
    K before RoPE, an approximation of a runtime that quantizes the rotated K; V is exact.
    An online Hadamard pre-hook already on ``linear`` moves into ``input_transform``.

    A quantizer-less :class:`QuantLinear` (made by attaching smoothing or a rotation first) gets
    the quantizers in place, keeping its transforms; one that already has quantizers is an error.
    """
    if isinstance(linear, QuantLinear):
        if scheme is None:
            return linear
        existing = (linear.weight_quantizer, linear.act_quantizer, linear.output_quantizer)
        if any(q is not None for q in existing):
            raise ConfigError(f"layer {name or linear.name!r} already has quantizers")
        quantizers = _build_quantizers(linear.linear, scheme, name or linear.name, lwc, kv)
        linear.weight_quantizer, linear.act_quantizer, linear.output_quantizer = quantizers
        linear.name = name or linear.name
        return linear
    quantizers = (None, None, None) if scheme is None else _build_quantizers(linear, scheme, name, lwc, kv)
    q = QuantLinear(linear, *quantizers, name=name)
    q.input_transform = detach_input_transform(linear)
    return q


def wrap_decoder_layer(
    layer: nn.Module, scheme: Scheme | None, *, lwc: bool = False, prefix: str = ""
) -> dict[str, QuantLinear]:
    """Give every linear of a Llama-style decoder layer the quantizers of ``scheme``.

    Plain linears are replaced by :class:`QuantLinear`; quantizer-less ones are completed (see
    :func:`wrap_linear`). Returns ``{relative name: QuantLinear}``.
    """
    out: dict[str, QuantLinear] = {}
    for rel in decoder_linears(layer):
        kv = rel in ("self_attn.k_proj", "self_attn.v_proj")
        mod = wrap_linear(layer.get_submodule(rel), scheme, f"{prefix}{rel}", lwc=lwc, kv=kv)
        layer.set_submodule(rel, mod)
        out[rel] = mod
    return out


def unwrap_decoder_layer(layer: nn.Module, *, fold: bool = True) -> None:
    """Put plain ``nn.Linear`` back: folded (transforms + quantized weight) or the originals.

    ``fold=False`` returns the untouched original linears, to abandon a calibration attempt;
    detach smoothing/rotation first (their norm and embedding halves live outside the linears).
    Fold smoothing before ``fold=True`` too, or its norm wrappers stay in place.
    """
    for rel in decoder_linears(layer):
        mod = layer.get_submodule(rel)
        if isinstance(mod, QuantLinear):
            if not fold and mod.transform_keys():
                raise ConfigError(
                    f"{mod.name or rel} still has transforms {mod.transform_keys()}; detach them "
                    "(detach_smoothing / detach_residual_rotation) before unwrapping without folding"
                )
            if fold:
                new = mod.fold()
            else:
                new = mod.linear
                if mod.input_transform is not None:  # its weight already absorbed Hᵀ: keep it
                    attach_input_transform(new, mod.input_transform)
            layer.set_submodule(rel, new)


def set_quantizers_enabled(module: nn.Module, enabled: bool, *, weights: bool = True,
                           activations: bool = True) -> None:
    """Switch the weight and/or activation (incl. KV) quantizers under ``module`` on or off."""
    for m in module.modules():
        if isinstance(m, WeightQuantizer) and weights:
            m.enabled = enabled
        elif isinstance(m, ActQuantizer) and activations:
            m.enabled = enabled

