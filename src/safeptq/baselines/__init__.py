"""Reference quantizers from other libraries (optional dependencies, imported when run)."""

from safeptq.baselines.llmcompressor import METHODS, build_recipe, calibration_batches, run_llmcompressor

__all__ = ["METHODS", "build_recipe", "calibration_batches", "run_llmcompressor"]
