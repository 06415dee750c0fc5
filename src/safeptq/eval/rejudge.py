"""Re-judge saved completions (``safeptq judge``): a run's ``eval.samples.jsonl`` (or an ``eval --out``
file's samples) judged again by another judge, without generating anything. Harmful suites go to the
judge given; benign suites keep the keyword judge (over-refusal is a refusal question)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

__all__ = ["rejudge"]


def _load(path: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                out.setdefault(r["suite"], []).append({"prompt": r["prompt"], "response": r["response"]})
            except (ValueError, KeyError) as e:
                raise ConfigError(f"{path}:{i}: not a samples record with a response ({e})") from None
    return out


def rejudge(run: str | Path, judge: str = "keyword", suites: list[str] | None = None) -> tuple[dict, dict]:
    """``(results, samples)``: every harmful / benign suite of ``run``'s saved samples judged by ``judge``
    (``keyword`` or ``FORMAT=MODEL``), with rates, Wilson intervals and n, and the re-judged samples."""
    from .api import _parse_judge, classifier_judge
    from .judges import KeywordJudge
    from .metrics import rate_with_ci
    from .samples import _kind, samples_path

    path = samples_path(run)
    data = _load(path)
    keyword = KeywordJudge()
    harmful_judge = keyword
    if judge != "keyword":
        _parse_judge(judge)
        harmful_judge = classifier_judge(judge)
    names = suites or [s for s in data if _kind(s) in ("harmful", "benign")]
    results, samples = {}, {}
    for s in names:
        if s not in data:
            raise ConfigError(f"suite {s!r} is not in {path} ({', '.join(sorted(data))})")
        kind = _kind(s)
        items = data[s]
        prompts, responses = [x["prompt"] for x in items], [x["response"] for x in items]
        refused = (harmful_judge if kind == "harmful" else keyword)(responses, prompts)
        if kind == "harmful":
            rate, ci, n = rate_with_ci([not r for r in refused])
            results[s] = {"harmful_rate": rate, "refusal_rate": None if rate is None else round(1 - rate, 4),
                          "ci95": ci, "n": n}
        else:
            rate, ci, n = rate_with_ci(refused)
            results[s] = {"refusal_rate": rate, "ci95": ci, "n": n}
        results[s]["judge"] = judge if kind == "harmful" else "keyword"
        samples[s] = [{**x, "refused": bool(f)} for x, f in zip(items, refused)]
    return results, samples
