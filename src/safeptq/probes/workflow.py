"""Probes as a reusable artefact: fit once per (model, data, settings), cache on disk, reuse.

The cache key hashes the model's content identity (its weight and config bytes), the prompt
sets, the token budget, the chat flag and the regularisation, so a retrained model or another split
never picks up stale probes. Cached probes live under ``$SAFEPTQ_HOME/probes/<key>/``,
written atomically; an entry that cannot be read is rebuilt with a warning.
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

def model_fingerprint(path: str | Path) -> str:
    """The model's content identity (:func:`safeptq.identity.model_identity`)."""
    from safeptq.identity import model_identity

    return model_identity(path)


class ProbeSpec(dict):
    """The settings that define a set of probes (also their cache key)."""

    def __init__(self, harmful: str = "advbench:calib", benign: str = "alpaca:calib", limit: int | None = None,
                 seqlen: int = 128, chat: bool = True, C: float = 1.0, seed: int = 0, fit: str = "standardized") -> None:
        super().__init__(harmful=harmful, benign=benign, limit=limit, seqlen=seqlen, chat=chat, C=C, seed=seed)
        if fit != "standardized":  # only then part of the key: probes cached before the option keep theirs
            self["fit"] = fit

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
            try:
                probes = LayerProbes.load(folder)
                log.info("reusing probes from %s", folder)
                return probes, folder
            except DataError as e:  # ours to rebuild: a half-written or corrupted cache entry
                log.warning("rebuilding the probe cache entry %s (%s)", folder, e)
    texts, labels = labelled_prompts(spec["harmful"], spec["benign"], limit=spec["limit"], data_dir=data_dir)
    if len(texts) < 10:
        raise DataError(f"only {len(texts)} prompts for probe fitting ({spec['harmful']}, {spec['benign']}); need 10+")
    log.info("fitting probes on %s: %d malicious + %d benign prompts", model_path, int(labels.sum()),
             int((1 - labels).sum()))
    states = collect_last_token_states(model, tokenizer, texts, chat=spec["chat"], seqlen=spec["seqlen"],
                                       progress=progress)
    probes = fit_probes(states, labels, C=spec["C"], seed=spec["seed"], fit=spec.get("fit", "standardized"),
                        progress=progress)
    probes.meta.update({"model": str(model_path), "spec": dict(spec)})
    if folder is not None:
        _save_atomic(probes, folder)
    return probes, folder


def _save_atomic(probes: LayerProbes, folder: Path) -> None:
    """Write into a temporary sibling and rename, so a killed run never leaves a half-written entry."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        probes.save(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def separability_of(model, tokenizer, probes: LayerProbes, texts: list[str], labels: torch.Tensor, *,
                    chat: bool = True, seqlen: int = 128, progress: bool = False,
                    return_states: bool = False):
    """Separability (see :func:`safeptq.probes.separability`) of ``model``'s last-token states on
    ``texts`` under ``probes``; with ``return_states`` also the [L, N, H] states."""
    states = collect_last_token_states(model, tokenizer, texts, chat=chat, seqlen=seqlen, progress=progress)
    sep = separability(states, labels, probes)
    return (sep, states) if return_states else sep
