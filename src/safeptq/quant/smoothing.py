"""Per-channel smoothing (SmoothQuant, OmniQuant's LET) for the decoder layers of every supported
family (:mod:`safeptq.archs`: norm names and gains, fused projections, which pairs are legal).

A smoothing scale ``s`` moves range from an activation to the weight that consumes it:
``x W^T = (x / s)(W diag(s))^T``. It is exact when ``x / s`` can be produced by the layer that
makes ``x``, so ``s`` folds away and the full-precision model is unchanged:

* ``attn_in``: input_layernorm → q, k, v      (norm weight / s; q,k,v columns * s)
* ``mlp_in``:  the MLP's input norm → gate, up (Llama: post_attention_layernorm; Gemma:
  pre_feedforward_layernorm; Phi-3: the fused gate_up_proj)
* ``vo``:      v_proj → o_proj                (v rows / s; o columns * s). Under GQA one v channel
  feeds ``num_heads / num_kv_heads`` query heads, so ``s`` lives in v's output space
  ``[kv_heads * head_dim]`` and is repeated per query head on o's input.
* ``qk``:      q_proj → k_proj through q·kᵀ     (q rows / s; k rows * s). RoPE mixes dims ``i`` and
  ``i + head_dim/2``; the scale commutes with it only if equal on both, so it is stored as
  ``[kv_heads, head_dim/2]`` and duplicated. It is per kv head and shared by its query heads.
* ``up_down``: up_proj → down_proj through ``act(gate(x)) * up(x)`` (up rows / s; down columns * s): the
  product is linear in ``up``'s output, so the scale passes through it (OSTQuant's and OmniQuant's
  up→down pair; Phi-3: the up half of the fused gate_up_proj). Not in :data:`DEFAULT_PAIRS`.

OmniQuant also learns shifts (``x - δ``, absorbed into a LayerNorm bias). RMSNorm has no bias
and its output is not centred, so there is nothing to absorb a shift into; shifts are omitted.

Training: :func:`attach_smoothing` keeps the layer's own forward and routes the learnable scales
through a norm wrapper and :class:`~safeptq.quant.qlinear.QuantLinear` weight transforms.
:func:`fold_smoothing` then bakes them in exactly (float64 arithmetic).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from safeptq.archs import ArchSpec, spec_of_layer
from safeptq.errors import ConfigError
from safeptq.quant.qlinear import QuantLinear, base_linear, wrap_linear

__all__ = [
    "PAIRS",
    "DEFAULT_PAIRS",
    "SCALE_CLAMP",
    "LayerGeometry",
    "LayerSmoothing",
    "ScaledNorm",
    "record_smoothing_stats",
    "init_smoothing",
    "attach_smoothing",
    "detach_smoothing",
    "fold_smoothing",
]

PAIRS: tuple[str, ...] = ("attn_in", "mlp_in", "vo", "qk", "up_down")
DEFAULT_PAIRS: tuple[str, ...] = ("attn_in", "mlp_in", "vo", "qk")  # what the engines smooth unless told otherwise
SCALE_CLAMP = 1e-5
_WARNED: set[tuple[str, str]] = set()
log = logging.getLogger(__name__)
_KEY = "smoothing"


@dataclass(frozen=True)
class LayerGeometry:
    """Attention shapes of one decoder layer, read from its linears."""

    hidden: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate: int = 0  # the MLP's inner width (down_proj's input)

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, layer: nn.Module) -> LayerGeometry:
        attn = layer.self_attn
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None:
            raise ConfigError(f"{type(attn).__name__} has no head_dim; not a Llama-style attention")
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim} is odd; RoPE needs it even")
        inter = base_linear(layer.get_submodule(spec_of_layer(layer).mlp_writer)).in_features
        cfg = getattr(attn, "config", None)
        if cfg is not None:  # every supported family keeps its config on the attention module
            heads = cfg.num_attention_heads
            return cls(cfg.hidden_size, head_dim, heads, getattr(cfg, "num_key_value_heads", None) or heads, inter)
        q, k = base_linear(attn.q_proj), base_linear(attn.k_proj)
        return cls(q.in_features, head_dim, q.out_features // head_dim, k.out_features // head_dim, inter)

    def per_query_head(self, s: torch.Tensor) -> torch.Tensor:
        """Expand a ``[kv_heads * head_dim]`` vector to ``[heads * head_dim]`` (GQA sharing)."""
        return s.view(self.num_kv_heads, self.head_dim).repeat_interleave(self.n_rep, 0).reshape(-1)

    def reduce_query_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Max of a ``[heads * head_dim]`` statistic over the query heads sharing a kv head."""
        return x.view(self.num_kv_heads, self.n_rep, self.head_dim).amax(1).reshape(-1)

    def reduce_rope_pairs(self, x: torch.Tensor) -> torch.Tensor:
        """``[kv_heads * head_dim]`` → ``[kv_heads, head_dim/2]``: max over each RoPE pair."""
        x = x.view(self.num_kv_heads, 2, self.head_dim // 2)
        return x.amax(1)


class LayerSmoothing(nn.Module):
    """Learnable smoothing scales of one decoder layer; ``scale(pair)`` gives the full vector."""

    def __init__(self, geometry: LayerGeometry, pairs: Iterable[str] = DEFAULT_PAIRS) -> None:
        super().__init__()
        pairs = tuple(pairs)
        bad = [p for p in pairs if p not in PAIRS]
        if bad:
            raise ConfigError(f"unknown smoothing pair(s) {bad}; valid: {list(PAIRS)}")
        self.geometry = g = geometry
        shapes = {
            "attn_in": (g.hidden,),
            "mlp_in": (g.hidden,),
            "vo": (g.num_kv_heads * g.head_dim,),
            "qk": (g.num_kv_heads, g.head_dim // 2),
            "up_down": (g.intermediate,),
        }
        self.scales = nn.ParameterDict({p: nn.Parameter(torch.ones(shapes[p])) for p in pairs})

    @property
    def pairs(self) -> tuple[str, ...]:
        return tuple(self.scales.keys())

    def scale(self, pair: str) -> torch.Tensor:
        """Clamped scale vector of ``pair`` in the space it acts on (qk: ``[kv_heads*head_dim]``)."""
        s = self.scales[pair].clamp(min=SCALE_CLAMP)
        if pair == "qk":
            s = torch.cat([s, s], dim=-1).reshape(-1)
        return s


class ScaledNorm(nn.Module):
    """Wraps a norm so its output is divided by a (learnable) scale: ``norm(x) / s``."""

    def __init__(self, norm: nn.Module, smoothing: LayerSmoothing, pair: str) -> None:
        super().__init__()
        self.norm = norm
        self.smoothing = [smoothing]  # a list: not a submodule, so its parameters are not duplicated
        self.pair = pair

    @property
    def weight(self) -> torch.Tensor:
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return (y / self.smoothing[0].scale(self.pair).to(y.device)).to(y.dtype)


# --- the transforms, shared by attach (live parameters) and fold (float64 constants) ---------
def _cols_mul(s):
    return lambda w, b: (w * s().to(w), b)


def _rows_div(s):
    def fn(w, b):
        v = s().to(w)
        return w / v[:, None], None if b is None else b / v

    return fn


def _rows_mul(s):
    def fn(w, b):
        v = s().to(w)
        return w * v[:, None], None if b is None else b * v

    return fn


def _second_half_rows_div(s):
    """Rows / s on the second half only: the up part of a fused ``gate_up_proj``."""
    def fn(w, b):
        v = s().to(w)
        ones = torch.ones(w.shape[0] - v.shape[0], dtype=w.dtype, device=w.device)
        full = torch.cat([ones, v])
        return w / full[:, None], None if b is None else b / full

    return fn


def _cols_mul_before(s, h: torch.Tensor):
    """Columns * s in the basis *before* an online input transform ``x ↦ x Hᵀ`` (stored weight ``W Hᵀ``): the scale
    must meet the activation before the Hadamard mixes its channels, so ``W Hᵀ ↦ (W Hᵀ H) diag(s) Hᵀ``."""
    def fn(w, b):
        hh = h.to(w)
        return ((w @ hh) * s().to(w)) @ hh.T, b

    return fn


def _online_matrix(layer: nn.Module, name: str) -> torch.Tensor | None:
    """The ``H`` of an online Hadamard on ``name``'s input (a QuantLinear's, or a plain linear's hook), if any."""
    mod = layer.get_submodule(name)
    t = getattr(mod, "input_transform", None)
    if t is None and isinstance(mod, QuantLinear):
        t = getattr(mod.linear, "input_transform", None)
    return getattr(t, "h", None)


def _plan(sm: LayerSmoothing, spec: ArchSpec, layer: nn.Module | None = None
          ) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """(linear transforms, norm divisions) implementing ``sm`` on a layer of family ``spec`` (``layer``: to see
    online Hadamards on down_proj's input, which the up→down scale has to pass before)."""
    g = sm.geometry
    spec.check_pairs(sm.pairs)
    lin: list[tuple[str, object]] = []
    norms: list[tuple[str, str]] = []
    if "attn_in" in sm.scales:
        norms.append((spec.attn_norm, "attn_in"))
        for n in spec.attn_readers:
            lin.append((n, _cols_mul(lambda: sm.scale("attn_in"))))
    if "mlp_in" in sm.scales:
        norms.append((spec.mlp_norm, "mlp_in"))
        for n in spec.mlp_readers:
            lin.append((n, _cols_mul(lambda: sm.scale("mlp_in"))))
    if "vo" in sm.scales:
        lin.append(("self_attn.v_proj", _rows_div(lambda: sm.scale("vo"))))
        lin.append(("self_attn.o_proj", _cols_mul(lambda: g.per_query_head(sm.scale("vo")))))
    if "qk" in sm.scales:
        lin.append(("self_attn.q_proj", _rows_div(lambda: g.per_query_head(sm.scale("qk")))))
        lin.append(("self_attn.k_proj", _rows_mul(lambda: sm.scale("qk"))))
    if "up_down" in sm.scales:
        div = _second_half_rows_div if spec.mlp_up_offset else _rows_div
        lin.append((spec.mlp_up, div(lambda: sm.scale("up_down"))))
        h = None if layer is None else _online_matrix(layer, spec.mlp_writer)
        scale = lambda: sm.scale("up_down")  # noqa: E731
        lin.append((spec.mlp_writer, _cols_mul(scale) if h is None else _cols_mul_before(scale, h)))
    return lin, norms


@contextmanager
def record_smoothing_stats(layer: nn.Module):
    """Record per-channel ``max|·|`` needed by :func:`init_smoothing` while the block runs.

    Yields a dict filled in place: ``attn_in``/``mlp_in`` (q and gate inputs), ``o_in`` (o_proj
    input), ``down_in`` (down_proj input), ``q_out``/``k_out`` (q and k outputs before RoPE). Call the layer any number of times
    inside the ``with``; maxima accumulate. Record on the full-precision layer, before wrapping
    or attaching anything (quantizers and scales would distort the statistics).
    """
    stats: dict[str, torch.Tensor] = {}

    def keep(key, t):
        m = t.detach().abs().reshape(-1, t.shape[-1]).amax(0).float()
        stats[key] = m if key not in stats else torch.maximum(stats[key], m)

    hooks = []
    spec = spec_of_layer(layer)
    sub = layer.get_submodule
    for name, key in ((spec.attn_readers[0], "attn_in"), (spec.mlp_readers[0], "mlp_in"), (spec.attn_writer, "o_in"),
                      (spec.mlp_writer, "down_in")):
        # prepend: ahead of an online Hadamard's pre-hook, so the statistic is in the basis the scale acts in
        hooks.append(sub(name).register_forward_pre_hook(lambda m, a, key=key: keep(key, a[0]), prepend=True))
    if not spec.fused:
        for name, key in (("self_attn.q_proj", "q_out"), ("self_attn.k_proj", "k_out")):
            hooks.append(sub(name).register_forward_hook(lambda m, a, out, key=key: keep(key, out)))
    try:
        yield stats
    finally:
        for h in hooks:
            h.remove()


def _smooth(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_max.clamp(min=SCALE_CLAMP).pow(alpha) / w_max.clamp(min=SCALE_CLAMP).pow(1 - alpha)
    return s.clamp(min=SCALE_CLAMP)


def _col_absmax(layer: nn.Module, names: Iterable[str]) -> torch.Tensor:
    ws = [base_linear(layer.get_submodule(n)).weight.detach().abs().float() for n in names]
    return torch.cat(ws, 0).amax(0)


@torch.no_grad()
def init_smoothing(
    layer: nn.Module,
    stats: dict[str, torch.Tensor] | None,
    alpha: float = 0.5,
    pairs: Iterable[str] = DEFAULT_PAIRS,
) -> LayerSmoothing:
    """SmoothQuant initialisation ``s = max|x|^α / max|w|^(1-α)``, clamped at 1e-5.

    ``stats`` comes from :func:`record_smoothing_stats`; pairs whose statistic is missing (or
    ``stats=None``) start at 1. For ``qk`` the roles are x = q, w = k.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha must be in [0, 1], got {alpha}")
    g = LayerGeometry.of(layer)
    spec = spec_of_layer(layer)
    pairs = tuple(pairs)
    for p in pairs:
        if p in spec.not_equivalent and (spec.family, p) not in _WARNED:  # switched off, said once per family
            _WARNED.add((spec.family, p))
            log.warning("smoothing pair %s is off on %s: %s", p, spec.family, spec.not_equivalent[p])
    sm = LayerSmoothing(g, spec.legal_pairs(pairs))
    stats = stats or {}
    dev = sm.scales[sm.pairs[0]].device if sm.pairs else None
    for pair in sm.pairs:
        if pair == "attn_in" and "attn_in" in stats:
            s = _smooth(stats["attn_in"], _col_absmax(layer, spec.attn_readers), alpha)
        elif pair == "mlp_in" and "mlp_in" in stats:
            s = _smooth(stats["mlp_in"], _col_absmax(layer, spec.mlp_readers), alpha)
        elif pair == "vo" and "o_in" in stats:
            w = _col_absmax(layer, ("self_attn.o_proj",))
            s = _smooth(g.reduce_query_heads(stats["o_in"]), g.reduce_query_heads(w), alpha)
        elif pair == "up_down" and "down_in" in stats:
            h = _online_matrix(layer, spec.mlp_writer)
            if h is None:
                w = _col_absmax(layer, (spec.mlp_writer,))
            else:  # the stored weight is W Hᵀ; the scale acts on W's own columns
                stored = base_linear(layer.get_submodule(spec.mlp_writer)).weight.detach().double()
                w = (stored @ h.to(stored)).abs().amax(0).float()
            s = _smooth(stats["down_in"], w, alpha)
        elif pair == "qk" and "q_out" in stats and "k_out" in stats:
            q = g.reduce_rope_pairs(g.reduce_query_heads(stats["q_out"]))
            k = g.reduce_rope_pairs(stats["k_out"])
            s = _smooth(q, k, alpha)
        else:
            continue
        sm.scales[pair].copy_(s.to(dev))
    return sm


def _ensure_wrapped(layer: nn.Module, name: str) -> QuantLinear:
    mod = layer.get_submodule(name)
    if not isinstance(mod, QuantLinear):
        mod = wrap_linear(mod, None, name)
        layer.set_submodule(name, mod)
    return mod


def attach_smoothing(layer: nn.Module, smoothing: LayerSmoothing) -> None:
    """Route ``smoothing``'s live scales through ``layer`` for training (output unchanged in FP).

    Plain linears are wrapped in a quantizer-less :class:`QuantLinear`; norms are wrapped in
    :class:`ScaledNorm`. Undo with :func:`detach_smoothing` or :func:`fold_smoothing`.
    """
    if LayerGeometry.of(layer) != smoothing.geometry:
        raise ConfigError("smoothing scales were built for a layer of another shape")
    spec = spec_of_layer(layer)
    if any(isinstance(layer.get_submodule(n), ScaledNorm) for n in (spec.attn_norm, spec.mlp_norm)):
        raise ConfigError("smoothing is already attached to this layer")
    lin, norms = _plan(smoothing, spec, layer)
    for name, fn in lin:
        _ensure_wrapped(layer, name).add_weight_transform(_KEY, fn)
    for norm_name, pair in norms:
        layer.set_submodule(norm_name, ScaledNorm(layer.get_submodule(norm_name), smoothing, pair))


def detach_smoothing(layer: nn.Module) -> None:
    """Remove attached scales without folding them (restores the original function)."""
    spec = spec_of_layer(layer)
    for name in (spec.attn_norm, spec.mlp_norm):
        mod = layer.get_submodule(name)
        if isinstance(mod, ScaledNorm):
            layer.set_submodule(name, mod.norm)
    for mod in layer.modules():
        if isinstance(mod, QuantLinear):
            mod.remove_weight_transforms(_KEY)


@torch.no_grad()
def fold_smoothing(layer: nn.Module, smoothing: LayerSmoothing) -> None:
    """Bake ``smoothing`` into the layer's norm weights and linear weights, exactly.

    Works whether or not the scales are attached; afterwards nothing of ``smoothing`` is
    referenced by the layer. Arithmetic is done in float64 and cast back once per tensor.
    """
    spec = spec_of_layer(layer)
    attached = any(isinstance(layer.get_submodule(n), ScaledNorm) for n in (spec.attn_norm, spec.mlp_norm)) or any(
        isinstance(m, QuantLinear) and _KEY in m.transform_keys() for m in layer.modules())
    if attached:
        for mod in layer.modules():
            if isinstance(mod, QuantLinear) and _KEY in mod.transform_keys():
                mod.bake_transforms([_KEY])  # raises if another transform sits in front
        detach_smoothing(layer)
    else:
        if LayerGeometry.of(layer) != smoothing.geometry:
            raise ConfigError("smoothing scales were built for a layer of another shape")
        lin, _ = _plan(smoothing, spec, layer)
        for name, fn in lin:
            mod = layer.get_submodule(name)
            if isinstance(mod, QuantLinear) and mod.transform_keys():
                raise ConfigError(
                    f"{name} has unfolded transforms {mod.transform_keys()}; they apply before "
                    "smoothing, fold them first"
                )
            w_mod = base_linear(mod)
            w = w_mod.weight.double()
            b = None if w_mod.bias is None else w_mod.bias.double()
            w, b = fn(w, b)
            w_mod.weight.copy_(w.to(w_mod.weight.dtype))
            if b is not None:
                w_mod.bias.copy_(b.to(w_mod.bias.dtype))
    _, norms = _plan(smoothing, spec)
    off = spec.norm_offset  # the gain is offset + w (Gemma: 1 + w): (offset + w) / s = offset + w'
    for norm_name, pair in norms:
        norm = layer.get_submodule(norm_name)
        s = smoothing.scale(pair).double().to(norm.weight.device)
        norm.weight.copy_(((off + norm.weight.double()) / s - off).to(norm.weight.dtype))
