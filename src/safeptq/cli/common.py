"""Option groups the quantizing commands (quantize, realign, aaq) share, and their one run path:
flags → recipe → :func:`safeptq.methods.pipeline.run` → printed summary."""

from __future__ import annotations

import argparse

from .flags import add_chat_flags, default_text, option_flag, recipe_flag, recipe_overrides, run_options

__all__ = ["add_model_group", "add_calib_group", "add_eval_group", "add_output_group", "add_resume_flags",
           "run_quantizing"]


def add_model_group(p: argparse.ArgumentParser, title: str, device_help: str) -> argparse._ArgumentGroup:
    from ..quant.args import SCHEMES

    g = p.add_argument_group(title)
    recipe_flag(g, "--model", field="model", required=True, metavar="MODEL",
                help="local HF folder, .gguf file, hub id (online), or 'default' (SmolLM2-135M-Instruct)")
    recipe_flag(g, "--scheme", field="scheme", required=True,
                help=" | ".join(SCHEMES.names()) + " (see `safeptq ls schemes`)")
    recipe_flag(g, "--group-size", field="group_size", type=int,
                help="weight group size of grouped schemes (w4a16 default 64); must divide every layer")
    option_flag(g, "--device", field="device", help=device_help)
    recipe_flag(g, "--dtype", field="dtype", choices=("auto", "float32", "bfloat16", "float16"),
                help="dtype the model is loaded and kept in (auto = bfloat16 when calibrating on CUDA, float32 on a "
                     "CPU); learnable parameters are float32")
    recipe_flag(g, "--precision", field="precision", choices=("auto", "fp32", "tf32", "bf16"),
                help="matrix products of the training steps: fp32, tf32 (CUDA) or bf16 autocast (auto = bf16 on "
                     "CUDA, fp32 on a CPU); learnable parameters stay float32")
    add_chat_flags(g)
    option_flag(g, "--max-memory", field="max_memory", metavar="SIZE",
                help="override the memory check made before loading: host=SIZE,device=SIZE (e.g. host=64GiB,"
                     "device=70GiB), SIZE for the host only, or none; default: what the machine has")
    return g


def add_calib_group(p: argparse.ArgumentParser, cls, title: str = "calibration data") -> argparse._ArgumentGroup:
    g = p.add_argument_group(title)
    recipe_flag(g, "--calib", field="calib.data",
                help=f"prompt set(s) with shares (default {default_text(cls, 'calib.data')}), e.g. alpaca:calib, "
                     "advbench:calib=0.75,alpaca:calib=0.25, wikitext2:calib, or a file [harmful:|benign:]PATH[@COLUMN]")
    recipe_flag(g, "--nsamples", field="calib.nsamples", type=int,
                help=f"calibration samples ({default_text(cls, 'calib.nsamples')})")
    recipe_flag(g, "--seqlen", field="calib.seqlen", type=int,
                help="tokens per sample (128): prompts keep their last SEQLEN tokens, text is cut in windows")
    recipe_flag(g, "--no-chat", field="calib.chat", action="store_const", const=False,
                help="tokenize prompts as raw text instead of chat turns (base models without a template)")
    recipe_flag(g, "--calib-replies", field="calib.replies", type=int, metavar="TOKENS",
                help="append the full-precision model's own greedy reply (up to TOKENS tokens) to every prompt, so "
                     f"the answer tokens are calibrated too (default {default_text(cls, 'calib.replies')})")
    recipe_flag(g, "--data-dir", field="data_dir",
                help="dataset folder (else $SAFEPTQ_DATA, ../shared/data beside a checkout, then the hub)")
    return g


def add_resume_flags(g) -> None:
    recipe_flag(g, "--seed", field="seed", type=int, help="seed (0)")
    option_flag(g, "--resume", field="resume", action="store_const", const=True,
                help="continue from the checkpoint in the work folder (same recipe, model and data only)")
    option_flag(g, "--work-dir", field="work_dir",
                help="checkpoint folder (default OUT.work); created with a marker, removed after a successful run")


def add_eval_group(p: argparse.ArgumentParser, run_file: str) -> None:
    g = p.add_argument_group("evaluation (optional)")
    recipe_flag(g, "--eval", field="eval.suites", metavar="SUITES",
                help="evaluate the quantized model on these suites after export, e.g. wikitext2 or "
                     f"advbench:eval,wikitext2 (results go into {run_file})")
    recipe_flag(g, "--eval-limit", field="eval.limit", type=int,
                help="first N prompts of each suite / N perplexity windows")
    recipe_flag(g, "--ppl-windows", field="eval.ppl_windows", type=int,
                help="cap on perplexity windows only (overrides --eval-limit for text suites), e.g. 40")


def add_output_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True,
                   help="output folder: new, empty, or an earlier safeptq run holding only files safeptq wrote")
    g.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it holds other files (only after the new run is complete)")
    option_flag(g, "--no-progress", field="progress", action="store_const", const=False)


def run_quantizing(args: argparse.Namespace, cls, **fixed) -> int:
    """Build the recipe from the flags, run it into ``--out`` and print the summary."""
    from ..methods.pipeline import run
    from ..recipes import make_recipe
    from .summary import print_run

    recipe = make_recipe(cls, None, **{**recipe_overrides(args), **fixed})
    qm = run(recipe, options=run_options(args), out=args.out, overwrite=args.overwrite)
    print_run(qm.record)
    return 0
