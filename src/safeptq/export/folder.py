"""Export folders: written into a temporary sibling and renamed into place only when complete,
so a failed export never leaves a folder that looks finished."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safeptq.errors import ExportError

__all__ = ["SIDE_FILE", "check_target", "atomic_folder"]

SIDE_FILE = "safeptq_quant.json"
"""safeptq's metadata next to the checkpoint (scheme, format, method, version)."""


def check_target(out: Path) -> None:
    """Refuse to replace anything but an earlier safeptq export (one holding :data:`SIDE_FILE`)."""
    if out.is_file():
        raise ExportError(f"export target {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / SIDE_FILE).exists():
        raise ExportError(
            f"refusing to replace {out}: it exists and is not a safeptq export (no {SIDE_FILE}); "
            "choose another output folder"
        )


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; rename it to ``out`` if the block completes.

    An existing ``out`` is moved aside first and deleted only after the rename succeeded; on
    any error the temp folder is removed and ``out`` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        aside = None
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, aside / out.name)
        try:
            os.replace(tmp, out)
        except OSError:
            if aside is not None:
                os.replace(aside / out.name, out)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
