"""The result of every quantizing call: the quantized model in memory, its recipe and run record,
and what it takes to save it (export + reload check + evaluation + model card + recipe + record,
committed in one rename) or evaluate it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

__all__ = ["QuantizedModel"]

log = logging.getLogger(__name__)


class QuantizedModel:
    """``.model`` / ``.tokenizer``: the quantized model (activation quantization as forward hooks);
    ``.recipe``: the resolved recipe; ``.record``: the run record as a dict (grows with
    :meth:`evaluate` and :meth:`save`)."""

    def __init__(self, model, tokenizer, recipe, record: dict, *, method, scheme, report: dict,
                 session=None) -> None:
        self.model, self.tokenizer, self.recipe, self.record = model, tokenizer, recipe, record
        self._method, self._scheme, self._report, self._session = method, scheme, report, session
        self._samples: dict[str, list[dict]] = {}
        self.path: Path | None = None

    def __repr__(self) -> str:
        return (f"QuantizedModel({self.recipe.method} {self._scheme.name} of {self.record.get('model')!r}"
                f"{'' if self.path is None else f', saved to {self.path}'})")

    @classmethod
    def _from_session(cls, method, s, cal) -> QuantizedModel:
        from . import __version__
        from .memory import process_peak_mb

        rss, acc = process_peak_mb()
        calib = s.calib
        record = {
            "safeptq_version": __version__,
            "run_id": s.run_id,
            "model": s.model_label,
            "model_path": s.lm.path,
            "model_id": s.model_id,
            "recipe": s.recipe.model_dump(mode="json"),
            "scheme": s.scheme.model_dump(mode="json"),
            "config": cal.config,
            "calib_set": calib.describe() if calib is not None else None,
            "chat": s.chat if calib is not None else None,  # chat turns actually used (False for plain text)
            "dtype": s.dtype,
            "device": str(s.device),
            "quantize_time_s": round(time.time() - s.t0, 1),
            "peak_rss_mb": round(rss, 1),
            "peak_accel_mb": None if acc is None else round(acc, 1),
            "memory_plan": s.plan.as_dict() if s.plan is not None else None,
            "memory_phases": s.phases,
            "calibration": {k: v for k, v in cal.report.items() if k != "qparams"},
            **cal.record,
        }
        after = method.after(s, cal.model)
        for k, v in after.items():  # e.g. separability: merge "after" beside "before"
            record[k] = {**record[k], **v} if isinstance(v, dict) and isinstance(record.get(k), dict) else v
        return cls(cal.model, s.lm.tokenizer, s.recipe, record, method=method, scheme=s.scheme, report=cal.report,
                   session=s)

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, suites: str | list[str], limit: int | None = None, **opts: Any) -> dict:
        """Evaluate the in-memory quantized model (with its activation quantization) on ``suites``;
        returns ``{suite: metrics}`` and adds them to :attr:`record` (``eval``), so :meth:`save`
        writes them with the per-prompt samples. ``opts``: fields of
        :class:`~safeptq.eval.api.EvalOptions`."""
        from .eval.api import EvalOptions, evaluate_model

        device = opts.pop("device", None) or (str(self._session.device) if self._session is not None else "auto")
        options = EvalOptions(limit=limit, device=device, backend="hf",
                              data_dir=opts.pop("data_dir", None) or self.recipe.data_dir,
                              chat_template=bool(getattr(self.tokenizer, "chat_template", None)), **opts)
        doc, samples = evaluate_model(self.model, list(suites) if not isinstance(suites, str) else suites,
                                      tokenizer=self.tokenizer, options=options)
        self.model.to("cpu")
        self.record["eval"] = {**(self.record.get("eval") or {}), **doc["suites"]}
        self.record["eval_config"] = doc["config"]
        self._samples.update(samples)
        return doc["suites"]

    # -- saving ----------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, *, overwrite: bool = False, evaluate: bool = True) -> Path:
        """Export to ``out_dir`` and return it. Everything is written into a hidden staging folder
        first — export, reload check, the recipe's evaluation suites (``evaluate=True``), per-prompt
        samples, ``README.md`` model card, ``recipe.yaml`` and the run record last — and then one
        rename replaces ``out_dir``. ``out_dir`` must be new, empty, or an earlier safeptq run holding
        only files safeptq wrote (``overwrite=True`` replaces anything)."""
        from .eval.samples import SAMPLES_FILE, write_samples
        from .export.card import CARD_FILE, model_card
        from .export.folder import SIDE_FILE
        from .export.verify import verify_export
        from .export.save import by_llmcompressor, save_quantized
        from .memory import phase_peak, process_peak_mb
        from .recipes import RECIPE_FILE
        from .runs import FolderLock, StagedRun, write_json_atomic

        out = Path(out_dir).expanduser()
        with FolderLock(out):
            stage = StagedRun(out, self.record["run_id"], overwrite=overwrite)
            try:
                calib = self._session.calib if self._session is not None else None
                metadata = {"model": self.record["model"], "model_path": self.record["model_path"],
                            "recipe": self.record["recipe"], "calib_set": self.record["calib_set"],
                            "nsamples": len(calib) if calib is not None else 0,
                            "seqlen": int(calib.input_ids.shape[1]) if calib is not None else 0,
                            "config": self.record["config"]}
                with phase_peak() as mem:
                    save_quantized(self.model, self.tokenizer, self._scheme, stage.dir, self._report, metadata)
                    verify = verify_export(stage.dir, self.model, self.tokenizer, self._scheme,
                                           builtin=not by_llmcompressor(self._report))
                self.record["memory_phases"]["export"] = mem.as_dict()
                todo = [s for s in self.recipe.eval.suites if s not in (self.record.get("eval") or {})]
                if evaluate and todo:
                    self.evaluate(todo, limit=self.recipe.eval.limit, ppl_windows=self.recipe.eval.ppl_windows,
                                  progress=self._session.progress if self._session is not None else True)
                if self._samples:  # per-prompt verdicts, for `safeptq compare`
                    write_samples(stage.dir / SAMPLES_FILE, self._samples)
                info = json.loads((stage.dir / SIDE_FILE).read_text())
                rss, acc = process_peak_mb()
                doc = {**self.record, "wall_time_s": round(time.time() - self._t0(), 1),
                       "peak_rss_mb": round(rss, 1), "peak_accel_mb": None if acc is None else round(acc, 1),
                       "export": {"path": str(out), "format": info.get("format"), "fake_quant": info.get("fake_quant"),
                                  "bits_per_weight": verify.get("bits_per_weight")},
                       "verify": verify, "eval": self.record.get("eval")}
                recipe_yaml = self.recipe.to_yaml()
                (stage.dir / RECIPE_FILE).write_text(recipe_yaml)
                (stage.dir / CARD_FILE).write_text(model_card(doc, recipe_yaml))
                write_json_atomic(stage.dir / self._method.run_file, doc)  # the run record, last
                stage.commit({"method": self.recipe.method, "run_file": self._method.run_file})
            except BaseException:
                stage.discard()
                raise
        self.record = doc
        self.path = out
        if self._session is not None and self._session.work is not None:
            self._session.work.remove()
        return out

    def _t0(self) -> float:
        return self._session.t0 if self._session is not None else time.time()
