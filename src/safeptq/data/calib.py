"""Calibration sets: token ids (right-padded) with a per-sample label and last-prompt-token index.

A calibration spec names one or more prompt sets with shares, e.g. ``alpaca:calib`` (one set),
``advbench:calib=0.75,alpaca:calib=0.25`` (Q-realign's mix) or ``wikitext2`` (plain text cut into
windows of ``seqlen`` tokens). Harmful sets give label 1 (malicious), everything else label 0;
a ``harmful:`` / ``benign:`` prefix overrides that for user files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .chat import format_chat
from .registry import load_prompt_set

__all__ = ["CalibSet", "MALICIOUS", "BENIGN", "build_calib_set", "parse_calib_spec", "load_calibration"]

BENIGN, MALICIOUS = 0, 1


@dataclass
class CalibSet:
    """``input_ids``/``attention_mask`` [N, T] right-padded; ``labels`` [N] (1 = malicious);
    ``last_idx`` [N] position of each sample's last real token (the last prompt token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    last_idx: torch.Tensor
    sources: list[str]

    def token_lists(self) -> list[torch.Tensor]:
        """Each sample's tokens without its padding (what llm-compressor's calibration takes)."""
        return [row[: int(m.sum())] for row, m in zip(self.input_ids, self.attention_mask)]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def describe(self) -> dict:
        return {"n": len(self), "max_len": int(self.input_ids.shape[1]), "tokens": self.n_tokens,
                "malicious": int(self.labels.sum()), "sources": sorted(set(self.sources))}


def build_calib_set(tokenizer, texts: list[str], labels: list[int] | None = None, seqlen: int = 128,
                    chat: bool = True, sources: list[str] | None = None) -> CalibSet:
    """Tokenize ``texts`` (as chat prompts ending in the assistant turn when ``chat``).

    A text longer than ``seqlen`` tokens keeps its *last* ``seqlen`` tokens, so the last prompt
    token (where probes read the state) survives truncation.
    """
    if not texts:
        raise ConfigError("the calibration set is empty")
    if seqlen <= 1:
        raise ConfigError(f"--seqlen must be at least 2, got {seqlen}")
    labels = list(labels) if labels is not None else [BENIGN] * len(texts)
    if len(labels) != len(texts):
        raise ConfigError(f"{len(texts)} calibration texts but {len(labels)} labels")
    rows = []
    for t in texts:
        s = format_chat(tokenizer, t) if chat else t
        ids = tokenizer(s, add_special_tokens=not chat)["input_ids"]
        rows.append(ids[-seqlen:])
    t_max = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), t_max), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t_max), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return CalibSet(input_ids, mask, torch.tensor(labels, dtype=torch.long), mask.sum(1) - 1,
                    list(sources) if sources else ["user"] * len(texts))


def parse_calib_spec(spec: str) -> list[tuple[str, float | None]]:
    """``"a=0.75,b=0.25"`` → ``[("a", 0.75), ("b", 0.25)]``; a single name gets share ``None``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError("empty --calib")
    out = []
    for p in parts:
        name, eq, share = p.rpartition("=") if "=" in p else (p, "", "")
        if eq:
            try:
                v = float(share)
            except ValueError:
                raise ConfigError(f"--calib share of {name!r} must be a number, got {share!r}") from None
            if not 0 < v <= 1:
                raise ConfigError(f"--calib share of {name!r} must be in (0, 1], got {v}")
            out.append((name, v))
        else:
            out.append((p, None))
    shares = [s for _, s in out]
    if len(out) > 1 and any(s is None for s in shares):
        raise ConfigError("--calib with several sets needs a share for each, e.g. advbench:calib=0.75,alpaca:calib=0.25")
    if len(out) > 1 and abs(sum(shares) - 1) > 1e-6:
        raise ConfigError(f"--calib shares must add up to 1, got {sum(shares):g}")
    return out


def _text_windows(text: str, tokenizer, n: int, seqlen: int, seed: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < seqlen + 1:
        raise DataError(f"calibration text has {len(ids)} tokens, fewer than --seqlen {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seqlen) for _ in range(n)]
    return [ids[s: s + seqlen] for s in starts]


def load_calibration(spec: str, tokenizer, nsamples: int = 128, seqlen: int = 128, chat: bool = True,
                     data_dir: str | Path | None = None, seed: int = 0) -> CalibSet:
    """The calibration set named by ``spec`` (see module doc): ``nsamples`` in total, in order
    of the sets' rows (fixed splits, so runs are reproducible), malicious first."""
    if nsamples <= 0:
        raise ConfigError(f"--nsamples must be positive, got {nsamples}")
    texts, labels, sources, windows = [], [], [], []
    parts = parse_calib_spec(spec)
    counts = [nsamples if s is None else round(s * nsamples) for _, s in parts]
    counts[-1] = nsamples - sum(counts[:-1])
    for (name, _), n in zip(parts, counts):
        ps = load_prompt_set(name, data_dir=data_dir)
        label = MALICIOUS if ps.kind == "harmful" else BENIGN
        if ps.kind == "text":
            windows += [(w, name) for w in _text_windows("\n\n".join(ps.texts), tokenizer, n, seqlen, seed)]
            continue
        if len(ps) < n:
            raise DataError(f"calibration set {name} has {len(ps)} prompts, {n} requested")
        texts += ps.texts[:n]
        labels += [label] * n
        sources += [name] * n
    if windows and texts:
        raise ConfigError("--calib cannot mix plain text (wikitext2) with prompt sets")
    if windows:
        ids = torch.tensor([w for w, _ in windows], dtype=torch.long)
        return CalibSet(ids, torch.ones_like(ids), torch.zeros(len(ids), dtype=torch.long),
                        torch.full((len(ids),), seqlen - 1, dtype=torch.long), [s for _, s in windows])
    return build_calib_set(tokenizer, texts, labels, seqlen=seqlen, chat=chat, sources=sources)
