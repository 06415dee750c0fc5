"""Export a fake-quantized model as a compressed-tensors checkpoint, and check it reloads.

The model handed to :func:`export_compressed` holds decoder linears whose weights are already
quantized-dequantized (all learned transforms folded in). The exporter

1. finds each linear's scale/zero-point (given, or recovered from the grid, see
   :mod:`safeptq.export.grid`) and refuses weights that are not on their grid;
2. on a copy of the model, attaches the compressed-tensors scheme with
   ``apply_quantization_config``, writes our scale/zero-point into the ``weight_scale`` /
   ``weight_zero_point`` parameters it creates, and compresses with ``ModelCompressor``
   (``pack-quantized`` int4/int8 codes in int32 words, or ``int-quantized`` int8 weights);
3. decompresses every layer again with compressed-tensors' own compressor and checks it gives
   back our weight, then saves (``save_pretrained`` + ``ModelCompressor.update_config``, which
   writes ``quantization_config`` into ``config.json``) into a temporary folder renamed into
   place only when complete.

Schemes no engine serves (W4A8, W4A4, KV-cache quantization) are saved as a dense checkpoint
of the fake-quantized weights, with a ``README_QUANT.md`` saying so. safeptq's own metadata
goes to ``safeptq_quant.json``, never into ``quantization_config``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from safeptq.errors import ExportError
from safeptq.export.folder import SIDE_FILE, atomic_folder, check_target
from safeptq.export.grid import check_qparams, recover_qparams
from safeptq.export.schemes import (
    DEFAULT_IGNORE,
    DEFAULT_TARGETS,
    ServingFormat,
    serving_format,
    to_quantization_scheme,
)
from safeptq.quant.args import Scheme
from safeptq.quant.quantizer import ActQuantizer, QuantizedWeight

__all__ = [
    "SIDE_FILE",
    "ONLINE_FILE",
    "online_transforms",
    "attach_online_transforms",
    "README_FILE",
    "DENSE",
    "quantized_linears",
    "export_compressed",
    "reload_check",
    "bits_per_weight",
]

log = logging.getLogger(__name__)

README_FILE = "README_QUANT.md"
DENSE = "dense"
"""``format`` recorded in the side file for fake-quant (dense) checkpoints."""

_QPARAM_SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_zero_point")


# -- which layers ---------------------------------------------------------------------------------
def _ignored(name: str) -> bool:
    return any(name == ig or name.endswith("." + ig) for ig in DEFAULT_IGNORE)


ONLINE_FILE = "safeptq_online.safetensors"  # the online input transforms of a fake-quant export


def online_transforms(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The run-time transforms of ``model``: ``linears`` — ``{name: H}`` of every linear whose input is transformed
    online (``x ↦ x Hᵀ``); ``attention`` — ``{name: H}`` of every attention module with a post-RoPE q/k transform."""
    lins = {name: m.input_transform.h for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and getattr(m, "_safeptq_input_hook", None) is not None
            and hasattr(m.input_transform, "h")}
    attn = {name: m.qk_transform.h for name, m in model.named_modules()
            if getattr(m, "qk_transform", None) is not None and m.qk_transform.h is not None}
    return {"linears": lins, "attention": attn}


def attach_online_transforms(model: nn.Module, folder: str | Path, info: Mapping, kv_cache=None) -> int:
    """Put back the run-time transforms a fake-quant export stores (``info``: its side file); returns how many.
    ``kv_cache``: the scheme's KV quantization, applied to K after the q/k transform (None: not quantized). Call
    before attaching activation quantizers: their hooks must see the transformed input."""
    online = info.get("online_transforms")
    if not online:
        return 0
    from safetensors.torch import load_file

    from safeptq.quant.attention import attach_qk_transform
    from safeptq.quant.qlinear import attach_input_transform
    from safeptq.quant.rotation import OnlineHadamard

    mats = load_file(str(Path(folder) / online["file"]))
    for name in online.get("layers", []):
        lin = model.get_submodule(name)
        attach_input_transform(lin, OnlineHadamard(mats[name]).to(lin.weight.device))
    for name in online.get("attention", []):
        attach_qk_transform(model, model.get_submodule(name), mats[f"{name}.qk"], kv_cache)
    return len(online.get("layers", [])) + len(online.get("attention", []))


def quantized_linears(model: nn.Module, allow_online: bool = False) -> dict[str, nn.Linear]:
    """The linears the export quantizes (every ``nn.Linear`` but ``lm_head``).

    Raises :class:`ExportError` for layers that a checkpoint cannot represent: unfolded
    ``QuantLinear`` wrappers and (unless ``allow_online``: a fake-quant export stores them beside the
    weights) linears carrying an online input transform (Hadamard).
    """
    from safeptq.quant.qlinear import QuantLinear

    out: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            raise ExportError(
                f"layer {name!r} is still a QuantLinear; fold it (unwrap_decoder_layer) before export"
            )
        if not isinstance(module, nn.Linear) or _ignored(name):
            continue
        if getattr(module, "_safeptq_input_hook", None) is not None and not allow_online:
            raise ExportError(
                f"layer {name!r} applies an online input transform (Hadamard) that neither "
                "compressed-tensors nor a dense checkpoint can store; export a scheme without "
                "online rotations"
            )
        out[name] = module
    if not out:
        raise ExportError("found no linear layer to quantize in the model (lm_head is left dense)")
    return out


def _layer_qparams(
    linears: Mapping[str, nn.Linear], scheme: Scheme, qparams: Mapping[str, QuantizedWeight] | None
) -> dict[str, QuantizedWeight]:
    if scheme.weights is None:
        return {}
    qparams = dict(qparams or {})
    unknown = sorted(set(qparams) - set(linears))
    if unknown:
        raise ExportError(
            f"qparams name layers the export does not quantize: {unknown[:5]}; expected names "
            f"like {next(iter(linears))!r}"
        )
    out: dict[str, QuantizedWeight] = {}
    for name, lin in linears.items():
        w = lin.weight.detach()
        if name in qparams:
            check_qparams(name, w, qparams[name], scheme.weights)
            out[name] = qparams[name]
        else:
            out[name] = recover_qparams(name, w, scheme.weights)
    return out


# -- writing ----------------------------------------------------------------------------------------
def _save(model: nn.Module, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _compress_copy(model: nn.Module, scheme: Scheme, fmt: str, params: Mapping[str, QuantizedWeight]):
    """A compressed copy of ``model`` and the ``ModelCompressor`` that compressed it."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.utils import get_direct_state_dict

    qconfig = QuantizationConfig(
        config_groups={"group_0": to_quantization_scheme(scheme, DEFAULT_TARGETS, fmt)},
        ignore=list(DEFAULT_IGNORE),
        format=fmt,
        quantization_status=QuantizationStatus.FROZEN,
    )
    work = copy.deepcopy(model)
    apply_quantization_config(work, qconfig, show_progress=False)
    attached = {n for n, m in work.named_modules() if hasattr(m, "quantization_scheme")}
    if attached != set(params):
        raise ExportError(
            f"compressed-tensors matched other layers than safeptq quantized: only ours "
            f"{sorted(set(params) - attached)[:3]}, only theirs {sorted(attached - set(params))[:3]}"
        )
    with torch.no_grad():
        for name, qw in params.items():
            module = work.get_submodule(name)
            module.weight_scale.copy_(qw.scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(qw.zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor(quantization_config=qconfig, force_compression_format=fmt)
    compressor.compress_model(work)
    compressor.remove_decompression_hook(work)
    codec = BaseCompressor.get_value_from_registry(fmt)
    for name, qw in params.items():
        module = work.get_submodule(name)
        restored = codec.decompress(get_direct_state_dict(module), module.quantization_scheme)["weight"]
        ours = model.get_submodule(name).weight.detach()
        err = (restored.float().cpu() - ours.float().cpu()).abs()
        eps = torch.finfo(ours.dtype).eps
        tol = 1e-3 * qw.scale.float().abs().max().item() + 2 * eps * ours.abs().max().item()
        if err.max().item() > tol:
            raise ExportError(
                f"layer {name!r}: compressed-tensors decompresses to a different weight "
                f"(max abs error {err.max().item():.3g} > {tol:.3g}); scale dtype "
                f"{module.weight_scale.dtype} may be too coarse"
            )
    return work, compressor


def _readme(scheme: Scheme, fmt: ServingFormat) -> str:
    return (
        f"# Fake-quantized checkpoint ({scheme.name})\n\n"
        "The weights in this folder are **dense**: every decoder linear holds its quantized-then-"
        "dequantized weight in the model's float dtype. This is **not a serving format** and "
        "is no smaller than the original model.\n\n"
        f"Reason: {fmt.reason}.\n\n"
        "Activation and KV-cache quantization are not stored either; to reproduce the "
        "quantized model's outputs, apply them at run time as `safeptq_quant.json` describes.\n"
    )


def export_compressed(
    model: nn.Module,
    tokenizer,
    scheme: Scheme,
    out_dir: str | Path,
    qparams: Mapping[str, QuantizedWeight] | None = None,
    metadata: Mapping | None = None,
) -> Path:
    """Write ``model`` (fake-quantized for ``scheme``) to ``out_dir``; return the folder.

    ``qparams`` maps module names (``model.layers.0.self_attn.q_proj``) to the exact
    :class:`QuantizedWeight` of that layer; layers without one get their scale recovered from
    the weight grid. Any weight that is not ``(q - zero) * scale`` raises :class:`ExportError`
    naming the layer, and nothing is left at ``out_dir``. ``metadata`` (recipe, method, ...) is
    stored in ``safeptq_quant.json``. ``model`` itself is not modified.
    """
    from safeptq import __version__

    out = Path(out_dir)
    check_target(out)
    fmt = serving_format(scheme)
    online = online_transforms(model)
    first = next(iter(online["linears"] or online["attention"]), None)
    if first is not None and fmt.served:
        raise ExportError(f"{first} applies an online Hadamard, which a {fmt.format} checkpoint cannot "
                          "carry and vLLM would not run; use it with a fake-quant scheme (w4a8, w4a4, w4a4kv4)")
    linears = quantized_linears(model, allow_online=True)
    params = _layer_qparams(linears, scheme, qparams)
    info = {
        "safeptq_version": __version__,
        "scheme_name": scheme.name,
        "scheme": scheme.model_dump(mode="json"),
        "format": fmt.format or DENSE,
        "fake_quant": not fmt.served,
        "note": fmt.reason if fmt.served else
        f"fake-quant checkpoint (dense weights), not a serving format: {fmt.reason}",
        "ignore": list(DEFAULT_IGNORE),
        "layers": list(linears),
        "metadata": dict(metadata or {}),
    }
    if first is not None:
        info["online_transforms"] = {
            "file": ONLINE_FILE, "layers": sorted(online["linears"]), "attention": sorted(online["attention"]),
            "op": "x -> x @ H.T on the layer's input, before its activation quantizer (H orthogonal, in the file "
                  "under the layer's name); the stored weight is already W @ H.T",
            "attention_op": "after RoPE, every head's q -> q @ H.T and k -> k @ H.T (H under NAME.qk in the file; "
                            "q k^T unchanged); the scheme's KV-cache quantization acts on K there, not at k_proj"}
    with atomic_folder(out) as tmp:
        if fmt.served:
            work, compressor = _compress_copy(model, scheme, fmt.format, params)
            _save(work, tokenizer, tmp)
            compressor.update_config(str(tmp))
            del work
        else:
            _save(model, tokenizer, tmp)
            (tmp / README_FILE).write_text(_readme(scheme, fmt))
            if first is not None:
                from safetensors.torch import save_file

                mats = {**online["linears"], **{f"{k}.qk": v for k, v in online["attention"].items()}}
                save_file({k: v.detach().float().contiguous().cpu() for k, v in mats.items()}, str(tmp / ONLINE_FILE))
        (tmp / SIDE_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    log.info("exported %s (%s, %d layers) to %s", scheme.name, info["format"], len(linears), out)
    return out


# -- reading back -------------------------------------------------------------------------------------
def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"no .safetensors file in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def bits_per_weight(out_dir: str | Path) -> tuple[dict[str, float], float]:
    """Stored bits per weight element of each quantized linear of an export, and overall.

    Counts the weight tensor (packed int32 words or int8 codes, or the dense float weight),
    its scales and zero-points; not ``weight_shape`` (two integers of metadata per layer).
    The overall figure is total bits over total weight elements.
    """
    out = Path(out_dir)
    info = json.loads((out / SIDE_FILE).read_text())
    tensors = _read_tensors(out)
    per_layer: dict[str, float] = {}
    total_bits = total_numel = 0
    for name in info["layers"]:
        parts = {s: tensors.get(f"{name}.{s}") for s in _QPARAM_SUFFIXES}
        if parts["weight"] is not None:
            numel = parts["weight"].numel()
        elif parts["weight_packed"] is not None:
            numel = int(torch.prod(tensors[f"{name}.weight_shape"]).item())
        else:
            raise ExportError(f"layer {name!r} has no weight in {out}")
        bits = sum(t.numel() * t.element_size() * 8 for t in parts.values() if t is not None)
        per_layer[name] = bits / numel
        total_bits += bits
        total_numel += numel
    return per_layer, total_bits / total_numel


def _reload_transformers(out: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()


def _reload_ct(out: Path, dtype: torch.dtype) -> nn.Module:
    """Dense model decompressed by compressed-tensors itself (no transformers quantizer)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(out))
    raw = json.loads((out / "config.json").read_text()).get("quantization_config")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    compressor = None
    if raw is not None:
        fields = set(QuantizationConfig.model_fields)
        qconfig = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k in fields})
        apply_quantization_config(model, qconfig, show_progress=False)
        compressor = ModelCompressor(quantization_config=qconfig)
        compressor.compress_model(model)  # gives the modules the compressed parameter layout
    missing, unexpected = model.load_state_dict(_read_tensors(out), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"{out}: state dict mismatch, missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if compressor is not None:
        compressor.decompress_model(model)
    return model


@contextmanager
def _reference_act_quant(model: nn.Module, names: list[str], scheme: Scheme) -> Iterator[None]:
    """Dynamic activation fake-quant (safeptq's own ``ActQuantizer``) on ``names``' inputs."""
    if scheme.input_activations is None:
        yield
        return
    quantizer = ActQuantizer(scheme.input_activations)
    modules = [model.get_submodule(n) for n in names]
    # a model quantized by llm-compressor already runs compressed-tensors' activation QDQ
    modules = [m for m in modules if getattr(getattr(m, "quantization_scheme", None),
                                             "input_activations", None) is None]
    handles = [m.register_forward_pre_hook(lambda m, a: (quantizer(a[0]), *a[1:])) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _set_ct_quant(model: nn.Module, enabled: bool) -> int:
    """Switch compressed-tensors' runtime QDQ on the reloaded model; returns modules touched."""
    n = 0
    for m in model.modules():
        if getattr(m, "quantization_scheme", None) is not None:
            m.quantization_enabled = enabled
            n += 1
    return n


def _errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    ref, out = ref.double().cpu(), out.double().cpu()
    diff = (out - ref).abs().max().item()
    return diff, diff / max(ref.abs().max().item(), 1e-12)


@torch.no_grad()
def reload_check(out_dir: str | Path, reference_model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Load an export back and compare its logits with ``reference_model`` on ``input_ids``.

    Loads through transformers' compressed-tensors integration; if that fails, through
    compressed-tensors' own decompression into a dense model (``reload_path`` says which).
    When the reloaded model quantizes activations itself (W8A8: compressed-tensors runs dynamic
    per-token int8 QDQ on CPU), the reference gets safeptq's activation quantizer on the same
    layers and ``max_abs_err``/``max_rel_err`` compare the two; ``weights_only_*`` compare with
    activation quantization off on both sides. Dense fake-quant exports store no activation
    quantization, so only weights-only errors exist for them.
    """
    out = Path(out_dir)
    info = json.loads((out / SIDE_FILE).read_text())
    scheme = Scheme.model_validate(info["scheme"])
    dtype = next(reference_model.parameters()).dtype
    try:
        model, path = _reload_transformers(out, dtype), "transformers"
        model(input_ids=input_ids[:, :2].cpu())  # decompresses on first call; fails early if it cannot
    except Exception as e:  # noqa: BLE001 - any failure falls back to the library's own loader
        log.warning("transformers could not load/run %s (%s); using compressed-tensors decompression", out, e)
        model, path = _reload_ct(out, dtype), "compressed-tensors"
    attach_online_transforms(model, out, info)
    ids = input_ids.to(next(reference_model.parameters()).device)
    # a model quantized by llm-compressor runs compressed-tensors' activation QDQ itself: off for
    # the weights-only comparison, as on the reloaded side
    ref_ct = _set_ct_quant(reference_model, False)
    try:
        ref_w = reference_model(input_ids=ids).logits
    finally:
        if ref_ct:
            _set_ct_quant(reference_model, True)
    acts_on_reload = info["format"] != DENSE and scheme.input_activations is not None
    _set_ct_quant(model, False)
    got_w = model(input_ids=input_ids.cpu()).logits
    w_abs, w_rel = _errors(ref_w, got_w)
    result = {
        "format": info["format"],
        "reload_path": path,
        "activation_quant": acts_on_reload,
        "weights_only_max_abs_err": w_abs,
        "weights_only_max_rel_err": w_rel,
    }
    if acts_on_reload:
        _set_ct_quant(model, True)
        got = model(input_ids=input_ids.cpu()).logits
        with _reference_act_quant(reference_model, info["layers"], scheme):
            ref = reference_model(input_ids=ids).logits
        result["max_abs_err"], result["max_rel_err"] = _errors(ref, got)
    else:
        result["max_abs_err"], result["max_rel_err"] = w_abs, w_rel
    result["bits_per_weight_by_layer"], result["bits_per_weight"] = bits_per_weight(out)
    if info["format"] == DENSE:
        result["note"] = ("dense fake-quant checkpoint: weights stored in full precision; "
                          "activation/KV quantization not stored")
    return result
