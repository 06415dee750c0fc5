"""Typed quantization settings: one tensor (:class:`QuantArgs`), one target (:class:`Scheme`),
and the named presets.

Field names follow compressed-tensors' ``QuantizationArgs`` (``num_bits``, ``symmetric``,
``strategy``, ``group_size``, ``dynamic``) so the exporter can map them one to one.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safeptq.errors import ConfigError
from safeptq.registry import Registry

__all__ = [
    "SCHEMES",
    "Strategy",
    "QuantArgs",
    "Scheme",
    "PRESETS",
    "preset_names",
    "resolve_scheme",
    "check_group_size",
]


class Strategy(str, Enum):
    """Granularity of one scale/zero-point: whole tensor, output channel, input group, or token."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"
    TOKEN = "token"


class QuantArgs(BaseModel):
    """Integer quantization of one tensor kind (weights, input activations or KV cache)."""

    model_config = ConfigDict(extra="forbid")

    num_bits: int = Field(8, ge=2, le=8)
    symmetric: bool = True
    strategy: Strategy = Strategy.CHANNEL
    group_size: int | None = None
    dynamic: bool = False

    @field_validator("strategy", mode="before")
    @classmethod
    def _lower_strategy(cls, value):
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_group(self) -> QuantArgs:
        if self.strategy is Strategy.GROUP and (self.group_size is None or self.group_size <= 0):
            raise ValueError(
                f"strategy 'group' needs a positive group_size, got {self.group_size!r}"
            )
        if self.strategy is not Strategy.GROUP and self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only meaningful with strategy 'group', "
                f"not {self.strategy.value!r}"
            )
        return self

    @property
    def qmin(self) -> int:
        """Lowest integer code (signed range, as compressed-tensors stores it)."""
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        """Highest integer code."""
        return 2 ** (self.num_bits - 1) - 1


class Scheme(BaseModel):
    """What to quantize at each linear layer: weights, its input activations, and the KV cache."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None
    kv_cache: QuantArgs | None = None


def _w(bits: int, *, group: int | None = None, symmetric: bool = True) -> QuantArgs:
    if group is None:
        return QuantArgs(num_bits=bits, symmetric=symmetric, strategy=Strategy.CHANNEL)
    return QuantArgs(num_bits=bits, symmetric=symmetric, strategy=Strategy.GROUP, group_size=group)


def _a(bits: int) -> QuantArgs:
    # activations: asymmetric, dynamic, one scale per token (both papers' code does this)
    return QuantArgs(num_bits=bits, symmetric=False, strategy=Strategy.TOKEN, dynamic=True)


# Weights are symmetric per channel in the W8A8/W4A8/W4A4 presets (not asymmetric as in the
# Q-realign code) so that the result exports to compressed-tensors "int-quantized" for vLLM;
# ``w4a16-asym`` keeps the asymmetric variant for weight-only runs.
PRESETS: dict[str, Scheme] = {
    "w8a8": Scheme(name="w8a8", weights=_w(8), input_activations=_a(8)),
    "w8a16": Scheme(name="w8a16", weights=_w(8)),
    "w4a16": Scheme(name="w4a16", weights=_w(4, group=64)),
    "w4a16-asym": Scheme(name="w4a16-asym", weights=_w(4, group=64, symmetric=False)),
    "w4a8": Scheme(name="w4a8", weights=_w(4), input_activations=_a(8)),
    "w4a4": Scheme(name="w4a4", weights=_w(4), input_activations=_a(4)),
    "w4a4kv4": Scheme(
        name="w4a4kv4",
        weights=_w(4),
        input_activations=_a(4),
        kv_cache=QuantArgs(
            num_bits=4, symmetric=False, strategy=Strategy.GROUP, group_size=128, dynamic=True
        ),
    ),
}


def _describe(s: Scheme) -> str:
    w, a = s.weights, s.input_activations
    wd = "none" if w is None else f"int{w.num_bits} {'sym' if w.symmetric else 'asym'} " + (
        f"group {w.group_size}" if w.strategy is Strategy.GROUP else "per channel")
    ad = "none" if a is None else f"int{a.num_bits} dynamic per token"
    return f"weights {wd}; activations {ad}" + ("; KV cache int4 group 128" if s.kv_cache is not None else "")


SCHEMES: Registry[Scheme] = Registry("quantization scheme")
"""The scheme presets as a registry (``safeptq ls schemes``, suggestions for a mistyped name)."""
for _name, _scheme in PRESETS.items():
    SCHEMES.add(_name, _scheme, _describe(_scheme))


def preset_names() -> list[str]:
    """Names accepted by :func:`resolve_scheme`."""
    return sorted(PRESETS)


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def resolve_scheme(
    name: str, group_size: int | None = None, head_dim: int | None = None
) -> Scheme:
    """A deep copy of preset ``name``.

    ``group_size`` overrides the weight group of grouped presets (``w4a16``); giving it to a
    per-channel preset is an error rather than a silent no-op. ``head_dim`` clamps the KV-cache
    group to one attention head (group 128 cannot split a 64-wide head).
    """
    key = SCHEMES.canonical(_normalize(name)) if _normalize(name) not in PRESETS else _normalize(name)
    scheme = PRESETS[key].model_copy(deep=True)
    if group_size is not None:
        w = scheme.weights
        if w is None or w.strategy is not Strategy.GROUP:
            raise ConfigError(
                f"scheme {key!r} quantizes weights per channel; group_size={group_size} applies "
                "only to grouped schemes (w4a16, w4a16-asym)"
            )
        if group_size <= 0:
            raise ConfigError(f"group_size must be positive, got {group_size}")
        scheme.weights = w.model_copy(update={"group_size": group_size})
    kv = scheme.kv_cache
    if head_dim is not None and kv is not None and kv.strategy is Strategy.GROUP:
        if kv.group_size is not None and kv.group_size > head_dim:
            scheme.kv_cache = kv.model_copy(update={"group_size": head_dim})
    return scheme


def check_group_size(layer_name: str, in_features: int, group_size: int | None) -> None:
    """Raise :class:`ConfigError` naming ``layer_name`` when ``group_size`` does not divide it."""
    if group_size is None:
        return
    if group_size <= 0 or in_features % group_size != 0:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        hint = f"; group sizes that fit: {divisors}" if divisors else ""
        raise ConfigError(
            f"group_size={group_size} does not divide in_features={in_features} of layer "
            f"{layer_name!r}{hint}"
        )
