"""The parts every quantizing recipe shares: calibration, evaluation, the common top-level fields,
validation errors that name the field, and the preset merge (explicit values win over a preset).

Validation happens here and only here; the CLI maps a field's dotted name (``training.lr_lwc``)
to its flag (``--lr-lwc``) when it prints the error.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError, SafePTQError

__all__ = ["section_type", "RecipeModel", "RecipeError", "CalibRecipe", "EvalRecipe", "BaseRecipe", "merge_preset",
           "validation_error"]


class RecipeError(ConfigError):
    """A recipe field is invalid; ``field`` is its dotted name, ``detail`` the reason."""

    def __init__(self, field: str, detail: str) -> None:
        self.field, self.detail = field, detail
        super().__init__(f"recipe field {field}: {detail}" if field else detail)


def validation_error(e: ValidationError) -> RecipeError:
    """The first error of a pydantic ``ValidationError`` as one line naming the field."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if err["type"] == "extra_forbidden":
        return RecipeError(loc, "is not a field of this recipe")
    msg = msg.replace("Input should be", "must be").replace("Field required", "is required")
    msg = (msg.replace("must be greater than or equal to 0", "must be non-negative")
              .replace("must be greater than 0", "must be positive")
              .replace("must be greater than or equal to", "must be at least")
              .replace("must be less than or equal to", "must be at most"))
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        if "got" not in msg:
            msg += f", got {err['input']!r}"
    return RecipeError(loc, msg)


class RecipeModel(BaseModel):
    """Strict: unknown fields are errors, NaN and infinities are refused, assignment re-validates."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


def section_type(annotation) -> type[BaseModel] | None:
    """The recipe section class of a field annotation (``X`` or ``X | None``), else ``None``."""
    import typing

    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def user_section(data: dict, key: str) -> dict:
    """The fields a caller set in section ``key`` of raw recipe ``data`` (a dict or a section object)."""
    cur = data.get(key)
    return cur.model_dump(exclude_unset=True) if isinstance(cur, BaseModel) else dict(cur or {})


def merge_preset(data: dict, preset: dict) -> dict:
    """``data`` with every key it does not set taken from ``preset`` (recursively for sections)."""
    out = dict(data)
    for k, v in preset.items():
        if isinstance(v, dict):
            out[k] = merge_preset(user_section(out, k), v)
        elif out.get(k) is None:
            out[k] = v
    return out


def _text_sets(spec: str) -> tuple[list[str], set[str]]:
    from ..data.calib import parse_calib_spec
    from ..data.registry import REGISTRY

    names = [name for name, _ in parse_calib_spec(spec)]
    return names, {n for n in names if n in REGISTRY and REGISTRY[n].kind == "text"}


class CalibRecipe(RecipeModel):
    """The calibration set: prompt sets with shares (``advbench:calib=0.75,alpaca:calib=0.25``),
    a text set (``wikitext2:calib``) or a file ``[harmful:|benign:]PATH[@COLUMN]``."""

    data: str | None = "alpaca:calib"
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(128, ge=2)
    chat: bool = True
    replies: int = Field(0, ge=0, description="greedy reply tokens of the full-precision model appended")

    @field_validator("data")
    @classmethod
    def _spec(cls, v):
        if v is not None:
            try:
                _text_sets(v)
            except SafePTQError as e:
                raise ValueError(str(e).replace("--calib ", "")) from None
        return v

    def text_sets(self) -> set[str]:
        return _text_sets(self.data)[1] if self.data else set()

    def is_text(self) -> bool:
        """Every set is plain text: no chat turns, so no chat template needed."""
        if not self.data:
            return False
        names, text = _text_sets(self.data)
        return len(text) == len(set(names))

    @model_validator(mode="after")
    def _replies_need_prompts(self):
        if self.replies and self.is_text():
            raise ValueError(f"`calib.replies` needs chat prompts in `calib.data`; plain text ({self.data}) has none")
        return self


class EvalRecipe(RecipeModel):
    """Suites evaluated on the quantized model after export (results go into the run record)."""

    suites: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, gt=0)
    ppl_windows: int | None = Field(None, gt=0)

    @field_validator("suites", mode="before")
    @classmethod
    def _split(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        from ..eval import parse_suites

        try:
            return parse_suites(list(v)) if v else []
        except SafePTQError as e:
            raise ValueError(str(e)) from None


class BaseRecipe(RecipeModel):
    """Fields every quantizing method has. ``model`` may be unset when an in-memory model is given."""

    method: str
    model: str | None = None
    scheme: str
    group_size: int | None = Field(None, gt=0)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    data_dir: str | None = None
    system_prompt: str | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    calib: CalibRecipe = Field(default_factory=CalibRecipe)
    eval: EvalRecipe = Field(default_factory=EvalRecipe)

    @model_validator(mode="after")
    def _scheme(self):
        from ..quant.args import resolve_scheme

        try:
            resolve_scheme(self.scheme, group_size=self.group_size)
        except SafePTQError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def uses_calibration(self) -> bool:
        return True

    def resolved_scheme(self, head_dim: int | None = None):
        from ..quant.args import resolve_scheme

        return resolve_scheme(self.scheme, group_size=self.group_size, head_dim=head_dim)

    @classmethod
    def build(cls, data: dict | None = None, **kw: Any):
        """Validate ``data`` (plus keyword fields); a bad field raises :class:`RecipeError`."""
        try:
            return cls.model_validate({**(data or {}), **kw})
        except ValidationError as e:
            raise validation_error(e) from None

    def replace(self, **changes: Any):
        """A copy with ``changes`` (dotted names such as ``training.epochs`` allowed), re-validated."""
        from .overrides import apply_overrides

        return type(self).build(apply_overrides(type(self), self.model_dump(), changes))

    def to_yaml(self) -> str:
        import yaml

        head = (f"# safeptq {self.method} recipe (resolved: every default filled in).\n"
                "# Replay with: safeptq run recipe.yaml --out DIR\n")
        return head + yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def finite(v: float, what: str) -> float:
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v}")
    return v
