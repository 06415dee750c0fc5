"""What a report knows about one run: read from a run folder or an eval JSON, checked before any figure is drawn."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

__all__ = ["RunEntry", "load_entry", "suite_kind", "parse_run_spec", "METRIC"]

_RUN_RECORDS = ("realign.json", "aaq.json", "quantize.json")
_DTYPE_BITS = {"F64": 64, "F32": 32, "BF16": 16, "F16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I8": 8, "U8": 8}


@dataclass
class RunEntry:
    """One column of the report. ``results``: suite → metrics (rates with ``ci95`` and ``n``); ``samples``:
    suite → prompt → (refused, response); ``samples_ref``: the path :func:`~safeptq.api.compare` pairs on."""

    name: str
    path: Path
    kind: str  # quantize | realign | aaq | eval
    method: str
    scheme: str
    model: str
    results: dict
    samples: dict = field(default_factory=dict)
    samples_ref: Path | None = None
    recipe_text: str | None = None
    bits_per_weight: float | None = None
    size_mb: float | None = None
    quantize_time_s: float | None = None
    peak_rss_mb: float | None = None
    separability: dict | None = None
    losses: dict | None = None
    eval_config: dict | None = None


def parse_run_spec(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` or ``PATH``."""
    name, sep, path = str(spec).partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, Path(path)
    return None, Path(spec)


METRIC = {"harmful": "harmful_rate", "benign": "refusal_rate", "task": "accuracy", "ppl": "perplexity"}
"""The headline metric of each kind of suite."""


def suite_kind(name: str, res: dict) -> str:
    """harmful | benign | task | ppl, from what the suite's results carry."""
    if "harmful_rate" in res:
        return "harmful"
    if "refusal_rate" in res:
        return "benign"
    if "accuracy" in res:  # before perplexity: LAMBADA reports both, its headline is the accuracy
        return "task"
    return "ppl" if "perplexity" in res else "other"


def load_entry(spec: str | Path, name: str | None = None) -> RunEntry:
    """Read one run (a quantize / realign / aaq folder, or an ``eval --out`` JSON); one-line error otherwise."""
    given, path = parse_run_spec(str(spec))
    name = name or given
    if not path.exists():
        raise ConfigError(f"report: {path}: no such run folder or eval file")
    if path.is_dir():
        rec = next((path / f for f in _RUN_RECORDS if (path / f).is_file()), None)
        if rec is None:
            raise ConfigError(f"report: {path}: not a finished run folder (no {', '.join(_RUN_RECORDS)})")
        doc = _read_json(rec)
        entry = _from_run(doc, path, rec.stem, name or path.name)
    else:
        doc = _read_json(path)
        if "suites" not in doc:
            raise ConfigError(f"report: {path}: not a run record or an eval file (no 'suites')")
        entry = _from_eval(doc, path, name or path.name.removesuffix(".json"))
    if not entry.results:
        raise ConfigError(f"report: {path}: has no evaluation results (run it with --eval, or `safeptq eval`)")
    _attach_samples(entry)
    return entry


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"report: {path}: unreadable ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"report: {path}: not a JSON object")
    return doc


def _from_run(doc: dict, folder: Path, kind: str, name: str) -> RunEntry:
    recipe = doc.get("recipe") or {}
    scheme = (doc.get("scheme") or {}).get("name") or recipe.get("scheme") or "?"
    gs = recipe.get("group_size") or ((doc.get("scheme") or {}).get("weights") or {}).get("group_size")
    method = recipe.get("method") or kind
    if kind == "quantize" and method == "quantize":
        method = (doc.get("config") or {}).get("method", "?")
    recipe_file = folder / "recipe.yaml"
    export = doc.get("export") or {}
    return RunEntry(
        name=name, path=folder, kind=kind, method=str(method),
        scheme=f"{scheme}-g{gs}" if gs and f"g{gs}" not in str(scheme) else str(scheme),
        model=str(doc.get("model", "?")), results=_results(doc.get("eval")),
        recipe_text=recipe_file.read_text() if recipe_file.is_file() else None,
        bits_per_weight=export.get("bits_per_weight"), size_mb=_size_mb(folder),
        quantize_time_s=doc.get("quantize_time_s"), peak_rss_mb=doc.get("peak_rss_mb"),
        separability=_separability(doc.get("separability")), losses=_losses(doc),
        eval_config=doc.get("eval_config"))


def _from_eval(doc: dict, path: Path, name: str) -> RunEntry:
    model_path = Path(str(doc.get("model_path") or ""))
    local = model_path.is_dir()
    side = local and (model_path / "safeptq_quant.json").is_file()
    rec = next((model_path / f for f in _RUN_RECORDS if local and (model_path / f).is_file()), None)
    bits = None
    if rec is not None:
        bits = (_read_json(rec).get("export") or {}).get("bits_per_weight")
    elif local:
        bits = _checkpoint_bits(model_path)
    return RunEntry(
        name=name, path=path, kind="eval", method="quantized" if side or rec else "fp",
        scheme="(export)" if side or rec else "fp", model=str(doc.get("model", "?")), results=_results(doc.get("suites")),
        bits_per_weight=bits, size_mb=_size_mb(model_path) if local else None, eval_config=doc.get("config"))


def _results(ev) -> dict:
    if not isinstance(ev, dict):
        return {}
    return {k: v for k, v in ev.items() if isinstance(v, dict) and suite_kind(k, v) != "other"}


def _size_mb(folder: Path) -> float | None:
    files = list(folder.glob("*.safetensors"))
    return round(sum(f.stat().st_size for f in files) / 2**20, 1) if files else None


def _checkpoint_bits(folder: Path) -> float | None:
    """Bits per weight of an unquantized checkpoint: the storage type of its 2-D tensors (safetensors header)."""
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for k, v in header.items():
            if k != "__metadata__" and len(v.get("shape", ())) == 2:
                return _DTYPE_BITS.get(v.get("dtype"))
    return None


def _separability(sep) -> dict | None:
    if not isinstance(sep, dict) or "before" not in sep:
        return None
    out = {}
    for when in ("before", "after"):
        acc = ((sep.get(when) or {}).get("per_layer") or {}).get("accuracy")
        if acc:
            out[when] = [float(a) for a in acc]
    return out or None


def _losses(doc: dict) -> dict | None:
    cal = doc.get("calibration") or {}
    blocks = cal.get("blocks")
    if blocks:
        rows = [b for b in blocks if "loss_first" in b and "loss_last" in b]
        if rows:
            return {"kind": "per_block", "block": [b["block"] for b in rows],
                    "first": [b["loss_first"] for b in rows], "last": [b["loss_last"] for b in rows]}
    steps = (doc.get("loss") or {}).get("per_step")
    if steps:
        return {"kind": "per_step", "step": [s["step"] for s in steps], "loss": [s["loss"] for s in steps]}
    return None


def _attach_samples(entry: RunEntry) -> None:
    from ..eval.samples import samples_path

    try:
        path = samples_path(entry.path)
    except ConfigError:
        return
    out: dict[str, dict] = {}
    i = 0
    try:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                r = json.loads(line)
                out.setdefault(r["suite"], {})[r["prompt"]] = (bool(r["refused"]), str(r.get("response", "")))
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as e:
        raise ConfigError(f"report: {path}:{i}: unreadable samples ({type(e).__name__})") from None
    entry.samples, entry.samples_ref = out, entry.path
