"""Family x transform table (issue 18): on a tiny random model of every supported family (2 layers,
hidden 64, GQA 4/2 heads of 16, random norm gains and biases; Gemma with one sliding-window layer), the
relative change of the logits (float32) when each equivalent transform is attached and folded, or the
reason it is refused. Usage: python benchmarks/arch_transforms.py  (prints a markdown table)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import FAMILY_CONFIGS, make_tiny_family  # noqa: E402

from safeptq.archs import spec_of_model  # noqa: E402
from safeptq.errors import ConfigError  # noqa: E402
from safeptq.quant.rotation import add_online_hadamard, fuse_residual_rotation, random_hadamard  # noqa: E402
from safeptq.quant.smoothing import LayerGeometry, LayerSmoothing, attach_smoothing, fold_smoothing  # noqa: E402

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits.double()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def smoothing(fam, pair):
    m = make_tiny_family(fam)
    ref = logits(m)
    layer = m.model.layers[0]
    sm = LayerSmoothing(LayerGeometry.of(layer), (pair,))
    with torch.no_grad():
        sm.scales[pair].copy_(0.5 + torch.rand_like(sm.scales[pair]))
    try:
        attach_smoothing(layer, sm)
    except ConfigError:
        return "refused"
    fold_smoothing(layer, sm)
    return f"{rel(logits(m), ref):.1e}"


def rotation(fam):
    m = make_tiny_family(fam)
    ref = logits(m)
    try:
        fuse_residual_rotation(m, random_hadamard(64, seed=1))
    except ConfigError:
        return "refused"
    return f"{rel(logits(m), ref):.1e}"


def hadamard(fam):
    m = make_tiny_family(fam)
    ref = logits(m)
    add_online_hadamard(m)
    return f"{rel(logits(m), ref):.1e}"


def main():
    head = ["family", "LET norm→q,k,v", "LET norm→gate,up", "LET v→o", "LET q·k", "residual rotation",
            "online Hadamard (down_proj)", "why refused"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for fam in FAMILY_CONFIGS:
        spec = spec_of_model(make_tiny_family(fam))
        cells = [smoothing(fam, p) for p in ("attn_in", "mlp_in", "vo", "qk")] + [rotation(fam), hadamard(fam)]
        why = "; ".join(f"{k}: {v}" for k, v in spec.not_equivalent.items()) or "—"
        print("| " + " | ".join([fam, *cells, why]) + " |")


if __name__ == "__main__":
    main()
