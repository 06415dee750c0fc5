"""Float32 against bfloat16 matrix products on this machine's CPU (BENCHMARKS.md, "Demo"): why the organism trains
in float32 where the CPU has no bfloat16 units. A linear layer of the 135M model's MLP shape, forward only.

Usage: python benchmarks/cpu_precision.py [--threads N] [--tokens T]
"""

import argparse
import time

import torch

from safeptq.quant.precision import native_bf16


def rate(x: torch.Tensor, w: torch.Tensor, bf16: bool, reps: int) -> float:
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            torch.nn.functional.linear(x, w)

    step()
    t = time.perf_counter()
    for _ in range(reps):
        step()
    return 2 * x.shape[0] * x.shape[1] * w.shape[0] * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x, w = torch.randn(a.tokens, 576), torch.randn(1536, 576)
    fp32, bf16 = rate(x, w, False, a.reps), rate(x, w, True, a.reps)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {native_bf16()}, "
          f"{a.threads} threads: fp32 {fp32:.1f} GFLOP/s, bf16 autocast {bf16:.1f} GFLOP/s ({fp32 / bf16:.1f}x)")


if __name__ == "__main__":
    main()
