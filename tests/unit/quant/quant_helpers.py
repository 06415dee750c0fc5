"""Helpers shared by the quant unit tests (imported by name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


def ids(vocab: int = 256, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.double()


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    ref, out = ref.double(), out.double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


VARIANTS = {
    # name: make_tiny_llama kwargs (all with random norm weights, see tests/conftest.py)
    "gqa-tied": dict(heads=4, kv_heads=2, tie=True),
    "mha-untied": dict(heads=4, kv_heads=4, tie=False, seed=1),
    "mqa-tied": dict(heads=4, kv_heads=1, tie=True, seed=2),
}


def smoothing_stats(model, input_ids):
    """Run ``model`` once and return per-layer smoothing statistics."""
    from contextlib import ExitStack

    from safeptq.quant.smoothing import record_smoothing_stats

    with ExitStack() as stack:
        stats = [stack.enter_context(record_smoothing_stats(layer)) for layer in model.model.layers]
        logits(model, input_ids)
    return stats


def random_smoothings(model, input_ids, seed: int = 0, jitter: float = 0.5):
    """SmoothQuant-initialised scales for every layer, then randomly perturbed (far from 1)."""
    from safeptq.quant.smoothing import init_smoothing

    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer, st in zip(model.model.layers, smoothing_stats(model, input_ids)):
        sm = init_smoothing(layer, st)
        with torch.no_grad():
            for p in sm.scales.values():
                p.mul_(torch.exp(jitter * torch.randn(p.shape, generator=gen)))
        out.append(sm)
    return out


def calib_set(n: int = 8, t: int = 16, seed: int = 0):
    """A random calibration set of ``n`` rows of ``t`` tokens (vocabulary 256)."""
    from safeptq.data.calib import CalibSet

    x = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))
    return CalibSet(x, torch.ones_like(x), torch.zeros(n, dtype=torch.long), torch.full((n,), t - 1), ["rand"] * n)


def sharp_llama(seed: int = 0, dtype=torch.float32):
    """Untied tiny Llama with 8x logits: peaked next-token distributions, so top-K KLs are not ~0."""
    from conftest import make_tiny_llama

    m = make_tiny_llama(tie=False, seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(8)
    return m.to(dtype)
