"""What every quantization method shares: run-time options (not part of a recipe: they change where
and how fast a run goes, never its result), the session the pipeline fills before calibrating, and
the :class:`Method` interface the pipeline calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..errors import ConfigError

__all__ = ["RunOptions", "Session", "Calibrated", "Method"]


@dataclass
class RunOptions:
    """``device``: where calibration runs (auto = CUDA when present); ``max_memory``: override of
    the memory check (``host=64GiB,device=70GiB``, ``none``); ``stream_budget_mb``: RAM for the
    block-wise calibration streams before they spill to the work folder; ``checkpointing``:
    per-layer activation checkpointing of the end-to-end engine; ``save_every``: end-to-end
    checkpoint interval; ``work_dir``/``resume``: checkpoints of a resumable run."""

    device: str = "auto"
    max_memory: str | None = None
    stream_budget_mb: float | None = None
    checkpointing: Literal["auto", "on", "off"] = "auto"
    save_every: int = 20
    progress: bool = True
    work_dir: str | Path | None = None
    resume: bool = False

    def check(self) -> None:
        import math

        if self.stream_budget_mb is not None and not (math.isfinite(self.stream_budget_mb)
                                                      and self.stream_budget_mb >= 0):
            raise ConfigError(f"`stream_budget_mb` must be non-negative, got {self.stream_budget_mb}")
        if self.save_every < 0:
            raise ConfigError(f"`save_every` must be non-negative, got {self.save_every}")
        if self.checkpointing not in ("auto", "on", "off"):
            raise ConfigError(f"`checkpointing` must be auto, on or off, got {self.checkpointing!r}")
        if self.max_memory is not None:
            from ..plan import parse_max_memory

            parse_max_memory(self.max_memory)
        from ..models import pick_device

        pick_device(self.device)  # 'cuda' without CUDA: one line now, not a traceback later


@dataclass
class Session:
    """What the pipeline checked and loaded before calibration; methods read and extend it."""

    recipe: Any  # a BaseRecipe subclass
    options: RunOptions
    run_id: str
    t0: float
    device: Any  # torch.device
    dtype: str  # resolved load dtype
    lm: Any  # safeptq.models.LoadedModel
    model_label: str  # what the user called the model (path, hub id, "default", or "<in-memory>")
    model_id: str  # content identity (see safeptq.identity)
    scheme: Any
    work: Any = None  # safeptq.runs.WorkFolder or None
    calib: Any = None  # safeptq.data.calib.CalibSet or None
    chat: bool = True
    plan: Any = None
    phases: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # method-private (objective, probes, ...)

    @property
    def progress(self) -> bool:
        return self.options.progress

    @property
    def work_path(self) -> Path | None:
        return self.work.path if self.work is not None else None


@dataclass
class Calibrated:
    """A method's product: the quantized model, its report (``qparams`` for the exporter), the
    engine config fingerprint and extra run-record entries."""

    model: Any
    report: dict
    config: dict | None = None
    record: dict = field(default_factory=dict)


class Method:
    """A quantization method: its recipe type, what it checks, its memory plan and its calibration.
    The pipeline (:func:`safeptq.methods.pipeline.run`) does the rest (folders, loading,
    calibration data, export, reload check, evaluation, run record)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    run_file: ClassVar[str] = "quantize.json"
    exporter: ClassVar[str] = "builtin"  # or "llmcompressor"
    # what the engine may write into the work folder (only these are ever deleted there)
    work_files: ClassVar[tuple[str, ...]] = ()
    work_dirs: ClassVar[tuple[str, ...]] = ()
    work_trees: ClassVar[tuple[str, ...]] = ()
    measure_calibration_phase: ClassVar[bool] = True

    def uses_work(self, recipe) -> bool:
        """Whether the method checkpoints into a work folder (and so honours ``resume``)."""
        return False

    def requires_work(self, recipe) -> bool:
        """Whether it needs a work folder even without checkpoints (then a temporary one is made)."""
        return False

    def check(self, recipe, options: RunOptions) -> None:
        """Checks that need no model (optional dependencies, scheme support); raise to refuse."""

    def check_family(self, recipe, family) -> None:
        """Checks against the model's family (:class:`~safeptq.archs.ArchSpec`), before any weight loads."""

    def plan(self, recipe, options: RunOptions, shape, device, dtype: str):
        """The memory plan (:mod:`safeptq.plan`), or ``None``."""
        return None

    def check_models(self, session: Session) -> None:
        """Checks once the model is loaded, before the calibration data (e.g. a second model)."""

    def calibrate(self, session: Session) -> Calibrated:
        raise NotImplementedError

    def after(self, session: Session, model) -> dict:
        """Run-record entries measured on the quantized model (e.g. separability after)."""
        return {}

    def describe(self) -> str:
        return self.help
