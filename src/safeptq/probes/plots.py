"""Separability figures (PNG): per-layer curves for several models on one figure, and a 2-D
projection of last-token states, benign vs malicious, one panel per model."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["plot_layer_curves", "plot_projection"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_curves(results: dict[str, dict[str, list[float]]], out: str | Path, title: str = "") -> Path:
    """``results``: model name → :func:`safeptq.probes.separability` output. Two panels: probe
    accuracy, and mean probe margin (solid malicious, dashed benign)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, (name, sep) in enumerate(results.items()):
        c = f"C{k}"
        layers = range(len(sep["accuracy"]))
        a1.plot(layers, sep["accuracy"], color=c, marker="o", ms=3, label=name)
        a2.plot(layers, sep["margin_malicious"], color=c, label=f"{name}: malicious")
        a2.plot(layers, sep["margin_benign"], color=c, ls="--", label=f"{name}: benign")
    a1.set(xlabel="layer", ylabel="probe accuracy", ylim=(0, 1.05), title="probe accuracy per layer")
    a2.axhline(0, color="grey", lw=0.8)
    a2.set(xlabel="layer", ylabel="mean probe margin  w·h + b", title="malicious (solid) vs benign (dashed)")
    a1.legend(fontsize=8)
    a2.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_projection(states: dict[str, torch.Tensor], labels: torch.Tensor, layer: int, out: str | Path,
                    basis: torch.Tensor | None = None) -> Path:
    """2-D projection of last-token states at ``layer``: ``states`` maps model → [N, H]. The axes
    are the top-2 principal directions of the first model (or ``basis`` [H, 2]) so the panels
    share coordinates and a shift between models is visible."""
    plt = _plt()
    names = list(states)
    first = states[names[0]].double()
    mu = first.mean(0)
    if basis is None:
        _, _, v = torch.pca_lowrank(first - mu, q=2, center=False)
        basis = v[:, :2]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.8), squeeze=False)
    mal = labels.bool()
    for ax, name in zip(axes[0], names):
        p = (states[name].double() - mu) @ basis.double()
        ax.scatter(p[~mal, 0], p[~mal, 1], s=8, alpha=0.6, label="benign")
        ax.scatter(p[mal, 0], p[mal, 1], s=8, alpha=0.6, label="malicious")
        ax.set_title(f"{name} (layer {layer})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
