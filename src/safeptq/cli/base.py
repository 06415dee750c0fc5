"""Sub-command base class and shared option groups. Heavy imports live inside ``run`` so that
``safeptq --help`` answers at once."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

__all__ = ["Command", "add_model_options", "add_data_options", "write_json_atomic", "print_table"]


class Command:
    name: str = ""
    help: str = ""
    description: str = ""
    epilog: str = ""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def add_model_options(p: argparse.ArgumentParser, required: bool = True, flag: str = "--model") -> None:
    g = p.add_argument_group("model")
    g.add_argument(flag, required=required, metavar="MODEL",
                   help="local HF folder, .gguf file, hub id (online), or 'default' (SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (else $SAFEPTQ_DATA, ../shared/data beside a checkout, then the hub)")


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write JSON via a temp file + rename so a killed run never leaves a truncated result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
