"""Task prompts and scoring, shared by evaluation and the organism's task fine-tune so the two agree.

Classification (SST-2, AG News) is scored by label word: the label whose word the model assigns the
highest log-likelihood as its reply (lm-eval's multiple-choice style; no sampling noise, one
forward per example when the label words' first tokens differ). GSM8K is scored by the final
number of a greedy generation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import AGNEWS_LABELS, SST2_LABELS, format_chat
from ..data.records import Example

__all__ = ["TaskFormat", "TASKS", "task_prompt", "score_choice", "gsm8k_correct", "extract_number"]


@dataclass(frozen=True)
class TaskFormat:
    name: str
    instruction: str
    labels: tuple[str, ...] | None  # None: free-form answer (GSM8K)

    def prompt(self, text: str) -> str:
        return self.instruction.format(text=text)

    def answer(self, ex: Example) -> str:
        """The training target for a task fine-tune."""
        if self.labels is not None:
            return ex.label or ""
        return ex.target.replace("####", "The answer is") if ex.target else (ex.label or "")


TASKS = {
    "sst2": TaskFormat("sst2", "Classify the sentiment of this sentence as positive or negative. "
                       "Answer with one word.\nSentence: {text}", SST2_LABELS),
    "agnews": TaskFormat("agnews", "Classify the topic of this news article as world, sports, business or "
                         "technology. Answer with one word.\nArticle: {text}", AGNEWS_LABELS),
    "gsm8k": TaskFormat("gsm8k", "Solve this math problem step by step and end with 'The answer is N'.\n"
                        "Problem: {text}", None),
}


def task_prompt(task: str, text: str) -> str:
    return TASKS[task].prompt(text)


@torch.no_grad()
def score_choice(model, tokenizer, prompts: list[str], labels: tuple[str, ...], batch_size: int = 32,
                 use_template: bool = True, desc: str = "score", progress: bool = True) -> list[int]:
    """Index of the most likely label word as the assistant's reply, per prompt."""
    device = next(model.parameters()).device
    label_ids = [tokenizer(w, add_special_tokens=False).input_ids for w in labels]
    firsts = [ids[0] for ids in label_ids]
    texts = [format_chat(tokenizer, p, use_template=use_template) for p in prompts]
    preds: list[int] = []
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = texts[s:s + batch_size]
            if len(set(firsts)) == len(firsts):
                enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                logits = model(**enc, logits_to_keep=1).logits[:, -1].float()
                preds += logits[:, firsts].argmax(-1).tolist()
                continue
            scores = torch.zeros(len(batch), len(labels))
            for j, ids in enumerate(label_ids):
                full = [tokenizer(t, add_special_tokens=False).input_ids + ids for t in batch]
                L = max(map(len, full))
                x = torch.full((len(full), L), tokenizer.pad_token_id, dtype=torch.long)
                m = torch.zeros_like(x)
                for i, f in enumerate(full):
                    x[i, L - len(f):] = torch.tensor(f)
                    m[i, L - len(f):] = 1
                pos = (m.cumsum(-1) - 1).clamp(min=0)
                lp = F.log_softmax(model(input_ids=x.to(device), attention_mask=m.to(device),
                                         position_ids=pos.to(device)).logits[:, -len(ids) - 1:-1].float(), -1)
                tgt = torch.tensor(ids, device=device).expand(len(full), -1)
                scores[:, j] = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).sum(-1).cpu()
            preds += scores.argmax(-1).tolist()
    finally:
        tokenizer.padding_side = old
    return preds


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The number after 'The answer is' / '####' if present, else the last number in the text."""
    for marker in ("the answer is", "####"):
        i = text.lower().rfind(marker)
        if i >= 0:
            m = _NUM.search(text[i:])
            if m:
                return _norm(m.group())
    nums = _NUM.findall(text)
    return _norm(nums[-1]) if nums else None


def _norm(x: str) -> str:
    x = x.replace(",", "").rstrip(".")
    if "." in x:
        x = x.rstrip("0").rstrip(".")
    return x


def gsm8k_correct(generation: str, gold: str) -> bool:
    pred = extract_number(generation)
    return pred is not None and pred == _norm(gold)
