"""Rates with 95% bootstrap intervals."""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_ci", "wilson_ci", "rate_with_ci", "format_metric"]


def bootstrap_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (0/1 outcomes or scores)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def wilson_ci(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval of a binomial rate ``k / n`` (scipy). Unlike a percentile bootstrap it
    is not degenerate at 0 or n successes: 0 of 170 gives [0, 0.022], not [0, 0]."""
    from scipy.stats import binomtest

    if n <= 0:
        return None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def rate_with_ci(flags) -> tuple[float | None, list[float] | None, int]:
    """Rate of 0/1 ``flags``, its 95% Wilson score interval and n; ``None`` for an empty set (JSON has
    no NaN). (Before safeptq 0.2 the interval was a percentile bootstrap; BENCHMARKS figures say which.)"""
    v = np.asarray(flags, dtype=float)
    if v.size == 0:
        return None, None, 0
    return round(float(v.mean()), 4), wilson_ci(int(v.sum()), int(v.size)), int(v.size)


def format_metric(res: dict) -> tuple[str, str, str, str]:
    """(metric name, value, 95% interval, n) for the table."""
    for key in ("harmful_rate", "refusal_rate", "accuracy"):
        if key in res:
            v = res[key]
            ci = res.get("ci95")
            return (key if key != "refusal_rate" else "refusal_rate (over-refusal)",
                    "n/a" if v is None else f"{v:.3f}",
                    "" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]", str(res.get("n", "")))
    if "perplexity" in res:
        ci = res.get("ci95")
        return ("perplexity", f"{res['perplexity']:.3f}", "" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]",
                f"ctx {res['context_length']}, {res['tokens_scored']} tok")
    return ("?", "", "", "")
