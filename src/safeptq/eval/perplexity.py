"""Strided perplexity over a long text (WikiText-2): non-overlapping windows of ``context_length``
tokens by default; with ``stride < context_length`` each window scores only its last ``stride``
tokens and sees the rest as context (the standard sliding-window evaluation).

The 95% interval resamples whole windows (percentile bootstrap of the pooled per-token NLL), so it
reflects how much the figure depends on which stretches of text were scored; the per-window NLLs
are kept so that two models scored on the same windows can be compared pairwise."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, context_length: int = 512, stride: int | None = None,
               max_windows: int | None = None, batch_size: int = 4, progress: bool = True) -> dict:
    stride = stride or context_length
    if not 0 < stride <= context_length:
        from ..errors import ConfigError
        raise ConfigError(f"stride {stride} must be in 1..context_length ({context_length})")
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    starts = list(range(0, max(len(ids) - context_length, 0) + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    win_nll: list[float] = []
    win_n: list[int] = []
    for s in tqdm(range(0, len(starts), batch_size), desc="perplexity", disable=not progress, unit="batch"):
        group = starts[s:s + batch_size]
        x = torch.stack([ids[a:a + context_length] for a in group]).to(device)
        logits = model(input_ids=x).logits.float()
        lp = F.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
        for i, a in enumerate(group):
            # the first window scores every token; later ones only their new `stride` tokens
            keep = lp[i] if a == 0 else lp[i, -stride:]
            win_nll.append(-keep.sum().item())
            win_n.append(keep.numel())
    count = sum(win_n)
    return {"perplexity": round(math.exp(sum(win_nll) / max(count, 1)), 4),
            "ci95": window_bootstrap_ci(win_nll, win_n), "context_length": context_length,
            "stride": stride, "windows": len(starts), "tokens_scored": count,
            "window_nll": [round(v / n, 5) for v, n in zip(win_nll, win_n)]}


def window_bootstrap_ci(win_nll, win_n, n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """95% percentile-bootstrap interval of the perplexity, resampling windows (sums of NLL and
    token counts per window)."""
    if len(win_nll) < 2:
        return None
    nll, n = np.asarray(win_nll, dtype=float), np.asarray(win_n, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(nll), size=(n_boot, len(nll)))
    ppl = np.exp(nll[idx].sum(1) / n[idx].sum(1))
    lo, hi = np.quantile(ppl, [0.025, 0.975])
    return [round(float(lo), 4), round(float(hi), 4)]


def paired_perplexity(nll_a, nll_b, n_boot: int = 5000, seed: int = 0) -> dict:
    """Perplexity of ``b`` minus that of ``a`` scored on the same windows (per-window mean NLLs, windows weighted
    alike: equal for the non-overlapping windows of the GPTQ convention), with a 95% paired-bootstrap interval that
    resamples windows for both models together."""
    a, b = np.asarray(nll_a, dtype=float), np.asarray(nll_b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired windows must have the same non-zero count, got {a.size} and {b.size}")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    diffs = np.exp(b[idx].mean(1)) - np.exp(a[idx].mean(1))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    pa, pb = math.exp(a.mean()), math.exp(b.mean())
    return {"a": round(pa, 4), "b": round(pb, 4), "diff": round(pb - pa, 4), "ci95": [round(float(lo), 4),
            round(float(hi), 4)], "n": int(a.size)}
