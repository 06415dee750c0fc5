"""Reference distributions for the end-to-end objectives: the top-K log-probabilities of one or
more reference models (AAQ: the instruct and the base model) on every calibration token.

:class:`ReferenceCache` computes them once (batched, no grad) and keeps them on CPU (ids int32,
log-probs float16 by default), so training never needs the reference models resident; it can be
saved to a ``.pt`` file whose fingerprint (model ids, calibration set, K) is checked on load, so a
stale cache is refused instead of silently used. :class:`LiveReferences` runs the models on each
batch instead (same values, for tests and for small models).

Besides the top-K, both store the per-token ``KL_topK(a ‖ b)`` between every ordered pair of
references (``[N, T]`` floats, without and with the tail bin): the bounded AAQ push uses
``KL_topK(base ‖ instruct)`` as its cap. Building holds every reference's logits for one batch at once:
``n_refs × batch_size × T × vocab × 4`` bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from safeptq.data.calib import CalibSet
from safeptq.errors import ConfigError, DataError
from safeptq.objectives.kl import RefBatch, TopK, check_k, kl_topk_per_token, topk_reference

__all__ = ["References", "ReferenceCache", "LiveReferences", "calib_digest", "model_id", "STORAGE_DTYPES"]

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FORMAT = "safeptq-reference-cache/1"


def calib_digest(calib: CalibSet) -> str:
    """A short hash of the calibration token ids and mask."""
    h = hashlib.sha256()
    h.update(str(tuple(calib.input_ids.shape)).encode())
    h.update(calib.input_ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(calib.attention_mask.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _content_checksum(blob: dict) -> str:
    """SHA-256 over a cache's tensors (names, shapes, bytes), stored in the file and verified on load."""
    h = hashlib.sha256()
    for n in sorted(blob["topk"]):
        for part in ("indices", "logp"):
            t = blob["topk"][n][part].contiguous()
            h.update(f"{n}/{part}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    for key in sorted(blob["cross_kl"]):
        t = blob["cross_kl"][key].contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_id(model: nn.Module) -> str:
    """The model's path or hub id as loaded (``config._name_or_path``), or ``"<in-memory>"``."""
    return getattr(getattr(model, "config", None), "_name_or_path", "") or "<in-memory>"


class References:
    """Base class: ``batch(index, input_ids)`` → :class:`RefBatch` for calibration rows ``index``."""

    k: int
    model_ids: dict[str, str]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.model_ids)

    def batch(self, index: torch.Tensor, input_ids: torch.Tensor) -> RefBatch:  # pragma: no cover - interface
        raise NotImplementedError

    def check_calib(self, calib: CalibSet) -> None:
        """Raise unless these references were computed on ``calib`` (no-op for live ones)."""

    def describe(self) -> dict:
        """What the values depend on (also part of the end-to-end checkpoint fingerprint)."""
        return {"k": self.k, "models": dict(self.model_ids)}


def _check_models(models: Mapping[str, nn.Module]) -> None:
    if not models:
        raise ConfigError("no reference model given")


@torch.no_grad()
def _reference_batch(models: Mapping[str, nn.Module], input_ids: torch.Tensor,
                     k: int) -> tuple[dict[str, TopK], dict[tuple[str, str, bool], torch.Tensor]]:
    """Top-K of each model and per-token cross KLs for one batch (all on CPU, float32)."""
    logits, topk = {}, {}
    for name, m in models.items():
        dev = next(m.parameters()).device
        lg = m(input_ids=input_ids.to(dev), use_cache=False).logits.float()
        logits[name] = lg
        topk[name] = topk_reference(lg, k)
    cross = {}
    for a in models:
        for b in models:
            if a != b:
                t = topk[a]
                dev = logits[b].device
                for tail in (False, True):
                    cross[(a, b, tail)] = kl_topk_per_token(t.indices.to(dev), t.logp.to(dev), logits[b], tail).cpu()
    return {n: TopK(t.indices.cpu(), t.logp.cpu()) for n, t in topk.items()}, cross


class ReferenceCache(References):
    """Top-K ``[N, T, K]`` (ids int32, log-probs ``dtype``) of each reference over a calibration set."""

    def __init__(self, topk: dict[str, TopK], cross_kl: dict[tuple[str, str, bool], torch.Tensor], k: int,
                 model_ids: Mapping[str, str], calib: str) -> None:
        self.topk, self.cross_kl, self.k = topk, cross_kl, k
        self.model_ids, self.calib = dict(model_ids), calib

    @property
    def nbytes(self) -> int:
        ts = [t for tk in self.topk.values() for t in tk] + list(self.cross_kl.values())
        return sum(t.numel() * t.element_size() for t in ts)

    @classmethod
    def build(cls, models: Mapping[str, nn.Module], calib: CalibSet, k: int, *,
              model_ids: Mapping[str, str] | None = None, batch_size: int = 4,
              dtype: torch.dtype = torch.float16, progress: bool = True,
              path: str | Path | None = None) -> ReferenceCache:
        """Run every model over ``calib`` once. ``model_ids`` (default: each model's path) go
        into the fingerprint; ``path`` also saves the cache there."""
        from tqdm.auto import tqdm

        _check_models(models)
        check_k(k)
        if dtype not in STORAGE_DTYPES:
            raise ConfigError(f"reference log-probs can be stored as {[str(d) for d in STORAGE_DTYPES]}, not {dtype}")
        if batch_size <= 0:
            raise ConfigError(f"reference batch size must be positive, got {batch_size}")
        ids = model_ids or {n: model_id(m) for n, m in models.items()}
        if set(ids) != set(models):
            raise ConfigError(f"model_ids name {sorted(ids)} but the models are {sorted(models)}")
        n, t = calib.input_ids.shape
        topk: dict[str, TopK] = {}
        cross = {(a, b, tail): torch.zeros(n, t) for a in models for b in models if a != b for tail in (False, True)}
        bar = tqdm(total=n, desc="reference top-k", unit="sample", disable=not progress)
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            tk, cr = _reference_batch(models, calib.input_ids[rows], k)
            widths = {name: v.indices.shape[-1] for name, v in tk.items()}
            if len(set(widths.values())) > 1:
                raise ConfigError(f"the references keep different numbers of entries {widths} (K capped at each "
                                  "vocabulary); all references must share the tokenizer")
            for name, v in tk.items():
                if name not in topk:
                    width = v.indices.shape[-1]
                    topk[name] = TopK(torch.zeros(n, t, width, dtype=torch.int32), torch.zeros(n, t, width, dtype=dtype))
                topk[name].indices[rows] = v.indices.to(torch.int32)
                topk[name].logp[rows] = v.logp.to(dtype)
            for pair, v in cr.items():
                cross[pair][rows] = v
            bar.update(rows.stop - rows.start)
        bar.close()
        cache = cls(topk, cross, k, {n: ids[n] for n in models}, calib_digest(calib))
        if path is not None:
            cache.save(path)
        return cache

    # -- persistence ---------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return {"models": dict(self.model_ids), "k": self.k, "calib": self.calib}

    def save(self, path: str | Path) -> Path:
        from safeptq.runs import save_torch_atomic

        path = Path(path)
        blob = {"format": _FORMAT, "fingerprint": self.fingerprint(),
                "topk": {n: {"indices": t.indices, "logp": t.logp} for n, t in self.topk.items()},
                "cross_kl": {f"{a}\t{b}\t{int(tail)}": v for (a, b, tail), v in self.cross_kl.items()}}
        blob["checksum"] = _content_checksum(blob)
        return save_torch_atomic(blob, path)

    @classmethod
    def load(cls, path: str | Path, calib: CalibSet, k: int, model_ids: Mapping[str, str]) -> ReferenceCache:
        """Load a cache and refuse it unless it was built for these models, ``calib`` and ``k``."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"reference cache {path} does not exist")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
            raise DataError(f"reference cache {path} is unreadable ({type(e).__name__}: {e})") from e
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise DataError(f"{path} is not a safeptq reference cache")
        if blob.get("checksum") != _content_checksum(blob):
            raise DataError(f"reference cache {path} is corrupted (its content does not match its checksum)")
        fp = blob["fingerprint"]
        stale = f"reference cache {path} is stale:"
        if fp["k"] != k:
            raise ConfigError(f"{stale} it holds the top-{fp['k']} log-probs but K={k} was asked; delete it to rebuild")
        if fp["calib"] != calib_digest(calib):
            raise ConfigError(f"{stale} it was built on another calibration set (samples, seqlen or order differ); "
                              "delete it to rebuild")
        if fp["models"] != dict(model_ids):
            raise ConfigError(f"{stale} it was built for models {fp['models']}, not {dict(model_ids)}; "
                              "delete it to rebuild")
        topk = {n: TopK(d["indices"], d["logp"]) for n, d in blob["topk"].items()}
        cross = {}
        for key, v in blob["cross_kl"].items():
            a, b, tail = key.split("\t")
            cross[(a, b, tail == "1")] = v
        return cls(topk, cross, fp["k"], fp["models"], fp["calib"])

    @classmethod
    def load_or_build(cls, path: str | Path, calib: CalibSet, k: int, model_ids: Mapping[str, str],
                      load_models: Callable[[], Mapping[str, nn.Module]], **build_kw) -> ReferenceCache:
        """Load ``path`` if it exists (refusing a stale one), else load the models, build and save."""
        if Path(path).is_file():
            return cls.load(path, calib, k, model_ids)
        return cls.build(load_models(), calib, k, model_ids=model_ids, path=path, **build_kw)

    # -- use -----------------------------------------------------------------------------------------
    def check_calib(self, calib: CalibSet) -> None:
        if calib_digest(calib) != self.calib:
            raise ConfigError("the reference cache was built on another calibration set than the one being used; "
                              "rebuild it")

    def batch(self, index: torch.Tensor, input_ids: torch.Tensor | None = None) -> RefBatch:
        return RefBatch({n: TopK(t.indices[index], t.logp[index]) for n, t in self.topk.items()},
                        {p: v[index] for p, v in self.cross_kl.items()})


class LiveReferences(References):
    """Uncached: the reference models compute their top-K on each batch (they stay resident).

    Never pass the model being quantized itself: it changes while calibrating. Use a copy, or a
    :class:`ReferenceCache` built before calibrating.
    """

    def __init__(self, models: Mapping[str, nn.Module], k: int, *, model_ids: Mapping[str, str] | None = None) -> None:
        _check_models(models)
        self.models, self.k = dict(models), check_k(k)
        self.model_ids = dict(model_ids or {n: model_id(m) for n, m in models.items()})
        if set(self.model_ids) != set(self.models):
            raise ConfigError(f"model_ids name {sorted(self.model_ids)} but the models are {sorted(self.models)}")

    def batch(self, index: torch.Tensor, input_ids: torch.Tensor) -> RefBatch:
        topk, cross = _reference_batch(self.models, input_ids, self.k)
        return RefBatch(topk, cross)
