"""Helpers shared by the export unit tests (imported by name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from safeptq.export import quantized_linears
from safeptq.quant.args import Scheme
from safeptq.quant.quantizer import QuantizedWeight, quantize_weight


@torch.no_grad()
def fake_quantize_model(model, scheme: Scheme) -> dict[str, QuantizedWeight]:
    """Replace every decoder linear's weight by its RTN quantize-dequantize; return the qparams."""
    qparams = {}
    for name, lin in quantized_linears(model).items():
        qw = quantize_weight(lin.weight, scheme.weights)
        lin.weight.copy_(qw.dequantized)
        qparams[name] = qw
    return qparams


def ids(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
