"""Evaluation: generation backends, judges, safety / task / perplexity metrics."""

from .generation import HFGenerator, greedy_generate, make_generator
from .judges import ClassifierJudge, KeywordJudge, refusal_margin
from .metrics import bootstrap_ci, rate_with_ci
from .perplexity import perplexity
from .suite import EvalConfig, evaluate, parse_suites

__all__ = ["HFGenerator", "greedy_generate", "make_generator", "ClassifierJudge", "KeywordJudge",
           "refusal_margin", "bootstrap_ci", "rate_with_ci", "perplexity", "EvalConfig", "evaluate",
           "parse_suites"]
