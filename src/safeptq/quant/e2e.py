"""The calibration engine, end-to-end scope (OSTQuant / AAQ).

1. Prepare (:func:`prepare_end_to_end`): with ``rotation`` on, a random Hadamard ``Q0`` is fused
   into the residual stream (norms folded, embeddings untied) and a learnable
   :class:`~safeptq.quant.rotation.CayleyRotation` ``R`` (identity at init) is attached on top, so
   the stream is rotated by ``Q0·R``: the same parametrisation as a Cayley rotation initialised
   at ``Q0``, but with ``Q0`` already in the weights the SmoothQuant initialisation of the
   smoothing scales reads rotated weights and activations. An online Hadamard goes on every
   down_proj input. Smoothing scales (SmoothQuant-initialised on the full-precision stream) are
   attached, then every decoder linear gets the scheme's quantizers (weights fake-quantized with
   a straight-through estimator and, with ``lwc``, learnable clipping; activations per token).
2. Train all transforms jointly (AdamW, one parameter group each for rotation, smoothing and LWC;
   the Cayley map keeps ``R`` orthogonal) on the objective over the whole model's logits. Batches
   are drawn from per-epoch permutations fixed by the seed, so a resumed run sees the same data.
3. Fold (:func:`fold_end_to_end`): the rotation, then the smoothing scales, are baked into the
   weights exactly (float64); the engine checks the full-precision logits before and after.
4. Finish (:func:`finalize_model`, the block-wise engine's :func:`~safeptq.quant.engine.finish_layer`): weights are quantized
   by round-to-nearest with the learned clipping, linears unwrapped to plain ``nn.Linear`` with
   quantized-dequantized weights and activation quantization as hooks. GPTQ is not applied.

The whole model lives on ``cfg.device`` (float32 while calibrating, its own dtype afterwards); the
references stay on CPU and only the batch's top-K moves. With ``work_dir`` the transform
parameters, optimizer state and step are checkpointed every ``save_every`` steps;
``resume=True`` continues from there (refused if the recipe, model, references or calibration
set differ).

Not done here (OSTQuant has them): per-head v/o rotations, online Hadamards on q/k after RoPE,
Riemannian Adam on the Stiefel manifold, a learning-rate schedule. Note that the exporter refuses
online Hadamards (``online_hadamard=False`` gives an exportable model).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from safeptq.data.calib import CalibSet
from safeptq.errors import CalibrationError, ConfigError
from safeptq.memory import release_host_memory
from safeptq.objectives.base import E2EObjective
from safeptq.objectives.references import References
from safeptq.quant.args import Scheme, resolve_scheme
from safeptq.runs import save_torch_atomic
from safeptq.quant.engine import check_architecture, finish_layer, peak_memory_mb, share_dequantized
from safeptq.quant.precision import PRECISIONS, forward_precision, is_low_precision, step_precision
from safeptq.quant.qlinear import (
    decoder_linears,
    QuantLinear,
    set_quantizers_enabled,
    wrap_decoder_layer,
)
from safeptq.quant.quantizer import QuantizedWeight, WeightQuantizer
from safeptq.archs import spec_of_layer
from safeptq.quant.attention import attach_qk_transform
from safeptq.quant.rotation import (
    CayleyRotation,
    OnlineHadamard,
    add_online_hadamard,
    attach_head_rotation,
    attach_residual_rotation,
    decoder_parts,
    fold_head_rotation,
    fold_residual_rotation,
    fuse_residual_rotation,
    random_hadamard,
)
from safeptq.quant.smoothing import (
    DEFAULT_PAIRS,
    PAIRS,
    LayerGeometry,
    LayerSmoothing,
    attach_smoothing,
    fold_smoothing,
    init_smoothing,
    record_smoothing_stats,
)

__all__ = ["E2EConfig", "E2EResult", "E2ETransforms", "prepare_end_to_end", "fold_end_to_end", "finalize_model",
           "calibrate_end_to_end", "choose_transforms", "initial_kl", "FOLD_TOLERANCE"]

log = logging.getLogger(__name__)

FOLD_TOLERANCE = 1e-3
"""Largest relative change of the full-precision logits that folding may cause before it is an error
(float32 weights; bf16/fp16 weights round every folded value, see :data:`FOLD_TOLERANCE_LOW`)."""
FOLD_TOLERANCE_LOW = 2e-2
"""For weights stored in bfloat16/float16 the check is per linear, not on the logits (a deep model's
logits move by more than this from one bf16 rounding of every weight, random 32-layer models by
~0.1): each folded weight times a fixed random vector against the transformed float32 weight
before folding, relative to the largest entry (unit roundoff 2**-8 for bf16)."""
_STATE = "e2e_state.pt"


@dataclass
class E2EConfig:
    scheme: Scheme | str
    steps: int = 100
    batch_size: int = 4
    lr_rotation: float = 1e-3  # on the Cayley parameter A (S = A - Aᵀ); untuned default
    lr_smoothing: float = 1e-3
    lr_lwc: float = 1e-2
    weight_decay: float = 0.0
    rotation: bool = True
    online_hadamard: bool | None = None  # None: same as ``rotation``
    smoothing: bool = True
    smooth_alpha: float = 0.5
    smooth_pairs: tuple[str, ...] = DEFAULT_PAIRS
    # a learnable rotation of every attention head's values, undone in o_proj (exact; OSTQuant's v/o transform);
    # layers of families where v is fused with q and k keep none
    vo_rotation: bool = False
    # a Hadamard on every head's q and k after RoPE (run time, not learnt; QuaRot's R3) and, for KV schemes, K
    # quantized there instead of at the k_proj output
    qk_hadamard: bool = False
    lwc: bool = True
    save_every: int = 20  # checkpoint every N steps (with a work dir; 0 = only at the end)
    seed: int = 0
    device: str | None = None
    # matrix products (safeptq.quant.precision): with bf16 the frozen weights also stay in the model's
    # own bf16/fp16 while training (half the memory); transforms, LWC and optimizer state stay float32
    precision: str = "fp32"
    # recompute each decoder layer's activations in the backward pass instead of keeping them: memory
    # for the backward grows with one layer, not with the depth, at the cost of a second forward
    checkpointing: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if isinstance(self.scheme, str):
            self.scheme = resolve_scheme(self.scheme)
        for name in ("steps", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {self.batch_size}")
        for name in ("lr_rotation", "lr_smoothing", "lr_lwc", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        self.smooth_pairs = tuple(self.smooth_pairs)
        bad = [p for p in self.smooth_pairs if p not in PAIRS]
        if bad:
            raise ConfigError(f"unknown smoothing pair(s) {bad}; valid: {list(PAIRS)}")

    @property
    def use_online_hadamard(self) -> bool:
        return self.rotation if self.online_hadamard is None else self.online_hadamard

    def fingerprint(self) -> dict:
        """What a checkpoint depends on (steps, save_every and device may change on resume)."""
        d = asdict(self)
        d["scheme"] = self.scheme.model_dump(mode="json")
        for k in ("steps", "save_every", "device", "checkpointing"):
            d.pop(k)
        return d


@dataclass
class E2EResult:
    """``qparams`` by linear name (empty unless finalized); ``records`` one dict per step (loss
    before that step's update and each objective term); ``loss_start``/``loss_end``: the objective
    on the first batch before training and after the last step, ``terms_start``/``terms_end``
    every term of it (``loss`` included) on that batch; ``fold_rel_err``: relative change of the
    full-precision logits caused by folding."""

    qparams: dict[str, QuantizedWeight]
    records: list[dict] = field(default_factory=list)
    loss_start: float | None = None
    loss_end: float | None = None
    fold_rel_err: float | None = None
    wall_time_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_accel_mb: float | None = None
    resumed_from: int = 0
    terms_start: dict[str, float] | None = None
    terms_end: dict[str, float] | None = None
    head_rotation_layers: list[str] = field(default_factory=list)  # layers that got a v/o head rotation

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]

    def summary(self) -> dict:
        return {"steps": len(self.records), "loss_start": self.loss_start, "loss_end": self.loss_end,
                "terms_start": self.terms_start, "terms_end": self.terms_end, "fold_rel_err": self.fold_rel_err,
                "wall_time_s": round(self.wall_time_s, 1),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "peak_accel_mb": self.peak_accel_mb,
                "resumed_from_step": self.resumed_from}


class E2ETransforms(nn.Module):
    """The learnable transforms attached to a model: one residual rotation, per-layer smoothing and (optionally)
    per-layer rotations of the attention heads' values."""

    def __init__(self, rotation: CayleyRotation | None, smoothing: list[LayerSmoothing],
                 head_rotations: dict[str, CayleyRotation] | None = None) -> None:
        super().__init__()
        self.rotation = rotation
        self.smoothing = nn.ModuleList(smoothing)
        self.head_rotations = nn.ModuleDict(head_rotations or {})  # by layer index


# --- prepare / fold / finish -----------------------------------------------------------------------
def _batches(calib: CalibSet, batch_size: int):
    for start in range(0, len(calib), batch_size):
        yield calib.input_ids[start:start + batch_size]


@torch.no_grad()
def _smoothing_stats(model: nn.Module, calib: CalibSet, batch_size: int, device) -> list[dict]:
    _, layers, _, _ = decoder_parts(model)
    with ExitStack() as stack:
        stats = [stack.enter_context(record_smoothing_stats(layer)) for layer in layers]
        for ids in _batches(calib, batch_size):
            model(input_ids=ids.to(device), use_cache=False)
    return stats


def prepare_end_to_end(model: nn.Module, calib: CalibSet, cfg: E2EConfig) -> E2ETransforms:
    """Attach rotation, smoothing and quantizers to ``model`` (on its device) for training.

    The full-precision function is unchanged (quantizers aside): with quantizers disabled the
    model computes what it did before. Model parameters are frozen; the returned transforms and
    the LWC factors are the trainable parameters.
    """
    _, layers, _, _ = decoder_parts(model)
    check_architecture(model)
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = decoder_parts(model)[0].weight.shape[1]
    if cfg.rotation:
        fuse_residual_rotation(model, random_hadamard(hidden, cfg.seed))
    if cfg.use_online_hadamard:
        add_online_hadamard(model, seed=cfg.seed + 1)
    stats = _smoothing_stats(model, calib, cfg.batch_size, device) if cfg.smoothing else []
    rotation = None
    if cfg.rotation:
        rotation = CayleyRotation(hidden, init=torch.eye(hidden, dtype=torch.float64)).to(device)
        attach_residual_rotation(model, rotation)
    smoothing, heads = [], {}
    for i, layer in enumerate(layers):
        if cfg.smoothing:
            sm = init_smoothing(layer, stats[i], cfg.smooth_alpha, cfg.smooth_pairs).to(device)
            attach_smoothing(layer, sm)
            smoothing.append(sm)
        if cfg.vo_rotation and "vo" not in spec_of_layer(layer).not_equivalent:
            # started at a random Hadamard (QuaRot's R2), then learnt (SpinQuant / OSTQuant)
            rot = CayleyRotation(LayerGeometry.of(layer).head_dim, seed=cfg.seed + 1000 + i).to(device)
            attach_head_rotation(layer, rot)
            heads[str(i)] = rot
        wrap_decoder_layer(layer, cfg.scheme, lwc=cfg.lwc, prefix=f"model.layers.{i}.")
        if cfg.qk_hadamard:
            attn = layer.self_attn
            if isinstance(getattr(attn, "k_proj", None), QuantLinear):
                attn.k_proj.output_quantizer = None  # K is quantized after RoPE instead
            attach_qk_transform(model, attn, random_hadamard(attn.head_dim, cfg.seed + 2000 + i).float(),
                                cfg.scheme.kv_cache)
    return E2ETransforms(rotation, smoothing, heads)


@torch.no_grad()
def fold_end_to_end(model: nn.Module, transforms: E2ETransforms) -> None:
    """Bake the rotation, then the smoothing scales, into the weights (exact, float64).

    Leaves quantizer-wrapped linears without transforms (online Hadamards stay as input transforms).
    """
    if transforms.rotation is not None:
        fold_residual_rotation(model, transforms.rotation)
    _, layers, _, _ = decoder_parts(model)
    for layer, sm in zip(layers, transforms.smoothing):
        fold_smoothing(layer, sm)
    for i, rot in transforms.head_rotations.items():  # attached after the smoothing: folded after it
        fold_head_rotation(layers[int(i)], rot)


@torch.no_grad()
def finalize_model(model: nn.Module, scheme: Scheme) -> dict[str, QuantizedWeight]:
    """The block-wise engine's finishing step for every layer: quantize the weights (RTN with the
    learned clipping), unwrap to plain linears, attach activation quantization hooks; returns
    the exact integer parameters by linear name (for the exporter); their ``dequantized`` entries are
    placeholders until :func:`~safeptq.quant.engine.share_dequantized` is called on the model in its
    final place and dtype (as :func:`calibrate_end_to_end` does)."""
    _, layers, _, _ = decoder_parts(model)
    set_quantizers_enabled(model, True)
    qparams: dict[str, QuantizedWeight] = {}
    for i, layer in enumerate(layers):
        for rel in decoder_linears(layer):
            mod = layer.get_submodule(rel)
            if isinstance(mod, QuantLinear) and mod.transform_keys():
                raise ConfigError(f"{mod.name or rel} still has transforms {mod.transform_keys()}; fold them first")
        qparams.update(finish_layer(layer, i, scheme))
    return qparams


# --- training ------------------------------------------------------------------------------------
def _named_trainables(model: nn.Module, transforms: E2ETransforms, cfg: E2EConfig) -> tuple[dict, list[dict]]:
    named: dict[str, nn.Parameter] = {}
    groups = []
    if transforms.rotation is not None:
        named["rotation.weight"] = transforms.rotation.weight
        groups.append({"params": [transforms.rotation.weight], "lr": cfg.lr_rotation, "name": "rotation"})
    heads = {f"head_rotations.{i}.weight": r.weight for i, r in transforms.head_rotations.items()}
    if heads:
        named.update(heads)
        groups.append({"params": list(heads.values()), "lr": cfg.lr_rotation, "name": "head_rotation"})
    sm = {f"smoothing.{n}": p for n, p in transforms.smoothing.named_parameters()}
    if sm:
        named.update(sm)
        groups.append({"params": list(sm.values()), "lr": cfg.lr_smoothing, "name": "smoothing"})
    lwc = {}
    for name, m in model.named_modules():
        if isinstance(m, WeightQuantizer) and m.lwc:
            lwc[f"{name}.upbound_factor"], lwc[f"{name}.lowbound_factor"] = m.upbound_factor, m.lowbound_factor
    if lwc:
        named.update(lwc)
        groups.append({"params": list(lwc.values()), "lr": cfg.lr_lwc, "name": "lwc"})
    for p in named.values():
        p.requires_grad_(True)
    return named, groups


def _batch_index(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Rows of batch ``step``: consecutive slices of per-epoch permutations fixed by ``seed``."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = perm[off: off + batch_size - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return torch.tensor(out, dtype=torch.long)


def _train_dtype(cfg: E2EConfig, dtype: torch.dtype) -> torch.dtype:
    """Dtype of the frozen weights while training: the model's own bf16/fp16 under ``bf16``
    precision, float32 otherwise."""
    return dtype if cfg.precision == "bf16" and is_low_precision(dtype) else torch.float32


def _terms(model, calib: CalibSet, objective: E2EObjective, refs: References, idx: torch.Tensor, device,
           precision: str = "fp32") -> dict:
    ids = calib.input_ids[idx]
    batch_refs = refs.batch(idx, ids).to(device)
    with forward_precision(precision, device):
        logits = model(input_ids=ids.to(device), use_cache=False).logits
    # the objective (log-softmax, KL) in float32, outside autocast
    return objective.terms(logits.float(), batch_refs, calib.attention_mask[idx].to(device))


@torch.no_grad()
def initial_kl(model: nn.Module, calib: CalibSet, objective: E2EObjective, refs: References,
               cfg: E2EConfig) -> float:
    """The quantization damage at initialisation: the objective's KL to the instruct model (its
    ``kl_instruct`` term; the whole loss for objectives without one) on the first training batch,
    right after :func:`prepare_end_to_end`, on a copy (``model`` is left untouched). Measuring the
    pull term alone makes the choice the same for every objective on the same instruct model."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    m = copy.deepcopy(model).to(device, _train_dtype(cfg, next(model.parameters()).dtype))
    prepare_end_to_end(m, calib, cfg)
    idx = _batch_index(0, len(calib), cfg.batch_size, cfg.seed)
    terms = _terms(m, calib, objective, refs, idx, device, cfg.precision)
    del m
    return float(terms.get("kl_instruct", terms["loss"]))


def choose_transforms(model: nn.Module, calib: CalibSet, objective: E2EObjective, refs: References,
                      cfg: E2EConfig, rotation: tuple[bool, ...] = (False, True),
                      smoothing: tuple[bool, ...] = (False, True)) -> tuple[E2EConfig, list[dict]]:
    """Pick the transform set (residual rotation on/off x smoothing on/off, among the options
    given) with the lowest :func:`initial_kl`; return its config and every candidate's value.

    Why: no initialisation wins everywhere. On SmolLM2-135M the random-Hadamard rotation (which
    needs the RMSNorm gains folded into the weights) raises the initial KL of W4A16-g64 and W4A8
    weights (0.49 -> 0.85 and 0.96 -> 1.40 nats per token), while SmoothQuant scales lower it; on
    larger models with activation outliers the rotation is what makes 4-bit activations work. The
    search costs one forward pass per candidate."""
    table = []
    for rot in dict.fromkeys(rotation):
        for sm in dict.fromkeys(smoothing):
            cand = replace(cfg, rotation=rot, smoothing=sm)
            table.append({"rotation": rot, "smoothing": sm,
                          "initial_kl": initial_kl(model, calib, objective, refs, cand)})
    best = min(table, key=lambda r: r["initial_kl"])
    return replace(cfg, rotation=best["rotation"], smoothing=best["smoothing"]), table


def _fingerprint(model, calib: CalibSet, objective: E2EObjective, refs: References, cfg: E2EConfig,
                 model_id: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"cfg": cfg.fingerprint(), "objective": objective.describe(), "refs": refs.describe(),
                         "model": model_id or getattr(model.config, "_name_or_path", ""),
                         "layers": len(decoder_parts(model)[1])}, sort_keys=True, default=str).encode())
    h.update(calib.input_ids.numpy().tobytes())
    h.update(calib.attention_mask.numpy().tobytes())
    return h.hexdigest()[:16]


def _check_inputs(objective: E2EObjective, refs: References, calib: CalibSet) -> None:
    if not isinstance(objective, E2EObjective):
        raise ConfigError(f"end-to-end calibration needs an end-to-end objective (kl_top, contrastive_kl_top), "
                          f"got {type(objective).__name__}")
    missing = [n for n in objective.references if n not in refs.names]
    if missing:
        raise ConfigError(f"objective {objective.name!r} needs reference(s) {missing}; the references hold "
                          f"{list(refs.names)}")
    if len(calib) == 0:
        raise ConfigError("the calibration set is empty")
    refs.check_calib(calib)


@torch.no_grad()
def _fold_weights_checked(model: nn.Module, transforms: E2ETransforms) -> float:
    """Fold, checking each linear in weight space (see :data:`FOLD_TOLERANCE_LOW`); returns the largest
    relative error. Keeps one vector per linear, not a second copy of the weights."""
    from safeptq.quant.qlinear import base_linear

    lins = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.transform_keys()}
    gen = torch.Generator().manual_seed(0)
    probes = {}
    for name, mod in lins.items():
        v = torch.randn(mod.in_features, 1, generator=gen, dtype=torch.float64)
        w, _ = mod.effective_weight_bias()
        probes[name] = (v, (w.double() @ v.to(w.device)).cpu())
    fold_end_to_end(model, transforms)
    worst, where = 0.0, ""
    for name, (v, ref) in probes.items():
        w = base_linear(model.get_submodule(name)).weight
        got = (w.double() @ v.to(w.device)).cpu()
        err = _rel_err(ref, got)
        if err > worst:
            worst, where = err, name
    if worst > FOLD_TOLERANCE_LOW:
        raise CalibrationError(f"folding the learned transforms changed {where} by {worst:.2e} (relative, in weight "
                               "space); the transforms are ill-conditioned")
    return worst


def _rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def calibrate_end_to_end(model: nn.Module, calib: CalibSet, objective: E2EObjective, refs: References,
                         cfg: E2EConfig, *, work_dir: str | Path | None = None, resume: bool = False,
                         progress: bool = True, finalize: bool = True,
                         on_step: Callable[[dict], None] | None = None, model_id: str | None = None) -> E2EResult:
    """Quantize ``model`` in place end to end (see the module doc).

    ``refs`` must hold the references ``objective`` reads, computed on ``calib``. ``on_step``
    receives each step's record. ``finalize=False`` stops after folding, leaving
    quantizer-wrapped linears with full-precision weights (call :func:`finalize_model` later).
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    check_architecture(model)
    _check_inputs(objective, refs, calib)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    first = next(model.parameters())
    orig_device, orig_dtype = first.device, first.dtype
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fp = _fingerprint(model, calib, objective, refs, cfg, model_id)
    model.to(device, _train_dtype(cfg, orig_dtype))
    transforms = prepare_end_to_end(model, calib, cfg)
    named, groups = _named_trainables(model, transforms, cfg)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay) if groups else None

    work = Path(work_dir) if work_dir is not None else None
    state_path = work / _STATE if work is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    start, records, loss_start = 0, [], None
    if resume and state_path is not None and state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "fingerprint" not in state:
                raise KeyError("fingerprint")
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line, not a traceback
            raise CalibrationError(f"the checkpoint {state_path} cannot be read ({type(e).__name__}); remove the "
                                   "work folder or run without --resume") from None
        if state["fingerprint"] != fp:
            raise CalibrationError(f"the checkpoint in {work} was made with another recipe, model, references or "
                                   "calibration set; remove it or run without resume")
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value.to(named[name].device))
        if opt is not None:
            opt.load_state_dict(state["optimizer"])
        start, records, loss_start = state["step"], json.loads(state["records"]), state["loss_start"]
        log.info("resuming end-to-end calibration at step %d of %d", start, cfg.steps)

    def save(step_done: int) -> None:
        if state_path is not None:
            save_torch_atomic({"fingerprint": fp, "step": step_done, "loss_start": loss_start,
                          "params": {n: p.detach().cpu() for n, p in named.items()},
                          "optimizer": opt.state_dict() if opt is not None else {},
                          "records": json.dumps(records)}, state_path)

    first_idx = _batch_index(0, len(calib), cfg.batch_size, cfg.seed)
    steps = cfg.steps if opt is not None else 0
    bar = tqdm(total=steps, initial=min(start, steps), desc="calibrate end-to-end", unit="step", disable=not progress)
    if cfg.checkpointing:
        # transformers' per-layer checkpointing (non-reentrant: only the transforms need gradients); it
        # acts in training mode only, and these decoders have no dropout, so train() changes nothing else
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    try:
        for step in range(start, steps):
            ts = time.time()
            idx = _batch_index(step, len(calib), cfg.batch_size, cfg.seed)
            with torch.enable_grad(), step_precision(cfg.precision, device):
                terms = _terms(model, calib, objective, refs, idx, device, cfg.precision)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise CalibrationError(f"end-to-end step {step}: the loss became {loss.item()}; lower the "
                                           "learning rates (lr_rotation / lr_smoothing / lr_lwc)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            rec = {"step": step, **{k: float(v.detach()) for k, v in terms.items()},
                   "seconds": round(time.time() - ts, 3)}
            # terms off the loss's gradient path (e.g. a capped push) keep their graph's saved tensors alive
            # until dropped: without this, step N's graph lives while step N+1 builds its own
            del terms, loss
            records.append(rec)
            if step == 0:
                loss_start = rec["loss"]
            done = step + 1
            if (cfg.save_every and done % cfg.save_every == 0) or done == steps:
                save(done)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4g}")
            if on_step is not None:
                on_step(rec)
    finally:
        bar.close()
        if cfg.checkpointing:
            model.eval()
            model.gradient_checkpointing_disable()

    for p in named.values():
        p.requires_grad_(False)
    with torch.no_grad():
        terms_end = {k: float(v) for k, v in
                     _terms(model, calib, objective, refs, first_idx, device, cfg.precision).items()}
        loss_end = terms_end["loss"]
        if loss_start is None:
            loss_start = loss_end
        terms_start = ({k: v for k, v in records[0].items() if k not in ("step", "seconds")} if records
                       else dict(terms_end))
        if is_low_precision(next(model.parameters()).dtype):
            fold_err = _fold_weights_checked(model, transforms)
        else:
            probe = calib.input_ids[first_idx].to(device)
            set_quantizers_enabled(model, False)
            before = model(input_ids=probe, use_cache=False).logits
            fold_end_to_end(model, transforms)
            after = model(input_ids=probe, use_cache=False).logits
            set_quantizers_enabled(model, True)
            fold_err = _rel_err(before, after)
            if fold_err > FOLD_TOLERANCE:
                raise CalibrationError(f"folding the learned transforms changed the full-precision logits by "
                                       f"{fold_err:.2e} (relative); the transforms are ill-conditioned")
        qparams = finalize_model(model, cfg.scheme) if finalize else {}
    # back to the model's own dtype, keeping the online Hadamards in float32
    hadamards = {m: m.h.clone() for m in model.modules() if isinstance(m, OnlineHadamard)}
    model.to(orig_device, orig_dtype)
    for m, h in hadamards.items():
        m.h = h.to(orig_device)
    share_dequantized(model, qparams)
    release_host_memory()  # the training's freed activations, not kept by the allocator into the export
    rss, acc = peak_memory_mb()
    return E2EResult(qparams=qparams, records=records, loss_start=loss_start, loss_end=loss_end,
                     fold_rel_err=fold_err, wall_time_s=time.time() - t0, peak_rss_mb=rss, peak_accel_mb=acc,
                     resumed_from=start, terms_start=terms_start, terms_end=terms_end,
                     head_rotation_layers=list(transforms.head_rotations.keys()))
