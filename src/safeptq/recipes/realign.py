"""Recipe of Q-realign: the block-wise engine with the probe objective, and its two schedules."""

from __future__ import annotations

import logging
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from .base import BaseRecipe, CalibRecipe, RecipeModel, merge_preset, user_section
from .quantize import BlockTraining

__all__ = ["MALICIOUS_TARGETS", "SCHEDULES", "RealignRecipe", "RealignCalib", "RealignObjective", "ProbeSource"]

log = logging.getLogger(__name__)

MaliciousTarget = Literal["probe", "state", "state_probe", "mean_diff"]
MALICIOUS_TARGETS: tuple[str, ...] = get_args(MaliciousTarget)  # kept equal to objectives.probe_push's (tested)

SCHEDULES: dict[str, dict] = {
    # the authors' code: batch size 1, 5 epochs per block in the first half of the layers, 15 after,
    # AdamW with LWC lr 1e-2 and LET lr 1e-3, the plain softplus(-score) loss, LWC + LET only, probes on raw
    # features fitted with saga
    "paper": {"training": {"epochs": (5, 15), "batch_size": 1, "lr_lwc": 1e-2, "lr_let": 1e-3,
                           "train_norms": False},
              "objective": {"margin": 0.0, "benign_anchor": 0.0, "malicious_target": "probe"},
              "probes": {"fit": "paper"}},
    # the schedule measured on the organism (BENCHMARKS.md, "Q-realign on the organism"). Three batched epochs per
    # block; clipping factors learn 10x faster than the paper's; the RMSNorm gains are trained too (LWC + LET are
    # equivalent transforms and at W8A8 move too little); a malicious prompt's last-token state is pulled to the
    # aligned (probe) model's own state on that prompt (crossing the probe alone did not bring the refusals back)
    # and benign prompts are anchored along the probe so their last token does not drift towards it
    "default": {"training": {"epochs": 3, "batch_size": 4, "lr_lwc": 1e-1, "lr_let": 1e-3, "train_norms": True,
                             "lr_norm": 2e-3},
                "objective": {"margin": "auto", "benign_anchor": 1.0, "malicious_target": "state"}},
}


class RealignCalib(CalibRecipe):
    """Q-realign's calibration: ``malicious_share`` of AdvBench calibration prompts, the rest Alpaca
    (the paper's 3:1, 200 prompts), unless ``data`` names another mix."""

    data: str | None = None
    nsamples: int = Field(200, ge=1)
    malicious_share: float = Field(0.75, gt=0, lt=1)

    @model_validator(mode="after")
    def _derive(self):
        if self.data is None:
            s = self.malicious_share
            object.__setattr__(self, "data", f"advbench:calib={s:g},alpaca:calib={1 - s:g}")
        return self


class ProbeSource(RecipeModel):
    """Where the per-layer probes come from: fitted (and cached) on ``model`` — normally the aligned
    model the fine-tune started from — or loaded from ``path`` (saved by ``safeptq probe``)."""

    model: str | None = None
    path: str | None = None
    C: float = Field(1.0, gt=0)
    fit: Literal["standardized", "paper"] = Field(
        "standardized", description="standardized: features standardised, liblinear (safeptq); paper: raw "
                                    "features, saga, as the authors' code fits them")
    sep_limit: int = Field(100, ge=0, description="held-out prompts per class for separability; 0 skips")

    @model_validator(mode="after")
    def _one_source(self):
        if self.model and self.path:
            raise ValueError("give either `probes.path` or `probes.model`, not both")
        return self


class RealignObjective(RecipeModel):
    probe_weight: float = Field(1.0, ge=0)
    margin: float | Literal["auto"] = 0.0
    benign_anchor: float = Field(0.0, ge=0)
    malicious_target: MaliciousTarget = "probe"

    @field_validator("margin", mode="before")
    @classmethod
    def _margin(cls, v):
        if v == "auto" or isinstance(v, (int, float)):
            return v
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number or 'auto', got {v!r}") from None


class RealignRecipe(BaseRecipe):
    method: Literal["realign"] = "realign"
    schedule: Literal["default", "paper"] = "default"
    probes: ProbeSource = Field(default_factory=ProbeSource)
    objective: RealignObjective = Field(default_factory=RealignObjective)
    calib: RealignCalib = Field(default_factory=RealignCalib)
    training: BlockTraining = Field(default_factory=BlockTraining)

    @model_validator(mode="before")
    @classmethod
    def _schedule(cls, data):
        """Fill what the caller left unset from the schedule; explicit values win."""
        if not isinstance(data, dict):
            return data
        name = data.get("schedule") or "default"
        if name not in SCHEDULES:
            return data  # the Literal check reports it
        target_given = user_section(data, "objective").get("malicious_target") is not None
        data = merge_preset(data, SCHEDULES[name])
        probe_model = user_section(data, "probes").get("model")
        if data["objective"].get("malicious_target") == "state" and not probe_model and not target_given:
            # the schedule's state target needs the aligned model; without one, fall back to the probe push
            log.info("no probe model: malicious prompts are pushed across the probes (malicious_target probe)")
            data["objective"]["malicious_target"] = "probe"
        return data

    @model_validator(mode="after")
    def _state_needs_model(self):
        if self.objective.malicious_target != "probe" and not self.probes.model:
            raise ValueError(f"`objective.malicious_target` {self.objective.malicious_target} needs `probes.model` "
                             "(the aligned model whose "
                             "states are the target)")
        return self
