"""Float32 against bfloat16 matrix products on this machine's CPU (BENCHMARKS.md, "Demo"): why the organism trains
in float32 where the CPU has no bfloat16 units. A linear layer of the 135M model's MLP shape, forward only.

Usage: python benchmarks/cpu_precision.py [--threads N] [--tokens T]
"""

import argparse

import torch

from safeptq.quant.precision import matmul_gflops, native_bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fp32, bf16 = matmul_gflops(False, a.tokens, a.reps), matmul_gflops(True, a.tokens, a.reps)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {native_bf16()}, "
          f"{a.threads} threads: fp32 {fp32:.1f} GFLOP/s, bf16 autocast {bf16:.1f} GFLOP/s ({fp32 / bf16:.1f}x)")


if __name__ == "__main__":
    main()
