"""Recover and check the integer grid of a fake-quantized weight; pure tensor functions.

A fake-quantized weight ``W = (q - zero) * scale`` does not carry its scale. Re-running min-max
on ``W`` gives it back only for asymmetric schemes: symmetric min-max sets
``scale = absmax / ((qmax - qmin) / 2)`` (``absmax / 7.5`` for int4), so the largest code is
``qmax`` or ``qmin`` and the dequantized absmax is ``7 * scale`` or ``8 * scale``; min-max on it
yields a different scale. :func:`recover_qparams` therefore tries min-max first and then, row
by row (a row = one scale), ``scale = absmax / k`` for ``k = |qmin|, qmax, qmax - 1, ...``, and
keeps for each row the first candidate that reproduces it.

"Reproduces" means ``|W - (q - zero) * scale| <= 1e-3 * scale + 2 * eps(dtype) * |W|``: a weight
off the grid is off by up to half a step, far above that, while a half-precision weight rounded
from a grid point is within one unit in the last place.
"""

from __future__ import annotations

import torch

from safeptq.errors import ExportError
from safeptq.quant import ops
from safeptq.quant.args import QuantArgs
from safeptq.quant.quantizer import QuantizedWeight, quantize_weight

__all__ = ["GRID_TOL", "grid_error", "check_qparams", "recover_qparams"]

GRID_TOL = 1e-3
"""Allowed distance from the grid, in units of the step (``scale``), on top of dtype rounding."""


def _tolerance(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return GRID_TOL * scale + 2 * eps * w.abs()


def _row_excess(
    rows: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Per row, max of ``|rows - deq| / tolerance`` (≤ 1 means on the grid)."""
    err = (rows - deq).abs()
    return (err / _tolerance(rows, scale, dtype)).amax(dim=-1)


def grid_error(weight: torch.Tensor, qw: QuantizedWeight, args: QuantArgs) -> float:
    """Largest ``|W - (q - zero) * scale|`` in units of ``scale``."""
    rows = ops.to_rows(weight.float(), args.strategy, args.group_size)
    scale = qw.scale.float().reshape(rows.shape[0], 1)
    zero = qw.zero.float().reshape(rows.shape[0], 1)
    q = qw.q.float().reshape(rows.shape)
    return ((rows - (q - zero) * scale).abs() / scale).max().item()


def check_qparams(name: str, weight: torch.Tensor, qw: QuantizedWeight, args: QuantArgs) -> None:
    """Raise :class:`ExportError` naming ``name`` unless ``(q - zero) * scale`` reproduces ``weight``."""
    rows = ops.to_rows(weight.float(), args.strategy, args.group_size)
    n = rows.shape[0]
    if qw.scale.numel() != n or qw.q.shape != weight.shape:
        raise ExportError(
            f"layer {name!r}: qparams do not fit the weight {tuple(weight.shape)} under "
            f"{args.strategy.value} quantization (scale {tuple(qw.scale.shape)}, q {tuple(qw.q.shape)})"
        )
    scale = qw.scale.float().reshape(n, 1)
    deq = (qw.q.float().reshape(rows.shape) - qw.zero.float().reshape(n, 1)) * scale
    excess = _row_excess(rows, deq, scale, weight.dtype)
    if bool((excess > 1).any()):
        raise ExportError(
            f"layer {name!r}: the stored weight is not (q - zero) * scale of the given qparams "
            f"(max error {grid_error(weight, qw, args):.3g} steps); export the weights the "
            "quantizer produced, or pass qparams from the same quantizer"
        )


@torch.no_grad()
def recover_qparams(name: str, weight: torch.Tensor, args: QuantArgs) -> QuantizedWeight:
    """Scale/zero/codes that reproduce the fake-quantized ``weight`` (see module docstring).

    Raises :class:`ExportError` naming ``name`` when some row is on no grid tried.
    """
    base = quantize_weight(weight, args)  # min-max; validates the shape/strategy too
    rows = ops.to_rows(weight.float(), args.strategy, args.group_size)
    n = rows.shape[0]
    scale = base.scale.float().reshape(n, 1).clone()
    zero = base.zero.float().reshape(n, 1).clone()
    q = base.q.float().reshape(rows.shape).clone()
    ok = _row_excess(rows, (q - zero) * scale, scale, weight.dtype) <= 1
    if args.symmetric and not bool(ok.all()):
        absmax = rows.abs().amax(dim=-1, keepdim=True)
        qmin, qmax = ops.qrange(args.num_bits)
        for k in [-qmin, *range(qmax, 0, -1)]:
            todo = ~ok
            if not bool(todo.any()):
                break
            s = (absmax[todo] / k).clamp(min=ops.SCALE_MIN)
            qk = ops.quantize_to_int(rows[todo], s, None, args.num_bits).float()
            good = _row_excess(rows[todo], qk * s, s, weight.dtype) <= 1
            idx = todo.nonzero().squeeze(-1)[good]
            scale[idx], q[idx], zero[idx] = s[good], qk[good], 0.0
            ok[idx] = True
    if not bool(ok.all()):
        bad = int((~ok).sum())
        raise ExportError(
            f"layer {name!r}: weights are not on a {args.num_bits}-bit "
            f"{'symmetric' if args.symmetric else 'asymmetric'} {args.strategy.value} grid "
            f"({bad} of {n} scale rows off the grid, max error "
            f"{(rows - (q - zero) * scale).abs().div(scale).max().item():.3g} steps); quantize "
            "and fold this layer first, or pass its qparams explicitly"
        )
    deq = ((q - zero) * scale).reshape(weight.shape).to(weight.dtype)
    return QuantizedWeight(
        deq, q.reshape(weight.shape).to(torch.int8), scale.reshape(base.scale.shape),
        zero.reshape(base.zero.shape).to(torch.int8),
    )
