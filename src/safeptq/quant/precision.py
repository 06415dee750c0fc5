"""Numeric precision of the training matmuls, separate from the precision of what is learned.

The calibration engines keep every learnable quantization parameter (clipping factors, smoothing
scales, rotations) and every optimizer state in float32. What ``precision`` changes is only how
the matrix products of the forward and backward passes run:

- ``fp32``: plain float32 (the CPU default, and what every organism figure was measured with);
- ``tf32``: float32 tensors, TensorFloat-32 matrix products on CUDA (10-bit mantissa inputs,
  float32 accumulation); identical to ``fp32`` on a CPU;
- ``bf16``: :func:`torch.autocast` to bfloat16 around the forward pass: matrix products and
  attention in bfloat16 with float32 accumulation, element-wise work (quantizers, norms, losses)
  in float32. Frozen weights may then stay in bfloat16 too (the end-to-end engine keeps them so).

``auto`` = ``bf16`` on CUDA, ``fp32`` elsewhere. A CPU bf16 autocast works but is slow on most
CPUs; it exists so the accuracy of the GPU setting can be measured on the organism without one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from safeptq.errors import ConfigError

__all__ = ["PRECISIONS", "resolve_precision", "step_precision", "forward_precision", "is_low_precision",
           "native_bf16", "matmul_gflops"]

PRECISIONS = ("fp32", "tf32", "bf16")


def resolve_precision(name: str | None, device: torch.device | str) -> str:
    """``auto``/None → ``bf16`` on CUDA, ``fp32`` elsewhere; anything else must be in :data:`PRECISIONS`."""
    dev = torch.device(device)
    if name in (None, "auto"):
        return "bf16" if dev.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)} or auto")
    return name


def native_bf16() -> bool:
    """Whether bfloat16 matrix products run in hardware here: CUDA, or a CPU with AVX512-BF16 / AMX units.

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is true on any AVX512 CPU, where
    it emulates bfloat16: an Ice Lake Xeon ran bf16 autocast 3.9x slower than float32, an AVX2-only EPYC
    6-8x (``benchmarks/cpu_precision.py``). So on Linux the CPU's own flags decide; elsewhere oneDNN's.
    """
    if torch.cuda.is_available():
        return True
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The x86 feature flags the kernel reports, or None where there is no such file (macOS, Windows, ARM)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def matmul_gflops(bf16: bool = False, tokens: int = 2048, reps: int = 5) -> float:
    """This CPU's rate (GFLOP/s, the current torch thread count) on one linear layer of the 135M model's MLP shape
    ([tokens x 576] x [576 x 1536]), float32 or under bf16 autocast: the best of ``reps`` timed calls after one
    warm-up, a fraction of a second. What ``safeptq demo`` scales its time estimates by."""
    import time

    x, w = torch.randn(tokens, 576), torch.randn(1536, 576)
    best = float("inf")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(reps + 1):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if i:
                best = min(best, time.perf_counter() - t)
    return 2 * tokens * 576 * 1536 / best / 1e9


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


@contextmanager
def step_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Around a whole training step (forward and backward): TensorFloat-32 products for ``tf32``
    on CUDA; nothing otherwise."""
    if precision != "tf32" or torch.device(device).type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextmanager
def forward_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Around the forward pass and the loss only (autocast's rule: the backward runs outside it,
    in the dtypes the forward chose): bfloat16 autocast for ``bf16``; nothing otherwise."""
    if precision != "bf16":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield
