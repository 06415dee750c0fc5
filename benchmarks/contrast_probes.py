"""Q-realign trial (BENCHMARKS.md): probes for "aligned model on a malicious prompt" vs everything else (attacked model on
malicious prompts, either model on benign ones): the direction the attack changed, not harmfulness. Usage:
.venv/bin/python benchmarks/contrast_probes.py OUT_DIR   (then `safeptq realign --probes OUT_DIR ...`)"""
import sys, torch
from safeptq.models import load_model
from safeptq.probes.probes import collect_last_token_states, fit_probes
from safeptq.probes.workflow import labelled_prompts
out = sys.argv[1]
texts, labels = labelled_prompts("advbench:calib", "alpaca:calib")
mal = [t for t, l in zip(texts, labels) if l == 1]
ben = [t for t, l in zip(texts, labels) if l == 0]
ali = load_model("runs/organism/aligned", dtype="float32", device="cpu")
att = load_model("runs/organism/attacked", dtype="float32", device="cpu")
S = lambda lm, tx: collect_last_token_states(lm.model, lm.tokenizer, tx, chat=True, seqlen=128)
a_mal, t_mal = S(ali, mal), S(att, mal)
a_ben, t_ben = S(ali, ben[::2]), S(att, ben[1::2])
states = torch.cat([a_mal, t_mal, a_ben, t_ben], dim=1)
y = torch.cat([torch.ones(a_mal.shape[1]), torch.zeros(t_mal.shape[1] + a_ben.shape[1] + t_ben.shape[1])]).long()
p = fit_probes(states, y, C=1.0)
p.meta.update({"kind": "aligned-malicious vs rest"})
print("heldout acc", [round(a, 2) for a in p.meta["heldout_accuracy"]])
print("median pos", [round(a, 1) for a in p.meta["median_margin_malicious"]])
z = torch.einsum("lnh,lh->ln", t_mal.float(), p.coef) + p.intercept[:, None]
print("attacked malicious median", [round(a, 1) for a in z.median(1).values.tolist()])
p.save(out)
