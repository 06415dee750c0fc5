"""Separability of malicious and benign prompts, layer by layer (Q-realign's analysis).

For states [L, N, H] of one model and a set of probes (fitted on this model or on another one,
typically the aligned model) each layer gets: the probes' accuracy, the mean probe margin of
malicious and of benign prompts, and the Fisher ratio of the two classes along the probe
direction, ``(μ₁ − μ₀)² / (σ₁² + σ₀²)``.
"""

from __future__ import annotations

import torch

from safeptq.probes.probes import LayerProbes

__all__ = ["separability", "summarize"]


def separability(states: torch.Tensor, labels: torch.Tensor, probes: LayerProbes) -> dict[str, list[float]]:
    if states.shape[0] != probes.n_layers:
        raise ValueError(f"states cover {states.shape[0]} layers, probes {probes.n_layers}")
    z = probes.logits(states)  # [L, N]
    mal = labels.bool()
    zm, zb = z[:, mal], z[:, ~mal]
    acc = ((z > 0) == mal[None]).float().mean(1)
    fisher = (zm.mean(1) - zb.mean(1)) ** 2 / (zm.var(1) + zb.var(1)).clamp(min=1e-12)
    return {"accuracy": acc.tolist(), "margin_malicious": zm.mean(1).tolist(), "margin_benign": zb.mean(1).tolist(),
            "fisher": fisher.tolist(), "malicious_on_malicious_side": (zm > 0).float().mean(1).tolist()}


def summarize(sep: dict[str, list[float]], from_layer: int = 0) -> dict[str, float]:
    """Means over layers ``from_layer``… (the late layers are where refusal is decided)."""
    return {k: float(sum(v[from_layer:]) / max(1, len(v[from_layer:]))) for k, v in sep.items()}
