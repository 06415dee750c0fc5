"""Per-layer probes on the residual stream and separability analysis (Q-realign)."""

from safeptq.probes.probes import (
    LayerProbes,
    collect_last_token_states,
    fit_probes,
    last_token_states,
    probe_dataset,
)
from safeptq.probes.separability import separability, summarize

__all__ = ["LayerProbes", "collect_last_token_states", "fit_probes", "last_token_states", "probe_dataset",
           "separability", "summarize"]
