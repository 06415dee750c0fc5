"""One page from many runs: ``safeptq report`` reads quantize / realign / aaq run folders and ``safeptq eval --out``
files and writes a self-contained HTML report (inline SVG figures and CSS, no network) and its Markdown tables."""

from .build import build_report
from .collect import RunEntry, load_entry

__all__ = ["build_report", "RunEntry", "load_entry"]
