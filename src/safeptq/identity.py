"""A model's identity by content: the SHA-256 of its weight and config files' bytes (or, for a
model held only in memory, of its tensors). Resume checkpoints, reference caches and probe caches
are keyed by it, so a model retrained in place is never mistaken for the old one.

Hashing a 7B checkpoint reads ~14 GB once; the digest is then remembered per file under
``$SAFEPTQ_HOME/identity.json`` keyed by (path, size, mtime, inode), as git's index does, so later
runs pay only a ``stat``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

__all__ = ["file_digest", "model_identity", "tensors_identity"]

log = logging.getLogger(__name__)

_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json")
_SKIP = {"safeptq_quant.json", ".safeptq-run.json"}  # safeptq's own metadata is not the model
_CHUNK = 8 << 20


def _memo_path() -> Path:
    from .paths import safeptq_home

    return safeptq_home() / "identity.json"


def _load_memo() -> dict:
    try:
        data = json.loads(_memo_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_digest(path: Path, memo: dict | None = None) -> str:
    """SHA-256 of a file's bytes, remembered in ``memo`` by (path, size, mtime, inode)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if memo is not None and key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo[key] = digest
    return digest


def model_identity(path: str | Path) -> str:
    """``sha256:<16 hex>`` over the names and content digests of a model folder's (or file's)
    weight and config files; a hub id that is not a local path is returned as is."""
    p = Path(path).expanduser()
    if not p.exists():
        return str(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir()
                                           if f.is_file() and f.suffix in _SUFFIXES and f.name not in _SKIP)
    memo = _load_memo()
    before = len(memo)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_digest(f, memo)}\n".encode())
    if len(memo) != before:
        _save_memo(memo)
    return "sha256:" + h.hexdigest()[:16]


def _save_memo(memo: dict) -> None:
    from .runs import write_json_atomic

    try:
        write_json_atomic(_memo_path(), dict(list(memo.items())[-2000:]))
    except OSError as e:  # a read-only home only costs a re-hash next time
        log.debug("cannot remember file digests: %s", e)


@torch.no_grad()
def tensors_identity(model: torch.nn.Module) -> str:
    """``sha256:<16 hex>`` over a model's parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]

