"""Recipe of AAQ: the end-to-end engine with the contrastive top-K KL objective, and its presets."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import BaseRecipe, CalibRecipe, RecipeModel, merge_preset, user_section

__all__ = ["AAQ_PRESETS", "AAQRecipe", "AAQObjective", "E2ETraining", "ReferenceSource", "OBJECTIVE_ALIASES"]

log = logging.getLogger(__name__)

AAQ_PRESETS: dict[str, dict] = {
    # the authors' code: plain WikiText-2 text, the unbounded push, the truncated KL over the top-K ids only
    "paper": {"calib": {"data": "wikitext2:calib", "replies": 0},
              "objective": {"lam": 0.1, "push": "unbounded", "tail": False}},
    # measured on the organism (BENCHMARKS.md, "AAQ on organism v7"): half plain text, half benign chat prompts
    # answered by the instruct model itself (WikiText-2 alone keeps perplexity but not the refusals; still no
    # safety data); a bounded push and the tail bin keep the loss a divergence with a floor
    "default": {"calib": {"data": "alpaca:calib=0.5,wikitext2:calib=0.5", "replies": 64},
                "objective": {"lam": 0.1, "push": "bounded", "tau": "ref", "tail": True}},
}

OBJECTIVE_ALIASES = {"contrastive": "contrastive", "contrastive-kl-top": "contrastive", "aaq": "contrastive",
                     "kl-top": "kl_top", "kl_top": "kl_top"}


class AAQObjective(RecipeModel):
    """``contrastive``: KL_topK(instruct ‖ q) − λ·push(base ‖ q); ``kl_top``: the pull term only."""

    kind: Literal["contrastive", "kl_top"] = "contrastive"
    lam: float | None = Field(None, ge=0)
    topk: int = Field(1000, ge=1)
    push: Literal["bounded", "unbounded", "margin"] | None = None
    tau: float | Literal["ref"] | None = None
    tail: bool = True

    @field_validator("kind", mode="before")
    @classmethod
    def _alias(cls, v):
        key = str(v).strip().lower().replace("_", "-")
        return OBJECTIVE_ALIASES.get(key, OBJECTIVE_ALIASES.get(str(v), v))

    @field_validator("tau", mode="before")
    @classmethod
    def _tau(cls, v):
        if v is None or v == "ref":
            return v
        try:
            t = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"must be 'ref' or a positive number of nats, got {v!r}") from None
        if not t > 0:
            raise ValueError(f"must be 'ref' or a positive number of nats, got {v!r}")
        return t

    def formula(self) -> str:
        """The objective as one line, e.g. ``KL_top1000+tail(instruct ‖ q) − 0.1 · min(..., τ)``."""
        kl = f"KL_top{self.topk}" + ("+tail" if self.tail else "")
        pull = f"{kl}(instruct ‖ q)"
        if self.kind == "kl_top":
            return pull
        push = f"{kl}(base ‖ q)"
        if self.push != "unbounded":
            tau = f"{kl}(base ‖ instruct) per token" if self.tau == "ref" else f"{self.tau:g} nats"
            diff = f"{push} − {pull}" if self.push == "margin" else push
            push = f"min({diff}, τ = {tau})"
        return f"{pull} − {self.lam:g} · {push}"


class ReferenceSource(RecipeModel):
    """``cache``: the references' top-K log-probabilities computed once (file ``path``, else
    ``$SAFEPTQ_HOME/references/``); ``live``: instruct and base models resident (memory comparisons)."""

    mode: Literal["cache", "live"] = "cache"
    path: str | None = None

    @model_validator(mode="after")
    def _check(self):
        from pathlib import Path

        if self.path and self.mode == "live":
            raise ValueError("a cache file (`references.path`) and live references (`references.mode`) exclude "
                             "each other; give one")
        if self.path and Path(self.path).expanduser().is_dir():
            raise ValueError(f"`references.path` {self.path} is a folder; give a file path (e.g. refs.pt)")
        return self


class E2ETraining(RecipeModel):
    steps: int = Field(100, ge=0, description="optimizer steps; 0 = no training: the initial transforms (a random "
                       "Hadamard rotation, SmoothQuant smoothing at smooth_alpha) and the weight rounding alone; with "
                       "rotation on, smoothing off and no LWC, the rotation-only (QuaRot-style) baseline")
    batch_size: int = Field(4, ge=1)
    lr_rotation: float = Field(1e-3, gt=0)
    lr_smoothing: float = Field(1e-3, gt=0)
    lr_lwc: float = Field(1e-2, gt=0)
    rotation: Literal["auto", "on", "off"] = "auto"
    smoothing: Literal["auto", "on", "off"] = "auto"
    lwc: bool = True
    smooth_alpha: float = Field(0.5, ge=0, le=1)
    up_down: bool = Field(False, description="also smooth up_proj -> down_proj (OSTQuant's pair)")
    vo_rotation: bool = Field(False, description="learn a rotation of every attention head's values, undone in o_proj")
    online_hadamard: bool = Field(False, description="a random Hadamard on down_proj's input, applied online at run "
                                                     "time (fake-quant schemes; stored with the export)")
    qk_hadamard: bool = Field(False, description="a Hadamard on every head's q and k after RoPE at run time, with "
                                                 "the KV-cache quantization of K there (fake-quant schemes)")
    weights: Literal["auto", "rtn", "gptq"] = "auto"


class AAQCalib(CalibRecipe):
    data: str | None = None
    replies: int = Field(0, ge=0)


class AAQRecipe(BaseRecipe):
    method: Literal["aaq"] = "aaq"
    preset: Literal["default", "paper"] = "default"
    base: str | None = None
    objective: AAQObjective = Field(default_factory=AAQObjective)
    references: ReferenceSource = Field(default_factory=ReferenceSource)
    training: E2ETraining = Field(default_factory=E2ETraining)
    calib: AAQCalib = Field(default_factory=AAQCalib)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        if not isinstance(data, dict):
            return data
        name = data.get("preset") or "default"
        if name not in AAQ_PRESETS:
            return data
        user = user_section(data, "objective")
        data = merge_preset(data, AAQ_PRESETS[name])
        obj = data["objective"]
        kind = OBJECTIVE_ALIASES.get(str(obj.get("kind", "contrastive")).strip().lower().replace("_", "-"))
        if kind == "kl_top":  # the pull term only: no base model, no push
            given = [k for k in ("lam", "push", "tau") if user.get(k) is not None]
            if data.get("base") or given:
                log.warning("%s not used by objective kl_top (it reads the instruct model only)",
                            ", ".join((["base"] if data.get("base") else []) + given))
            data["base"] = None
            data["objective"] = {**obj, "lam": None, "push": None, "tau": None}
        elif obj.get("push") in ("bounded", "margin") and obj.get("tau") is None:
            data["objective"] = {**obj, "tau": "ref"}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.objective.kind == "contrastive":
            if not self.base:
                raise ValueError("`objective.kind` contrastive needs `base`, the pre-trained model the instruct model "
                                 "was tuned from; or use `objective.kind` kl_top (no base model)")
            if self.objective.push == "unbounded" and self.objective.tau not in (None, "ref"):
                log.warning("objective.tau applies to the bounded and margin pushes only; ignored")
        if self.training.weights == "auto":  # gptq, except for KV schemes (llm-compressor's GPTQ has no KV quantizer)
            weights = "rtn" if self.resolved_scheme().kv_cache is not None else "gptq"
            object.__setattr__(self.training, "weights", weights)
        return self
