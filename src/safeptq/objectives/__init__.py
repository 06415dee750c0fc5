"""Pluggable objective terms for the calibration engine.

Block-wise objectives see one decoder block's quantized output next to its full-precision target
(:class:`BlockBatch`) and return one loss per sample, so a term may treat benign and malicious
samples differently. End-to-end objectives (AAQ, KL-top) see the model's logits instead.
"""

from safeptq.objectives.base import BlockBatch, BlockObjective, get_objective, objective_names, register_objective
from safeptq.objectives.reconstruction import MSE
from safeptq.objectives.probe_push import ProbePush

__all__ = ["BlockBatch", "BlockObjective", "get_objective", "objective_names", "register_objective", "MSE",
           "ProbePush"]
