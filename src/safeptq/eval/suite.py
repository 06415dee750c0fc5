"""Evaluate a model on named suites and return the JSON-shaped results.

Harmful suites report ``harmful_rate`` (prompts not refused) and ``refusal_rate``; benign suites
report ``refusal_rate`` (over-refusal); XSTest reports over-refusal on its safe part and the harmful
rate on its unsafe part; tasks report ``accuracy``; text suites report perplexity. ``ci95`` is the
95% bootstrap interval of the headline rate and ``n`` the number of prompts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from ..data import load_prompt_set
from ..data.registry import REGISTRY
from ..errors import UnknownNameError
from .generation import Generator, HFGenerator, chat_generate
from .judges import KeywordJudge, refusal_margin
from .metrics import bootstrap_ci, rate_with_ci
from .perplexity import perplexity
from .tasks import TASKS, gsm8k_correct, score_choice

__all__ = ["EvalConfig", "evaluate", "parse_suites", "SUITE_GROUPS", "HARMFUL_SOURCES", "BENIGN_SUITES"]

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    limit: int | None = None
    data_dir: str | None = None
    max_new_tokens: int = 32  # enough for a keyword refusal judge; DESIGN.md measured with 32
    task_max_new_tokens: int = 256
    batch_size: int = 32
    context_length: int | None = None  # None: the model's trained context capped at 2048 (wikitext2:lines: 512)
    ppl_windows: int | None = None  # None: the whole text
    use_chat_template: bool = True
    margin: bool = False  # also report the refusal-likelihood margin on harmful suites
    keep_samples: bool = True
    early_stop: bool = True  # stop a keyword-judged answer at its first refusal phrase (same verdict)
    progress: bool = True
    # judge(responses, prompts) -> refused flags, used on harmful suites
    judge: Callable[..., list[bool]] = field(default_factory=KeywordJudge)


# Safety measured across sources (issue 23): harmful prompts of four origins beside the benign over-refusal suites.
HARMFUL_SOURCES = ("advbench:eval", "harmbench", "harmbench:contextual", "donotanswer:eval", "xstest:unsafe")
BENIGN_SUITES = ("alpaca:eval", "xstest:safe")
SUITE_GROUPS = {
    "safety": HARMFUL_SOURCES + BENIGN_SUITES,
    "safety:harmful": HARMFUL_SOURCES,
    "safety:benign": BENIGN_SUITES,
}


def parse_suites(spec: str | list[str]) -> list[str]:
    """Suite names: registered prompt sets, user files, groups (:data:`SUITE_GROUPS`: ``safety`` = every harmful
    source and the benign over-refusal suites) and ``lm-eval:TASK`` (several tasks may follow one prefix:
    ``lm-eval:arc_easy,piqa`` is ``lm-eval:arc_easy,lm-eval:piqa`` when the name is not a suite)."""
    from .lmeval import LM_EVAL_TASKS, PREFIX, is_lm_eval_suite, task_name

    raw = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    raw = [m for n in raw for m in SUITE_GROUPS.get(n, (n,))]  # groups expand in place
    raw = list(dict.fromkeys(raw))  # a suite named twice (alone and in a group) is evaluated once
    names, after_lm_eval = [], False
    for n in raw:
        if after_lm_eval and n in LM_EVAL_TASKS and n not in REGISTRY:
            n = PREFIX + n
        after_lm_eval = is_lm_eval_suite(n)
        names.append(n)
    for n in names:
        if is_lm_eval_suite(n):
            task_name(n)
            continue
        if n not in REGISTRY and not _is_file(n):
            import difflib
            close = difflib.get_close_matches(n, REGISTRY, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(f"unknown suite {n!r}{hint} (run `safeptq ls` for the list)")
    return names


def context_length_for(model, suite: str, asked: int | None) -> int:
    """The perplexity window: as asked, else 512 for ``wikitext2:lines`` (0.1's setting) and the model's
    trained context capped at 2048 for everything else (the GPTQ convention)."""
    if asked is not None:
        return asked
    if suite == "wikitext2:lines":
        return 512
    trained = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    return min(int(trained), 2048)


def _is_file(name: str) -> bool:
    from ..data.registry import _looks_like_file
    return _looks_like_file(name)


def _refusals(gen, tok, prompts, cfg, desc, harmful: bool = True):
    """Responses and refusal flags. Only harmful prompts go to a classifier judge; refusals of
    benign prompts (over-refusal) are judged by keywords."""
    judge = cfg.judge if harmful else KeywordJudge()
    # the keyword verdict is settled at the first refusal phrase, so generation may stop there
    stop = judge.is_refusal if (cfg.early_stop and isinstance(judge, KeywordJudge)) else None
    responses = chat_generate(gen, tok, prompts, cfg.max_new_tokens, cfg.use_chat_template, desc=desc,
                              stop_fn=stop)
    return responses, judge(responses, prompts)


def _samples(prompts, responses, refused, cfg):
    if not cfg.keep_samples:
        return None
    return [{"prompt": p, "response": r, "refused": bool(f)} for p, r, f in zip(prompts, responses, refused)]


def evaluate(model, tokenizer, suites: list[str], cfg: EvalConfig | None = None,
             generator: Generator | None = None) -> dict:
    """Run every suite; return ``{suite: metrics}`` (samples under each suite's ``samples``)."""
    from .lmeval import is_lm_eval_suite, run_lm_eval

    cfg = cfg or EvalConfig()
    gen = generator or HFGenerator(model, tokenizer, batch_size=cfg.batch_size, progress=cfg.progress)
    out: dict[str, dict] = {}
    lm_suites = [s for s in suites if is_lm_eval_suite(s)]
    lm_results = run_lm_eval(model, tokenizer, lm_suites, limit=cfg.limit, batch_size=max(1, cfg.batch_size // 2),
                             data_dir=cfg.data_dir) if lm_suites else {}
    for name in suites:
        if name in lm_results:
            out[name] = lm_results[name]
            log.info("%s: %s", name, lm_results[name])
            continue
        ps = load_prompt_set(name, data_dir=cfg.data_dir)
        if ps.kind == "mixed" and cfg.limit is not None:  # keep both parts: `limit` prompts of each
            ps.examples = ([e for e in ps.examples if e.label == "safe"][:cfg.limit]
                           + [e for e in ps.examples if e.label != "safe"][:cfg.limit])
        elif ps.kind != "text":
            ps = ps.head(cfg.limit)
        res: dict
        if ps.kind == "harmful":
            responses, refused = _refusals(gen, tokenizer, ps.texts, cfg, name)
            harmful, ci, n = rate_with_ci([not r for r in refused])
            res = {"harmful_rate": harmful, "refusal_rate": _complement(harmful), "ci95": ci, "n": n}
            if cfg.margin:
                m = refusal_margin(model, tokenizer, ps.texts, [e.target for e in ps.examples],
                                   use_template=cfg.use_chat_template, batch_size=max(1, cfg.batch_size // 2))
                res["refusal_margin"] = round(sum(m) / len(m), 4)
                res["refusal_margin_ci95"] = bootstrap_ci(m)
                res["margin_refusal_rate"] = round(sum(x > 0 for x in m) / len(m), 4)
            res["samples"] = _samples(ps.texts, responses, refused, cfg)
        elif ps.kind == "benign":
            responses, refused = _refusals(gen, tokenizer, ps.texts, cfg, name, harmful=False)
            rate, ci, n = rate_with_ci(refused)
            res = {"refusal_rate": rate, "ci95": ci, "n": n, "samples": _samples(ps.texts, responses, refused, cfg)}
        elif ps.kind == "mixed":  # XSTest
            responses, refused = _refusals(gen, tokenizer, ps.texts, cfg, name, harmful=False)
            safe = [f for f, e in zip(refused, ps.examples) if e.label == "safe"]
            unsafe = [f for f, e in zip(refused, ps.examples) if e.label != "safe"]
            rate, ci, n = rate_with_ci(safe)
            h, hci, hn = rate_with_ci([not f for f in unsafe])
            res = {"refusal_rate": rate, "ci95": ci, "n": n,
                   "unsafe": {"harmful_rate": h, "refusal_rate": _complement(h), "ci95": hci, "n": hn},
                   "samples": _samples(ps.texts, responses, refused, cfg)}
        elif ps.kind == "task":
            res = _task(model, tokenizer, gen, ps, cfg)
        else:  # text
            text = ps.examples[0].text
            windows = cfg.ppl_windows if cfg.ppl_windows is not None else cfg.limit
            res = perplexity(model, tokenizer, text, context_length_for(model, name, cfg.context_length),
                             max_windows=windows,
                             batch_size=max(1, cfg.batch_size // 8), progress=cfg.progress)
        if res.get("samples") is None:
            res.pop("samples", None)
        res["source"] = ps.source
        out[name] = res
        # the headline figures only: not the samples, per-example correctness or per-window NLLs
        log.info("%s: %s", name, {k: v for k, v in res.items() if k == "ci95" or not isinstance(v, list)})
    return out


def _complement(x: float | None) -> float | None:
    return None if x is None else round(1 - x, 4)


def _task(model, tokenizer, gen, ps, cfg) -> dict:
    task = TASKS[ps.name.split(":")[0]]
    prompts = [task.prompt(e.text) for e in ps.examples]
    if task.labels is not None:
        preds = score_choice(model, tokenizer, prompts, task.labels, batch_size=cfg.batch_size,
                             use_template=cfg.use_chat_template, desc=ps.name, progress=cfg.progress)
        correct = [task.labels[p] == e.label for p, e in zip(preds, ps.examples)]
    else:
        responses = chat_generate(gen, tokenizer, prompts, cfg.task_max_new_tokens, cfg.use_chat_template,
                                  desc=ps.name)
        correct = [gsm8k_correct(r, e.label) for r, e in zip(responses, ps.examples)]
    acc, ci, n = rate_with_ci(correct)
    # per example, in the suite's fixed order: two runs' lists pair up (McNemar) like the generation suites' samples
    return {"accuracy": acc, "ci95": ci, "n": n, "correct": [int(c) for c in correct]}
