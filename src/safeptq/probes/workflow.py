"""Probes as a reusable artefact: fit once per (model, data, settings), cache on disk, reuse.

The cache key hashes the model folder's weight files (name, size, modification time), the prompt
sets, the token budget, the chat flag and the regularisation, so a retrained model or another split
never picks up stale probes. Cached probes live under ``$SAFEPTQ_HOME/probes/<key>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from safeptq.errors import DataError
from safeptq.probes.probes import LayerProbes, collect_last_token_states, fit_probes, probe_dataset
from safeptq.probes.separability import separability

__all__ = ["ProbeSpec", "model_fingerprint", "get_probes", "labelled_prompts", "separability_of"]

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def model_fingerprint(path: str | Path) -> str:
    """Short hash of a model folder's (or file's) weights, by name, size and mtime."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES) if p.is_dir() else []
    h = hashlib.sha256(str(p.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class ProbeSpec(dict):
    """The settings that define a set of probes (also their cache key)."""

    def __init__(self, harmful: str = "advbench:calib", benign: str = "alpaca:calib", limit: int | None = None,
                 seqlen: int = 128, chat: bool = True, C: float = 1.0, seed: int = 0) -> None:
        super().__init__(harmful=harmful, benign=benign, limit=limit, seqlen=seqlen, chat=chat, C=C, seed=seed)

    def key(self, model_path: str | Path) -> str:
        blob = json.dumps({"model": model_fingerprint(model_path), **self}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def labelled_prompts(harmful: str, benign: str, *, limit: int | None = None, data_dir=None) -> tuple[list[str], torch.Tensor]:
    """Malicious then benign prompts with labels (1 = malicious)."""
    return probe_dataset(harmful, benign, data_dir=data_dir, limit=limit)


def get_probes(model, tokenizer, model_path: str | Path, spec: ProbeSpec | None = None, *, data_dir=None,
               cache_dir: str | Path | None = None, progress: bool = False) -> tuple[LayerProbes, Path | None]:
    """Probes of ``model`` (loaded from ``model_path``) for ``spec``: from the cache when present,
    else fitted now and cached. ``cache_dir=False``-like empty string disables the cache."""
    from safeptq.paths import safeptq_home

    spec = spec or ProbeSpec()
    folder = None
    if cache_dir != "":
        folder = Path(cache_dir) if cache_dir else safeptq_home() / "probes"
        folder = folder / spec.key(model_path)
        if (folder / "probes.safetensors").is_file():
            log.info("reusing probes from %s", folder)
            return LayerProbes.load(folder), folder
    texts, labels = labelled_prompts(spec["harmful"], spec["benign"], limit=spec["limit"], data_dir=data_dir)
    if len(texts) < 10:
        raise DataError(f"only {len(texts)} prompts for probe fitting ({spec['harmful']}, {spec['benign']}); need 10+")
    log.info("fitting probes on %s: %d malicious + %d benign prompts", model_path, int(labels.sum()),
             int((1 - labels).sum()))
    states = collect_last_token_states(model, tokenizer, texts, chat=spec["chat"], seqlen=spec["seqlen"],
                                       progress=progress)
    probes = fit_probes(states, labels, C=spec["C"], seed=spec["seed"], progress=progress)
    probes.meta.update({"model": str(model_path), "spec": dict(spec)})
    if folder is not None:
        probes.save(folder)
    return probes, folder


def separability_of(model, tokenizer, probes: LayerProbes, texts: list[str], labels: torch.Tensor, *,
                    chat: bool = True, seqlen: int = 128, progress: bool = False,
                    return_states: bool = False):
    """Separability (see :func:`safeptq.probes.separability`) of ``model``'s last-token states on
    ``texts`` under ``probes``; with ``return_states`` also the [L, N, H] states."""
    states = collect_last_token_states(model, tokenizer, texts, chat=chat, seqlen=seqlen, progress=progress)
    sep = separability(states, labels, probes)
    return (sep, states) if return_states else sep
