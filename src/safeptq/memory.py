"""Peak memory of the whole process and of one phase of a run (e.g. AAQ's reference build vs its
training), for the run records.

The process peak (``ru_maxrss``) only grows, so it cannot tell a later, smaller phase from an
earlier one. On Linux :func:`phase_peak` resets the kernel's high-water mark (``VmHWM``, by writing
``5`` to ``/proc/self/clear_refs``) when the phase starts and reads it when it ends: exact, no
sampling. Elsewhere (or where that file is not writable) a background thread samples the current
RSS every 20 ms instead, which can miss a spike shorter than that. Either way the highest value
seen before a reset is remembered, so :func:`process_peak_mb` still reports the whole run's peak.
CUDA peaks are reset and read per phase the same way (``torch.cuda.reset_peak_memory_stats``).
"""

from __future__ import annotations

import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PhaseMemory", "phase_peak", "process_peak_mb", "current_rss_mb", "release_host_memory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_S = 0.02
_seen = {"rss_mb": 0.0, "accel_mb": 0.0}  # highest values observed before a reset


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_mb() -> float | None:
    """Resident set size of this process now, in MiB (``None`` where /proc is unavailable)."""
    return _status_mb("VmRSS")


_LIBC: list = []


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks in its arenas: without this a
    block-wise run's RSS grows by the allocator's leftovers, ~400 MiB over a 360M model). No-op where
    ``malloc_trim`` does not exist."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            _LIBC.append(getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None))
        except OSError:
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def _accel_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def process_peak_mb() -> tuple[float, float | None]:
    """(peak RSS of this process, peak CUDA memory allocated) in MiB over the whole run, resets
    made by :func:`phase_peak` included."""
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _seen["rss_mb"])  # kB on Linux
    acc = _accel_peak_mb()
    return rss, None if acc is None else max(acc, _seen["accel_mb"])


def _reset_high_water() -> bool:
    """Remember the current peak, then reset ``VmHWM``; ``False`` where that is not possible."""
    hwm = _status_mb("VmHWM")
    if hwm is None:
        return False
    _seen["rss_mb"] = max(_seen["rss_mb"], hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True, name="safeptq-rss-sampler")
        self.peak = current_rss_mb() or 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(_SAMPLE_S):
            self.peak = max(self.peak, current_rss_mb() or 0.0)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss_mb() or 0.0)


@dataclass
class PhaseMemory:
    """Peak memory of one phase: filled in when the :func:`phase_peak` block exits."""

    peak_rss_mb: float | None = None
    peak_accel_mb: float | None = None
    method: str = ""

    def as_dict(self) -> dict:
        def r(x):
            return None if x is None else round(x, 1)

        return {"peak_rss_mb": r(self.peak_rss_mb), "peak_accel_mb": r(self.peak_accel_mb), "rss_method": self.method}


@contextmanager
def phase_peak() -> Iterator[PhaseMemory]:
    """Measure the peak RSS (and CUDA memory) reached inside the ``with`` block."""
    mem = PhaseMemory()
    exact = _reset_high_water()
    sampler = None
    if not exact:
        sampler = _Sampler()
        sampler.start()
    if torch.cuda.is_available():
        _seen["accel_mb"] = max(_seen["accel_mb"], _accel_peak_mb() or 0.0)
        torch.cuda.reset_peak_memory_stats()
    try:
        yield mem
    finally:
        if exact:
            mem.peak_rss_mb, mem.method = _status_mb("VmHWM"), "VmHWM reset at phase start"
        else:
            mem.peak_rss_mb, mem.method = sampler.stop(), f"RSS sampled every {int(_SAMPLE_S * 1000)} ms"
        mem.peak_accel_mb = _accel_peak_mb()
        _seen["rss_mb"] = max(_seen["rss_mb"], mem.peak_rss_mb or 0.0)
        if mem.peak_accel_mb is not None:
            _seen["accel_mb"] = max(_seen["accel_mb"], mem.peak_accel_mb)
