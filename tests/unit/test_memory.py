"""Per-phase peak memory: a later, smaller phase reports its own peak, the process peak keeps the run's.

Run in a fresh interpreter: in a long test process, freed heap memory stays resident, so a new 256 MiB
tensor may not raise the RSS at all and the figures depend on which tests ran before."""

import json
import subprocess
import sys

SCRIPT = r"""
import json, torch
from safeptq.memory import current_rss_mb, phase_peak, process_peak_mb
base = current_rss_mb()
with phase_peak() as big:
    x = torch.ones(64 * 2**20)  # 256 MiB, touched
    del x
with phase_peak() as small:
    y = torch.ones(2**20)
    del y
print(json.dumps({"base": base, "big": big.peak_rss_mb, "small": small.peak_rss_mb, "method": big.method,
                  "as_dict": big.as_dict()["peak_rss_mb"], "process": process_peak_mb()[0]}))
"""


def test_phase_peaks_are_separate_and_the_process_peak_survives():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["big"] > r["small"] + 150
    if r["base"] is not None:
        assert r["big"] > r["base"] + 200
    assert r["method"] and r["as_dict"] == round(r["big"], 1)
    assert r["process"] >= r["big"]
