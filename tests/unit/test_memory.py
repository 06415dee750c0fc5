"""Per-phase peak memory: a later, smaller phase reports its own peak, the process peak keeps the run's."""

import torch

from safeptq.memory import current_rss_mb, phase_peak, process_peak_mb


def test_phase_peaks_are_separate_and_the_process_peak_survives():
    base = current_rss_mb()
    with phase_peak() as big:
        x = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        del x
    with phase_peak() as small:
        y = torch.ones(2**20)
        del y
    assert big.peak_rss_mb > small.peak_rss_mb + 150
    if base is not None:
        assert big.peak_rss_mb > base + 200
    assert big.method and big.as_dict()["peak_rss_mb"] == round(big.peak_rss_mb, 1)
    assert process_peak_mb()[0] >= big.peak_rss_mb
