"""The methods of ``safeptq quantize``: round to nearest, OmniQuant-style block-wise LWC + LET
(MSE reconstruction), and the llm-compressor baselines on the same calibration tokens."""

from __future__ import annotations

import logging
import time

from .base import Calibrated, Method, RunOptions, Session

__all__ = ["RTN", "OmniQuant", "LLMCompressorMethod", "LLMCOMPRESSOR", "BlockwiseMethod"]

log = logging.getLogger(__name__)

LLMCOMPRESSOR = ("gptq", "awq", "smoothquant+gptq")


def _weight_bits(scheme) -> float:
    return scheme.weights.num_bits if scheme.weights is not None else 16


class RTN(Method):
    name = "rtn"
    help = "round to nearest with min/max ranges (no calibration data)"

    def plan(self, recipe, options, shape, device, dtype):
        from ..plan import plan_blockwise

        return plan_blockwise(shape, dtype=dtype, device=str(device), nsamples=0, seqlen=1, batch_size=1, epochs=0,
                              weight_bits=_weight_bits(recipe.resolved_scheme()))

    def calibrate(self, s: Session) -> Calibrated:
        from ..quant.deploy import rtn_quantize

        log.info("quantizing %s with rtn to %s", s.model_label, s.scheme.name)
        t0 = time.time()
        qparams = rtn_quantize(s.lm.model, s.scheme)
        return Calibrated(model=s.lm.model, report={"method": "rtn", "qparams": qparams,
                                                    "wall_time_s": round(time.time() - t0, 1)})


class BlockwiseMethod(Method):
    """The block-wise engine (checkpointed per block, so ``resume`` continues a killed run) with a
    per-method objective; :class:`OmniQuant` uses MSE, Q-realign its probe objective."""

    work_files = ("state.pt", "state.pt.tmp")
    work_dirs = ("blocks", "streams")

    def uses_work(self, recipe) -> bool:
        return True

    def plan_probe_model(self, recipe) -> bool:
        return False

    def plan_separability(self, recipe) -> bool:
        return False

    def plan(self, recipe, options, shape, device, dtype):
        from ..plan import plan_blockwise

        t = recipe.training
        return plan_blockwise(shape, dtype=dtype, device=str(device), nsamples=recipe.calib.nsamples,
                              seqlen=recipe.calib.seqlen, batch_size=t.batch_size, epochs=t.epochs,
                              weight_bits=_weight_bits(recipe.resolved_scheme()),
                              probe_model=self.plan_probe_model(recipe), separability=self.plan_separability(recipe),
                              stream_budget_mb=options.stream_budget_mb)

    def engine_config(self, s: Session):
        from ..quant.engine import BlockwiseConfig
        from ..quant.precision import resolve_precision

        t = s.recipe.training
        return BlockwiseConfig(scheme=s.scheme, lwc=t.lwc, let=t.let, let_alpha=t.let_alpha, epochs=t.epochs,
                               batch_size=t.batch_size, lr_lwc=t.lr_lwc, lr_let=t.lr_let, train_norms=t.train_norms,
                               lr_norm=t.lr_norm, device=str(s.device), seed=s.recipe.seed,
                               precision=resolve_precision(s.recipe.precision, s.device),
                               stream_budget_mb=s.options.stream_budget_mb)

    def objective(self, s: Session):
        from ..objectives import MSE

        return MSE()

    def calibrate(self, s: Session) -> Calibrated:
        from ..quant.engine import calibrate_blockwise

        objective = self.objective(s)
        cfg = self.engine_config(s)
        log.info("quantizing %s with %s to %s on %d calibration samples", s.model_label, s.recipe.method,
                 s.scheme.name, len(s.calib))
        res = calibrate_blockwise(s.lm.model, s.calib, objective, cfg, work_dir=s.work_path,
                                  resume=s.options.resume, progress=s.progress, model_id=s.model_id)
        report = {"method": s.recipe.method, "qparams": res.qparams, **res.summary(),
                  "objective": objective.describe()}
        return Calibrated(model=s.lm.model, report=report, config=cfg.fingerprint(),
                          record={"precision": cfg.precision})


class OmniQuant(BlockwiseMethod):
    name = "omniquant"
    help = "block-wise learnable weight clipping + equivalent transformation, MSE to each block's full-precision output"


class LLMCompressorMethod(Method):
    """An llm-compressor baseline: its recipe, its modifiers and its exporter."""

    exporter = "llmcompressor"
    helps = {"gptq": "GPTQ via llm-compressor (its own ranges and exporter)",
             "awq": "AWQ via llm-compressor (weight-only schemes)",
             "smoothquant+gptq": "SmoothQuant then GPTQ via llm-compressor"}

    def __init__(self, name: str) -> None:
        self.name = name
        self.help = self.helps[name]

    def check(self, recipe, options: RunOptions) -> None:
        from ..baselines import llmcompressor as lc

        lc.require_llmcompressor()
        lc.build_recipe(self.name, recipe.resolved_scheme())  # refuses e.g. AWQ with activation quantization

    def plan(self, recipe, options, shape, device, dtype):
        from ..plan import plan_blockwise

        return plan_blockwise(shape, dtype=dtype, device=str(device), nsamples=0, seqlen=recipe.calib.seqlen,
                              batch_size=1, epochs=0, weight_bits=_weight_bits(recipe.resolved_scheme()))

    def calibrate(self, s: Session) -> Calibrated:
        from ..baselines.llmcompressor import run_llmcompressor

        log.info("quantizing %s with %s (llm-compressor) to %s on %d calibration samples", s.model_label, self.name,
                 s.scheme.name, len(s.calib))
        t0 = time.time()
        ids = s.calib.token_lists()
        model = run_llmcompressor(s.lm.model, s.lm.tokenizer, self.name, s.scheme, ids, nsamples=len(ids),
                                  seqlen=int(s.calib.input_ids.shape[1]))
        return Calibrated(model=model, report={"method": f"llmcompressor:{self.name}", "qparams": None,
                                               "wall_time_s": round(time.time() - t0, 1)})
