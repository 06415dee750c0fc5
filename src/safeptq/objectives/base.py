"""Objective protocol and registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from safeptq.registry import Registry

__all__ = ["OBJECTIVES", "BlockBatch", "BlockObjective", "register_objective", "get_objective", "objective_names",
           "E2EObjective", "register_e2e_objective", "get_e2e_objective", "e2e_objective_names"]


@dataclass
class BlockBatch:
    """What a block-wise objective sees for one mini-batch of calibration samples.

    ``output``/``target``: [B, T, H] quantized and full-precision block outputs; ``mask`` [B, T]
    (1 on real tokens); ``labels`` [B] (1 = malicious); ``last_idx`` [B] last prompt token;
    ``rows`` [B] the samples' rows in the calibration set (for objectives with per-sample targets).
    """

    layer: int
    output: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    last_idx: torch.Tensor
    rows: torch.Tensor | None = None

    def last_token(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H] states at each sample's last prompt token (of ``output`` by default)."""
        x = self.output if x is None else x
        return x[torch.arange(x.shape[0], device=x.device), self.last_idx.to(x.device)]


class BlockObjective:
    """Base class: ``__call__(batch) -> [B]`` per-sample losses (the engine takes the mean)."""

    name = "objective"

    def __call__(self, batch: BlockBatch) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}


OBJECTIVES: Registry = Registry("objective")
"""Every objective, block-wise and end-to-end, for ``safeptq ls`` (each kind also has its own below)."""
_BLOCK: Registry = Registry("block-wise objective")
_E2E: Registry = Registry("end-to-end objective")


def register_objective(name: str, factory: Callable[..., BlockObjective], help: str = "") -> None:
    _BLOCK.add(name, factory, help)
    OBJECTIVES.add(name, factory, f"block-wise: {help}" if help else "block-wise")


def objective_names() -> list[str]:
    return sorted(_BLOCK)


def get_objective(name: str, **kwargs) -> BlockObjective:
    return _BLOCK.get(name)(**kwargs)


class E2EObjective:
    """Base class of end-to-end objectives, which see the whole model's output logits.

    ``terms(student_logits, refs, mask)`` gets the quantized model's logits ``[B, T, V]``, the
    references' top-K entries for the same rows (a :class:`safeptq.objectives.kl.RefBatch`) and the
    token mask ``[B, T]`` (1 on real tokens), and returns named scalar tensors: ``"loss"`` (what is
    minimised) and any terms worth logging. ``references`` names the references it reads.
    """

    name = "e2e"

    @property
    def references(self) -> tuple[str, ...]:
        return ()

    def terms(self, student_logits: torch.Tensor, refs, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - interface

    def __call__(self, student_logits: torch.Tensor, refs, mask: torch.Tensor) -> torch.Tensor:
        return self.terms(student_logits, refs, mask)["loss"]

    def describe(self) -> dict:
        return {"name": self.name}


def register_e2e_objective(name: str, factory: Callable[..., E2EObjective], help: str = "") -> None:
    """Register an end-to-end objective (kept apart from the block-wise ones: other inputs)."""
    _E2E.add(name, factory, help)
    OBJECTIVES.add(name, factory, f"end-to-end: {help}" if help else "end-to-end")


def e2e_objective_names() -> list[str]:
    return sorted(_E2E)


def get_e2e_objective(name: str, **kwargs) -> E2EObjective:
    return _E2E.get(name)(**kwargs)
