"""Pluggable objective terms for the calibration engine.

Block-wise objectives see one decoder block's quantized output next to its full-precision target
(:class:`BlockBatch`) and return one loss per sample, so a term may treat benign and malicious
samples differently. End-to-end objectives (AAQ, KL-top) see the model's logits instead, next to
the reference models' top-K log-probabilities (:class:`ReferenceCache` / :class:`LiveReferences`);
they have their own registry (:func:`get_e2e_objective`).
"""

from safeptq.objectives.base import (
    OBJECTIVES,
    BlockBatch,
    BlockObjective,
    E2EObjective,
    e2e_objective_names,
    get_e2e_objective,
    get_objective,
    objective_names,
    register_e2e_objective,
    register_objective,
)
from safeptq.objectives.kl import ContrastiveKLTop, KLTop, RefBatch, TopK, kl_topk, topk_reference
from safeptq.objectives.probe_push import ProbePush
from safeptq.objectives.reconstruction import MSE
from safeptq.objectives.references import LiveReferences, ReferenceCache, References

__all__ = ["OBJECTIVES", "BlockBatch", "BlockObjective", "get_objective", "objective_names", "register_objective", "MSE",
           "ProbePush", "E2EObjective", "get_e2e_objective", "e2e_objective_names", "register_e2e_objective",
           "KLTop", "ContrastiveKLTop", "RefBatch", "TopK", "kl_topk", "topk_reference", "References",
           "ReferenceCache", "LiveReferences"]
