"""Calibration sets: token ids (right-padded) with a per-sample label and last-prompt-token index.

A calibration spec names one or more prompt sets with shares, e.g. ``alpaca:calib`` (one set),
``advbench:calib=0.75,alpaca:calib=0.25`` (Q-realign's mix) or ``wikitext2`` (plain text cut into
windows of ``seqlen`` tokens); plain text and prompt sets mix too (``wikitext2:calib=0.5,alpaca:calib=0.5``).
Harmful sets give label 1 (malicious), everything else label 0; a ``harmful:`` / ``benign:`` prefix
overrides that for user files. :func:`add_responses` appends a model's own greedy replies to the chat
samples (self-distillation data: the answer tokens of an instruct model, no labelled data needed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .chat import format_chat
from .registry import load_prompt_set

__all__ = ["CalibSet", "MALICIOUS", "BENIGN", "build_calib_set", "parse_calib_spec", "load_calibration",
           "add_responses"]

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
    pad = _pad_id(tokenizer)
    return _rows_to_set(rows, labels, [len(r) - 1 for r in rows],
                        list(sources) if sources else ["user"] * len(texts), pad)


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
    parts = []  # prompt rows first (malicious first among them), then text windows
    if texts:
        parts.append(build_calib_set(tokenizer, texts, labels, seqlen=seqlen, chat=chat, sources=sources))
    if windows:
        parts.append(_rows_to_set([w for w, _ in windows], [BENIGN] * len(windows), [seqlen - 1] * len(windows),
                                  [s for _, s in windows], _pad_id(tokenizer)))
    return parts[0] if len(parts) == 1 else _concat(parts, _pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _rows_to_set(rows: list[list[int]], labels: list[int], last_idx: list[int], sources: list[str],
                 pad: int) -> CalibSet:
    """Right-pad token rows into a :class:`CalibSet`."""
    t_max = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), t_max), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t_max), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return CalibSet(input_ids, mask, torch.tensor(labels, dtype=torch.long),
                    torch.tensor(last_idx, dtype=torch.long), list(sources))


def _concat(sets: list[CalibSet], pad: int) -> CalibSet:
    rows = [r.tolist() for c in sets for r in c.token_lists()]
    return _rows_to_set(rows, [int(x) for c in sets for x in c.labels], [int(x) for c in sets for x in c.last_idx],
                        [s for c in sets for s in c.sources], pad)


@torch.no_grad()
def add_responses(calib: CalibSet, model, tokenizer, max_new_tokens: int, batch_size: int = 16,
                  text_sources: set[str] | frozenset[str] = frozenset(), progress: bool = True) -> CalibSet:
    """``calib`` with ``model``'s greedy reply (up to ``max_new_tokens``, ending at its end-of-turn
    token, which is kept) appended to every chat sample; samples from ``text_sources`` (plain-text
    windows) stay as they are. ``last_idx`` still points at the last prompt token, so probes and
    Q-realign's malicious rows read the same position; the replies only add tokens after it.

    Why: an end-to-end distillation loss on chat *prompts* sees only one answer position per
    sample; with the instruct model's own replies every answer token carries its distribution."""
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise ConfigError(f"the reply length must be at least 1 token, got {max_new_tokens}")
    rows = [r.tolist() for r in calib.token_lists()]
    todo = [i for i, s in enumerate(calib.sources) if s not in text_sources]
    if not todo:
        raise ConfigError("replies need chat prompts in the calibration set; plain text (wikitext2) has none")
    from ..eval.generation import eos_ids

    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    eos = set(eos_ids(model, tokenizer))  # the tokenizer's and the generation config's end-of-turn ids
    order = sorted(todo, key=lambda i: len(rows[i]))
    bar = tqdm(total=len(order), desc="calibration replies", unit="sample", disable=not progress)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        t = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), t), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            ids[j, t - len(rows[i]):] = torch.tensor(rows[i])
            mask[j, t - len(rows[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(eos) or None)
        for j, i in enumerate(idx):
            reply = []
            for tok in out[j, t:].tolist():
                reply.append(tok)
                if tok in eos:
                    break
            rows[i] = rows[i] + reply
        bar.update(len(idx))
    bar.close()
    return _rows_to_set(rows, calib.labels.tolist(), calib.last_idx.tolist(), calib.sources, pad)
