"""Where safeptq keeps its cache (``SAFEPTQ_HOME``) and where it looks for datasets."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["safeptq_home", "source_checkout_data_dir"]


def safeptq_home() -> Path:
    """Cache home: ``$SAFEPTQ_HOME`` or ``~/.cache/safeptq``."""
    env = os.environ.get("SAFEPTQ_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safeptq"


def source_checkout_data_dir() -> Path | None:
    """``../shared/data`` beside a source checkout (``<repo>/src/safeptq`` → ``<repo>/../shared/data``)."""
    here = Path(__file__).resolve()
    if len(here.parents) < 4:
        return None
    repo = here.parents[2]
    if not (repo / "pyproject.toml").exists():
        return None
    return repo.parent / "shared" / "data"
