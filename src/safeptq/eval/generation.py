"""Batched greedy generation with the chat template.

The transformers backend runs a lean greedy loop (prefill keeping only the last logits, then one
token per step over the KV cache); on CPU it is markedly faster than ``model.generate`` and gives
the same tokens. A vLLM backend is used when vLLM is installed and a GPU is present; it is given the
token ids the transformers backend would see, never text it would tokenize again.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from tqdm.auto import tqdm

from ..data.chat import format_chats

__all__ = ["Generator", "HFGenerator", "VLLMGenerator", "make_generator", "greedy_generate", "eos_ids",
           "encode_prompts", "vllm_blocker", "check_vllm_folder"]

log = logging.getLogger(__name__)


class Generator(Protocol):
    def generate(self, prompts: list[str], max_new_tokens: int, desc: str = "generate",
                 stop_fn: Callable[[str], bool] | None = None) -> list[str]:
        """Greedy completions of raw prompt strings (chat formatting already applied); ``stop_fn``
        is an optional early-exit hint a backend may ignore."""


def encode_prompts(tokenizer, texts: list[str], **kw):
    """Token ids of already-formatted prompts, as every backend feeds them: the chat template's text
    already holds the BOS where the model wants one, so no special tokens are added (tokenizing again
    with them gives Llama-3-style templates a second BOS)."""
    return tokenizer(texts, add_special_tokens=False, **kw)


@torch.no_grad()
def greedy_generate(model, tokenizer, texts: list[str], max_new_tokens: int = 32, batch_size: int = 32,
                    desc: str = "generate", progress: bool = True,
                    stop_fn: Callable[[str], bool] | None = None, check_every: int = 4) -> list[str]:
    """Greedy decoding of already-formatted strings, batched by length; returns decoded completions.

    ``stop_fn(text_so_far)`` may end a sequence early once its outcome is settled (the keyword judge
    stops at the first refusal phrase: "contains a phrase" cannot change as the text grows)."""
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str | None] = [None] * len(texts)
    eos = set(eos_ids(model, tokenizer))
    pad = tokenizer.pad_token_id
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, unit="prompt")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = encode_prompts(tokenizer, [texts[i] for i in idx], return_tensors="pt", padding=True)
            ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            cache = res.past_key_values
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            gen = []
            nxt = res.logits[:, -1].argmax(-1)
            eos_t = torch.tensor(sorted(eos), device=device)
            for step in range(max_new_tokens):
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                gen.append(nxt)
                done |= torch.isin(nxt, eos_t)
                if stop_fn is not None and (step + 1) % check_every == 0:
                    so_far = torch.stack(gen, 1)
                    for r in (~done).nonzero().flatten().tolist():
                        text = tokenizer.decode(so_far[r], skip_special_tokens=True)
                        if text.strip() and stop_fn(text):
                            done[r] = True
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, (~done).long().unsqueeze(1) | 1], dim=1)
                pos = pos[:, -1:] + 1
                res = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos,
                            past_key_values=cache, use_cache=True)
                cache = res.past_key_values
                nxt = res.logits[:, -1].argmax(-1)
            toks = torch.stack(gen, 1).tolist()
            for j, i in enumerate(idx):
                seq = []
                for t in toks[j]:
                    if t in eos:
                        break
                    seq.append(t)
                out[i] = tokenizer.decode(seq, skip_special_tokens=True)
            bar.update(len(idx))
    finally:
        tokenizer.padding_side = old_side
        bar.close()
    return out  # type: ignore[return-value]


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the model's and generation config's EOS, the tokenizer's, ChatML's end."""
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(e)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        ids.add(vocab["<|im_end|>"])
    return sorted(ids)


class HFGenerator:
    """transformers backend."""

    def __init__(self, model, tokenizer, batch_size: int = 32, progress: bool = True):
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress

    def generate(self, prompts: list[str], max_new_tokens: int, desc: str = "generate",
                 stop_fn: Callable[[str], bool] | None = None) -> list[str]:
        return greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens, self.batch_size,
                               desc=desc, progress=self.progress, stop_fn=stop_fn)


class VLLMGenerator:
    """vLLM backend (needs vLLM and a GPU); loads the model folder itself but is fed the token ids of
    :func:`encode_prompts`, so it sees what the transformers backend sees. ``llm_kwargs`` go to
    ``vllm.LLM`` (tensor_parallel_size, gpu_memory_utilization, max_model_len)."""

    def __init__(self, model_path: str, tokenizer, stop_token_ids: list[int] | None = None,
                 progress: bool = True, **llm_kwargs):
        from vllm import LLM  # optional dependency

        self.tokenizer, self.stop_token_ids, self.progress = tokenizer, stop_token_ids, progress
        self._llm = LLM(model=model_path, **llm_kwargs)

    def generate(self, prompts: list[str], max_new_tokens: int, desc: str = "generate",
                 stop_fn: Callable[[str], bool] | None = None) -> list[str]:
        from vllm import SamplingParams

        kw = {"stop_token_ids": self.stop_token_ids} if self.stop_token_ids else {}
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, **kw)
        # TokensPrompt-shaped dicts: vLLM would otherwise tokenize the text again, adding a BOS
        ids = encode_prompts(self.tokenizer, prompts).input_ids
        outs = self._llm.generate([{"prompt_token_ids": list(x)} for x in ids], params, use_tqdm=self.progress)
        return [o.outputs[0].text for o in outs]


def vllm_blocker(model_path: str | None) -> str | None:
    """Why vLLM would evaluate ``model_path`` wrongly, or None. A safeptq fake-quant export (W4A8,
    W4A4, KV4: no serving format) stores dense weights only; transformers puts its activation / KV
    quantization back at load time, vLLM would silently run it without."""
    from ..export.folder import SIDE_FILE

    side = Path(model_path) / SIDE_FILE if model_path else None
    if side is None or not side.is_file():
        return None
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    scheme = info.get("scheme") or {}
    if not info.get("fake_quant") or not (scheme.get("input_activations") or scheme.get("kv_cache")):
        return None
    return (f"{model_path} is a safeptq fake-quant export ({info.get('scheme_name', 'custom')}) whose "
            "activation/KV quantization vLLM would not apply")


def check_vllm_folder(model_path: str | None) -> None:
    """Refuse ``--backend vllm`` for a folder vLLM would evaluate wrongly (see :func:`vllm_blocker`)."""
    blocker = vllm_blocker(model_path)
    if blocker:
        from ..errors import ConfigError
        raise ConfigError(f"--backend vllm: {blocker}; use --backend hf")


def _empty_cuda_cache() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # no CUDA context: nothing cached
        torch.cuda.empty_cache()


def _model_device(model) -> torch.device | None:
    return next(model.parameters()).device if model is not None else None


@contextlib.contextmanager
def _off_gpu(model, restore: bool = True) -> Iterator[None]:
    """Free the GPU memory of the transformers copy while vLLM starts: vLLM's start-up check sees
    only free memory, and a bf16 copy of an 8B model already takes 16 GB. Moved back afterwards when
    ``restore`` (perplexity, margins and choice tasks run on it) or vLLM failed to start, and only
    if it still fits beside vLLM; else it stays on CPU."""
    device = _model_device(model)
    if device is None or device.type == "cpu":
        yield
        return
    model.to("cpu")
    _empty_cuda_cache()
    ok = False
    try:
        yield
        ok = True
    finally:
        if restore or not ok:
            try:
                model.to(device)
            except torch.cuda.OutOfMemoryError:
                model.to("cpu")
                _empty_cuda_cache()
                log.warning("no GPU memory left beside vLLM for the transformers model; perplexity, margins "
                            "and choice tasks run on CPU (lower --gpu-memory-utilization to avoid this)")


def make_generator(model, tokenizer, backend: str = "auto", model_path: str | None = None,
                   batch_size: int = 32, progress: bool = True, restore_model: bool = True,
                   tensor_parallel_size: int | None = None, gpu_memory_utilization: float | None = None,
                   max_model_len: int | None = None) -> Generator:
    """``auto`` picks vLLM when it is installed, a GPU is present, the model is on disk and vLLM
    would run it as transformers does. With vLLM, ``model`` leaves the GPU while vLLM starts and
    comes back only when ``restore_model``; the vLLM options are passed to ``vllm.LLM`` when set."""
    if backend == "vllm":
        check_vllm_folder(model_path)
    if backend in ("auto", "vllm"):
        try:
            import vllm  # noqa: F401
            have_vllm = torch.cuda.is_available() and model_path is not None
        except ImportError:
            have_vllm = False
        blocker = vllm_blocker(model_path) if have_vllm else None
        if blocker:
            log.warning("%s; using the transformers backend", blocker)
        elif have_vllm:
            opts = {"tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
                    "max_model_len": max_model_len}
            stop = eos_ids(model, tokenizer) if model is not None else None
            with _off_gpu(model, restore=restore_model):
                return VLLMGenerator(model_path, tokenizer, stop_token_ids=stop, progress=progress,
                                     **{k: v for k, v in opts.items() if v is not None})
        elif backend == "vllm":
            from ..errors import ConfigError
            raise ConfigError("--backend vllm needs the vllm package, a CUDA GPU and a model folder")
    return HFGenerator(model, tokenizer, batch_size=batch_size, progress=progress)


def chat_generate(gen: Generator, tokenizer, prompts: list[str], max_new_tokens: int,
                  use_template: bool = True, desc: str = "generate",
                  stop_fn: Callable[[str], bool] | None = None) -> list[str]:
    return gen.generate(format_chats(tokenizer, prompts, use_template=use_template), max_new_tokens, desc=desc,
                        stop_fn=stop_fn)
