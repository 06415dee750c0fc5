"""Output and work folders: safeptq deletes or replaces only what it can prove it wrote, holds a
lock while it runs, and makes a finished run appear in one rename.

- Every folder safeptq creates carries a marker (:data:`MARKER`: run id, kind, the files it wrote).
  An existing ``--out`` is replaced only when its marker lists every file in it; anything else (a
  user's folder, notes added to an earlier export) is refused with one line naming the folder and
  ``--overwrite``. A work folder is reused (``--resume``) or removed only when it carries a work
  marker; its removal deletes only the engine's own files.
- A run is staged in a hidden sibling (``.NAME.tmp-*``): export, reload check, evaluation, model
  card, recipe and run record all go there first, and only then does one rename replace ``--out``.
  A failure or Ctrl-C at any point leaves the previous complete run untouched.
- A lock file (``.NAME.lock`` beside the folder: pid, host, start time) makes runs on one folder
  exclusive; a lock whose process is gone is stale and taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError, ExportError

__all__ = ["MARKER", "WORK_MARKER", "new_run_id", "write_json_atomic", "save_torch_atomic", "json_safe", "check_out_target", "FolderLock",
           "StagedRun", "WorkFolder"]

log = logging.getLogger(__name__)

MARKER = ".safeptq-run.json"
"""In every output folder safeptq writes: run id, time and the list of files written."""
WORK_MARKER = ".safeptq-work.json"
"""In every work folder safeptq creates (checkpoints for ``--resume``)."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def json_safe(obj):
    """``obj`` with every NaN / infinity replaced by ``None``: strict JSON that every reader accepts
    (a bare ``NaN`` is not JSON), and a run never fails at its last write over one such number."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write JSON via a temp file + rename so a killed run never leaves a truncated result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(obj), f, indent=2, allow_nan=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_torch_atomic(obj, path: str | Path) -> Path:
    """``torch.save`` via a temp file + rename: a checkpoint is either the old one or the new one."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def _read_marker(folder: Path, name: str = MARKER) -> dict | None:
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def check_out_target(out: Path, overwrite: bool = False, flag: str = "--overwrite") -> None:
    """Refuse an output folder safeptq may not replace (one line naming it): a file, or a folder
    holding anything its marker does not list. An empty or missing folder is fine."""
    out = Path(out)
    if out.is_symlink() or out.is_file():
        raise ConfigError(f"output {out} is {'a symlink' if out.is_symlink() else 'a file'}; give a folder path")
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        if out.exists() and not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"output folder {out} is not writable")
        _check_parent_writable(out)
        return
    marker = _read_marker(out)
    if marker is None:
        raise ConfigError(f"refusing to replace {out}: it exists and was not written by safeptq (no {MARKER}); "
                          f"choose another folder or pass {flag}")
    foreign = sorted(_listing(out) - set(marker.get("files", [])) - {MARKER})
    if foreign:
        raise ConfigError(f"refusing to replace {out}: it holds files safeptq did not write "
                          f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); move them or pass {flag}")
    _check_parent_writable(out)


def _check_parent_writable(out: Path) -> None:
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {out}: {parent} is not writable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock on a folder path (which need not exist): the file ``.NAME.lock`` beside it,
    created atomically, holding the owner's pid, host and start time. Re-entrant in one process."""

    _held: dict[str, int] = {}

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder).expanduser().absolute()
        self.folder = folder
        self.path = folder.parent / f".{folder.name}.lock"

    def acquire(self) -> FolderLock:
        key = str(self.path)
        if FolderLock._held.get(key):
            FolderLock._held[key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read_marker(self.path.parent, self.path.name) or {}
                pid, host = other.get("pid"), other.get("host")
                if isinstance(pid, int) and host == info["host"] and not _pid_alive(pid):
                    log.warning("removing a stale lock %s (process %d is gone)", self.path, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                raise ConfigError(f"{self.folder} is in use by another safeptq run (pid {pid} on {host}, started "
                                  f"{other.get('started')}); wait for it, or delete {self.path} if that run is gone")
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            FolderLock._held[key] = 1
            return self
        raise ConfigError(f"cannot lock {self.folder} ({self.path})")

    def release(self) -> None:
        key = str(self.path)
        n = FolderLock._held.get(key, 0)
        if n > 1:
            FolderLock._held[key] = n - 1
            return
        FolderLock._held.pop(key, None)
        if n == 1:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class StagedRun:
    """A run's output staged in a hidden sibling of ``out`` and committed by one rename."""

    def __init__(self, out: str | Path, run_id: str, overwrite: bool = False) -> None:
        self.out = Path(out).expanduser()
        self.run_id, self.overwrite = run_id, overwrite
        check_out_target(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))

    def commit(self, extra: dict | None = None) -> Path:
        """Write the marker and replace ``out`` with the staged folder (re-checking ``out`` first:
        a user may have added files while the run was going)."""
        check_out_target(self.out, self.overwrite)
        files = sorted(_listing(self.dir))
        write_json_atomic(self.dir / MARKER, {"run_id": self.run_id, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                                              "files": files, **(extra or {})})
        os.chmod(self.dir, 0o755)
        aside = None
        if self.out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, aside / self.out.name)
        try:
            os.replace(self.dir, self.out)
        except OSError as e:
            if aside is not None:
                os.replace(aside / self.out.name, self.out)
            raise ExportError(f"cannot move the finished run into {self.out}: {e}") from e
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class WorkFolder:
    """Checkpoints of a resumable run. Created with a marker; an existing folder is used only when it
    carries one (or is empty); :meth:`remove` deletes only the engine's files, then the folder if empty."""

    def __init__(self, path: str | Path, out: Path | None, engine_files: Iterable[str] = (),
                 engine_dirs: Iterable[str] = (), engine_trees: Iterable[str] = ()) -> None:
        self.path = Path(path).expanduser()
        self.files, self.dirs, self.trees = tuple(engine_files), tuple(engine_dirs), tuple(engine_trees)
        if out is not None and self.path.absolute() == Path(out).expanduser().absolute():
            raise ConfigError("--work-dir must differ from --out")
        if self.path.is_symlink() or self.path.is_file():
            raise ConfigError(f"work folder {self.path} is a file; choose another --work-dir")
        if self.path.is_dir() and any(self.path.iterdir()) and _read_marker(self.path, WORK_MARKER) is None:
            raise ConfigError(f"refusing to use {self.path} as work folder: it was not created by safeptq "
                              f"(no {WORK_MARKER}); choose another --work-dir")

    @property
    def exists(self) -> bool:
        return (self.path / WORK_MARKER).is_file()

    def create(self, run_id: str, fingerprint: dict | None = None) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.exists:
            write_json_atomic(self.path / WORK_MARKER, {"run_id": run_id, **(fingerprint or {})})
        return self.path

    def discard_if_unused(self) -> None:
        """After a failure: remove the folder when it holds nothing to resume from (only its marker)."""
        if self.exists and {p.name for p in self.path.iterdir()} <= {WORK_MARKER, *self.dirs} and not any(
                any((self.path / d).iterdir()) for d in self.dirs if (self.path / d).is_dir()):
            self.remove()

    def remove(self) -> None:
        """Delete only what the engine wrote (checkpoints, state, spilled streams), then the empty folders."""
        if not self.exists:
            return
        for name in self.trees:  # whole sub-folders the engine wrote in this marked folder (a saved model)
            if not (self.path / name).is_symlink():
                shutil.rmtree(self.path / name, ignore_errors=True)
        for name in self.dirs:
            sub = self.path / name
            if sub.is_dir() and not sub.is_symlink():
                for pattern in ("*.pt", "*.pt.tmp", "*.f32"):
                    for f in sub.glob(pattern):
                        f.unlink(missing_ok=True)
        for name in self.files:
            (self.path / name).unlink(missing_ok=True)
        (self.path / WORK_MARKER).unlink(missing_ok=True)
        for d in [self.path / name for name in self.dirs] + [self.path]:
            try:
                d.rmdir()
            except OSError:
                pass
