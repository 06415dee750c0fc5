"""Time the calibration engine on a large random-initialised Llama (GPU benchmark).

A model with LLaMA-2-7B's layer shape (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) but only
``--layers`` decoder layers, stored in bfloat16 like a loaded checkpoint. Each scope is timed
per block / per step, which is what extrapolates to the full 32-layer model:

- block-wise (OmniQuant / Q-realign scope): LWC + LET, MSE reconstruction, ``--nsamples`` x ``--seqlen``
  calibration tokens, ``--epochs`` epochs per block at batch ``--batch-size``; per-block seconds with
  the capture of block inputs excluded, and peak GPU memory;
- end-to-end (AAQ scope): reference top-K cache of two models (instruct, base), then ``--e2e-steps``
  steps of rotation + smoothing + LWC training against ContrastiveKLTop at W4A4; seconds per step
  (first step excluded) and peak GPU memory.

Random weights make losses meaningless; only time and memory are read off. Writes JSON to --out.
Usage (GPU machine): python benchmarks/engine_gpu.py --out engine_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def build(args, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(4096, args.seqlen), tie_word_embeddings=False)
    with torch.device("cuda" if args.init_on_gpu and torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    return model.to("cpu", torch.bfloat16).eval()


def calib(args, n: int, seqlen: int):
    from safeptq.data.calib import CalibSet

    x = torch.randint(0, args.vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return CalibSet(x, torch.ones_like(x), torch.zeros(n, dtype=torch.long), torch.full((n,), seqlen - 1),
                    ["random"] * n)


def gpu_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def blockwise(args, scheme_name: str, group_size: int | None) -> dict:
    from safeptq.objectives import MSE
    from safeptq.quant.args import resolve_scheme
    from safeptq.quant.engine import BlockwiseConfig, calibrate_blockwise

    model = build(args, 0)
    scheme = resolve_scheme(scheme_name, group_size=group_size)
    cfg = BlockwiseConfig(scheme=scheme, epochs=args.epochs, batch_size=args.batch_size, device=args.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    res = calibrate_blockwise(model, calib(args, args.nsamples, args.seqlen), MSE(), cfg, progress=False)
    total = time.time() - t0
    per_block = [b["seconds"] for b in res.blocks]
    steps = args.epochs * -(-args.nsamples // args.batch_size)
    out = {"scheme": scheme.name, "group_size": group_size, "epochs": args.epochs, "steps_per_block": steps,
           "block_seconds": per_block, "total_seconds": round(total, 1),
           "capture_and_rest_seconds": round(total - sum(per_block), 1),
           "seconds_per_step": round(max(per_block) / steps, 3), "peak_gpu_mb": gpu_peak_mb(),
           "peak_rss_mb": round(res.peak_rss_mb, 1)}
    print(json.dumps(out), flush=True)
    return out


def end_to_end(args) -> dict:
    from safeptq.objectives import ContrastiveKLTop, ReferenceCache
    from safeptq.quant.e2e import E2EConfig, calibrate_end_to_end

    cal = calib(args, args.e2e_nsamples, args.e2e_seqlen)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = {"instruct": build(args, 0), "base": build(args, 1)}
    t0 = time.time()
    refs = ReferenceCache.build({k: m.to(dev) for k, m in models.items()}, cal, args.topk, progress=False,
                                model_ids={"instruct": "random-0", "base": "random-1"})
    ref_s = time.time() - t0
    model = models["instruct"].to("cpu")
    del models["base"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps = []
    cfg = E2EConfig(scheme="w4a4", steps=args.e2e_steps, batch_size=args.e2e_batch_size, device=dev)
    t1 = time.time()
    res = calibrate_end_to_end(model, cal, ContrastiveKLTop(k=args.topk), refs, cfg, progress=False,
                               on_step=lambda r: stamps.append(time.time()))
    total = time.time() - t1
    steady = [b - a for a, b in zip(stamps, stamps[1:])]
    out = {"scheme": "w4a4", "objective": "contrastive top-K KL", "k": args.topk, "nsamples": args.e2e_nsamples,
           "seqlen": args.e2e_seqlen, "batch_size": args.e2e_batch_size, "steps": args.e2e_steps,
           "references_seconds": round(ref_s, 1), "reference_cache_mb": round(refs.nbytes / 2**20, 1),
           "train_total_seconds": round(total, 1),
           "seconds_per_step": round(sum(steady) / len(steady), 3) if steady else None,
           "first_step_seconds": round(stamps[0] - t1, 1) if stamps else None,
           "peak_gpu_mb": gpu_peak_mb(), "fold_rel_err": res.fold_rel_err}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--schemes", default="w4a16:128,w4a4", help="SCHEME[:GROUP],...")
    p.add_argument("--e2e-nsamples", type=int, default=16)
    p.add_argument("--e2e-seqlen", type=int, default=2048)
    p.add_argument("--e2e-batch-size", type=int, default=4)
    p.add_argument("--e2e-steps", type=int, default=6)
    p.add_argument("--topk", type=int, default=1000)
    p.add_argument("--tf32", action="store_true", help="allow TF32 matrix products (off: plain float32)")
    p.add_argument("--init-on-gpu", action="store_true", help="random-initialise on the GPU (faster)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: blockwise,e2e")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    doc = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
           "torch": torch.__version__, "tf32": args.tf32,
           "shape": {k: getattr(args, k) for k in ("layers", "hidden", "inter", "heads", "kv_heads", "vocab")},
           "blockwise": [], "end_to_end": None}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if "blockwise" not in skip:
        doc["calibration"] = {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size}
        for spec in args.schemes.split(","):
            name, _, g = spec.partition(":")
            doc["blockwise"].append(blockwise(args, name, int(g) if g else None))
            with open(args.out, "w") as f:  # partial results survive a timeout
                json.dump(doc, f, indent=1)
    if "e2e" not in skip:
        doc["end_to_end"] = end_to_end(args)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
