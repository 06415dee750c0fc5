"""Q-realign's per-sample objective: benign → reconstruction, malicious → probe push.

For a malicious sample the state ``h`` of the block's output at the last prompt token is pushed
to the malicious side of that layer's frozen linear probe: ``softplus(margin − (w·h + b))``.
Benign samples keep the full-precision behaviour with the masked MSE. With the defaults
(weight 1, margin 0) this is the authors' loss; the calibration mix (75 % malicious) sets the
balance between the two terms.

``benign_anchor`` (β, 0 = the authors' loss) adds ``β·(s_q − s_fp)²`` to a benign sample's loss,
``s`` being the probe score at its last prompt token in the quantized and full-precision block
output. The MSE averages over every token and channel, so on its own it barely notices a benign
prompt's last token sliding along the (sparse) probe direction; without the anchor the cheapest
way to push malicious prompts across is to shift every prompt, which turns into over-refusal or,
at strong settings, a broken model.

``malicious_target="state"`` (not in the paper) replaces the probe push with a pull of the malicious
prompt's last-token state to the *probe model's own state* on the same prompt (``states``, one row
per calibration sample and layer): ``mean((h − h_aligned)²)``, the benign MSE's units. A probe reads
one sparse direction; a harmful fine-tune also changes what the later computation does with the
state, and pushing along the probe alone can cross it without bringing the refusal back
(BENCHMARKS.md, organism v7). The full state of the aligned model carries both.

Two more targets separate those two readings (issue 21's ablations):
``"state_probe"`` keeps only the state loss's component along the layer's probe direction
``u = w/‖w‖``: ``((h − h_aligned)·u)² / H`` (the state MSE restricted to that one direction);
``"mean_diff"`` pushes along a dense direction instead of the sparse L1 probe — the method passes
probes built from the probe model's mean malicious − mean benign state (:func:`mean_difference_probes`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from safeptq.errors import ConfigError
from safeptq.objectives.base import BlockBatch, BlockObjective, register_objective
from safeptq.objectives.reconstruction import masked_mse

__all__ = ["ProbePush", "MALICIOUS_TARGETS", "STATE_TARGETS", "mean_difference_probes"]

MALICIOUS_TARGETS = ("probe", "state", "state_probe", "mean_diff")
STATE_TARGETS = ("state", "state_probe", "mean_diff")  # need the probe model's own last-token states


class _DirectionProbes:
    """Probes along a dense direction per layer (``coef`` unit rows, ``intercept``, ``meta``)."""

    def __init__(self, coef: torch.Tensor, intercept: torch.Tensor, meta: dict) -> None:
        self.coef, self.intercept, self.meta = coef, intercept, meta

    @property
    def n_layers(self) -> int:
        return self.coef.shape[0]


def mean_difference_probes(states: torch.Tensor, labels: torch.Tensor) -> _DirectionProbes:
    """Per layer, the unit direction from the mean benign to the mean malicious state ``[L, N, H]`` (labels 1 =
    malicious), with its origin at the midpoint of the two means: a dense stand-in for the sparse L1 probe.
    ``meta['median_margin_malicious']`` is where the malicious states sit along it (for ``margin auto``)."""
    mal = labels.bool()
    if mal.all() or not mal.any():
        raise ConfigError("a mean-difference direction needs both malicious and benign states")
    mu_m, mu_b = states[:, mal].mean(1), states[:, ~mal].mean(1)
    d = mu_m - mu_b
    norm = d.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise ConfigError("the malicious and benign mean states coincide on some layer")
    u = d / norm
    b = -(u * (mu_m + mu_b) / 2).sum(-1)
    z = torch.einsum("lnh,lh->ln", states[:, mal], u) + b[:, None]
    return _DirectionProbes(u, b, {"kind": "mean_difference", "median_margin_malicious": z.median(1).values.tolist()})


class ProbePush(BlockObjective):
    """``probes``: a :class:`safeptq.probes.LayerProbes` (or anything with ``coef`` [L, H] and
    ``intercept`` [L] tensors, one row per decoder layer)."""

    name = "realign"

    def __init__(self, probes, probe_weight: float = 1.0, margin: float | str | list[float] = 0.0,
                 benign_anchor: float = 0.0, malicious_target: str = "probe",
                 states: torch.Tensor | None = None) -> None:
        if malicious_target not in MALICIOUS_TARGETS:
            raise ConfigError(f"unknown malicious target {malicious_target!r}; choose one of "
                              f"{', '.join(MALICIOUS_TARGETS)}")
        if malicious_target in ("state", "state_probe") and states is None:
            raise ConfigError(f"malicious target {malicious_target!r} needs the probe model's last-token states")
        self.malicious_target = malicious_target
        self.states = None if states is None else torch.as_tensor(states, dtype=torch.float32)
        if probe_weight < 0:
            raise ConfigError(f"--probe-weight must be non-negative, got {probe_weight}")
        if benign_anchor < 0:
            raise ConfigError(f"--benign-anchor must be non-negative, got {benign_anchor}")
        self.benign_anchor = float(benign_anchor)
        self.coef = torch.as_tensor(probes.coef, dtype=torch.float32)
        self.intercept = torch.as_tensor(probes.intercept, dtype=torch.float32)
        self.probe_weight = probe_weight
        if margin == "auto":
            # per layer: the median score of the probe model's own malicious prompts, i.e. push the
            # states back to where the aligned model keeps them, not just across the boundary
            med = (getattr(probes, "meta", None) or {}).get("median_margin_malicious")
            if not med:
                raise ConfigError("--margin auto needs probes fitted by this version of safeptq "
                                  "(their metadata lacks median_margin_malicious); refit them or give a number")
            margin = [max(0.0, float(m)) for m in med]
        if isinstance(margin, (list, tuple)):
            if len(margin) != self.coef.shape[0]:
                raise ConfigError(f"{len(margin)} margins for {self.coef.shape[0]} probe layers")
        self.margin = margin

    def probe_logit(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """[B] probe score ``w·h + b`` of layer ``layer`` (positive = malicious side)."""
        if layer >= self.coef.shape[0]:
            raise ConfigError(f"no probe for layer {layer}: the probes cover {self.coef.shape[0]} layers")
        w = self.coef[layer].to(h.device, h.dtype)
        return h @ w + self.intercept[layer].to(h.device, h.dtype)

    def __call__(self, batch: BlockBatch) -> torch.Tensor:
        mal = batch.labels.to(batch.output.device) == 1
        loss = masked_mse(batch)
        if self.benign_anchor > 0 and not mal.all():
            drift = self.probe_logit(batch.layer, batch.last_token()) - \
                self.probe_logit(batch.layer, batch.last_token(batch.target))
            loss = loss + torch.where(mal, torch.zeros_like(drift), self.benign_anchor * drift.pow(2))
        if mal.any():
            loss = torch.where(mal, self.probe_weight * self.malicious_loss(batch), loss)
        return loss

    def malicious_loss(self, batch: BlockBatch) -> torch.Tensor:
        """[B] the malicious term of every sample in the batch (the caller keeps the malicious ones)."""
        h = batch.last_token()
        if self.malicious_target in ("state", "state_probe"):
            if batch.rows is None:
                raise ConfigError(f"malicious target {self.malicious_target!r} needs the calibration rows of the batch")
            if batch.layer >= self.states.shape[0]:
                raise ConfigError(f"no probe-model state for layer {batch.layer}")
            ref = self.states[batch.layer, batch.rows.cpu()].to(h.device, h.dtype)
            if self.malicious_target == "state":
                return (h - ref).pow(2).mean(-1)
            w = self.coef[batch.layer].to(h.device, h.dtype)
            if not w.any():
                raise ConfigError(f"the probe of layer {batch.layer} is all zero: no direction to restrict the state to")
            return ((h - ref) @ (w / w.norm())).pow(2) / h.shape[-1]
        m = self.margin[batch.layer] if isinstance(self.margin, (list, tuple)) else self.margin
        return F.softplus(m - self.probe_logit(batch.layer, h))

    def describe(self) -> dict:
        import hashlib

        digest = hashlib.sha256(self.coef.numpy().tobytes() + self.intercept.numpy().tobytes()).hexdigest()[:12]
        out = {"name": self.name, "probe_weight": self.probe_weight, "margin": self.margin,
               "benign_anchor": self.benign_anchor, "malicious_target": getattr(self, "label", self.malicious_target),
               "layers": int(self.coef.shape[0]), "probes_sha": digest}
        if self.states is not None:
            out["states_sha"] = hashlib.sha256(self.states.numpy().tobytes()).hexdigest()[:12]
        return out


register_objective("realign", ProbePush, "Q-realign: MSE on benign rows; malicious last-token states across the probe "
                   "(softplus), to the aligned model's state, its probe component, or across a dense direction")
