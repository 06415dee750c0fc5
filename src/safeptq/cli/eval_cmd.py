"""``safeptq eval``: safety, over-refusal, task and perplexity evaluation of one model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .base import Command, add_data_options, add_model_options, print_table, write_json_atomic

__all__ = ["EvalCommand", "format_metric"]


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


class EvalCommand(Command):
    name = "eval"
    help = "evaluate safety (harmful rate, over-refusal), task accuracy and perplexity"
    description = ("Greedy-generate answers to the suites' prompts with the chat template, judge refusals, "
                   "and report every rate with its 95% bootstrap interval and n. Harmful suites give the "
                   "harmful rate (prompts not refused); benign suites (alpaca:eval, xstest's safe part, "
                   "jbb:benign) give over-refusal; sst2/agnews give accuracy by label word; gsm8k by final "
                   "number; wikitext2 gives perplexity.")
    epilog = """examples:
  safeptq eval --model default --suite advbench:eval --limit 64
  safeptq eval --model runs/organism/attacked --suite advbench:eval,harmbench,xstest,alpaca:eval,sst2 --out r.json
  safeptq eval --model my-model --suite harmful:prompts.csv@question,wikitext2 --ppl-windows 64
  safeptq ls   # lists every suite name"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_options(p)
        g = p.add_argument_group("what to evaluate")
        g.add_argument("--suite", required=True,
                       help="comma-separated suite names (see `safeptq ls`) or files [harmful:|benign:]PATH[@COLUMN]")
        g.add_argument("--limit", type=int, default=None,
                       help="first N prompts of each suite (N per part for xstest; N windows for perplexity)")
        add_data_options(g)
        g = p.add_argument_group("generation and judging")
        g.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per safety prompt (32)")
        g.add_argument("--batch-size", type=int, default=32)
        g.add_argument("--context-length", type=int, default=512, help="perplexity window in tokens (512)")
        g.add_argument("--ppl-windows", type=int, default=None, help="cap on perplexity windows (default: all)")
        g.add_argument("--margin", action="store_true",
                       help="also report the refusal-likelihood margin on harmful suites (no generation)")
        g.add_argument("--judge", default="keyword",
                       help="keyword (default) or FORMAT=MODEL with FORMAT harmbench|llamaguard for a classifier judge")
        g.add_argument("--full-responses", action="store_true",
                       help="generate all --max-new-tokens even after a refusal phrase (the keyword verdict is "
                            "the same; by default a refusing answer stops at its first refusal phrase)")
        g.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                       help="generation backend: vllm when installed with a GPU (not for fake-quant exports "
                            "with activation/KV quantization), else transformers")
        g.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                       help="vLLM: GPUs to shard over (1)")
        g.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                       help="vLLM: fraction of GPU memory it may take, 0-1 (vLLM's default 0.9)")
        g.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                       help="vLLM: context length to reserve KV cache for (default: the model's)")
        g.add_argument("--no-chat-template", action="store_true", help="feed raw prompts (base models)")
        g = p.add_argument_group("output")
        g.add_argument("--out", default=None, help="write results JSON here (samples go to OUT.samples.jsonl)")
        g.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        from ..errors import ConfigError
        from ..eval import EvalConfig, evaluate, make_generator, parse_suites
        from ..eval.samples import pop_samples, write_samples
        from ..models import load_model, require_chat_template

        suites = parse_suites(args.suite)
        if args.limit is not None and args.limit <= 0:
            raise ConfigError(f"--limit must be positive, got {args.limit}")
        for flag in ("tensor_parallel_size", "max_model_len"):
            if getattr(args, flag) is not None and getattr(args, flag) <= 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
        if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
        if args.backend == "vllm":  # refuse before the model is loaded, not after
            from ..eval.generation import check_vllm_folder
            from ..models import resolve_model
            check_vllm_folder(resolve_model(args.model)[0])
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
        if not args.no_chat_template:
            require_chat_template(lm.tokenizer, args.model)
        cfg = EvalConfig(limit=args.limit, data_dir=args.data_dir, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, context_length=args.context_length,
                         ppl_windows=args.ppl_windows, use_chat_template=not args.no_chat_template,
                         margin=args.margin, progress=not args.no_progress,
                         early_stop=not args.full_responses)
        judge_info = "keyword (GCG refusal list, case-insensitive)"
        if args.judge != "keyword":
            cfg.judge = _classifier_judge(args.judge)
            judge_info = args.judge
        gen = make_generator(lm.model, lm.tokenizer, args.backend, model_path=lm.path,
                             batch_size=args.batch_size, progress=not args.no_progress,
                             restore_model=_needs_hf_model(suites, args.margin),
                             tensor_parallel_size=args.tensor_parallel_size,
                             gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len)
        t0 = time.time()
        results = evaluate(lm.model, lm.tokenizer, suites, cfg, generator=gen)
        samples = pop_samples(results)
        rows = [[name, *format_metric(res)] for name, res in results.items()]
        print_table(rows, ["suite", "metric", "value", "95% CI", "n"])
        doc = {"model": args.model, "model_path": lm.path, "suites": results,
               "config": {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "judge": judge_info,
                          "greedy": True, "chat_template": not args.no_chat_template,
                          "context_length": args.context_length},
               "wall_time_s": round(time.time() - t0, 1)}
        if args.out:
            out = write_json_atomic(args.out, doc)
            if samples:
                write_samples(Path(str(out)).with_suffix(".samples.jsonl"), samples)
            print(f"results written to {out}")
        return 0


def _needs_hf_model(suites: list[str], margin: bool) -> bool:
    """Whether the transformers model scores anything itself (perplexity, refusal margins, label
    choice): if not, it can stay off the GPU while vLLM generates."""
    from ..data.registry import REGISTRY
    from ..eval.tasks import TASKS

    if margin:
        return True
    for name in suites:
        spec = REGISTRY.get(name)  # None: a user file of harmful/benign prompts, generation only
        task = TASKS.get(name.split(":")[0]) if spec is not None and spec.kind == "task" else None
        if (spec is not None and spec.kind == "text") or (task is not None and task.labels is not None):
            return True
    return False


def _classifier_judge(spec: str):
    from ..errors import ConfigError
    from ..eval.judges import ClassifierJudge

    if "=" not in spec:
        raise ConfigError(f"--judge {spec!r}: use keyword or FORMAT=MODEL (FORMAT harmbench|llamaguard)")
    fmt, path = spec.split("=", 1)
    if fmt not in ClassifierJudge.FORMATS:
        raise ConfigError(f"--judge {spec!r}: unknown format {fmt!r}; choose harmbench or llamaguard")
    return ClassifierJudge.from_pretrained(path, fmt)
