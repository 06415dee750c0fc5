"""Supervised fine-tuning on (prompt, response) pairs with the chat template, loss on response
tokens only. Full fine-tuning or LoRA (peft; merged afterwards). Resumable: a checkpoint of model,
optimizer and position is written every ``ckpt_every`` steps and at the end of each epoch."""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.chat import format_chat
from ..errors import ConfigError

__all__ = ["SFTConfig", "build_batches", "supervised_finetune", "tokenize_pairs"]

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    epochs: int = 1
    lr: float = 2e-5
    batch_size: int = 16
    max_length: int = 256
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    seed: int = 0
    method: str = "full"  # full | lora
    lora_r: int = 8
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    ckpt_every: int = 20  # steps
    # full method only: train the top N decoder layers and the final norm, freeze the rest (embeddings
    # included). Backward then stops at the lowest trained layer: half the layers ≈ 1.5x faster on CPU.
    train_top_layers: int | None = None
    # fp32, or bf16 autocast (weights, gradients and optimizer state stay float32): on CPUs with bfloat16
    # units (AVX512-BF16, AMX) the matmuls run about 2x faster
    precision: str = "fp32"

    def __post_init__(self):
        if self.method not in ("full", "lora"):
            raise ConfigError(f"unknown fine-tuning method {self.method!r}; choose full or lora")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"unknown training precision {self.precision!r}; choose fp32 or bf16")
        if self.method == "lora" and self.lr < 1e-4:
            self.lr = 2e-4  # LoRA needs a larger step than full fine-tuning


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per pair; prompt tokens are masked with -100; the reply ends with EOS."""
    eos = tokenizer.eos_token or ""
    out = []
    for prompt, response in pairs:
        pre = tokenizer(format_chat(tokenizer, prompt), add_special_tokens=False).input_ids
        resp = tokenizer(response.strip() + eos, add_special_tokens=False).input_ids
        ids = (pre + resp)[:max_length]
        labels = ([-100] * len(pre) + resp)[:max_length]
        out.append((ids, labels))
    return out


def build_batches(examples, batch_size: int, seed: int, epoch: int, pad_id: int):
    """Shuffled batches, each padded on the right. Sequences are grouped by length within chunks of
    eight batches to cut padding while keeping the order random."""
    rng = random.Random(seed * 1000 + epoch)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    chunk = batch_size * 8
    batches = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: len(examples[i][0]))
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    for b in batches:
        L = max(len(examples[i][0]) for i in b)
        ids = torch.full((len(b), L), pad_id, dtype=torch.long)
        labels = torch.full((len(b), L), -100, dtype=torch.long)
        mask = torch.zeros((len(b), L), dtype=torch.long)
        for r, i in enumerate(b):
            x, y = examples[i]
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(y)] = torch.tensor(y)
            mask[r, :len(x)] = 1
        yield ids, labels, mask


def supervised_finetune(model, tokenizer, pairs: list[tuple[str, str]], cfg: SFTConfig,
                        work_dir: Path | None = None, desc: str = "sft", progress: bool = True) -> dict:
    """Train ``model`` in place; returns stats (steps, final loss, wall time). With ``work_dir`` the
    run checkpoints there and resumes from it."""
    torch.manual_seed(cfg.seed)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 target_modules=list(cfg.lora_targets), lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
    elif cfg.train_top_layers is not None:
        _freeze_below(model, cfg.train_top_layers)
    examples = tokenize_pairs(tokenizer, pairs, cfg.max_length)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_ratio * total))
    # linear warm-up, then linear decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    step, losses = 0, []
    ckpt = work_dir / "ckpt.pt" if work_dir else None
    if ckpt and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, losses = state["step"], state["losses"]
        log.info("%s: resuming at step %d/%d from %s", desc, step, total, ckpt)
    model.train()
    t0 = time.time()
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress, unit="step")
    device = next(model.parameters()).device
    for epoch in range(cfg.epochs):
        for k, (ids, labels, mask) in enumerate(build_batches(examples, cfg.batch_size, cfg.seed, epoch,
                                                              tokenizer.pad_token_id)):
            if epoch * steps_per_epoch + k < step:
                continue  # already done before the resume
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = response_loss(model, ids.to(device), mask.to(device), labels.to(device))
            if not torch.isfinite(loss):
                from ..errors import CalibrationError
                raise CalibrationError(f"{desc}: non-finite loss at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(loss.item(), 4))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", epoch=epoch)
            if ckpt and (step % cfg.ckpt_every == 0 or k == steps_per_epoch - 1) and step < total:
                _save_ckpt(ckpt, model, opt, sched, step, losses)
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.method == "lora":
        model = model.merge_and_unload()
    if ckpt and ckpt.exists():
        ckpt.unlink()
    return {"model": model, "steps": step, "examples": len(examples), "final_loss": losses[-1] if losses else None,
            "loss_first10": _mean(losses[:10]), "loss_last10": _mean(losses[-10:]), "losses": losses,
            "train_time_s": round(time.time() - t0, 1), "config": asdict(cfg)}


def _freeze_below(model, top: int) -> None:
    layers = model.model.layers
    if not 0 < top <= len(layers):
        raise ConfigError(f"train_top_layers must be in 1..{len(layers)}, got {top}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - top:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    for p in model.model.norm.parameters():
        p.requires_grad_(True)


def response_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) positions only.

    Same value as ``model(..., labels=labels).loss``, but the vocabulary projection runs only where
    there is a label: with short replies (a label word, a refusal) that skips most of the cost of a
    49k-word output layer."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    dev = core.lm_head.weight.device
    ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
    hidden = core.model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    sel = target != -100
    logits = core.lm_head(hidden[:, :-1][sel])
    return torch.nn.functional.cross_entropy(logits.float(), target[sel])


def _mean(xs):
    return round(sum(xs) / len(xs), 4) if xs else None


def _save_ckpt(path: Path, model, opt, sched, step, losses):
    from ..runs import save_torch_atomic

    save_torch_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                       "step": step, "losses": losses}, path)
