"""Reconstruction: mean squared error to the full-precision block output (OmniQuant)."""

from __future__ import annotations

import torch

from safeptq.objectives.base import BlockBatch, BlockObjective, register_objective

__all__ = ["MSE", "masked_mse"]


def masked_mse(batch: BlockBatch) -> torch.Tensor:
    """[B] mean squared error over each sample's real tokens and hidden units."""
    m = batch.mask.to(batch.output.dtype)[..., None]
    se = ((batch.output - batch.target.to(batch.output.dtype)) ** 2 * m).sum((1, 2))
    return se / (m.sum((1, 2)) * batch.output.shape[-1]).clamp(min=1)


class MSE(BlockObjective):
    name = "mse"

    def __call__(self, batch: BlockBatch) -> torch.Tensor:
        return masked_mse(batch)


register_objective("mse", MSE, "MSE to the full-precision block output (OmniQuant)")
