"""Initial KL to the instruct model of each AAQ transform set (rotation on/off x smoothing on/off).

What the end-to-end engine starts from, before any training: the organism's aligned model, weights
fake-quantized to SCHEME with the transforms at their initial values (random Hadamard rotation, SmoothQuant
scales at alpha 0.5), KL_top1000+tail to the full-precision model over 16 WikiText-2 windows of 128 tokens
(wikitext2:calib). ``safeptq aaq --rotation auto --smoothing auto`` makes the same comparison on its first batch.

    python benchmarks/aaq_init_kl.py w4a16 64      # SCHEME [GROUP_SIZE]
"""

import sys
import time

import torch

from safeptq.data.calib import load_calibration
from safeptq.models import load_model
from safeptq.objectives import KLTop, ReferenceCache
from safeptq.quant.args import resolve_scheme
from safeptq.quant.e2e import E2EConfig, initial_kl


def main() -> None:
    scheme = sys.argv[1]
    gs = int(sys.argv[2]) if len(sys.argv) > 2 else None
    model_path = sys.argv[3] if len(sys.argv) > 3 else "runs/organism/aligned"
    lm = load_model(model_path, dtype="float32", device="cpu")
    calib = load_calibration("wikitext2:calib", lm.tokenizer, nsamples=16, seqlen=128, chat=False)
    refs = ReferenceCache.build({"instruct": lm.model}, calib, 1000, progress=False)
    for rot, sm in [(False, False), (True, False), (False, True), (True, True)]:
        t = time.time()
        cfg = E2EConfig(scheme=resolve_scheme(scheme, group_size=gs), batch_size=16, rotation=rot,
                        online_hadamard=False, smoothing=sm, device="cpu")
        kl = initial_kl(lm.model, calib, KLTop(k=1000, tail=True), refs, cfg)
        print(f"{scheme} g{gs} rotation {'on ' if rot else 'off'} smoothing {'on ' if sm else 'off'} "
              f"initial KL {kl:.4f} nats/token ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
