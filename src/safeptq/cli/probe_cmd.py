"""``safeptq probe``: fit per-layer probes on one model and measure, layer by layer, how well they
separate malicious from benign prompts on that model and on others (Q-realign's analysis)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .base import Command
from .summary import print_table

__all__ = ["ProbeCommand", "parse_named_models"]


def parse_named_models(items: list[str] | None) -> list[tuple[str, str]]:
    """``["aligned=runs/a", "runs/b"]`` → ``[("aligned", "runs/a"), ("b", "runs/b")]``."""
    from ..errors import ConfigError

    out: list[tuple[str, str]] = []
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name or item, item
        if not name or not path:
            raise ConfigError(f"--compare expects NAME=MODEL or MODEL, got {item!r}")
        if any(name == n for n, _ in out):
            raise ConfigError(f"--compare names must be unique; {name!r} appears twice")
        out.append((name, path))
    return out


class ProbeCommand(Command):
    name = "probe"
    help = "fit per-layer malicious/benign probes and plot the separability of several models"
    description = ("Fit one L1 logistic probe per decoder layer (label 1 = malicious) on the last-prompt-token "
                   "residual stream of --probe-model (default: --model), from calibration splits never used for "
                   "evaluation; cache them; then apply the same probes to --model and every --compare model on "
                   "held-out prompts and report per-layer probe accuracy, Fisher ratio and mean probe margins. "
                   "Writes probes/, separability.json, layers.png (curves for all models) and projection.png "
                   "(2-D projection of the states, benign vs malicious, one panel per model).")
    epilog = """examples:
  safeptq probe --model runs/organism/attacked --probe-model runs/organism/aligned \\
      --compare original=default --compare aligned=runs/organism/aligned --out runs/probe
  safeptq probe --model default --out runs/probe-default   # probes of the model itself"""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("models")
        g.add_argument("--model", required=True, metavar="MODEL", help="model to analyse (folder, .gguf, hub id, 'default')")
        g.add_argument("--name", default=None, help="label of --model in tables and plots (default: folder name)")
        g.add_argument("--probe-model", default=None, metavar="MODEL",
                       help="model whose states the probes are fitted on (default: --model); typically the aligned model")
        g.add_argument("--probes", default=None, metavar="DIR", help="use probes saved earlier instead of fitting")
        g.add_argument("--compare", action="append", metavar="NAME=MODEL",
                       help="another model analysed with the same probes (repeatable)")
        g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
        g = p.add_argument_group("prompts")
        g.add_argument("--fit-harmful", default="advbench:calib", help="malicious prompts to fit on (advbench:calib)")
        g.add_argument("--fit-benign", default="alpaca:calib", help="benign prompts to fit on (alpaca:calib)")
        g.add_argument("--fit-limit", type=int, default=None, help="first N prompts of each fitting set")
        g.add_argument("--harmful", default="advbench:eval", help="malicious prompts to measure on (advbench:eval)")
        g.add_argument("--benign", default="alpaca:eval", help="benign prompts to measure on (alpaca:eval)")
        g.add_argument("--limit", type=int, default=100, help="first N prompts of each measuring set (100)")
        g.add_argument("--seqlen", type=int, default=128, help="prompt tokens kept (the last SEQLEN)")
        g.add_argument("--no-chat", action="store_true", help="raw prompts instead of chat turns")
        g.add_argument("--data-dir", default=None, help="dataset folder (else $SAFEPTQ_DATA, ../shared/data)")
        g = p.add_argument_group("probes and plots")
        g.add_argument("--C", type=float, default=1.0, help="inverse L1 strength of the probes (1.0)")
        g.add_argument("--layer", type=int, default=None,
                       help="layer of the 2-D projection (default: the probe model's most separable late layer)")
        g.add_argument("--out", required=True, help="output folder")
        g.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        from ..api import probe
        from ..probes.analysis import SEPARABILITY_FILE

        doc = probe(args.model, out=args.out, probe_model=args.probe_model, probes=args.probes,
                    compare=dict(parse_named_models(args.compare)), name=args.name, fit_harmful=args.fit_harmful,
                    fit_benign=args.fit_benign, fit_limit=args.fit_limit, harmful=args.harmful, benign=args.benign,
                    limit=args.limit, seqlen=args.seqlen, chat=not args.no_chat, C=args.C, layer=args.layer,
                    device=args.device, data_dir=args.data_dir, progress=not args.no_progress)
        self._table(doc["separability"])
        print(f"probes, {SEPARABILITY_FILE}, layers.png and projection.png written to {args.out}")
        return 0

    @staticmethod
    def _table(seps: dict) -> None:
        from ..probes import summarize

        rows = []
        for name, sep in seps.items():
            n = len(sep["accuracy"])
            s = summarize(sep, from_layer=n // 3)
            rows.append([name, f"{s['accuracy']:.3f}", f"{s['margin_malicious']:+.2f}", f"{s['margin_benign']:+.2f}",
                         f"{s['fisher']:.2f}", f"{s['malicious_on_malicious_side']:.3f}"])
        print_table(rows, ["model", "accuracy", "margin mal.", "margin ben.", "fisher", "mal. on mal. side"])
        print("(means over the last two thirds of the layers)")
