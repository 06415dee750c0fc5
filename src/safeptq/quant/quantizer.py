"""Quantizer modules: weights with optional learnable clipping (LWC), activations per token.

LWC (OmniQuant, also Q-realign): each scale row (output channel, or group) owns two learnable
logits ``upbound_factor``/``lowbound_factor``, initialised at 4.0 so ``sigmoid(4) ≈ 0.982``; the
row's max and min are multiplied by their sigmoids before scale and zero-point are computed.
The sigmoid keeps the clip inside ``(0, 1)`` of the observed range, so training can only shrink it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from safeptq.errors import CalibrationError, ConfigError
from safeptq.quant import ops
from safeptq.quant.args import QuantArgs, Strategy

__all__ = [
    "LWC_INIT",
    "QuantizedWeight",
    "quantize_weight",
    "WeightQuantizer",
    "ActQuantizer",
    "lwc_parameters",
]

LWC_INIT = 4.0


class QuantizedWeight(NamedTuple):
    """Result of quantizing a weight ``[out, in]``.

    ``scale``/``zero`` are shaped as compressed-tensors stores them: ``[1]`` per tensor,
    ``[out, 1]`` per channel, ``[out, in // group_size]`` per group.
    """

    dequantized: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def _num_rows(shape: tuple[int, int], args: QuantArgs) -> int:
    out_f, in_f = shape
    if args.strategy is Strategy.TENSOR:
        return 1
    if args.strategy is Strategy.CHANNEL:
        return out_f
    if args.strategy is Strategy.GROUP:
        return out_f * (in_f // args.group_size)
    raise ConfigError(f"weights cannot be quantized per {args.strategy.value!r}; use channel or group")


def _export_shape(shape: tuple[int, int], args: QuantArgs) -> tuple[int, ...]:
    out_f, in_f = shape
    if args.strategy is Strategy.TENSOR:
        return (1,)
    if args.strategy is Strategy.CHANNEL:
        return (out_f, 1)
    return (out_f, in_f // args.group_size)


def _weight_qparams(
    w: torch.Tensor, args: QuantArgs, up: torch.Tensor | None, low: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = ops.to_rows(w, args.strategy, args.group_size)
    x_max = rows.amax(dim=-1, keepdim=True)
    x_min = rows.amin(dim=-1, keepdim=True)
    if up is not None:
        x_max = torch.sigmoid(up) * x_max
        x_min = torch.sigmoid(low) * x_min
    scale, zero = ops.compute_qparams(x_min, x_max, args.num_bits, args.symmetric)
    return rows, scale, zero


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, args: QuantArgs) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight ``[out, in]`` (no learnable clipping)."""
    return _quantize_with(weight, args, None, None)


def _quantize_with(
    weight: torch.Tensor, args: QuantArgs, up: torch.Tensor | None, low: torch.Tensor | None
) -> QuantizedWeight:
    if weight.dim() != 2:
        raise ConfigError(f"expected a weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.float()
    rows, scale, zero = _weight_qparams(w, args, up, low)
    q = ops.quantize_to_int(rows, scale, zero, args.num_bits)
    deq = ops.dequantize(q, scale, zero, dtype=weight.dtype).reshape(weight.shape)
    shape = _export_shape(tuple(weight.shape), args)
    return QuantizedWeight(
        deq, q.reshape(weight.shape), scale.reshape(shape), zero.reshape(shape).to(torch.int8)
    )


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight ``[out, in]`` for ``args``; with ``lwc`` learns its clip range."""

    def __init__(self, args: QuantArgs, shape: tuple[int, int], lwc: bool = False) -> None:
        super().__init__()
        if args.dynamic:
            raise ConfigError("weights are quantized statically; set dynamic: false for weights")
        self.args = args
        self.shape = tuple(shape)
        self.enabled = True
        rows = _num_rows(self.shape, args)
        if lwc:
            self.upbound_factor = nn.Parameter(torch.full((rows, 1), LWC_INIT))
            self.lowbound_factor = nn.Parameter(torch.full((rows, 1), LWC_INIT))
        else:
            self.upbound_factor = None
            self.lowbound_factor = None

    @property
    def lwc(self) -> bool:
        return self.upbound_factor is not None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        a = self.args
        w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        rows, scale, zero = _weight_qparams(w, a, self.upbound_factor, self.lowbound_factor)
        out = ops.fake_quantize(rows, scale, zero, a.num_bits, a.symmetric)
        return out.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Integer codes, scale and zero of ``weight`` with the learned clipping, for export."""
        return _quantize_with(weight, self.args, self.upbound_factor, self.lowbound_factor)

    def extra_repr(self) -> str:
        a = self.args
        return (
            f"bits={a.num_bits}, sym={a.symmetric}, {a.strategy.value}, lwc={self.lwc}, "
            f"enabled={self.enabled}"
        )


class ActQuantizer(nn.Module):
    """Fake-quantizes activations ``[..., features]``.

    Dynamic (the default in every preset): the range comes from each token (or each group of a
    token) at run time, as vLLM does. Static: one per-tensor range recorded while
    ``observing`` is true (inputs then pass through unquantized), frozen afterwards.
    """

    def __init__(self, args: QuantArgs) -> None:
        super().__init__()
        if not args.dynamic and args.strategy is not Strategy.TENSOR:
            raise ConfigError(
                f"static activation quantization supports strategy 'tensor' only, got "
                f"{args.strategy.value!r}; use dynamic: true for per-token ranges"
            )
        if args.dynamic and args.strategy is Strategy.CHANNEL:
            raise ConfigError("activations cannot be quantized per channel; use 'token'")
        self.args = args
        self.enabled = True
        self.observing = False
        self.register_buffer("x_min", torch.full((1,), float("inf")))
        self.register_buffer("x_max", torch.full((1,), float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        a = self.args
        if a.dynamic:
            return ops.fake_quantize_dynamic(x, a)
        if self.observing:
            with torch.no_grad():
                self.x_min.copy_(torch.minimum(self.x_min, x.detach().amin().float()))
                self.x_max.copy_(torch.maximum(self.x_max, x.detach().amax().float()))
            return x
        if not torch.isfinite(self.x_min).all():
            raise CalibrationError(
                "static activation quantizer has no recorded range; run calibration inputs "
                "with observing=True first"
            )
        scale, zero = ops.compute_qparams(self.x_min, self.x_max, a.num_bits, a.symmetric)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return ops.fake_quantize(xf, scale, zero, a.num_bits, a.symmetric).to(x.dtype)

    def extra_repr(self) -> str:
        a = self.args
        kind = "dynamic" if a.dynamic else "static"
        return f"bits={a.num_bits}, sym={a.symmetric}, {kind} {a.strategy.value}, enabled={self.enabled}"


def lwc_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every LWC clip factor under ``module`` (for its own optimizer group, lr 1e-2 in Q-realign)."""
    return [
        p
        for m in module.modules()
        if isinstance(m, WeightQuantizer) and m.lwc
        for p in (m.upbound_factor, m.lowbound_factor)
    ]
