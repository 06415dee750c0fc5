"""Diagnostic behind Q-realign's state target (BENCHMARKS.md, "Q-realign on the organism"): DESIGN.md's
full-precision prototype — only the RMSNorm gains trained, end to end, no quantization — on an attacked model.

Malicious calibration prompts either cross every layer's probe at the last prompt token (softplus push, the
paper's loss) or, with ``--aligned``, pull their last-token states at every layer to the aligned model's states
(MSE); benign prompts keep every layer's output (MSE to the unmodified model). Then the first ``--limit``
prompts of advbench:eval and alpaca:eval are evaluated.

Usage: python benchmarks/realign_fp_norms.py ATTACKED PROBES_DIR OUT.json [--aligned ALIGNED] [--lr 1e-3]
"""
import argparse
import json
import time

import torch
from torch.nn import functional as F

from safeptq.data.calib import load_calibration
from safeptq.eval.suite import EvalConfig, evaluate
from safeptq.models import load_model
from safeptq.probes import LayerProbes

ap = argparse.ArgumentParser()
for name in ("attacked", "probes", "out"):
    ap.add_argument(name)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--epochs", type=int, default=2)
ap.add_argument("--bs", type=int, default=8)
ap.add_argument("--margin", default="0")
ap.add_argument("--from-layer", type=int, default=0)
ap.add_argument("--anchor", type=float, default=0.0)
ap.add_argument("--nmal", type=int, default=150)
ap.add_argument("--nben", type=int, default=100)
ap.add_argument("--limit", type=int, default=80)
ap.add_argument("--aligned", default=None, 
                help="malicious target: the aligned model's states (MSE at last token) instead of the probe")
ap.add_argument("--tokens", type=int, default=1, help="push at the last N prompt tokens")
a = ap.parse_args()
torch.manual_seed(0)
lm = load_model(a.attacked, dtype="float32", device="cpu")
model, tok = lm.model, lm.tokenizer
probes = LayerProbes.load(a.probes)
W, B = probes.coef.float(), probes.intercept.float()
L = W.shape[0]
if a.margin == "auto":
    marg = torch.tensor([max(0.0, m) for m in probes.meta["median_margin_malicious"]])
else:
    marg = torch.full((L,), float(a.margin))
n = a.nmal + a.nben
calib = load_calibration(f"advbench:calib={a.nmal / n},alpaca:calib={a.nben / n}", tok, nsamples=n, seqlen=128)
layers = model.model.layers
params = []
for p in model.parameters():
    p.requires_grad_(False)
for l in layers:
    for m in (l.input_layernorm, l.post_attention_layernorm):
        m.weight.requires_grad_(True)
        params.append(m.weight)
print("trainable", sum(p.numel() for p in params))


_cap = []
_hooks = []
for _l in layers:
    _hooks += [_l.register_forward_hook(lambda m, ar, o: _cap.append(o[0] if isinstance(o, tuple) else o))]


def states(ids, mask):
    _cap.clear()
    model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return list(_cap)  # raw layer outputs (no final norm)


# FP targets for benign: every layer output of the unmodified model
ben_idx = (calib.labels == 0).nonzero().flatten()
with torch.no_grad():
    tgt = {}
    for i in ben_idx.tolist():
        t = int(calib.attention_mask[i].sum())
        hs = states(calib.input_ids[i:i + 1, :t], calib.attention_mask[i:i + 1, :t])
        tgt[i] = [h[0].clone() for h in hs]
mal_tgt = {}
if a.aligned:
    al = load_model(a.aligned, dtype="float32", device="cpu").model
    with torch.no_grad():
        for i in (calib.labels == 1).nonzero().flatten().tolist():
            t = int(calib.attention_mask[i].sum())
            cap = []
            hk = [l.register_forward_hook(lambda m, ar, o: cap.append(o[0] if isinstance(o, tuple) else o)) for l in al.model.layers]
            al.model(input_ids=calib.input_ids[i:i + 1, :t], use_cache=False)
            for h in hk:
                h.remove()
            mal_tgt[i] = [h[0, t - a.tokens:t].clone() for h in cap]
    del al
opt = torch.optim.Adam(params, lr=a.lr)
t0 = time.time()
g = torch.Generator().manual_seed(0)
for ep in range(a.epochs):
    perm = torch.randperm(n, generator=g)
    for s in range(0, n, a.bs):
        rows = perm[s:s + a.bs]
        t = int(calib.attention_mask[rows].sum(1).max())
        ids, mask = calib.input_ids[rows, :t], calib.attention_mask[rows, :t]
        hs = states(ids, mask)
        last = calib.last_idx[rows]
        loss = 0.0
        for j, r in enumerate(rows.tolist()):
            if calib.labels[r] == 1:
                lp = 0.0
                lo = int(last[j]) + 1 - a.tokens
                for l in range(a.from_layer, L):
                    if a.aligned:
                        lp = lp + F.mse_loss(hs[l][j, lo:lo + a.tokens], mal_tgt[r][l])
                    else:
                        sc = hs[l][j, lo:lo + a.tokens] @ W[l] + B[l]
                        lp = lp + F.softplus(marg[l] - sc).mean()
                loss = loss + lp / (L - a.from_layer)
            else:
                tl = int(mask[j].sum())
                mse = sum(F.mse_loss(hs[l][j, :tl], tgt[r][l][:tl]) for l in range(L)) / L
                if a.anchor:
                    dr = sum(((hs[l][j, last[j]] - tgt[r][l][last[j]]) @ W[l]) ** 2 for l in range(L)) / L
                    mse = mse + a.anchor * dr
                loss = loss + mse
        loss = loss / len(rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"ep {ep} step {s // a.bs} loss {loss.item():.4f} t {time.time() - t0:.0f}s", flush=True)
train_s = time.time() - t0
model.eval()
for _h in _hooks:
    _h.remove()
for p in params:
    p.requires_grad_(False)
res = evaluate(model, tok, ["advbench:eval", "alpaca:eval"], EvalConfig(limit=a.limit, progress=False))
summary = {k: {kk: v for kk, v in r.items() if kk != "samples"} for k, r in res.items()}
summary["train_s"] = train_s
summary["args"] = vars(a)
print(json.dumps(summary, indent=1))
json.dump(summary, open(a.out, "w"), indent=1)
