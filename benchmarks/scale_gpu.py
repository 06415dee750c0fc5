"""Real model sizes on one GPU (issue 22): random-initialised 7B/8B-shaped Llamas, timed end to end.

Parts (``--parts``, in this order; each writes its JSON record as soon as it ends, so a part that
runs out of time leaves the others' figures):

- ``realign7b``: a 32-layer model with LLaMA-2-7B's layer shape (hidden 4096, MLP 11008, 32 heads)
  and the default model's tokenizer (vocabulary 49,152), saved in bfloat16, then
  ``safeptq realign --scheme w8a8`` with the default schedule, exactly as a user runs it: probes
  fitted on the model, calibration (200 prompts x 128 tokens, 3 epochs per block), compressed-tensors
  export, reload check, separability before and after. Wall time, peak host RSS and peak GPU memory
  are read from ``realign.json``.
- ``aaq8b``: a 32-layer model with Llama-3-8B's shape (hidden 4096, MLP 14336, 32 heads, 8 KV heads,
  vocabulary 128,256) in bfloat16: top-K reference cache of two such models (instruct, base), then
  ``--aaq-steps`` steps of AAQ's end-to-end engine at W4A4 (residual rotation, smoothing, LWC,
  contrastive top-K KL) with bf16 autocast and per-layer activation checkpointing; seconds per step
  (first step excluded) and peak GPU memory.

Random weights make every loss meaningless; only time and memory are read off.
Usage (GPU machine): python benchmarks/scale_gpu.py --out-dir OUT --data-dir DATA --tokenizer TOKDIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def _gpu() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"


def _write(out_dir: Path, name: str, doc: dict) -> None:
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps({name: doc})[:4000], flush=True)


def _llama(cfg_kw: dict, seed: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5, **cfg_kw)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def realign7b(args) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model_dir = Path(args.work) / "random-7b"
    t0 = time.time()
    k = args.shrink
    shape = dict(hidden_size=4096 // k, intermediate_size=11008 // k, num_hidden_layers=args.layers,
                 num_attention_heads=32 // k, num_key_value_heads=32 // k, vocab_size=len(tok),
                 bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = _llama(shape, 0, dev).to("cpu")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    build_s = time.time() - t0
    out = Path(args.work) / "realign-7b-w8a8"
    env = {**os.environ, "SAFEPTQ_HOME": str(Path(args.work) / "home"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "safeptq", "realign", "--model", str(model_dir), "--probe-model", str(model_dir),
           "--scheme", "w8a8", "--out", str(out), "--data-dir", args.data_dir, *args.realign_args.split()]
    t1 = time.time()
    with open(Path(args.out_dir) / "realign7b.log", "w") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t1
    doc = {"device": _gpu(), "torch": torch.__version__, "parameters": n_params, "shape": shape,
           "build_and_save_s": round(build_s, 1), "command": " ".join(cmd[1:]), "rc": rc,
           "command_wall_s": round(wall, 1)}
    rec = out / "realign.json"
    if rc == 0 and rec.is_file():
        r = json.loads(rec.read_text())
        blocks = r["calibration"]["blocks"]
        doc.update({k: r.get(k) for k in ("wall_time_s", "quantize_time_s", "peak_rss_mb", "peak_accel_mb",
                                          "recipe", "verify", "export")})
        doc["block_seconds"] = [b["seconds"] for b in blocks]
        doc["separability"] = {k: v.get("mean_late_layers") for k, v in (r.get("separability") or {}).items()
                               if isinstance(v, dict) and "mean_late_layers" in v}
        doc["export_size_gb"] = round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e9, 2)
    return doc


def aaq8b(args) -> dict:
    from safeptq.data.calib import CalibSet
    from safeptq.objectives import ContrastiveKLTop, ReferenceCache
    from safeptq.quant.e2e import E2EConfig, calibrate_end_to_end

    k = args.shrink
    shape = dict(hidden_size=4096 // k, intermediate_size=14336 // k, num_hidden_layers=args.layers,
                 num_attention_heads=32 // k, num_key_value_heads=max(1, 8 // k), vocab_size=128256 // k)
    n, t = args.aaq_nsamples, args.aaq_seqlen
    x = torch.randint(0, shape["vocab_size"], (n, t), generator=torch.Generator().manual_seed(0))
    cal = CalibSet(x, torch.ones_like(x), torch.zeros(n, dtype=torch.long), torch.full((n,), t - 1), ["random"] * n)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    models = {"instruct": _llama(shape, 0, dev), "base": _llama(shape, 1, dev)}
    refs = ReferenceCache.build(models, cal, args.topk, batch_size=args.aaq_batch_size, progress=False,
                                model_ids={"instruct": "random-0", "base": "random-1"})
    ref_s = time.time() - t0
    model = models.pop("instruct")
    del models
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []
    cfg = E2EConfig(scheme="w4a4", steps=args.aaq_steps, batch_size=args.aaq_batch_size, device=dev,
                    online_hadamard=False, precision=args.aaq_precision, checkpointing=not args.no_checkpointing)
    t1 = time.time()
    res = calibrate_end_to_end(model, cal, ContrastiveKLTop(k=args.topk), refs, cfg, progress=False,
                               on_step=lambda r: stamps.append(time.time()))
    total = time.time() - t1
    steady = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"device": _gpu(), "torch": torch.__version__, "shape": shape,
            "parameters": sum(p.numel() for p in model.parameters()), "scheme": "w4a4",
            "precision": cfg.precision, "checkpointing": cfg.checkpointing, "nsamples": n, "seqlen": t,
            "batch_size": cfg.batch_size, "steps": cfg.steps, "k": args.topk,
            "references_s": round(ref_s, 1), "reference_cache_mb": round(refs.nbytes / 2**20, 1),
            "train_fold_finish_s": round(total, 1),
            "seconds_per_step": round(sum(steady) / len(steady), 3) if steady else None,
            "first_step_s": round(stamps[0] - t1, 1) if stamps else None,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "fold_rel_err": res.fold_rel_err, "loss_start": res.loss_start, "loss_end": res.loss_end}


PARTS = {"aaq8b": aaq8b, "realign7b": realign7b}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--work", default="/tmp/safeptq-scale", help="models and exports (large; not returned)")
    p.add_argument("--data-dir", required=True, help="holds advbench/ and alpaca/ as ../shared/data does")
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder with a chat template (the default model's)")
    p.add_argument("--parts", default="aaq8b,realign7b")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--realign-args", default="", help="extra `safeptq realign` flags, e.g. '--epochs 1'")
    p.add_argument("--aaq-nsamples", type=int, default=16)
    p.add_argument("--aaq-seqlen", type=int, default=2048)
    p.add_argument("--aaq-batch-size", type=int, default=4)
    p.add_argument("--aaq-steps", type=int, default=6)
    p.add_argument("--aaq-precision", default="bf16")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--topk", type=int, default=1000)
    p.add_argument("--shrink", type=int, default=1,
                   help="divide widths and heads by this (CPU smoke test of the script)")
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for name in [s.strip() for s in args.parts.split(",") if s.strip()]:
        t = time.time()
        try:
            doc = PARTS[name](args)
        except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others' figures
            doc = {"error": f"{type(e).__name__}: {e}"}
        doc["part_wall_s"] = round(time.time() - t, 1)
        _write(out_dir, name, doc)


if __name__ == "__main__":
    main()
