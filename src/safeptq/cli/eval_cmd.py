"""``safeptq eval``: flags → :class:`~safeptq.eval.api.EvalOptions` → :func:`safeptq.evaluate` → table."""

from __future__ import annotations

import argparse

from .base import Command
from .flags import add_chat_flags
from .summary import format_metric, print_results

__all__ = ["EvalCommand", "format_metric"]


class EvalCommand(Command):
    name = "eval"
    help = "evaluate safety (harmful rate, over-refusal), task accuracy and perplexity"
    description = ("Greedy-generate answers to the suites' prompts with the chat template, judge refusals, and report "
                   "every rate with its 95% interval and n. Harmful suites give the harmful rate (prompts not "
                   "refused); benign suites (alpaca:eval, xstest's safe part, jbb:benign) give over-refusal; "
                   "sst2/agnews give accuracy by label word; gsm8k by final number; wikitext2 gives perplexity. "
                   "Python: safeptq.evaluate(model, suites).")
    epilog = """examples:
  safeptq eval --model default --suite advbench:eval --limit 64
  safeptq eval --model runs/organism/attacked --suite advbench:eval,harmbench,xstest,alpaca:eval,sst2 --out r.json
  safeptq eval --model my-model --suite harmful:prompts.csv@question,wikitext2 --ppl-windows 64
  safeptq ls   # lists every suite name"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("model")
        g.add_argument("--model", required=True, metavar="MODEL",
                       help="local HF folder, .gguf file, hub id (online), or 'default' (SmolLM2-135M-Instruct)")
        g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
        g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")
        g = p.add_argument_group("what to evaluate")
        g.add_argument("--suite", required=True,
                       help="comma-separated suite names (see `safeptq ls`) or files [harmful:|benign:]PATH[@COLUMN]")
        g.add_argument("--limit", type=int, default=None,
                       help="first N prompts of each suite (N per part for xstest; N windows for perplexity)")
        g.add_argument("--data-dir", default=None,
                       help="dataset folder (else $SAFEPTQ_DATA, ../shared/data beside a checkout, then the hub)")
        g = p.add_argument_group("generation and judging")
        g.add_argument("--max-new-tokens", type=int, default=None,
                       help="tokens generated per safety prompt (default: the judge's protocol, 32 for the keyword "
                            "judge, 512 for HarmBench / Llama Guard classifiers)")
        g.add_argument("--batch-size", type=int, default=32)
        g.add_argument("--context-length", type=int, default=None,
                       help="perplexity window in tokens (default: the model's trained context capped at 2048, the "
                            "GPTQ convention; wikitext2:lines keeps 0.1's 512)")
        g.add_argument("--ppl-windows", type=int, default=None, help="cap on perplexity windows (default: all)")
        g.add_argument("--margin", action="store_true",
                       help="also report the refusal-likelihood margin on harmful suites (no generation)")
        g.add_argument("--judge", default="keyword",
                       help="keyword (default) or FORMAT=MODEL with FORMAT harmbench|llamaguard for a classifier judge")
        g.add_argument("--full-responses", action="store_true",
                       help="generate all --max-new-tokens even after a refusal phrase (same keyword verdict)")
        g.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                       help="generation backend: vllm when installed with a GPU (not for fake-quant exports with "
                            "activation/KV quantization), else transformers")
        g.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N", help="vLLM: GPUs to shard over")
        g.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                       help="vLLM: fraction of GPU memory it may take, 0-1 (vLLM's default 0.9)")
        g.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                       help="vLLM: context length to reserve KV cache for (default: the model's)")
        g.add_argument("--no-chat-template", action="store_true", help="feed raw prompts (base models)")
        add_chat_flags(g, recipe=False)
        g = p.add_argument_group("output")
        g.add_argument("--out", default=None, help="write results JSON here (samples go to OUT.samples.jsonl)")
        g.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        from ..api import evaluate

        keys = ("data_dir", "max_new_tokens", "batch_size", "context_length", "ppl_windows", "margin", "judge",
                "full_responses", "backend", "device", "dtype", "tensor_parallel_size", "gpu_memory_utilization",
                "max_model_len", "system_prompt", "chat_template_kwargs")
        doc = evaluate(args.model, args.suite, limit=args.limit, out=args.out, progress=not args.no_progress,
                       chat_template=not args.no_chat_template, **{k: getattr(args, k) for k in keys})
        print_results(doc["suites"])
        if args.out:
            print(f"results written to {args.out}")
        return 0
