"""Orthogonal rotations of a Llama-style model (QuaRot/SpinQuant/OSTQuant): fixed and learnable.

Notation: hidden states are row vectors ``h``; a linear computes ``y = h Wᵀ + b``.

Residual rotation. Rotating the residual stream ``h → h Q`` (``Q`` orthogonal) leaves the model's
function unchanged if every reader absorbs ``Q`` and every writer emits rotated output:
readers (q, k, v, gate, up, lm_head) ``W ← W Q``; writers (o, down) ``W ← Qᵀ W``, ``b ← b Q``;
embeddings ``E ← E Q``. RMSNorm commutes with ``Q`` only when its weight is all ones
(``‖hQ‖ = ‖h‖``, but ``diag(g)`` does not commute with ``Q``), so every norm weight is first folded
into the linears that read it. Tied embeddings must be untied: ``E`` gets ``Q`` on one side for
the input, ``lm_head`` on the other for the output.

Online Hadamard. The down_proj input (the MLP's intermediate activation) is not part of the
residual stream, so it is rotated at run time: ``x ← x Hᵀ`` by a pre-hook and ``W_down ← W_down Hᵀ``
(``x Hᵀ (W Hᵀ)ᵀ = x Wᵀ``). It spreads outliers before activation quantization.

Learnable rotation. :class:`CayleyRotation` is ``Q0 · (I - S)⁻¹(I + S)`` with ``S`` skew-symmetric:
orthogonal for any parameter value, equal to ``Q0`` (a random Hadamard) at init. It is applied
to a model through QuantLinear weight transforms and an embedding hook while training
(:func:`attach_residual_rotation`) and baked in by :func:`fold_residual_rotation`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from safeptq.archs import spec_of_layer, spec_of_model
from safeptq.errors import ConfigError
from safeptq.quant.qlinear import (
    QuantLinear,
    attach_input_transform,
    base_linear,
    wrap_linear,
)

__all__ = [
    "READERS",
    "WRITERS",
    "sylvester_hadamard",
    "random_orthogonal",
    "random_hadamard",
    "decoder_parts",
    "untie_embeddings",
    "fold_norms",
    "fuse_residual_rotation",
    "OnlineHadamard",
    "online_hadamard",
    "add_online_hadamard",
    "CayleyRotation",
    "attach_residual_rotation",
    "detach_residual_rotation",
    "fold_residual_rotation",
    "attach_head_rotation",
    "fold_head_rotation",
]

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # Llama's; other families: their spec (safeptq.archs)
_KEY = "rotation"


# --- matrices -----------------------------------------------------------------------------------
def sylvester_hadamard(n: int) -> torch.Tensor:
    """The ±1 Sylvester Hadamard matrix of order ``n`` (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    d = torch.diagonal(r)
    return (q * torch.where(d < 0, -1.0, 1.0).to(q.dtype).unsqueeze(0)).contiguous()


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthonormal Hadamard-like matrix of order ``n`` with random sign flips.

    ``n = 2^k · m`` with ``m`` odd: ``diag(±1) · (H_{2^k}/√2^k ⊗ R_m)`` where ``R_m`` is a random
    orthogonal matrix (``m = 1``: exact Hadamard). E.g. 576 = 64·9, 1536 = 512·3.
    Built in float64; cast to ``dtype`` at the end.
    """
    if n < 1:
        raise ConfigError(f"matrix order must be positive, got {n}")
    gen = torch.Generator().manual_seed(seed)
    pow2 = n & -n
    odd = n // pow2
    h = sylvester_hadamard(pow2) / math.sqrt(pow2)
    if odd > 1:
        h = torch.kron(h, random_orthogonal(odd, gen))
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * h).to(dtype)


def _check_orthogonal(q: torch.Tensor, n: int) -> torch.Tensor:
    if q.shape != (n, n):
        raise ConfigError(f"rotation must be [{n}, {n}] for hidden size {n}, got {tuple(q.shape)}")
    q = q.detach().double()
    err = (q.T @ q - torch.eye(n, dtype=torch.float64, device=q.device)).abs().max().item()
    if err > 1e-4:
        raise ConfigError(f"rotation is not orthogonal (max |QᵀQ - I| = {err:.2e})")
    return q


# --- model surgery ------------------------------------------------------------------------------
def decoder_parts(model: nn.Module) -> tuple[nn.Embedding, nn.ModuleList, nn.Module, nn.Module]:
    """``(embed_tokens, layers, final norm, lm_head)`` of a Llama-style causal LM."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise ConfigError(
            f"{type(model).__name__} is not a Llama-style causal LM (expected model.model.layers "
            "and model.model.norm)"
        )
    return inner.embed_tokens, inner.layers, inner.norm, model.lm_head


def untie_embeddings(model: nn.Module) -> bool:
    """Give ``lm_head`` its own copy of the embedding weight; returns whether they were tied."""
    embed, _, _, head = decoder_parts(model)
    head = base_linear(head)
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    text_cfg.tie_word_embeddings = False
    return tied


def _inner_norm(norm: nn.Module) -> nn.Module:
    return getattr(norm, "norm", norm) if not hasattr(norm, "variance_epsilon") else norm


@torch.no_grad()
def _check_rmsnorm(norm: nn.Module, where: str) -> None:
    """Fail unless ``norm(x) == weight * x / rms(x)`` (Gemma's ``1 + weight`` is not foldable)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    w = getattr(norm, "weight", None)
    if eps is None or w is None or getattr(norm, "bias", None) is not None:
        raise ConfigError(f"{where}: {type(norm).__name__} is not a plain RMSNorm")
    x = torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, torch.float32)
    ref = w.float() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if not torch.allclose(norm(x.to(w.dtype)).float(), ref, rtol=1e-2, atol=1e-3):
        raise ConfigError(f"{where}: {type(norm).__name__} is not weight·x/rms(x); cannot fold it")


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Module], where: str) -> None:
    norm = _inner_norm(norm)
    _check_rmsnorm(norm, where)
    g = norm.weight.double()
    if torch.equal(g, torch.ones_like(g)):
        return
    for r in readers:
        if isinstance(r, QuantLinear) and r.transform_keys():
            raise ConfigError(f"{where}: fold norms before attaching transforms ({r.transform_keys()})")
        lin = base_linear(r)
        lin.weight.copy_((lin.weight.double() * g.to(lin.weight.device)).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def _norm_readers(layer: nn.Module) -> dict[str, tuple[str, ...]]:
    spec = spec_of_layer(layer)
    return {spec.attn_norm: spec.attn_readers, spec.mlp_norm: spec.mlp_readers}


def _readers_writers(layer: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    spec = spec_of_layer(layer)
    spec.check_rotation()
    return (*spec.attn_readers, *spec.mlp_readers), (spec.attn_writer, spec.mlp_writer)


def fold_norms(model: nn.Module) -> None:
    """Fold every RMSNorm weight into the linears reading its output; norms become all-ones.

    Exact; ties are undone first because the final norm folds into ``lm_head`` only. Refused on
    families where a residual rotation is not equivalent (sandwich norms), before any change.
    """
    spec_of_model(model).check_rotation()
    untie_embeddings(model)
    _, layers, final_norm, head = decoder_parts(model)
    for i, layer in enumerate(layers):
        for norm_name, readers in _norm_readers(layer).items():
            mods = [layer.get_submodule(r) for r in readers]
            _fold_norm(layer.get_submodule(norm_name), mods, f"layers.{i}.{norm_name}")
    _fold_norm(final_norm, [head], "model.norm")


@torch.no_grad()
def _mul_right(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() @ q.to(lin.weight.device)).to(lin.weight.dtype))


@torch.no_grad()
def _mul_left_t(lin: nn.Linear, q: torch.Tensor) -> None:
    q = q.to(lin.weight.device)
    lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))


def _rotate_weights(model: nn.Module, q: torch.Tensor) -> None:
    embed, layers, _, head = decoder_parts(model)
    with torch.no_grad():
        embed.weight.copy_((embed.weight.double() @ q.to(embed.weight.device)).to(embed.weight.dtype))
    for layer in layers:
        readers, writers = _readers_writers(layer)
        for name in readers:
            _mul_right(base_linear(layer.get_submodule(name)), q)
        for name in writers:
            _mul_left_t(base_linear(layer.get_submodule(name)), q)
    _mul_right(base_linear(head), q)


def fuse_residual_rotation(model: nn.Module, q: torch.Tensor) -> None:
    """Rotate the residual stream by orthogonal ``q`` in place (see module docstring); exact.

    Unties embeddings, folds norms, then rotates. Linears must carry no attached transforms.
    """
    _, layers, _, head = decoder_parts(model)
    q = _check_orthogonal(q, decoder_parts(model)[0].weight.shape[1])
    for mod in [head, *layers.modules()]:
        if isinstance(mod, QuantLinear) and mod.transform_keys():
            raise ConfigError(
                f"{mod.name or 'a linear'} has attached transforms {mod.transform_keys()}; "
                "fold them (or use fold_residual_rotation) before fusing a rotation"
            )
    fold_norms(model)
    _rotate_weights(model, q)


# --- online Hadamard ------------------------------------------------------------------------------
class OnlineHadamard(nn.Module):
    """``x ↦ x Hᵀ`` on the last dim, computed in float32 (or float64) and cast back."""

    def __init__(self, h: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("h", h.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        return (x.to(dt) @ self.h.to(dt).T).to(x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.h.shape[0]}"


@torch.no_grad()
def online_hadamard(linear: nn.Module, h: torch.Tensor) -> None:
    """Make ``linear`` see ``x Hᵀ``: stored ``W ← W Hᵀ`` and an input transform ``x ↦ x Hᵀ``.

    ``linear`` may be a plain ``nn.Linear`` (a pre-hook is installed) or a :class:`QuantLinear`
    (its ``input_transform``, applied before the activation quantizer). ``H`` acts on input
    columns, so it commutes with the row transforms (rotation of writers) a QuantLinear may hold.
    """
    lin = base_linear(linear)
    n = lin.in_features
    h64 = _check_orthogonal(h, n)
    transform = OnlineHadamard(h64.to(torch.float32)).to(lin.weight.device)
    lin.weight.copy_((lin.weight.double() @ h64.T.to(lin.weight.device)).to(lin.weight.dtype))
    if isinstance(linear, QuantLinear):
        if linear.input_transform is not None:
            raise ConfigError(f"{linear.name or 'linear'} already has an input transform")
        linear.input_transform = transform
    else:
        attach_input_transform(lin, transform)


def add_online_hadamard(model: nn.Module, seed: int = 0) -> None:
    """Put an online Hadamard on every down_proj input (one matrix, shared by all layers)."""
    _, layers, _, _ = decoder_parts(model)
    n = base_linear(layers[0].mlp.down_proj).in_features
    h = random_hadamard(n, seed)
    for layer in layers:
        online_hadamard(layer.mlp.down_proj, h)


# --- learnable rotation ---------------------------------------------------------------------------
class CayleyRotation(nn.Module):
    """Learnable orthogonal ``Q0 · (I - S)⁻¹(I + S)``, ``S = A - Aᵀ`` (``A`` starts at 0).

    ``matrix(dtype)`` is cached per dtype until the parameter changes or :meth:`clear_cache`
    is called; :func:`attach_residual_rotation` clears it at each model forward so every forward
    builds a fresh graph (needed for gradient accumulation). Callers that run decoder layers
    directly with autograd should call :meth:`clear_cache` before each forward.
    """

    def __init__(self, n: int, init: torch.Tensor | None = None, seed: int = 0) -> None:
        super().__init__()
        q0 = random_hadamard(n, seed) if init is None else _check_orthogonal(init, n)
        self.register_buffer("q0", q0.to(torch.float64))
        self.weight = nn.Parameter(torch.zeros(n, n))
        self._cache: dict[tuple, torch.Tensor] = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (dtype, self.weight._version, torch.is_grad_enabled(), self.weight.device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        # in ``dtype`` even inside autocast (bf16 training): an autocast product here would return, and
        # cache under this float32 key, a bf16 matrix
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            a = self.weight.to(dtype)
            s = a - a.T
            eye = torch.eye(a.shape[0], dtype=dtype, device=a.device)
            r = self.q0.to(dtype) @ torch.linalg.solve(eye - s, eye + s)
        self._cache = {key: r}
        return r

    def forward(self) -> torch.Tensor:
        return self.matrix(self.weight.dtype)


def _reader_tf(rot: CayleyRotation):
    def fn(w, b):
        return w @ rot.matrix(w.dtype).to(w.device), b

    return fn


def _writer_tf(rot: CayleyRotation):
    def fn(w, b):
        r = rot.matrix(w.dtype).to(w.device)
        return r.T @ w, None if b is None else b @ r

    return fn


def _embed_hook(rot: CayleyRotation):
    def hook(module, args, out):
        return (out.to(rot.weight.dtype) @ rot.matrix(rot.weight.dtype).to(out.device)).to(out.dtype)

    return hook


def _wrap_first(parent: nn.Module, name: str, label: str) -> QuantLinear:
    mod = parent.get_submodule(name)
    if not isinstance(mod, QuantLinear):
        mod = wrap_linear(mod, None, label)
        parent.set_submodule(name, mod)
    elif mod.transform_keys():
        raise ConfigError(
            f"{label} already has transforms {mod.transform_keys()}; attach the residual rotation "
            "first (it acts before smoothing)"
        )
    return mod


def attach_residual_rotation(model: nn.Module, rotation: CayleyRotation) -> None:
    """Apply ``rotation`` to the residual stream on the fly, for training (function unchanged).

    Norms are folded first (permanently; exact). Plain linears, ``lm_head`` included, are
    wrapped in quantizer-less :class:`QuantLinear`; the embedding output is rotated by a hook.
    """
    embed, layers, _, head = decoder_parts(model)
    if getattr(model, "_safeptq_rotation_hooks", None):
        raise ConfigError("a residual rotation is already attached to this model")
    if rotation.q0.shape[0] != embed.weight.shape[1]:
        raise ConfigError(
            f"rotation of size {rotation.q0.shape[0]} does not match hidden size {embed.weight.shape[1]}"
        )
    fold_norms(model)
    for i, layer in enumerate(layers):
        readers, writers = _readers_writers(layer)
        for name in readers:
            _wrap_first(layer, name, f"layers.{i}.{name}").add_weight_transform(_KEY, _reader_tf(rotation))
        for name in writers:
            _wrap_first(layer, name, f"layers.{i}.{name}").add_weight_transform(_KEY, _writer_tf(rotation))
    _wrap_first(model, "lm_head", "lm_head").add_weight_transform(_KEY, _reader_tf(rotation))
    model._safeptq_rotation_hooks = [
        embed.register_forward_hook(_embed_hook(rotation)),
        model.register_forward_pre_hook(lambda m, a: rotation.clear_cache()),
    ]


def _unwrap_lm_head(model: nn.Module) -> None:
    head = model.lm_head
    if isinstance(head, QuantLinear) and not head.transform_keys() and head.weight_quantizer is None \
            and head.act_quantizer is None and head.input_transform is None:
        model.lm_head = head.linear


def detach_residual_rotation(model: nn.Module) -> None:
    """Remove an attached rotation without folding it (norms stay folded, which is exact)."""
    for h in getattr(model, "_safeptq_rotation_hooks", None) or []:
        h.remove()
    model._safeptq_rotation_hooks = None
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.remove_weight_transforms(_KEY)
    _unwrap_lm_head(model)


@torch.no_grad()
def fold_residual_rotation(model: nn.Module, rotation: CayleyRotation) -> None:
    """Bake ``rotation`` into the weights (float64) and detach it; exact up to the final cast.

    Transforms attached after the rotation (smoothing) stay attached and remain valid.
    """
    was_attached = bool(getattr(model, "_safeptq_rotation_hooks", None))
    q = rotation.matrix(torch.float64).detach()
    if was_attached:
        for mod in model.modules():
            keys = mod.transform_keys() if isinstance(mod, QuantLinear) else []
            if _KEY in keys and keys[0] != _KEY:
                raise ConfigError(f"{mod.name}: the rotation is not the first transform; cannot fold it")
        detach_residual_rotation(model)
        _rotate_weights(model, q)  # norms were folded at attach time
    else:
        fuse_residual_rotation(model, q)


# --- per-head rotation of v_proj's output and o_proj's input (SpinQuant's R2, OSTQuant's v/o transform) -----
_HEAD_KEY = "head_rotation"


def _head_rows_tf(rot: CayleyRotation, kv_heads: int, head_dim: int):
    """v_proj: every kv head's rows ``W_j ← Rᵀ W_j`` (and bias), so each head's value is ``v_j R``."""
    def fn(w, b):
        r = rot.matrix(w.dtype).to(w.device)
        w2 = torch.einsum("de,kdh->keh", r, w.reshape(kv_heads, head_dim, -1)).reshape(w.shape)
        b2 = None if b is None else torch.einsum("de,kd->ke", r, b.reshape(kv_heads, head_dim)).reshape(b.shape)
        return w2, b2

    return fn


def _head_cols_tf(rot: CayleyRotation, heads: int, head_dim: int):
    """o_proj: every query head's columns ``W_i ← W_i R``, undoing the rotation of the values it reads."""
    def fn(w, b):
        r = rot.matrix(w.dtype).to(w.device)
        return torch.einsum("oid,de->oie", w.reshape(w.shape[0], heads, head_dim), r).reshape(w.shape), b

    return fn


def attach_head_rotation(layer: nn.Module, rot: CayleyRotation) -> None:
    """Rotate the values of every attention head by one learnable ``head_dim`` rotation and undo it in o_proj:
    exact (attention mixes values across positions, never across their channels), and the KV cache and
    o_proj's input are quantized in the rotated basis. Shared by a kv head's query heads under GQA."""
    from safeptq.quant.smoothing import LayerGeometry, _ensure_wrapped

    spec = spec_of_layer(layer)
    if "vo" in spec.not_equivalent:
        raise ConfigError(f"a v/o head rotation is not an equivalent transform on {spec.family}: "
                          f"{spec.not_equivalent['vo']}")
    g = LayerGeometry.of(layer)
    if rot.q0.shape[0] != g.head_dim:
        raise ConfigError(f"head rotation of order {rot.q0.shape[0]} for head_dim {g.head_dim}")
    _ensure_wrapped(layer, "self_attn.v_proj").add_weight_transform(_HEAD_KEY, _head_rows_tf(rot, g.num_kv_heads,
                                                                                               g.head_dim))
    _ensure_wrapped(layer, "self_attn.o_proj").add_weight_transform(_HEAD_KEY, _head_cols_tf(rot, g.num_heads,
                                                                                               g.head_dim))
    # a fresh matrix (and graph) for every forward, shared by v and o within it
    rot._safeptq_hook = layer.self_attn.register_forward_pre_hook(lambda m, a: rot.clear_cache())


@torch.no_grad()
def fold_head_rotation(layer: nn.Module, rot: CayleyRotation) -> None:
    """Bake an attached head rotation into v_proj and o_proj (it must be the front transform of both)."""
    for name in ("self_attn.v_proj", "self_attn.o_proj"):
        mod = layer.get_submodule(name)
        if not isinstance(mod, QuantLinear) or _HEAD_KEY not in mod.transform_keys():
            raise ConfigError(f"{name} carries no head rotation to fold")
        rot.clear_cache()
        mod.bake_transforms([_HEAD_KEY])
    hook = getattr(rot, "_safeptq_hook", None)
    if hook is not None:
        hook.remove()
        rot._safeptq_hook = None
