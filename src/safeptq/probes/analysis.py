"""Separability analysis (``safeptq probe`` / ``safeptq.probe``): fit per-layer probes on one
model, apply them to several, and write the per-layer figures, plots and probes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["ProbeOptions", "analyse", "SEPARABILITY_FILE"]

log = logging.getLogger(__name__)

SEPARABILITY_FILE = "separability.json"


@dataclass
class ProbeOptions:
    name: str | None = None  # label of the analysed model (default: its folder name)
    fit_harmful: str = "advbench:calib"
    fit_benign: str = "alpaca:calib"
    fit_limit: int | None = None
    harmful: str = "advbench:eval"
    benign: str = "alpaca:eval"
    limit: int = 100
    seqlen: int = 128
    chat: bool = True
    C: float = 1.0
    layer: int | None = None
    device: str = "auto"
    data_dir: str | None = None
    progress: bool = True

    def check(self) -> None:
        import math

        for name in ("limit", "seqlen", "fit_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"`{name}` must be positive, got {v}")
        if not (math.isfinite(self.C) and self.C > 0):
            raise ConfigError(f"`C` must be a positive number, got {self.C}")


def analyse(model: str, out: str | Path, *, probe_model: str | None = None, probes: str | None = None,
            compare: dict[str, str] | None = None, options: ProbeOptions | None = None) -> dict:
    import torch

    from ..models import load_model
    from ..runs import write_json_atomic
    from . import LayerProbes
    from .plots import plot_layer_curves, plot_projection
    from .workflow import ProbeSpec, get_probes, labelled_prompts, separability_of

    o = options or ProbeOptions()
    o.check()
    t0 = time.time()
    if probes and probe_model:
        raise ConfigError("give either `probes` or `probe_model`, not both")
    main_name = o.name or Path(str(model).rstrip("/")).name or "model"
    models = [(main_name, model)] + list((compare or {}).items())
    if len({n for n, _ in models}) != len(models):
        raise ConfigError(f"model names must be unique: {[n for n, _ in models]}")
    out = Path(out).expanduser()
    texts, labels = labelled_prompts(o.harmful, o.benign, limit=o.limit, data_dir=o.data_dir)
    if probes:
        lp, probe_src = LayerProbes.load(probes), str(probes)
    else:
        src = probe_model or model
        lm = load_model(src, dtype="float32", device=o.device)
        spec = ProbeSpec(o.fit_harmful, o.fit_benign, o.fit_limit, o.seqlen, o.chat, o.C)
        lp, _ = get_probes(lm.model, lm.tokenizer, lm.path, spec, data_dir=o.data_dir, progress=o.progress)
        probe_src = src
        del lm
    layer = o.layer
    if layer is None:
        acc = lp.meta.get("heldout_accuracy") or []
        late = range(lp.n_layers // 3, lp.n_layers)
        layer = max(late, key=lambda i: acc[i] if i < len(acc) else 0.0)
    if not 0 <= layer < lp.n_layers:
        raise ConfigError(f"`layer` must be in [0, {lp.n_layers - 1}], got {layer}")
    out.mkdir(parents=True, exist_ok=True)
    lp.save(out / "probes")
    seps, proj = {}, {}
    for name, spec_ in models:
        log.info("separability of %s (%s)", name, spec_)
        lm = load_model(spec_, dtype="float32", device=o.device)
        sep, states = separability_of(lm.model, lm.tokenizer, lp, texts, labels, chat=o.chat, seqlen=o.seqlen,
                                      progress=o.progress, return_states=True)
        seps[name] = sep
        proj[name] = states[layer]
        del lm
    plot_layer_curves(seps, out / "layers.png", title=f"probes of {probe_src}")
    plot_projection(proj, labels, layer, out / "projection.png")
    torch.save({"labels": labels, "layer": layer, "states": proj}, out / "projection_states.pt")
    doc = {"probe_model": probe_src, "probes": lp.meta,
           "prompts": {"harmful": o.harmful, "benign": o.benign, "limit": o.limit, "n": len(texts)},
           "projection_layer": layer, "models": dict(models), "separability": seps,
           "wall_time_s": round(time.time() - t0, 1)}
    write_json_atomic(out / SEPARABILITY_FILE, doc)
    return doc
