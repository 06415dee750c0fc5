"""Per-prompt evaluation records (``*.samples.jsonl``) and paired comparisons of two runs.

Two quantized models judged on the same prompts are paired data: the interval of the difference of
their rates, bootstrapped over prompts, is much tighter than two separate intervals suggest, and it is
the right test of "lower by more than the noise"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError

__all__ = ["SAMPLES_FILE", "pop_samples", "write_samples", "read_samples", "samples_path", "paired_difference",
           "compare_runs"]

SAMPLES_FILE = "eval.samples.jsonl"  # in a quantize / realign / aaq output folder


def pop_samples(results: dict[str, dict]) -> dict[str, list[dict]]:
    """Take the per-prompt records out of :func:`~safeptq.eval.evaluate` results (they go to their own file,
    not into the results JSON): ``{suite: samples}`` of the suites that have any."""
    out = {}
    for suite, res in results.items():
        items = res.pop("samples", None)
        if items:
            out[suite] = items
    return out


def write_samples(path: str | Path, samples: dict[str, list[dict]]) -> Path:
    """One JSON line per prompt, ``{"suite", "prompt", "response", "refused"}``; written whole or not at all."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for suite, items in samples.items():
            for it in items:
                f.write(json.dumps({"suite": suite, **it}) + "\n")
    tmp.replace(path)
    return path


def samples_path(run: str | Path) -> Path:
    """The samples file of a run: the file itself, ``DIR/eval.samples.jsonl`` of a quantize/realign/aaq
    folder, or ``X.samples.jsonl`` beside an ``safeptq eval --out X.json``."""
    p = Path(run)
    for cand in (p, p / SAMPLES_FILE, p.with_suffix(".samples.jsonl")):
        if cand.is_file() and cand.name.endswith(".jsonl"):
            return cand
    raise ConfigError(f"{run}: no per-prompt samples (expected a .samples.jsonl file, a run folder with "
                      f"{SAMPLES_FILE}, or an eval --out JSON with its .samples.jsonl beside it)")


def read_samples(run: str | Path) -> dict[str, dict[str, bool]]:
    """``{suite: {prompt: refused}}`` of a run."""
    out: dict[str, dict[str, bool]] = {}
    path = samples_path(run)
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                out.setdefault(r["suite"], {})[r["prompt"]] = bool(r["refused"])
            except (json.JSONDecodeError, KeyError) as e:
                raise ConfigError(f"{path}:{i}: not a samples record ({e})") from None
    return out


def paired_difference(a, b, n_boot: int = 5000, seed: int = 0) -> dict:
    """Mean of ``b - a`` over paired 0/1 outcomes with its 95% paired-bootstrap interval, plus the
    discordant counts (a only / b only) and the exact two-sided McNemar p-value."""
    from scipy.stats import binomtest

    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired outcomes must have the same non-zero length, got {a.size} and {b.size}")
    d = b - a
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
    return {"a": round(float(a.mean()), 4), "b": round(float(b.mean()), 4), "diff": round(float(d.mean()), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)], "n": int(d.size),
            "only_a": only_a, "only_b": only_b, "mcnemar_p": float(p)}


def compare_runs(run_a, run_b, suites: list[str] | None = None) -> dict[str, dict]:
    """Paired comparison of the per-prompt outcomes of two runs on every suite they share. The outcome
    is "not refused" (the harmful rate) on harmful suites and "refused" (over-refusal) on benign ones:
    the suite's headline rate either way, so ``diff`` is rate(b) - rate(a). Mixed suites (XSTest: the
    samples do not say which prompts are the safe ones) are left out."""
    check_comparable(run_a, run_b)
    sa, sb = read_samples(run_a), read_samples(run_b)
    names = suites or [s for s in sa if s in sb and _kind(s) in ("harmful", "benign")]
    if not names:
        raise ConfigError(f"{run_a} and {run_b} share no evaluated suite")
    out = {}
    for s in names:
        if s not in sa or s not in sb:
            raise ConfigError(f"suite {s!r} is not in both runs ({run_a}: {sorted(sa)}; {run_b}: {sorted(sb)})")
        prompts = [p for p in sa[s] if p in sb[s]]
        if len(prompts) < min(len(sa[s]), len(sb[s])):
            raise ConfigError(f"suite {s!r}: the two runs judged different prompts")
        if _kind(s) not in ("harmful", "benign"):
            raise ConfigError(f"suite {s!r}: only harmful and benign suites can be compared per prompt")
        harmful = _kind(s) == "harmful"
        fa = [(not sa[s][p]) if harmful else sa[s][p] for p in prompts]
        fb = [(not sb[s][p]) if harmful else sb[s][p] for p in prompts]
        out[s] = {"metric": "harmful_rate" if harmful else "refusal_rate", **paired_difference(fa, fb)}
    return out


_RUN_FILES = ("quantize.json", "realign.json", "aaq.json")
# settings that change verdicts: runs that differ in any of them are not paired data
COMPARABLE = ("judge", "max_new_tokens", "chat_template", "limit", "system_prompt", "chat_template_kwargs")


def run_document(run: str | Path) -> tuple[Path, dict] | None:
    """The results document of a run: an ``eval --out`` JSON (given, or beside its samples file) or
    the run record of a quantize / realign / aaq folder; ``None`` where there is none."""
    p = Path(run)
    cands = ([p / f for f in _RUN_FILES] if p.is_dir() else
             [p] if p.suffix == ".json" else [p.with_name(p.name.removesuffix(".samples.jsonl") + ".json")])
    for c in cands:
        if c.is_file():
            try:
                return c, json.loads(c.read_text())
            except ValueError:
                raise ConfigError(f"{c} is not valid JSON") from None
    return None


def eval_settings(doc: dict) -> dict | None:
    """The evaluation settings of a results document (``config`` of eval, ``eval_config`` of a run)."""
    return doc.get("config") if "suites" in doc else doc.get("eval_config")


def check_comparable(run_a, run_b) -> None:
    """Refuse (one line) to pair runs judged differently, or a samples file that is not the one its
    results were written with."""
    import hashlib

    settings = []
    for run in (run_a, run_b):
        found = run_document(run)
        if found is None:
            settings.append(None)
            continue
        path, doc = found
        ref = doc.get("samples_file")
        if ref:
            side = path.with_name(ref["name"])
            if not side.is_file() or hashlib.sha256(side.read_bytes()).hexdigest() != ref["sha256"]:
                raise ConfigError(f"{run}: the samples file beside {path.name} is not the one its results were "
                                  "written with (a later or interrupted run); re-run the evaluation")
        settings.append(eval_settings(doc))
    a, b = settings
    if a is None or b is None:
        return
    differ = [k for k in COMPARABLE if k in a and k in b and a[k] != b[k]]
    if differ:
        k = differ[0]
        raise ConfigError(f"the runs were evaluated differently ({', '.join(differ)}: {k} {a[k]!r} vs {b[k]!r}); "
                          "a paired comparison needs the same judge, generation length, template and prompts")


def _kind(suite: str) -> str:
    from ..data.registry import REGISTRY

    spec = REGISTRY.get(suite)
    if spec is not None:
        return spec.kind
    return "benign" if suite.startswith("benign:") else "harmful"  # user files: [harmful:|benign:]PATH
