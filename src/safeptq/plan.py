"""A memory and time plan for a quantizing run, made from the model's config before any weight is
loaded, so that a run that cannot fit is refused in a second instead of failing after an hour.

The model is instantiated on the ``meta`` device (no memory) to count its parameters; each phase of
the run (load, probes, calibration, export with its reload check) is then a sum of the tensors the
code holds at that point:

- block-wise engine (``quantize --method omniquant``, ``realign``): the model in ``--dtype`` on the
  host (finished blocks go back into the loaded storage) and the int8 codes of the finished blocks;
  the two calibration streams (updated in place; the full-precision one also holds the block's
  targets) on the host in float32 (``2 x N x T x hidden x 4`` bytes) or in memory-mapped files; on
  the calibration device one block in float32 with its fake-quantized and transformed copies and
  gradients (about 5 copies) and a batch's activations; the probe model (``realign
  --probe-model``) and the separability pass hold a whole model on the device;
- end-to-end engine (``aaq``): the whole model on the device in float32 (or its bf16 under
  ``--precision bf16``), the transformed weights kept for the backward pass (one layer's with
  activation checkpointing, every layer's without), the activations (one layer's plus the layer
  inputs with checkpointing), the logits and their float32 copies; the reference top-K cache on the
  host;
- end-to-end finish: the trained model, the codes and the cast back to the model's dtype;
- export: the model, its packed copy and the reloaded export side by side on the host.

The memory constants are fitted to the CPU scaling table in BENCHMARKS.md ("Memory plan against measured
peaks": realign and aaq on 135M, 360M and 1.1B shapes, every plan within 20 % of the measured peak); the
device figures are not yet checked against a GPU run, and times are rough (a factor of two or more).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError

__all__ = ["ModelShape", "MemoryPlan", "model_shape", "plan_blockwise", "plan_end_to_end", "machine_memory_mb",
           "parse_max_memory", "BASE_MB"]

MB = 2**20
BASE_MB = 600.0
"""Resident size of a Python process that imported torch, transformers, scikit-learn and safeptq."""
COPIES_TRAINED_BLOCK = 5.0
"""float32 copies of a block's weights while it trains: the weights, the transformed (smoothed) and the
fake-quantized weights kept for the backward pass, their gradient, and one transient."""
COPIES_SAVED_E2E = 5.0
"""float32 copies of each layer's weights the end-to-end backward pass keeps without checkpointing (the
transformed weight, the quantizer's intermediates), fitted to 135M/360M shapes on a CPU."""
ACT_FLOATS_PER_TOKEN = (24, 6)
"""Saved activations per token of one decoder layer, as (multiple of hidden, multiple of intermediate)."""
FLOPS = {"cpu": 3.0e10, "cuda": 1.0e13}
"""Effective training throughput, FLOP/s (per CPU core for ``cpu``), fitted to measured runs: Q-realign
on the 135M organism on 2 cores, a 7B-shaped block on an H200 (8.8 s per block of 3 epochs)."""


@dataclass(frozen=True)
class ModelShape:
    params: int
    layer_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    model_type: str
    stored_dtype: str | None = None  # the checkpoint's dtype (config), when it says

    @property
    def linear_params(self) -> int:
        return self.layer_params * self.n_layers


@dataclass
class MemoryPlan:
    """Peak host and device memory (MiB) and wall time (s) of a run, with each phase's figures."""

    host_mb: float
    device_mb: float | None
    seconds: float
    phases: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        r = round
        return {"host_mb": r(self.host_mb), "device_mb": None if self.device_mb is None else r(self.device_mb),
                "seconds": r(self.seconds), "phases": {k: {kk: r(vv) if isinstance(vv, float) else vv
                                                           for kk, vv in v.items()} for k, v in self.phases.items()}}

    def describe(self) -> str:
        dev = "" if self.device_mb is None else f", device {_gib(self.device_mb)}"
        worst = max(self.phases, key=lambda k: self.phases[k].get("host_mb", 0)) if self.phases else "-"
        return (f"memory plan: peak host {_gib(self.host_mb)} (in {worst}){dev}; time about "
                f"{_duration(self.seconds)}")

    def check(self, limits: tuple[float | None, float | None]) -> None:
        """Refuse (one line) when a peak exceeds what the machine has or what --max-memory allows."""
        host_cap, dev_cap = limits
        if host_cap is not None and self.host_mb > host_cap:
            raise ConfigError(f"this run needs about {_gib(self.host_mb)} of host memory and {_gib(host_cap)} is "
                              "available; use a smaller --nsamples/--seqlen, --dtype bfloat16, or --max-memory "
                              "to override")
        if dev_cap is not None and self.device_mb is not None and self.device_mb > dev_cap:
            raise ConfigError(f"this run needs about {_gib(self.device_mb)} of device memory and {_gib(dev_cap)} "
                              "is free; use a smaller --batch-size, --precision bf16, or --max-memory to override")


def _gib(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def model_shape(config) -> ModelShape:
    """Parameter counts of a causal LM built from ``config`` on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    text = getattr(config, "text_config", None) or config
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return ModelShape(params=sum(p.numel() for p in model.parameters()),
                      layer_params=sum(p.numel() for p in layers[0].parameters()), n_layers=len(layers),
                      hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                      vocab=text.vocab_size, model_type=getattr(config, "model_type", "?"),
                      stored_dtype=str(stored).removeprefix("torch.") if stored is not None else None)


def _bytes(dtype: str | torch.dtype) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype).element_size()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _load_mb(s: ModelShape, wbytes: int) -> float:
    """Loading: the model, plus the checkpoint's memory-mapped pages while a dtype conversion reads them
    (a checkpoint already in the load dtype is used in place)."""
    stored = _bytes(s.stored_dtype) if s.stored_dtype else wbytes
    return s.params * wbytes / MB + (s.params * stored / MB if stored != wbytes else 0.0)


def _codes_mb(s: ModelShape) -> float:
    """Integer codes (int8 storage) of every quantized weight, kept for the exporter."""
    return s.linear_params / MB


EXPORT_MODEL_COPIES = 2.5
"""Model-sized buffers while exporting: the model, the reloaded export, and the reload's decompression
transients (fitted: half a model more on 135M-1.1B shapes)."""


def _export_mb(s: ModelShape, wbytes: int, bits: float) -> float:
    """Model + its integer codes + packed copy of the linears + the reloaded export, side by side."""
    return (EXPORT_MODEL_COPIES * s.params * wbytes + s.linear_params * bits / 8) / MB + _codes_mb(s)


def plan_blockwise(s: ModelShape, *, dtype: str, device: str, nsamples: int, seqlen: int, batch_size: int,
                   epochs: int | tuple[int, int], weight_bits: float, probe_model: bool = False,
                   separability: bool = False, stream_budget_mb: float | None = None) -> MemoryPlan:
    """Block-wise engine (OmniQuant / Q-realign scope); streams above ``stream_budget_mb`` are
    memory-mapped files (page cache the kernel can evict), not counted."""
    wb = _bytes(dtype)
    on_gpu = torch.device(device).type == "cuda"
    model_mb = s.params * wb / MB
    streams_mb = 2 * nsamples * seqlen * s.hidden * 4 / MB  # updated in place, block after block
    if stream_budget_mb is not None and streams_mb > stream_budget_mb:
        streams_mb = 0.0
    tokens = batch_size * seqlen
    act_mb = tokens * (ACT_FLOATS_PER_TOKEN[0] * s.hidden + ACT_FLOATS_PER_TOKEN[1] * s.intermediate) * 4 / MB
    block_mb = COPIES_TRAINED_BLOCK * s.layer_params * 4 / MB + act_mb
    whole_on_device = model_mb if (probe_model or separability) else 0.0
    phases = {"load": {"host_mb": BASE_MB + _load_mb(s, wb)}}
    if probe_model or separability:
        phases["probes"] = {"host_mb": BASE_MB + model_mb + (0 if on_gpu else model_mb),
                            "device_mb": whole_on_device if on_gpu else None}
    phases["calibration"] = {"host_mb": BASE_MB + model_mb + streams_mb + _codes_mb(s) + (0 if on_gpu else block_mb),
                             "device_mb": block_mb if on_gpu else None}
    phases["export"] = {"host_mb": BASE_MB + _export_mb(s, wb, weight_bits)}
    ep = epochs if isinstance(epochs, tuple) else (epochs, epochs)
    epoch_blocks = ep[0] * (s.n_layers // 2) + ep[1] * (s.n_layers - s.n_layers // 2)
    flop = 6 * s.layer_params * nsamples * seqlen * epoch_blocks + 4 * s.params * nsamples * seqlen
    rate = FLOPS["cuda"] if on_gpu else FLOPS["cpu"] * _threads()
    return _finish(phases, flop / rate, on_gpu)


def plan_end_to_end(s: ModelShape, *, dtype: str, device: str, nsamples: int, seqlen: int, batch_size: int,
                    steps: int, weight_bits: float, precision: str, checkpointing: bool, topk: int,
                    n_references: int) -> MemoryPlan:
    """End-to-end engine (AAQ scope); references are built from full models on the device first."""
    on_gpu = torch.device(device).type == "cuda"
    wb = _bytes(dtype)
    train_b = wb if precision == "bf16" and wb < 4 else 4
    tokens = batch_size * seqlen
    model_mb = s.params * wb / MB
    train_model_mb = s.params * train_b / MB
    layer_act = tokens * (ACT_FLOATS_PER_TOKEN[0] * s.hidden + ACT_FLOATS_PER_TOKEN[1] * s.intermediate) * 4 / MB
    layer_w = COPIES_SAVED_E2E * s.layer_params * 4 / MB  # float32 weight copies kept for the backward pass
    if checkpointing:
        saved = s.n_layers * tokens * s.hidden * train_b / MB + layer_act + layer_w
    else:
        saved = s.n_layers * (layer_act + layer_w)
    logits_mb = tokens * s.vocab * (train_b + 3 * 4) / MB
    train_dev = train_model_mb + saved + logits_mb
    refs_host = nsamples * seqlen * (topk + 1) * 6 * n_references / MB
    refs_dev = n_references * model_mb + tokens * s.vocab * 4 * 2 / MB
    phases = {"load": {"host_mb": BASE_MB + _load_mb(s, wb)}}
    if on_gpu:
        phases["references"] = {"host_mb": BASE_MB + model_mb + refs_host, "device_mb": refs_dev}
        phases["training"] = {"host_mb": BASE_MB + refs_host + model_mb, "device_mb": train_dev}
    else:
        phases["references"] = {"host_mb": BASE_MB + refs_dev + refs_host}
        phases["training"] = {"host_mb": BASE_MB + refs_host + train_dev}
    # folding and rounding: the trained model, the integer codes, and the cast back to the model's dtype
    finish = BASE_MB + refs_host + train_model_mb + _codes_mb(s) + (model_mb if train_b != wb else 0.0)
    if on_gpu:
        phases["finish"] = {"host_mb": BASE_MB + refs_host + model_mb + _codes_mb(s), "device_mb": train_model_mb}
    else:
        phases["finish"] = {"host_mb": finish}
    phases["export"] = {"host_mb": BASE_MB + refs_host + _export_mb(s, wb, weight_bits)}
    flop = (8 if checkpointing else 6) * s.params * tokens * steps + 2 * s.params * nsamples * seqlen * n_references
    rate = FLOPS["cuda"] if on_gpu else FLOPS["cpu"] * _threads()
    return _finish(phases, flop / rate, on_gpu)


def _finish(phases: dict, seconds: float, on_gpu: bool) -> MemoryPlan:
    host = max(p["host_mb"] for p in phases.values())
    dev = max((p.get("device_mb") or 0.0) for p in phases.values()) if on_gpu else None
    return MemoryPlan(host_mb=host, device_mb=dev, seconds=seconds, phases=phases)


def machine_memory_mb(device: str) -> tuple[float | None, float | None]:
    """(host memory available to this process, free memory of the CUDA device) in MiB; ``None``
    where it cannot be read."""
    host = None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        host = int(info["MemAvailable"].split()[0]) / 1024
        from .memory import current_rss_mb

        host += current_rss_mb() or 0.0
    except (OSError, KeyError, ValueError):
        pass
    dev = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        dev = free / MB
    return host, dev


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)\s*$", re.I)
_UNIT_MB = {"": 1024, "b": 1 / MB, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024**2}


def _size_mb(text: str) -> float:
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--max-memory: cannot read size {text!r} (e.g. 64GiB, 900MiB)")
    return float(m.group(1)) * _UNIT_MB[m.group(2).lower()[:1]]


def parse_max_memory(spec: str | None) -> tuple[float | None, float | None] | None:
    """``--max-memory``: ``none`` (no check), ``SIZE`` (host), or ``host=SIZE,device=SIZE``; sizes in
    GiB unless a unit is given. ``None`` = use what the machine has."""
    if spec is None:
        return None
    if spec.strip().lower() == "none":
        return (None, None)
    host = dev = None
    for part in spec.split(","):
        key, eq, val = part.partition("=")
        if not eq:
            key, val = "host", key
        key = key.strip().lower()
        if key not in ("host", "device"):
            raise ConfigError(f"--max-memory: unknown key {key!r}; use host=SIZE,device=SIZE")
        if key == "host":
            host = _size_mb(val)
        else:
            dev = _size_mb(val)
    return host, dev
