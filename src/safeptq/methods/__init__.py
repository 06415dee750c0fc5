"""Quantization methods behind one registry: each is an engine + an objective + its own policy.
The registry is the single source for dispatch, ``safeptq ls``, ``--help`` choices and "did you
mean" suggestions."""

from __future__ import annotations

from ..registry import Registry
from .base import Calibrated, Method, RunOptions, Session

__all__ = ["METHODS", "Method", "RunOptions", "Session", "Calibrated", "LLMCOMPRESSOR"]

METHODS: Registry[Method] = Registry("method")

from .simple import LLMCOMPRESSOR, LLMCompressorMethod, OmniQuant, RTN  # noqa: E402

METHODS.add("rtn", RTN(), RTN.help)
METHODS.add("omniquant", OmniQuant(), OmniQuant.help)
for _name in LLMCOMPRESSOR:
    METHODS.add(_name, LLMCompressorMethod(_name), LLMCompressorMethod.helps[_name])

from .realign import Realign  # noqa: E402

METHODS.add("realign", Realign(), Realign.help, aliases=("q-realign",))

from .aaq import AAQ  # noqa: E402

METHODS.add("aaq", AAQ(), AAQ.help)
