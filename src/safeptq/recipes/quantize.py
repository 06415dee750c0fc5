"""Recipe of ``safeptq quantize``: one method (RTN, OmniQuant's block-wise LWC + LET, or an
llm-compressor baseline) and one scheme."""

from __future__ import annotations

import logging

from pydantic import Field, field_validator, model_validator

from .base import BaseRecipe, CalibRecipe, RecipeModel

__all__ = ["BlockTraining", "QuantizeRecipe", "parse_epochs"]

log = logging.getLogger(__name__)


def parse_epochs(value) -> int | tuple[int, int]:
    """``2`` / ``"2"`` → 2; ``"5,15"`` / ``[5, 15]`` → (5, 15) (first half of the blocks, second half)."""
    if isinstance(value, bool):
        raise ValueError(f"must be N or A,B, got {value!r}")
    if isinstance(value, int):
        nums = [value]
    elif isinstance(value, (list, tuple)):
        nums = list(value)
    else:
        try:
            nums = [int(p.strip()) for p in str(value).split(",")]
        except ValueError:
            raise ValueError(f"must be N or A,B (first half, second half of the blocks), got {value!r}") from None
    if len(nums) not in (1, 2) or any(not isinstance(n, int) or n < 0 for n in nums):
        raise ValueError(f"must be N or A,B with non-negative integers, got {value!r}")
    return nums[0] if len(nums) == 1 else (nums[0], nums[1])


class BlockTraining(RecipeModel):
    """The block-wise engine's schedule (OmniQuant's learning rates by default)."""

    epochs: int | tuple[int, int] = 2
    batch_size: int = Field(4, ge=1)
    lr_lwc: float = Field(1e-2, gt=0)
    lr_let: float = Field(1e-3, gt=0)
    lwc: bool = True
    let: bool = True
    let_alpha: float = Field(0.5, ge=0, le=1)
    train_norms: bool = False
    lr_norm: float = Field(1e-3, gt=0)

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, v):
        return parse_epochs(v)


class QuantizeRecipe(BaseRecipe):
    """``calib`` is ``None`` for rtn (no data) and ``training`` is set for omniquant only (the
    llm-compressor baselines use their own settings)."""

    method: str = "rtn"
    calib: CalibRecipe | None = Field(default_factory=CalibRecipe)
    training: BlockTraining | None = Field(default_factory=BlockTraining)

    @model_validator(mode="after")
    def _method(self):
        from ..methods import METHODS

        name = METHODS.canonical(self.method)  # unknown: one line with a suggestion
        if name in ("realign", "aaq"):
            raise ValueError(f"method {name!r} has its own recipe and objective: run `safeptq {name}` "
                             f"(or safeptq.{name}()) instead of `safeptq quantize`")
        if name != self.method:
            object.__setattr__(self, "method", name)
        for section, used in (("calib", name != "rtn"), ("training", name == "omniquant")):
            value = getattr(self, section)
            if not used and value is not None:
                if value.model_fields_set:
                    log.warning("%s settings (%s) are not used by %s", section,
                                ", ".join(sorted(value.model_fields_set)), name)
                object.__setattr__(self, section, None)
            elif used and value is None:
                object.__setattr__(self, section, {"calib": CalibRecipe, "training": BlockTraining}[section]())
        return self

    @property
    def uses_calibration(self) -> bool:
        return self.method != "rtn"

    @property
    def blockwise(self) -> bool:
        return self.method == "omniquant"

