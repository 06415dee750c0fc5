"""Pure tensor functions for integer fake quantization; no modules, no state.

Conventions match compressed-tensors so exported codes need no conversion: integer codes are
signed (``[-2^(b-1), 2^(b-1)-1]``) for symmetric and asymmetric schemes alike, the zero-point
lives in that signed domain, zero is always representable, and ``x ≈ (q - zero) * scale``.

Granularity is handled by one trick: every strategy reshapes the tensor into rows that share one
scale (:func:`to_rows`), reduces over the last dim, and reshapes back (:func:`from_rows`).
"""

from __future__ import annotations

import torch

from safeptq.errors import ConfigError
from safeptq.quant.args import QuantArgs, Strategy

__all__ = [
    "SCALE_MIN",
    "round_ste",
    "clamp_ste",
    "qrange",
    "to_rows",
    "from_rows",
    "compute_qparams",
    "fake_quantize",
    "quantize_to_int",
    "dequantize",
    "fake_quantize_dynamic",
]

SCALE_MIN = 1e-8
"""Smallest scale; keeps an all-zero row from dividing by zero."""


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass (straight-through)."""
    return (x.round() - x).detach() + x


def clamp_ste(x: torch.Tensor, lo: float | torch.Tensor, hi: float | torch.Tensor) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient in the backward pass."""
    return (torch.clamp(x, lo, hi) - x).detach() + x


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range ``(qmin, qmax)`` of a ``bits``-bit code."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def to_rows(x: torch.Tensor, strategy: Strategy, group_size: int | None = None) -> torch.Tensor:
    """View ``x`` as 2-D rows that share one scale each.

    tensor → one row; channel → one row per output channel (``x`` is a weight ``[out, in]``);
    group → one row per ``group_size`` consecutive entries of the last dim; token → one row per
    token (all leading dims flattened).
    """
    if strategy is Strategy.TENSOR:
        return x.reshape(1, -1)
    if strategy is Strategy.CHANNEL:
        if x.dim() != 2:
            raise ConfigError(f"per-channel quantization needs a 2-D weight, got shape {tuple(x.shape)}")
        return x
    if strategy is Strategy.GROUP:
        if group_size is None or x.shape[-1] % group_size != 0:
            raise ConfigError(
                f"group_size={group_size} does not divide the last dim {x.shape[-1]} of {tuple(x.shape)}"
            )
        return x.reshape(-1, group_size)
    if strategy is Strategy.TOKEN:
        return x.reshape(-1, x.shape[-1])
    raise ConfigError(f"unsupported strategy {strategy!r}")


def from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_rows`."""
    return rows.reshape(shape)


def compute_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (signed-domain) zero-point from a range, differentiable in ``x_min``/``x_max``.

    The range is first widened to include 0. Symmetric: ``scale = absmax / ((qmax-qmin)/2)``,
    zero 0. Asymmetric: ``scale = (max-min)/(qmax-qmin)``, ``zero = round(qmin - min/scale)``
    with a straight-through round so learnable clipping gets gradients through the zero-point.
    """
    qmin, qmax = qrange(bits)
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    if symmetric:
        absmax = torch.maximum(x_min.abs(), x_max)
        scale = (absmax / ((qmax - qmin) / 2)).clamp(min=SCALE_MIN)
        return scale, torch.zeros_like(scale)
    scale = ((x_max - x_min) / (qmax - qmin)).clamp(min=SCALE_MIN)
    zero = torch.clamp(round_ste(qmin - x_min / scale), qmin, qmax)
    return scale, zero


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    symmetric: bool,
) -> torch.Tensor:
    """Quantize then dequantize, with a straight-through round (``scale``/``zero`` broadcast).

    Codes are clamped with a plain clamp, so entries clipped away get no gradient of their own
    while the scale (and through it LWC factors) still does, as in OmniQuant.
    """
    qmin, qmax = qrange(bits)
    z = 0.0 if symmetric or zero is None else zero
    q = torch.clamp(round_ste(x / scale) + z, qmin, qmax)
    return (q - z) * scale


def quantize_to_int(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Integer codes (``int8`` storage, any ``bits`` ≤ 8) of ``x``, for export."""
    qmin, qmax = qrange(bits)
    z = 0.0 if zero is None else zero
    q = torch.clamp(torch.round(x / scale) + z, qmin, qmax)
    return q.to(torch.int8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Real values ``(q - zero) * scale`` of integer codes."""
    z = 0.0 if zero is None else zero
    return ((q.to(scale.dtype) - z) * scale).to(dtype)


def fake_quantize_dynamic(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Fake-quantize an activation with a range computed from ``x`` itself (dynamic quant).

    ``args.strategy`` token gives one range per token, group one per ``group_size`` slice of each
    token (used for KV heads), tensor one for the whole batch. Computed in float32 at least.
    """
    if args.strategy is Strategy.CHANNEL:
        raise ConfigError("activations cannot be quantized per channel dynamically; use 'token'")
    dtype = x.dtype
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    rows = to_rows(xf, args.strategy, args.group_size)
    scale, zero = compute_qparams(
        rows.amin(dim=-1, keepdim=True), rows.amax(dim=-1, keepdim=True), args.num_bits, args.symmetric
    )
    out = fake_quantize(rows, scale, zero, args.num_bits, args.symmetric)
    return from_rows(out, x.shape).to(dtype)
