"""Baselines from llm-compressor: GPTQ, AWQ and SmoothQuant+GPTQ on safeptq's calibration data.

The scheme is described to llm-compressor with the same compressed-tensors objects the exporter
writes (:func:`safeptq.export.schemes.to_quantization_scheme`, ``ignore=["lm_head"]``), and the
calibration samples are handed over as a ready ``DataLoader``, so a baseline sees exactly the
tokens safeptq calibrates on. The optional dependency is imported only when a baseline runs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from safeptq.errors import ConfigError
from safeptq.export.schemes import DEFAULT_IGNORE, DEFAULT_TARGETS, to_quantization_scheme
from safeptq.quant.args import Scheme

__all__ = ["METHODS", "Method", "require_llmcompressor", "calibration_batches", "build_recipe",
           "run_llmcompressor", "save_baseline"]

log = logging.getLogger(__name__)

Method = Literal["gptq", "awq", "smoothquant+gptq"]
METHODS: tuple[str, ...] = ("gptq", "awq", "smoothquant+gptq")


def require_llmcompressor() -> None:
    """Raise :class:`ConfigError` with the install command when llm-compressor is missing."""
    if importlib.util.find_spec("llmcompressor") is None:
        raise ConfigError(
            "the llm-compressor baselines need the llmcompressor package: "
            "pip install safeptq[baselines]"
        )


def calibration_batches(
    calib: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    tokenizer,
    nsamples: int,
    seqlen: int,
) -> list[dict[str, torch.Tensor]]:
    """Up to ``nsamples`` batches ``{"input_ids", "attention_mask"}`` of shape ``[1, <= seqlen]``.

    ``calib`` is a list of texts (tokenized with ``tokenizer``, truncated to ``seqlen``), or
    token ids: a ``[N, L]`` tensor, or a list of id lists / 1-D tensors.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise ConfigError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    rows: list[torch.Tensor] = []
    for item in calib:
        if len(rows) == nsamples:
            break
        if isinstance(item, str):
            if tokenizer is None:
                raise ConfigError("calibration texts need a tokenizer")
            ids = tokenizer(item, truncation=True, max_length=seqlen, return_tensors="pt")["input_ids"][0]
        else:
            ids = torch.as_tensor(item, dtype=torch.long).reshape(-1)[:seqlen]
        if ids.numel() > 0:
            rows.append(ids)
    if not rows:
        raise ConfigError("no calibration sample left (all empty); pass texts or token ids")
    if len(rows) < nsamples:
        log.warning("only %d calibration samples available (asked for %d)", len(rows), nsamples)
    return [{"input_ids": r[None], "attention_mask": torch.ones_like(r)[None]} for r in rows]


def build_recipe(method: str, scheme: Scheme, *, dampening_frac: float = 0.01,
                 smoothing_strength: float = 0.8) -> list:
    """llm-compressor modifiers for ``method`` quantizing the decoder linears to ``scheme``."""
    require_llmcompressor()
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    if method not in METHODS:
        raise ConfigError(f"unknown baseline method {method!r}; choose one of {', '.join(METHODS)}")
    if scheme.weights is None:
        raise ConfigError(f"baseline {method!r} quantizes weights; scheme {scheme.name!r} has none")
    if scheme.kv_cache is not None:
        raise ConfigError("the llm-compressor baselines do not quantize the KV cache; drop kv_cache")
    quant = {
        "config_groups": {"group_0": to_quantization_scheme(scheme, DEFAULT_TARGETS)},
        "ignore": list(DEFAULT_IGNORE),
    }
    if method == "gptq":
        return [GPTQModifier(dampening_frac=dampening_frac, **quant)]
    if method == "awq":
        if scheme.input_activations is not None:
            raise ConfigError(f"AWQ is a weight-only method; scheme {scheme.name!r} quantizes activations")
        return [AWQModifier(), QuantizationModifier(**quant)]
    return [
        SmoothQuantModifier(smoothing_strength=smoothing_strength),
        GPTQModifier(dampening_frac=dampening_frac, **quant),
    ]


@contextmanager
def _no_pinning_without_accelerator() -> Iterator[None]:
    """Skip pinning of cached activations when torch has no accelerator.

    llm-compressor 0.14's AWQ pins its CPU activation cache before the grid search (an
    optimization for host-to-device copies); on a CPU-only torch ``pin_memory`` raises
    "Cannot access accelerator device". Pinning changes no value, so it is skipped there.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.__dict__["_pin_intermediate"]
    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    try:
        yield
    finally:
        IntermediatesCache._pin_intermediate = original


def run_llmcompressor(
    model_path_or_model: str | Path | nn.Module,
    tokenizer,
    method: Method,
    scheme: Scheme,
    calib: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    nsamples: int = 128,
    seqlen: int = 512,
    out_dir: str | Path | None = None,
    *,
    dampening_frac: float = 0.01,
    smoothing_strength: float = 0.8,
) -> nn.Module:
    """Quantize with llm-compressor's ``oneshot`` and return the quantized model.

    A model object is quantized in place (llm-compressor's own behaviour); a path is loaded
    first. With ``out_dir`` the result is also saved compressed (``save_compressed=True``) with a
    ``safeptq_quant.json`` side file. ``calib``: texts or token ids, see
    :func:`calibration_batches`.
    """
    require_llmcompressor()
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    recipe = build_recipe(method, scheme, dampening_frac=dampening_frac,
                          smoothing_strength=smoothing_strength)
    if isinstance(model_path_or_model, (str, Path)):
        from safeptq.models import load_model

        loaded = load_model(str(model_path_or_model))
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    else:
        model = model_path_or_model
        if tokenizer is None:
            raise ConfigError("pass the tokenizer along with a model object (oneshot needs it)")
        if not getattr(model.config, "name_or_path", ""):
            raise ConfigError(
                "llm-compressor's oneshot re-reads the config from model.config.name_or_path, "
                "which is empty for this model; save it first (safeptq.models.save_model) and "
                "pass the folder"
            )
    batches = calibration_batches(calib, tokenizer, nsamples, seqlen)
    loader = DataLoader(batches, batch_size=None)  # already batched: [1, L] each
    with _no_pinning_without_accelerator():
        model = oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=loader,
                        num_calibration_samples=len(batches), max_seq_length=seqlen)
    if out_dir is not None:
        save_baseline(model, tokenizer, out_dir, method, scheme, len(batches), seqlen)
    return model


def save_baseline(model: nn.Module, tokenizer, out_dir: str | Path, method: str, scheme: Scheme,
                  nsamples: int, seqlen: int) -> Path:
    """Save an llm-compressor-quantized model compressed, atomically, with a side file."""
    from safeptq import __version__
    from safeptq.export.folder import SIDE_FILE, atomic_folder, check_target

    out = Path(out_dir)
    check_target(out)
    info = {
        "safeptq_version": __version__,
        "scheme_name": scheme.name,
        "scheme": scheme.model_dump(mode="json"),
        "fake_quant": False,
        "ignore": list(DEFAULT_IGNORE),
        "layers": [
            n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None
        ],
        "metadata": {"method": f"llmcompressor:{method}", "nsamples": nsamples, "seqlen": seqlen},
    }
    with atomic_folder(out) as tmp:
        model.save_pretrained(str(tmp), save_compressed=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        config = json.loads((tmp / "config.json").read_text())
        info["format"] = config.get("quantization_config", {}).get("format")
        (tmp / SIDE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out
