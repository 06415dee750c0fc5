"""``safeptq probe``: fit per-layer probes on one model and measure, layer by layer, how well they
separate malicious from benign prompts on that model and on others (Q-realign's analysis)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .base import Command, add_data_options, print_table, write_json_atomic

__all__ = ["ProbeCommand", "parse_named_models", "SEPARABILITY_FILE"]

log = logging.getLogger(__name__)

SEPARABILITY_FILE = "separability.json"


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
        add_data_options(g)
        g = p.add_argument_group("probes and plots")
        g.add_argument("--C", type=float, default=1.0, help="inverse L1 strength of the probes (1.0)")
        g.add_argument("--layer", type=int, default=None,
                       help="layer of the 2-D projection (default: the probe model's most separable late layer)")
        g.add_argument("--out", required=True, help="output folder")
        g.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        import torch

        from ..errors import ConfigError
        from ..models import load_model
        from ..probes import LayerProbes
        from ..probes.plots import plot_layer_curves, plot_projection
        from ..probes.workflow import ProbeSpec, get_probes, labelled_prompts, separability_of

        t0 = time.time()
        for flag, v in (("--limit", args.limit), ("--seqlen", args.seqlen)):
            if v is not None and v < 1:
                raise ConfigError(f"{flag} must be positive, got {v}")
        if args.probes and args.probe_model:
            raise ConfigError("give either --probes or --probe-model, not both")
        compare = parse_named_models(args.compare)
        main_name = args.name or Path(str(args.model).rstrip("/")).name or "model"
        models = [(main_name, args.model)] + compare
        if len({n for n, _ in models}) != len(models):
            raise ConfigError(f"model names must be unique: {[n for n, _ in models]}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        chat = not args.no_chat
        progress = not args.no_progress
        texts, labels = labelled_prompts(args.harmful, args.benign, limit=args.limit, data_dir=args.data_dir)

        if args.probes:
            probes, probe_src = LayerProbes.load(args.probes), str(args.probes)
        else:
            src = args.probe_model or args.model
            lm = load_model(src, dtype="float32", device=args.device)
            spec = ProbeSpec(args.fit_harmful, args.fit_benign, args.fit_limit, args.seqlen, chat, args.C)
            probes, cached = get_probes(lm.model, lm.tokenizer, lm.path, spec, data_dir=args.data_dir,
                                        progress=progress)
            probe_src = src
            del lm
        probes.save(out / "probes")

        seps, proj = {}, {}
        layer = args.layer
        if layer is None:
            acc = probes.meta.get("heldout_accuracy") or []
            late = range(probes.n_layers // 3, probes.n_layers)
            layer = max(late, key=lambda i: acc[i] if i < len(acc) else 0.0)
        if not 0 <= layer < probes.n_layers:
            raise ConfigError(f"--layer must be in [0, {probes.n_layers - 1}], got {layer}")
        for name, spec_ in models:
            log.info("separability of %s (%s)", name, spec_)
            lm = load_model(spec_, dtype="float32", device=args.device)
            sep, states = separability_of(lm.model, lm.tokenizer, probes, texts, labels, chat=chat,
                                          seqlen=args.seqlen, progress=progress, return_states=True)
            seps[name] = sep
            proj[name] = states[layer]
            del lm
        plot_layer_curves(seps, out / "layers.png", title=f"probes of {probe_src}")
        plot_projection(proj, labels, layer, out / "projection.png")
        torch.save({"labels": labels, "layer": layer, "states": proj}, out / "projection_states.pt")
        doc = {"probe_model": probe_src, "probes": probes.meta, "prompts": {
            "harmful": args.harmful, "benign": args.benign, "limit": args.limit, "n": len(texts)},
            "projection_layer": layer, "models": dict(models), "separability": seps,
            "wall_time_s": round(time.time() - t0, 1)}
        write_json_atomic(out / SEPARABILITY_FILE, doc)
        self._table(seps)
        print(f"probes, {SEPARABILITY_FILE}, layers.png and projection.png written to {out}")
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
