"""Per-layer linear probes on the residual stream at the last prompt token (Q-realign).

One L1-regularised logistic regression per decoder layer (scikit-learn, C=1; label 1 = malicious), fitted
on the output of that layer. ``fit="standardized"`` (safeptq's default) standardises the features for the
solver (liblinear) and folds the scaling back; ``fit="paper"`` fits the raw states with saga as the authors'
code does, so its L1 penalty favours high-variance coordinates less and low-variance ones more. Either way
the saved probe is ``w·h + b`` on raw states: exactly what the calibration objective evaluates on the
quantized block's output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from safeptq.data.calib import CalibSet, build_calib_set
from safeptq.errors import ConfigError, DataError
from safeptq.quant.rotation import decoder_parts

__all__ = ["LayerProbes", "collect_last_token_states", "last_token_states", "fit_probes", "probe_dataset", "PROBE_FITS"]

log = logging.getLogger(__name__)


def collect_last_token_states(model: nn.Module, tokenizer, texts: list[str], *, chat: bool = True,
                              seqlen: int = 128, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """[L, N, H] float32: the output of every decoder layer at each prompt's last token."""
    calib = build_calib_set(tokenizer, texts, seqlen=seqlen, chat=chat)
    return last_token_states(model, calib, batch_size=batch_size, progress=progress)


@torch.no_grad()
def last_token_states(model: nn.Module, calib: CalibSet, rows: torch.Tensor | None = None, *, batch_size: int = 16,
                      progress: bool = False) -> torch.Tensor:
    """[L, len(rows), H] float32: every decoder layer's output at the last prompt token of the
    calibration samples ``rows`` (default: all).

    Read with forward hooks on the layers (not ``output_hidden_states``, whose last entry has the
    final norm applied), on right-padded batches so the last real token is at a known index.
    """
    from tqdm.auto import tqdm

    _, layers, _, _ = decoder_parts(model)
    rows = torch.arange(len(calib)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    device = next(model.parameters()).device
    n, n_layers = len(rows), len(layers)
    out = torch.zeros(n_layers, n, model.config.hidden_size)
    cur: dict = {}

    def hook(i):
        def fn(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            out[i, cur["pos"]] = h[torch.arange(h.shape[0], device=h.device), cur["last"]].float().cpu()
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for s in tqdm(range(0, n, batch_size), desc="states", disable=not progress, unit="batch"):
            pos = torch.arange(s, min(s + batch_size, n))
            r = rows[pos]
            t = int(calib.attention_mask[r].sum(1).max())
            cur.update(pos=pos, last=calib.last_idx[r].to(device))
            # the decoder body only: the LM head's logits are not needed
            base = getattr(model, "model", model)
            base(input_ids=calib.input_ids[r, :t].to(device), attention_mask=calib.attention_mask[r, :t].to(device),
                 use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


@dataclass
class LayerProbes:
    """``coef`` [L, H] and ``intercept`` [L] of one probe per layer, on raw states."""

    coef: torch.Tensor
    intercept: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.coef.shape[0])

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """[L, N] probe scores ``w·h + b`` of states [L, N, H]."""
        return torch.einsum("lnh,lh->ln", states.float(), self.coef.float()) + self.intercept.float()[:, None]

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"coef": self.coef.contiguous(), "intercept": self.intercept.contiguous()}, str(folder / "probes.safetensors"))
        (folder / "probes.json").write_text(json.dumps(self.meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "LayerProbes":
        from safetensors.torch import load_file

        folder = Path(folder)
        f = folder / "probes.safetensors"
        if not f.is_file():
            raise DataError(f"no probes at {folder} (expected probes.safetensors); fit them with `safeptq probe`")
        try:
            t = load_file(str(f))
            meta = json.loads((folder / "probes.json").read_text()) if (folder / "probes.json").is_file() else {}
            coef, intercept = t["coef"], t["intercept"]
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
            raise DataError(f"probes at {folder} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if coef.ndim != 2 or intercept.shape != coef.shape[:1]:
            raise DataError(f"probes at {folder} have inconsistent shapes {tuple(coef.shape)} / {tuple(intercept.shape)}")
        return cls(coef, intercept, meta)


PROBE_FITS = ("standardized", "paper")


def fit_probes(states: torch.Tensor, labels: torch.Tensor, *, C: float = 1.0, held_out: float = 0.2, seed: int = 0,
               max_iter: int | None = None, fit: str = "standardized", progress: bool = False) -> LayerProbes:
    """Fit one L1 logistic probe per layer on ``states`` [L, N, H] with ``labels`` [N] (1 = malicious).

    A stratified ``held_out`` share is kept aside for the accuracy in ``meta['heldout_accuracy']``;
    the saved probe is then refitted on all samples.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from tqdm.auto import tqdm

    y = labels.numpy().astype(int)
    if len(set(y.tolist())) != 2:
        raise DataError("probes need both malicious (1) and benign (0) prompts")
    if C <= 0:
        raise ConfigError(f"probe C must be positive, got {C}")
    if fit not in PROBE_FITS:
        raise ConfigError(f"unknown probe fit {fit!r}; choose one of {', '.join(PROBE_FITS)}")
    # the authors' code keeps scikit-learn's default iteration cap; liblinear on standardised features converges
    max_iter = max_iter or (100 if fit == "paper" else 1000)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=held_out, stratify=y, random_state=seed) if held_out > 0 else (idx, idx[:0])
    n_layers, _, hidden = states.shape
    coef = torch.zeros(n_layers, hidden)
    intercept = torch.zeros(n_layers)
    acc = []

    def fit_one(x, yy):
        # l1_ratio=1 is the L1 penalty (scikit-learn ≥ 1.8 spelling)
        if fit == "paper":  # raw features, saga: the authors' probes
            clf = LogisticRegression(C=C, l1_ratio=1.0, solver="saga", max_iter=max_iter, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x, yy)
            return clf.coef_[0], clf.intercept_[0]
        sc = StandardScaler().fit(x)
        # liblinear solves these small, wide problems in milliseconds where saga needs seconds and still warns
        clf = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(sc.transform(x), yy)
        w = clf.coef_[0] / sc.scale_
        b = clf.intercept_[0] - float(np.dot(w, sc.mean_))
        return w, b

    for layer in tqdm(range(n_layers), desc="probes", disable=not progress, unit="layer"):
        x = states[layer].double().numpy()
        if len(te):
            w, b = fit_one(x[tr], y[tr])
            acc.append(float(((x[te] @ w + b > 0).astype(int) == y[te]).mean()))
        w, b = fit_one(x, y)
        coef[layer] = torch.from_numpy(w).float()
        intercept[layer] = float(b)
    z = torch.einsum("lnh,lh->ln", states.float(), coef) + intercept[:, None]
    mal = torch.from_numpy(y).bool()
    meta = {"C": C, "penalty": "l1", "solver": "saga" if fit == "paper" else "liblinear", "fit": fit,
            "max_iter": max_iter, "n": int(len(y)), "malicious": int(y.sum()),
            "held_out": held_out, "heldout_accuracy": acc, "seed": seed,
            # where this model keeps its malicious / benign prompts along each probe (``--margin auto``)
            "median_margin_malicious": z[:, mal].median(1).values.tolist(),
            "median_margin_benign": z[:, ~mal].median(1).values.tolist()}
    return LayerProbes(coef, intercept, meta)


def probe_dataset(harmful: str = "advbench:calib", benign: str = "alpaca:calib", data_dir=None,
                  limit: int | None = None) -> tuple[list[str], torch.Tensor]:
    """Prompts and labels for probe fitting (DESIGN.md splits: calibration rows, never evaluation)."""
    from safeptq.data.registry import load_prompt_set

    h = load_prompt_set(harmful, data_dir=data_dir, limit=limit).texts
    b = load_prompt_set(benign, data_dir=data_dir, limit=limit).texts
    return h + b, torch.tensor([1] * len(h) + [0] * len(b))
