"""The calibration engine, block-wise scope (OmniQuant / Q-realign).

1. The inputs of decoder block 0 are captured for the whole calibration set (one forward pass
   that stops at block 0), together with the keyword arguments the model hands its blocks
   (rotary embeddings, causal mask).
2. For each block in order: its full-precision output on the full-precision stream is the
   target; its learnable transforms (LWC clipping factors, LET/SmoothQuant scales) are trained
   on the *quantized* stream (the outputs of the already-quantized previous blocks) with a
   pluggable per-sample objective; then the scales are folded, the weights quantized, the block
   replaced by plain linears (activation quantization as hooks, see :mod:`safeptq.quant.deploy`)
   and both streams propagated.
3. Only the current block and the mini-batch live on the accelerator; the streams stay on CPU.
   After every block the block's weights and both streams are checkpointed, so ``resume=True``
   continues a killed run where it stopped.

Calibration samples are right-padded: with a causal mask, padding can never influence a real
token, so one mask serves every batch and padded positions are simply left out of the loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from safeptq.data.calib import CalibSet
from safeptq.errors import CalibrationError, ConfigError
from safeptq.objectives.base import BlockBatch, BlockObjective
from safeptq.memory import release_host_memory
from safeptq.runs import save_torch_atomic
from safeptq.quant.args import Scheme
from safeptq.quant.deploy import attach_act_quant
from safeptq.quant.precision import PRECISIONS, forward_precision, step_precision
from safeptq.quant.qlinear import (QuantLinear, decoder_linears, set_quantizers_enabled, unwrap_decoder_layer,
                                   wrap_decoder_layer)
from safeptq.quant.quantizer import QuantizedWeight, lwc_parameters
from safeptq.quant.rotation import decoder_parts
from safeptq.quant.smoothing import DEFAULT_PAIRS, attach_smoothing, fold_smoothing, init_smoothing, record_smoothing_stats

__all__ = ["BlockwiseConfig", "CalibResult", "calibrate_blockwise", "capture_block_inputs", "check_architecture",
           "peak_memory_mb"]

log = logging.getLogger(__name__)

PAPER_EPOCHS = (5, 15)
"""Q-realign's schedule: 5 epochs for blocks in the first half, 15 after (batch size 1)."""


@dataclass
class BlockwiseConfig:
    scheme: Scheme
    lwc: bool = True
    let: bool = True
    let_alpha: float = 0.5
    let_pairs: tuple[str, ...] = DEFAULT_PAIRS
    epochs: int | tuple[int, int] = 2  # one number, or (first half of the blocks, second half)
    batch_size: int = 4
    lr_lwc: float = 1e-2
    lr_let: float = 1e-3
    weight_decay: float = 0.0
    # Also learn the two RMSNorm gains of each block. Not an equivalent transform and not in the
    # papers: an opt-in extra lever (the DESIGN.md prototype's) for objectives that must move the
    # function more than quantization error can. The gains stay full precision in the export.
    train_norms: bool = False
    lr_norm: float = 1e-3
    patience: int = 0  # stop a block after this many epochs without relative improvement (0 = off)
    min_delta: float = 0.01
    device: str | None = None
    seed: int = 0
    # matrix products of the training steps (safeptq.quant.precision): fp32 | tf32 | bf16; the
    # learnable parameters, the block's weights while it trains and both streams stay float32
    precision: str = "fp32"
    # above this many MiB, the two calibration streams live in memory-mapped files in the work folder
    # (``streams/``) instead of RAM; None = always in RAM
    stream_budget_mb: float | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        eps = self.epochs if isinstance(self.epochs, tuple) else (self.epochs,)
        if any(int(e) < 0 for e in eps):
            raise ConfigError(f"epochs must be non-negative, got {self.epochs}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {self.batch_size}")
        if self.patience < 0:
            raise ConfigError(f"patience must be non-negative, got {self.patience}")

    def epochs_for(self, block: int, n_blocks: int) -> int:
        if isinstance(self.epochs, tuple):
            first, second = self.epochs
            return first if block < n_blocks // 2 else second
        return self.epochs

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["scheme"] = self.scheme.model_dump(mode="json")
        d.pop("device")
        d.pop("stream_budget_mb")  # where the streams live does not change the result
        return d


@dataclass
class CalibResult:
    qparams: dict[str, QuantizedWeight]
    blocks: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_accel_mb: float | None = None
    resumed_from: int = 0

    def summary(self) -> dict:
        return {"blocks": self.blocks, "wall_time_s": round(self.wall_time_s, 1),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "peak_accel_mb": self.peak_accel_mb,
                "resumed_from_block": self.resumed_from}


def peak_memory_mb() -> tuple[float, float | None]:
    """(peak resident set size of this process, peak CUDA memory allocated) in MiB, over the whole
    run even where a phase measurement reset the counters (see :mod:`safeptq.memory`)."""
    from safeptq.memory import process_peak_mb

    return process_peak_mb()


def check_architecture(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a model of a supported family (:mod:`safeptq.archs`); others get a clear error."""
    from safeptq.archs import spec_of_layer, spec_of_model

    spec = spec_of_model(model)
    _, layers, _, _ = decoder_parts(model)
    if spec_of_layer(layers[0]) is not spec:
        raise ConfigError(f"{type(layers[0]).__name__} does not match the config's family {spec.family}")
    for rel in spec.linears:
        try:
            layers[0].get_submodule(rel)
        except AttributeError:
            raise ConfigError(f"{spec.family} decoder layers lack {rel}; the checkpoint does not match its family") \
                from None
    return layers


class _Captured(Exception):
    pass


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


def stream_buffer(shape: tuple[int, ...], spill_dir: Path | None = None, name: str = "stream") -> torch.Tensor:
    """A float32 [N, T, H] calibration stream: in RAM, or (``spill_dir``) backed by a memory-mapped file
    there, so that streams larger than the RAM budget live in the page cache and can be evicted."""
    if spill_dir is None:
        return torch.empty(shape, dtype=torch.float32)
    spill_dir.mkdir(parents=True, exist_ok=True)
    path = spill_dir / f"{name}.f32"
    path.unlink(missing_ok=True)
    n = 1
    for d in shape:
        n *= d
    return torch.from_file(str(path), shared=True, size=n, dtype=torch.float32).view(shape)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int, device,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states entering block 0 for every row of ``input_ids`` ([N, T, H] float32, CPU; written
    into ``out`` when given). The blocks' keyword arguments come from :func:`capture_layer_kwargs`."""
    layers = check_architecture(model)
    states: list[torch.Tensor] = []
    pos = {"row": 0}

    def hook(module, args, kw):
        h = args[0] if args else kw["hidden_states"]
        if out is None:
            states.append(h.detach().to("cpu", torch.float32))
        else:
            out[pos["row"]:pos["row"] + h.shape[0]] = h.detach().to("cpu", torch.float32)
        raise _Captured

    inner = model.model
    moved = [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None)) if m is not None]
    for m in moved:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for rows in input_ids.split(batch_size):
            try:
                model(input_ids=rows.to(device), use_cache=False)
            except _Captured:
                pass
            pos["row"] += len(rows)
    finally:
        handle.remove()
    return torch.cat(states) if out is None else out


class _KwargsRecorder(nn.Module):
    """Stands in for a decoder layer for one forward: records the keyword arguments the model passes
    it (attention mask, position embeddings: they differ between sliding-window and global layers in
    Gemma 2/3, Mistral, Qwen) and returns its input unchanged, so the pass costs almost nothing."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)
        self.kwargs: dict = {}

    def forward(self, hidden_states, *args, **kwargs):
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        return hidden_states


@torch.no_grad()
def capture_layer_kwargs(model: nn.Module, input_ids: torch.Tensor, device) -> list[dict]:
    """The keyword arguments every decoder layer receives on a batch-1 call (they broadcast over any
    batch size): per layer, since layers of different attention types get different masks and RoPE."""
    inner = model.model
    layers = check_architecture(model)
    recorders = [_KwargsRecorder(layer) for layer in layers]
    originals = list(layers)
    for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None), getattr(inner, "rotary_emb_local", None)):
        if m is not None:
            m.to(device)
    try:
        for i, r in enumerate(recorders):
            layers[i] = r
        model.model(input_ids=input_ids[:1].to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    out = []
    for r in recorders:
        kw = dict(r.kwargs)
        kw["use_cache"] = False
        out.append(kw)
    return out


def _run_inplace(layer: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int, device, dtype) -> torch.Tensor:
    """Replace each row of the stream ``x`` by the block's output on it (rows are independent), so a
    stream never needs a second copy; returns ``x``."""
    for start in range(0, x.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        x[rows] = _layer_out(layer(x[rows].to(device, dtype), **kwargs)).to("cpu", torch.float32)
    return x


FOLD_TOLERANCE = 1e-3
"""Largest relative change of a block's full-precision output that folding its trained smoothing may
cause (float64 arithmetic, float32 weights: ~1e-6 when the fold is exact; a wrong fold is O(1))."""


def _check_fold(index: int, before: torch.Tensor, after: torch.Tensor) -> None:
    """Never export a block other than the one trained: folding must not change its function."""
    err = ((after - before).abs().max() / before.abs().max().clamp(min=1e-12)).item()
    if not err <= FOLD_TOLERANCE:
        raise CalibrationError(f"folding the trained smoothing into layers.{index} changed its output by {err:.2e} "
                               f"(relative; tolerance {FOLD_TOLERANCE:g}): the transform is not exact on this "
                               "architecture; refusing to export")


def _qparams_state(qp: dict[str, QuantizedWeight]) -> dict:
    return {k: tuple(t.cpu() for t in v) for k, v in qp.items()}


def _fingerprint(model, calib: CalibSet, objective: BlockObjective, cfg: BlockwiseConfig,
                 model_id: str | None = None) -> str:
    """What a checkpoint depends on; ``model_id`` is the model's content identity
    (:mod:`safeptq.identity`), so a model retrained in place does not resume into old blocks."""
    h = hashlib.sha256()
    h.update(json.dumps({"cfg": cfg.fingerprint(), "objective": objective.describe(),
                         "model": model_id or getattr(model.config, "_name_or_path", ""),
                         "layers": len(decoder_parts(model)[1])}, sort_keys=True, default=str).encode())
    h.update(calib.input_ids.numpy().tobytes())
    h.update(calib.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def finish_layer(layer: nn.Module, index: int, scheme: Scheme) -> dict[str, QuantizedWeight]:
    """Quantize a wrapped decoder layer's weights (RTN with its learned clipping), unwrap it to plain
    linears and attach the scheme's activation quantization; returns the exact integer parameters
    by linear name (for the exporter), codes and scales on the CPU: the accelerator must not keep a
    copy of every quantized weight. ``dequantized`` is a placeholder until :func:`share_dequantized`."""
    qparams = {}
    prefix = f"model.layers.{index}."
    for rel in decoder_linears(layer):
        mod = layer.get_submodule(rel)
        if isinstance(mod, QuantLinear) and mod.weight_quantizer is not None:
            deq, q, scale, zero = mod.quantized_weight()
            # the dequantized weight is the folded linear's weight: the caller shares it with
            # share_dequantized once the layer has its final device and dtype (no copy to the host here)
            qparams[prefix + rel] = QuantizedWeight(torch.empty(deq.shape, dtype=deq.dtype, device="meta"),
                                                    q.cpu(), scale.cpu(), zero.cpu())
    unwrap_decoder_layer(layer, fold=True)
    attach_act_quant(layer, scheme)
    return qparams


def share_dequantized(module: nn.Module, qparams: dict[str, QuantizedWeight], prefix: str = "") -> None:
    """Point each entry's ``dequantized`` at the folded linear's own weight (the same values, up to
    the module's dtype), so the integer parameters kept for the exporter cost their codes and scales,
    not a second float32 copy of every quantized weight (a weight on an accelerator is copied to the
    host in its own dtype). Call again after a dtype cast or a move."""
    for name, qw in qparams.items():
        if not name.startswith(prefix):
            continue
        weight = module.get_submodule(name[len(prefix):]).weight
        qparams[name] = qw._replace(dequantized=weight.data if weight.device.type == "cpu"
                                    else weight.detach().to("cpu"))


@torch.no_grad()
def _return_home(layer: nn.Module, home: dict[str, torch.Tensor]) -> None:
    """Move a finished block back to the host *into its original storage*: the loaded (often memory-
    mapped) tensors are overwritten in place instead of new ones being allocated beside them, so the
    host holds one copy of the model however many blocks are done."""
    for name, param in layer.named_parameters():
        h = home.get(name)
        if h is not None and h.shape == param.shape and h.dtype == param.dtype and h.device.type == "cpu":
            h.copy_(param.data)
            param.data = h
    layer.to("cpu")  # anything new (or of another shape or dtype) the normal way


def _trainable_groups(layer: nn.Module, smoothing, cfg: BlockwiseConfig) -> list[dict]:
    groups = []
    lwc = lwc_parameters(layer)
    if lwc:
        groups.append({"params": lwc, "lr": cfg.lr_lwc})
    if smoothing is not None:
        groups.append({"params": list(smoothing.parameters()), "lr": cfg.lr_let})
    if cfg.train_norms:
        norms = []
        for name in ("input_layernorm", "post_attention_layernorm"):
            mod = getattr(layer, name)
            w = (mod.norm if hasattr(mod, "norm") else mod).weight  # ScaledNorm wraps the RMSNorm under LET
            w.requires_grad_(True)
            norms.append(w)
        groups.append({"params": norms, "lr": cfg.lr_norm})
    return groups


def _train_block(i: int, layer, smoothing, q_inps, fp_out, calib: CalibSet, kwargs, objective, cfg, n_epochs,
                 device, bar) -> list[float]:
    groups = _trainable_groups(layer, smoothing, cfg)
    if not groups or n_epochs == 0:
        return []
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + i)
    n = q_inps.shape[0]
    losses: list[float] = []
    best, stale = float("inf"), 0
    for ep in range(n_epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for idx in perm.split(cfg.batch_size):
            with step_precision(cfg.precision, device):
                with forward_precision(cfg.precision, device):
                    out = _layer_out(layer(q_inps[idx].to(device), **kwargs))
                # the objective (MSE, probe scores) in float32, outside autocast
                batch = BlockBatch(i, out.float(), fp_out[idx].to(device), calib.attention_mask[idx].to(device),
                                   calib.labels[idx].to(device), calib.last_idx[idx].to(device), idx)
                loss = objective(batch).mean()
                if not torch.isfinite(loss):
                    raise CalibrationError(f"block {i}: the loss became {loss.item()} in epoch {ep}; lower the "
                                           "learning rates (--lr-lwc / --lr-let)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        if bar is not None:
            bar.set_postfix(block=i, epoch=f"{ep + 1}/{n_epochs}", loss=f"{losses[-1]:.4g}")
        if cfg.patience:
            if losses[-1] < best * (1 - cfg.min_delta):
                best, stale = losses[-1], 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    return losses


def _restore(layers, work: Path, upto: int, scheme: Scheme) -> dict[str, QuantizedWeight]:
    qparams: dict[str, QuantizedWeight] = {}
    for j in range(upto):
        blob = torch.load(work / "blocks" / f"{j:03d}.pt", weights_only=True)
        layers[j].load_state_dict(blob["state"])
        attach_act_quant(layers[j], scheme)
        block_q = {k: QuantizedWeight(*v) for k, v in blob["qparams"].items()}
        share_dequantized(layers[j], block_q, f"model.layers.{j}.")
        qparams.update(block_q)
    return qparams


def calibrate_blockwise(model: nn.Module, calib: CalibSet, objective: BlockObjective, cfg: BlockwiseConfig, *,
                        work_dir: str | Path | None = None, resume: bool = False,
                        progress: bool = True, model_id: str | None = None) -> CalibResult:
    """Quantize ``model`` in place block by block (see the module doc); returns qparams and a
    per-block report (epochs run, losses, seconds). ``work_dir`` enables checkpoints."""
    from tqdm.auto import tqdm

    t0 = time.time()
    layers = check_architecture(model)
    n_blocks = len(layers)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dtype = next(model.parameters()).dtype
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    work = Path(work_dir) if work_dir is not None else None
    fp = _fingerprint(model, calib, objective, cfg, model_id)
    start, qparams, report = 0, {}, []
    state_path = work / "state.pt" if work is not None else None
    shape = (*calib.input_ids.shape, model.config.hidden_size)
    spill = None
    stream_mb = 2 * calib.input_ids.numel() * model.config.hidden_size * 4 / 2**20
    if cfg.stream_budget_mb is not None and stream_mb > cfg.stream_budget_mb:
        if work is None:
            raise ConfigError(f"the calibration streams ({stream_mb:.0f} MiB) exceed the RAM budget "
                              f"({cfg.stream_budget_mb:.0f} MiB) and there is no work folder to spill them to")
        spill = work / "streams"
        log.info("calibration streams (%.0f MiB) go to memory-mapped files in %s", stream_mb, spill)
    if work is not None:
        (work / "blocks").mkdir(parents=True, exist_ok=True)
    if resume and state_path is not None and state_path.exists():
        try:
            state = torch.load(state_path, weights_only=True)
            if not isinstance(state, dict) or "fingerprint" not in state:
                raise KeyError("fingerprint")
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line, not a traceback
            raise CalibrationError(f"the checkpoint {state_path} cannot be read ({type(e).__name__}); remove the "
                                   "work folder or run without --resume") from None
        if state["fingerprint"] != fp:
            raise CalibrationError(f"the checkpoint in {work} was made with another recipe, model or calibration "
                                   "set; remove it or run without --resume")
        start, report = state["next"], json.loads(state["report"])
        fp_inps = stream_buffer(shape, spill, "fp").copy_(state["fp_inps"])
        q_inps = stream_buffer(shape, spill, "q").copy_(state["q_inps"])
        del state
        qparams = _restore(layers, work, start, cfg.scheme)
        log.info("resuming at block %d of %d", start, n_blocks)
    else:
        fp_inps = capture_block_inputs(model, calib.input_ids, cfg.batch_size, device,
                                       out=stream_buffer(shape, spill, "fp"))
        q_inps = stream_buffer(shape, spill, "q")
        q_inps.copy_(fp_inps)
    # the block kwargs (rotary tables, mask; per layer: attention types differ) are cheap to recompute and
    # not checkpointed
    layer_kwargs = [{k: _to(v, device) for k, v in kw.items()}
                    for kw in capture_layer_kwargs(model, calib.input_ids[:1], device)]

    bar = tqdm(total=n_blocks, initial=start, desc="calibrate", unit="block", disable=not progress)
    for i in range(start, n_blocks):
        tb = time.time()
        layer, kwargs = layers[i], layer_kwargs[i]
        home = {n: p.data for n, p in layer.named_parameters()}  # the block's host storage, reused below
        layer.to(device, torch.float32)
        for p in layer.parameters():
            p.requires_grad_(False)
        with torch.no_grad(), record_smoothing_stats(layer) as stats:
            fp_out = _run_inplace(layer, fp_inps, kwargs, cfg.batch_size, device, torch.float32)
        smoothing = None
        if cfg.let:
            smoothing = init_smoothing(layer, stats, cfg.let_alpha, cfg.let_pairs).to(device)
            attach_smoothing(layer, smoothing)
        wrap_decoder_layer(layer, cfg.scheme, lwc=cfg.lwc, prefix=f"model.layers.{i}.")
        n_epochs = cfg.epochs_for(i, n_blocks)
        with torch.enable_grad():
            losses = _train_block(i, layer, smoothing, q_inps, fp_out, calib, kwargs, objective, cfg, n_epochs,
                                  device, bar)
        with torch.no_grad():
            for p in layer.parameters():
                p.requires_grad_(False)
            if smoothing is not None:
                probe = q_inps[:1].to(device, torch.float32)
                set_quantizers_enabled(layer, False)
                before = _layer_out(layer(probe, **kwargs))
                fold_smoothing(layer, smoothing)
                _check_fold(i, before, _layer_out(layer(probe, **kwargs)))
                set_quantizers_enabled(layer, True)
            block_q = finish_layer(layer, i, cfg.scheme)
            layer.to(device, model_dtype)
            q_inps = _run_inplace(layer, q_inps, kwargs, cfg.batch_size, device, model_dtype)
        fp_inps = fp_out
        _return_home(layer, home)
        share_dequantized(layer, block_q, f"model.layers.{i}.")
        release_host_memory()
        qparams.update(block_q)
        report.append({"block": i, "epochs": len(losses), "loss_first": losses[0] if losses else None,
                       "loss_last": losses[-1] if losses else None, "seconds": round(time.time() - tb, 2)})
        if work is not None:
            save_torch_atomic({"state": {k: v.detach().cpu() for k, v in layer.state_dict().items()},
                          "qparams": _qparams_state(block_q)}, work / "blocks" / f"{i:03d}.pt")
            save_torch_atomic({"fingerprint": fp, "next": i + 1, "fp_inps": fp_inps, "q_inps": q_inps,
                          "report": json.dumps(report)}, state_path)
        bar.update(1)
    bar.close()
    for m in (model.model.embed_tokens, getattr(model.model, "rotary_emb", None)):
        if m is not None:
            m.to("cpu")
    rss, acc = peak_memory_mb()
    return CalibResult(qparams=qparams, blocks=report, wall_time_s=time.time() - t0, peak_rss_mb=rss,
                       peak_accel_mb=acc, resumed_from=start)
