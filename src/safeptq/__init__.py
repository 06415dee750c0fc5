"""safeptq: safety-aware post-training quantization of Hugging Face causal language models.

The public API (loaded lazily, so ``import safeptq`` stays fast)::

    import safeptq
    q = safeptq.quantize("default", method="rtn", scheme="w8a8")
    q.save("runs/rtn-w8a8")
    safeptq.evaluate(q, "advbench:eval", limit=32)

See :mod:`safeptq.api` for every function and :mod:`safeptq.recipes` for the typed recipes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_API = ("load_model", "quantize", "realign", "aaq", "run", "evaluate", "judge", "probe", "build_organism", "compare",
        "report", "demo")
_OTHER = {"QuantizedModel": "safeptq.result", "RunOptions": "safeptq.methods",
          "QuantizeRecipe": "safeptq.recipes", "RealignRecipe": "safeptq.recipes", "AAQRecipe": "safeptq.recipes",
          "load_recipe": "safeptq.recipes", "METHODS": "safeptq.methods"}

__all__ = ["__version__", *_API, *_OTHER]

if TYPE_CHECKING:  # pragma: no cover
    from .api import (aaq, build_organism, compare, evaluate, judge, load_model, probe, quantize,  # noqa: F401
                      realign, report, run, demo)
    from .methods import METHODS, RunOptions  # noqa: F401
    from .recipes import AAQRecipe, QuantizeRecipe, RealignRecipe, load_recipe  # noqa: F401
    from .result import QuantizedModel  # noqa: F401


def __getattr__(name: str) -> Any:
    import importlib

    if name in _API:
        return getattr(importlib.import_module("safeptq.api"), name)
    if name in _OTHER:
        return getattr(importlib.import_module(_OTHER[name]), name)
    raise AttributeError(f"module 'safeptq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
