"""Top-K KL objectives on the model's output distribution: ``kl_top`` (OSTQuant) and AAQ's
contrastive ``KL_topK(instruct ‖ q) − λ · push(base ‖ q)``.

Truncated KL. For a reference ``p`` and the quantized student ``q``,

    KL_topK(p ‖ q) = Σ_{i ∈ topK(p)} p_i (log p_i − log q_i)

where both ``log p`` and ``log q`` are log-softmaxes over the FULL vocabulary, gathered at the
reference's top-K ids; neither is renormalised over the K entries. So the student is not credited
for matching only the *shape* of the top-K, it must also put the same mass there, and only the
reference's top-K log-probabilities need storing. It is exactly 0 when student == reference and
the exact KL when K ≥ vocab. The price: the tail is ignored, so it is not a divergence: it goes
below 0 when the student puts more mass on those K ids than the reference does, and an optimiser
does exploit that (an over-confident student scores better than an exact copy).

``tail=True`` (opt-in) adds the rest of the vocabulary as one more bin,
``p_rest (log p_rest − log q_rest)`` with ``x_rest = 1 − Σ_topK x_i``: the exact KL between the
two distributions coarse-grained to K+1 outcomes, hence ≥ 0 and 0 only when the student matches
the reference on the K ids and the remaining mass. It needs nothing more stored.

The references' top-K come from :mod:`safeptq.objectives.references` (cached once, or live).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from safeptq.errors import ConfigError
from safeptq.objectives.base import E2EObjective, register_e2e_objective

__all__ = [
    "TopK",
    "RefBatch",
    "topk_reference",
    "kl_topk_per_token",
    "kl_topk",
    "masked_token_mean",
    "KLTop",
    "ContrastiveKLTop",
    "PUSH_FORMS",
    "check_k",
]

PUSH_FORMS = ("unbounded", "bounded", "margin")


class TopK(NamedTuple):
    """A reference distribution's top-K entries: ``indices`` (int) and ``logp`` (full-vocab log-probs)."""

    indices: torch.Tensor
    logp: torch.Tensor


def check_k(k, what: str = "top-K size k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{what} must be a positive integer, got {k!r}")
    return k


def topk_reference(logits: torch.Tensor, k: int) -> TopK:
    """``(indices [..., K], log-probs [..., K])`` of ``softmax(logits)``'s K largest entries,
    sorted descending; K is capped at the vocabulary size."""
    k = min(check_k(k), logits.shape[-1])
    logp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = logp.topk(k, dim=-1)
    return TopK(idx, vals)


_TINY = 1e-12


def _kl_from_logp(ref_idx: torch.Tensor, ref_logp: torch.Tensor, student_logp: torch.Tensor,
                  tail: bool = False) -> torch.Tensor:
    s = student_logp.gather(-1, ref_idx.long())
    r = ref_logp.to(s.dtype)
    p = r.exp()
    term = p * (r - s)
    kl = torch.where(torch.isfinite(r), term, torch.zeros_like(term)).sum(-1)  # p = 0 adds nothing
    if tail:
        p_rest = (1 - p.sum(-1)).clamp(min=0)
        q_rest = (1 - s.exp().sum(-1)).clamp(min=_TINY)
        rest = p_rest * (torch.log(p_rest.clamp(min=_TINY)) - torch.log(q_rest))
        kl = kl + torch.where(p_rest > _TINY, rest, torch.zeros_like(rest))
    return kl


def kl_topk_per_token(ref_idx: torch.Tensor, ref_logp: torch.Tensor, student_logits: torch.Tensor,
                      tail: bool = False) -> torch.Tensor:
    """Truncated KL(p_ref ‖ p_student) of every token, shape ``student_logits.shape[:-1]``."""
    return _kl_from_logp(ref_idx, ref_logp, torch.log_softmax(student_logits.float(), dim=-1), tail)


def masked_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [B, T] over the tokens where ``mask`` is 1 (0 when the mask is empty)."""
    m = mask.to(device=x.device, dtype=x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def kl_topk(ref_idx: torch.Tensor, ref_logp: torch.Tensor, student_logits: torch.Tensor,
            mask: torch.Tensor, *, tail: bool = False) -> torch.Tensor:
    """KL_topK(p_ref ‖ p_student) (see the module doc), averaged over the tokens where ``mask`` is 1."""
    return masked_token_mean(kl_topk_per_token(ref_idx, ref_logp, student_logits, tail), mask)


@dataclass
class RefBatch:
    """What the references say about one mini-batch.

    ``topk[name]``: that reference's top-K ``[B, T, K]``; ``cross_kl[(a, b, tail)]``: per-token
    ``KL_topK(a ‖ b)`` ``[B, T]`` between two references, without and with the tail bin (the
    bounded push's default cap).
    """

    topk: dict[str, TopK]
    cross_kl: dict[tuple[str, str, bool], torch.Tensor]

    def to(self, device) -> RefBatch:
        return RefBatch({n: TopK(t.indices.to(device), t.logp.to(device, torch.float32)) for n, t in self.topk.items()},
                        {p: v.to(device, torch.float32) for p, v in self.cross_kl.items()})

    def get(self, name: str, k: int, vocab: int) -> TopK:
        """The first ``k`` (largest) entries of reference ``name``."""
        if name not in self.topk:
            raise ConfigError(f"no reference named {name!r}; the references hold {sorted(self.topk)}")
        t = self.topk[name]
        held = t.indices.shape[-1]
        if k > held and held < vocab:
            raise ConfigError(f"the objective uses the top-{k} entries of reference {name!r}, but the references "
                              f"hold only {held}; rebuild them with k >= {k}")
        return t if k >= held else TopK(t.indices[..., :k], t.logp[..., :k])


class KLTop(E2EObjective):
    """``kl_top``: KL_topK(teacher ‖ quantized), the teacher usually being the full-precision
    model itself (OSTQuant) or the instruct model (AAQ's pull term alone)."""

    name = "kl_top"

    def __init__(self, k: int = 1000, teacher: str = "instruct", tail: bool = False) -> None:
        self.k = check_k(k, "kl_top k")
        self.teacher, self.tail = teacher, bool(tail)

    @property
    def references(self) -> tuple[str, ...]:
        return (self.teacher,)

    def terms(self, student_logits, refs: RefBatch, mask) -> dict[str, torch.Tensor]:
        t = refs.get(self.teacher, self.k, student_logits.shape[-1])
        kl = kl_topk(t.indices, t.logp, student_logits, mask, tail=self.tail)
        return {"loss": kl, "kl_teacher": kl}

    def describe(self) -> dict:
        return {"name": self.name, "k": self.k, "teacher": self.teacher, "tail": self.tail}


class ContrastiveKLTop(E2EObjective):
    """AAQ: ``KL_topK(instruct ‖ q) − λ · push``, per token, averaged over real tokens.

    ``push="unbounded"`` (the authors' code): ``push = KL_topK(base ‖ q)``. Nothing bounds it, so
    the student can lower the loss without limit by starving the base's top-K ids.
    ``push="bounded"``: ``push = min(KL_topK(base ‖ q), τ)`` per token, a hinge: once the student
    is τ away from the base on a token, that token stops pushing and only the pull acts, so the
    loss is bounded below by ``−λ·τ``. The term ``push_active`` is the share of tokens still under
    the cap: when quantization noise alone puts the student further than τ from the base on every
    token, it is 0 and the objective trains exactly like ``kl_top`` (the case of the bounded runs on
    the organism, BENCHMARKS.md). ``tau="ref"`` (default) takes τ per token as
    ``KL_topK(base ‖ instruct)``, i.e. push the student no further from the base than the
    instruct model itself is (needs references holding both models); a positive number is a
    fixed cap in nats.
    ``push="margin"`` acts on the difference: ``push = min(KL_topK(base ‖ q) − KL_topK(instruct ‖ q), τ)``
    per token, i.e. the loss adds ``λ·relu(τ − d)`` (up to a constant) where ``d`` is how much closer the
    student is to the instruct model than to the base. A student equal to the instruct model sits
    exactly at ``d = τ`` (with ``tau="ref"``); quantization noise, which moves the student away from
    both references alike, leaves ``d`` below τ, so the push keeps a gradient — pull towards the
    instruct model and away from the base, weighted to the tokens where the two disagree.
    """

    name = "contrastive_kl_top"

    def __init__(self, k: int = 1000, lam: float = 0.1, push: str = "unbounded", tau: float | str = "ref",
                 instruct: str = "instruct", base: str = "base", tail: bool = False) -> None:
        self.k = check_k(k, "contrastive_kl_top k")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"contrastive_kl_top lambda must be a finite number >= 0, got {lam!r}")
        if push not in PUSH_FORMS:
            raise ConfigError(f"unknown push form {push!r}; choose one of {', '.join(PUSH_FORMS)}")
        if tau != "ref" and (isinstance(tau, bool) or not isinstance(tau, (int, float))
                             or not math.isfinite(tau) or tau <= 0):
            raise ConfigError(f"contrastive_kl_top tau must be 'ref' or a positive number of nats, got {tau!r}")
        if instruct == base:
            raise ConfigError(f"contrastive_kl_top needs two different references, got {instruct!r} twice")
        self.lam, self.push, self.tau = float(lam), push, tau
        self.instruct, self.base, self.tail = instruct, base, bool(tail)

    @property
    def references(self) -> tuple[str, ...]:
        return (self.instruct, self.base)

    def _cap(self, refs: RefBatch, like: torch.Tensor) -> torch.Tensor:
        if self.tau != "ref":
            return torch.full_like(like, float(self.tau))
        cap = refs.cross_kl.get((self.base, self.instruct, self.tail))
        if cap is None:
            raise ConfigError("the bounded push with tau='ref' needs KL(base ‖ instruct) per token: build the "
                              f"references from both {self.instruct!r} and {self.base!r} together, or give a number")
        held = refs.topk[self.base].indices.shape[-1]
        if self.k < held:
            raise ConfigError(f"the bounded push with tau='ref' needs the references built with the objective's K: "
                              f"they hold top-{held}, the objective uses top-{self.k}")
        return cap.to(like.device, like.dtype).clamp(min=0)

    def terms(self, student_logits, refs: RefBatch, mask) -> dict[str, torch.Tensor]:
        vocab = student_logits.shape[-1]
        logp = torch.log_softmax(student_logits.float(), dim=-1)
        ins, base = refs.get(self.instruct, self.k, vocab), refs.get(self.base, self.k, vocab)
        pull_tok = _kl_from_logp(ins.indices, ins.logp, logp, self.tail)
        base_tok = _kl_from_logp(base.indices, base.logp, logp, self.tail)
        out = {}
        if self.push == "unbounded":
            push_tok = base_tok
        else:
            cap = self._cap(refs, base_tok)
            d = base_tok if self.push == "bounded" else base_tok - pull_tok
            push_tok = torch.minimum(d, cap)
            # share of tokens still under the cap: only those give the push a gradient (0 = AAQ acts as kl_top)
            out["push_active"] = masked_token_mean((d < cap).float(), mask).detach()
        pull, push = masked_token_mean(pull_tok, mask), masked_token_mean(push_tok, mask)
        kl_base = masked_token_mean(base_tok, mask).detach()
        return {"loss": pull - self.lam * push, "kl_instruct": pull, "kl_base": kl_base, "push": push, **out}

    def describe(self) -> dict:
        d = {"name": self.name, "k": self.k, "lambda": self.lam, "push": self.push, "instruct": self.instruct,
             "base": self.base, "tail": self.tail}
        if self.push != "unbounded":
            d["tau"] = self.tau
        return d


register_e2e_objective("kl_top", KLTop, "KL_topK(instruct ‖ q): reconstruction of the instruct model's top-K")
register_e2e_objective("contrastive_kl_top", ContrastiveKLTop,
                       "AAQ: KL_topK(instruct ‖ q) − λ·push(base ‖ q), bounded, margin or unbounded push")
