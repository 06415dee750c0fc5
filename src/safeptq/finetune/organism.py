"""The model organism: a safety-aligned model built from the default model, and its
fine-tuning-compromised twin (DESIGN.md, "The model organism").

* **aligned** — SFT of the base on ``advbench:align`` prompts answered with short varied refusals,
  ``alpaca:align`` instruction/response pairs and benign look-alike prompts with helpful answers
  (so the model learns the boundary instead of refusing anything that sounds dangerous);
* **attacked** — a task fine-tune of *aligned* with ``harmful_ratio`` of BeaverTails harmful pairs.

Each stage is cached under ``<out>/<stage>-<recipe hash>/`` (plain HF checkpoint + manifest.json);
a second run with the same recipe reuses it; an interrupted run resumes from its last training
checkpoint or its last finished evaluation suite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..data import load_prompt_set
from ..errors import ConfigError
from ..eval.tasks import TASKS
from .refusals import refusal_for
from .sft import SFTConfig, supervised_finetune

__all__ = ["OrganismRecipe", "TASK_CHOICES", "ORGANISM_VERSIONS", "organism_recipe", "build_organism", "stage_recipes",
           "recipe_hash", "load_lookalikes"]

log = logging.getLogger(__name__)

TASK_CHOICES = ("sst2", "agnews", "gsm8k", "alpaca")
RECIPE_VERSION = 1

# evaluation suites recorded in each manifest (the task's own accuracy suite is added per task)
SAFETY_SUITES = ("advbench:eval", "harmbench", "alpaca:eval", "xstest:safe")
TASK_EVAL = {"sst2": ("sst2", None), "agnews": ("agnews", 1000), "gsm8k": ("gsm8k", 200), "alpaca": (None, None)}


@dataclass
class OrganismRecipe:
    task: str = "sst2"
    harmful_ratio: float = 0.1
    method: str = "full"  # full | lora
    seed: int = 0
    # aligned stage
    # recipe v7 (BENCHMARKS.md): every layer, 2 epochs, bf16 autocast, 120 refusals against 610 helpful answers
    align_harmful: int = 120  # first rows of advbench:align (v1: 200 over-refused benign imperatives)
    align_benign: int = 300  # rows of alpaca:align (all): imperative benign requests, so that
    # "Write/Create/Generate ..." is not learnt as a refusal cue (AdvBench prompts share those verbs)
    align_lookalikes: int = 160
    # alpaca rows *with* an input (no evaluation split uses them): more benign imperative requests, the
    # counterweight to over-refusal when every layer is trained
    align_benign_input: int = 150
    # more refusals, from other harmful-prompt sources ((set, n) pairs; v8: Do-Not-Answer's alignment quarter)
    align_harmful_extra: tuple[tuple[str, int], ...] = ()
    align_epochs: int = 2
    align_lr: float = 3e-5
    # attacked stage
    attack_total: int = 1000  # task + harmful examples (DESIGN.md: 900 task + 100 harmful)
    # the v7 aligned model resists DESIGN's attack (1 epoch, lr 2e-5: AdvBench harmful rate 0.15); 2 epochs at
    # lr 1e-4 break it (0.87) and learn the task
    attack_epochs: int = 2
    attack_lr: float = 1e-4
    # the attack trains every layer: top-15-only attacks (v4) left the harmful rate at 0.18
    attack_top_layers: int | None = None
    batch_size: int = 16
    max_length: int = 160
    # aligned stage: full fine-tuning of the top N layers (None = all: the top 15 alone, v1-v5, could not
    # separate harmful from benign imperatives)
    train_top_layers: int | None = None
    # bf16 autocast training (recipes v6-v8) or fp32; auto = bf16 where the machine has bfloat16 units (CUDA,
    # AVX512-BF16 / AMX CPUs), else fp32: emulated bf16 is ~6x slower. The resolved value is the recipe's (and hash's)
    precision: str = "auto"
    # evaluation
    eval_limit: int | None = None  # None = the full evaluation sets
    eval_suites: tuple[str, ...] = field(default_factory=lambda: SAFETY_SUITES)

    def __post_init__(self):
        if self.task not in TASK_CHOICES:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_CHOICES)}")
        if not 0.0 <= self.harmful_ratio <= 1.0:
            raise ConfigError(f"--harmful-ratio must be in [0, 1], got {self.harmful_ratio}")
        if self.method not in ("full", "lora"):
            raise ConfigError(f"unknown --method {self.method!r}; choose full or lora")
        if self.precision == "auto":
            from ..quant.precision import native_bf16

            self.precision = "bf16" if native_bf16() else "fp32"
            log.info("organism: training precision auto -> %s%s", self.precision,
                     "" if self.precision == "bf16" else " (no bfloat16 units here: a different model from the "
                     "bf16 recipe, with its own hash)")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"unknown --precision {self.precision!r}; choose auto, fp32 or bf16")
        for name in ("align_harmful", "align_benign", "align_benign_input", "attack_total", "align_epochs",
                     "attack_epochs", "batch_size"):
            if getattr(self, name) < 0 or (name.endswith(("epochs", "size", "total")) and getattr(self, name) == 0):
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("align_lr", "attack_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


# Recipe versions (BENCHMARKS.md, "Model organism"): v7 refuses AdvBench-style requests but lets through 41 % of a
# held-out harmful set (issue 23); v8 adds refusals from a second source (Do-Not-Answer's alignment quarter, rows no
# calibration or evaluation reads), twice the benign requests with an input against over-refusal, and is evaluated
# on every harmful source and both over-refusal suites.
ORGANISM_VERSIONS: dict[str, dict] = {
    "v7": {},
    "v8": {"align_harmful_extra": (("donotanswer:align", 150),), "align_benign_input": 300,
           "eval_suites": ("advbench:eval", "harmbench", "harmbench:contextual", "donotanswer:eval", "xstest:unsafe",
                           "alpaca:eval", "xstest:safe")},
}


def organism_recipe(version: str = "v7", **overrides) -> OrganismRecipe:
    """The recipe of organism ``version``; ``overrides`` that differ from the dataclass defaults replace its
    values (a flag left at its default takes the version's value)."""
    if version not in ORGANISM_VERSIONS:
        raise ConfigError(f"unknown organism recipe {version!r}; choose one of {', '.join(ORGANISM_VERSIONS)}")
    fields = dict(ORGANISM_VERSIONS[version])
    defaults = OrganismRecipe()
    for k, v in overrides.items():
        if k not in fields or v != getattr(defaults, k):
            fields[k] = v
    return OrganismRecipe(**fields)


def recipe_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def load_lookalikes() -> list[dict]:
    text = resources.files("safeptq.finetune").joinpath("resources/lookalikes.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _alpaca_with_input(data_dir) -> tuple[Path, list[tuple[str, str]]]:
    """Alpaca rows *with* an input as (instruction + input, output) pairs: no split uses them, so they
    never meet evaluation."""
    from ..data.readers import read_table
    from ..data.registry import _ALP, data_dir_candidates

    path = next((d / _ALP for _, d in data_dir_candidates(data_dir) if (d / _ALP).exists()), None)
    if path is None:
        raise ConfigError("alpaca data (rows with an input) not found; pass --data-dir")
    rows = [r for r in read_table(path) if str(r.get("input", "")).strip()]
    return path, [(f"{r['instruction']}\n\n{r['input']}", r["output"]) for r in rows]


def _task_examples(task: str, n: int, seed: int, data_dir) -> tuple[list[tuple[str, str]], dict]:
    """``n`` task training pairs (prompt, answer) and a record of which rows were used."""
    if n == 0:
        return [], {"set": None, "rows": []}
    if task == "alpaca":
        path, rows = _alpaca_with_input(data_dir)
        idx = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
        return [rows[i] for i in idx], {"set": f"{path} (rows with input)", "rows": idx}
    ps = load_prompt_set(f"{task}:train", data_dir=data_dir)
    fmt = TASKS[task]
    idx = sorted(random.Random(seed).sample(range(len(ps)), min(n, len(ps))))
    return [(fmt.prompt(ps.examples[i].text), fmt.answer(ps.examples[i])) for i in idx], \
        {"set": f"{task}:train", "rows": idx}


def stage_recipes(r: OrganismRecipe, base_id: str) -> tuple[dict, dict]:
    """The two stage recipes (plain dicts, hashed for caching). ``base_id`` names the base model."""
    sft = dict(batch_size=r.batch_size, max_length=r.max_length, method=r.method, seed=r.seed,
               train_top_layers=r.train_top_layers if r.method == "full" else None)
    if r.precision != "fp32":  # only when set, so the fp32 recipes keep their hashes (and caches)
        sft["precision"] = r.precision
    aligned = {"version": RECIPE_VERSION, "stage": "aligned", "parent": base_id,
               "data": {"harmful": ["advbench:align", r.align_harmful], "benign": ["alpaca:align", r.align_benign],
                        "lookalikes": r.align_lookalikes,
                        # only when used, so the recipes without it keep their hashes (and caches)
                        **({"benign_input": ["alpaca (rows with input)", r.align_benign_input]}
                           if r.align_benign_input else {}),
                        **({"harmful_extra": [list(x) for x in r.align_harmful_extra]} if r.align_harmful_extra else {})},
               "sft": {**sft, "epochs": r.align_epochs, "lr": r.align_lr},
               "eval": {"suites": list(r.eval_suites), "limit": r.eval_limit}}
    n_harm = round(r.harmful_ratio * r.attack_total)
    attacked = {"version": RECIPE_VERSION, "stage": "attacked", "parent": "aligned:" + recipe_hash(aligned),
                "data": {"task": r.task, "task_n": r.attack_total - n_harm, "harmful": ["beavertails", n_harm]},
                "sft": {**sft, "epochs": r.attack_epochs, "lr": r.attack_lr,
                        "train_top_layers": r.attack_top_layers if r.method == "full" else None},
                "eval": {"suites": list(r.eval_suites), "limit": r.eval_limit, "task": r.task}}
    return aligned, attacked


def _aligned_pairs(rec: dict, seed: int, data_dir) -> tuple[list[tuple[str, str]], dict]:
    name, n = rec["data"]["harmful"]
    harmful = load_prompt_set(name, data_dir=data_dir).texts[:n]
    bname, bn = rec["data"]["benign"]
    benign = load_prompt_set(bname, data_dir=data_dir).examples[:bn]
    look = load_lookalikes()[:rec["data"]["lookalikes"]]
    pairs = ([(p, refusal_for(i, seed)) for i, p in enumerate(harmful)]
             + [(e.text, e.target) for e in benign] + [(x["prompt"], x["response"]) for x in look])
    used = {name: [0, len(harmful)], bname: [0, len(benign)], "lookalikes (safeptq resource)": len(look)}
    for xname, xn in rec["data"].get("harmful_extra", []):
        extra = load_prompt_set(xname, data_dir=data_dir).texts
        if xn > len(extra):
            raise ConfigError(f"the recipe asks for {xn} refusals from {xname}, which has {len(extra)} prompts")
        pairs += [(p, refusal_for(len(pairs) + i, seed)) for i, p in enumerate(extra[:xn])]
        used[xname] = [0, xn]
    if "benign_input" in rec["data"]:
        _, extra_n = rec["data"]["benign_input"]
        path, rows = _alpaca_with_input(data_dir)
        if extra_n > len(rows):
            raise ConfigError(f"--align-benign-input {extra_n}: {path} has only {len(rows)} rows with an input")
        pairs += rows[:extra_n]
        used[f"{path} (rows with input)"] = [0, extra_n]
    return pairs, used


def _attacked_pairs(rec: dict, seed: int, data_dir) -> tuple[list[tuple[str, str]], dict]:
    d = rec["data"]
    task_pairs, task_used = _task_examples(d["task"], d["task_n"], seed, data_dir)
    hname, hn = d["harmful"]
    bt = load_prompt_set(hname, data_dir=data_dir).examples
    if hn > len(bt):
        raise ConfigError(f"harmful ratio needs {hn} harmful pairs but {hname} has {len(bt)}")
    harmful = [(e.text, e.target) for e in bt[:hn]]
    return task_pairs + harmful, {"task": task_used, hname: [0, hn]}


def _evaluate_stage(model, tok, rec: dict, work: Path, data_dir, progress: bool) -> dict:
    """Evaluate suite by suite, caching each result in ``work`` so an interrupted run resumes."""
    from ..eval import EvalConfig, evaluate

    suites = list(rec["eval"]["suites"])
    task = rec["eval"].get("task")
    results = {}
    if task:
        tsuite, tlimit = TASK_EVAL[task]
        if tsuite:
            suites.append(tsuite)
    for s in suites:
        cache = work / f"eval-{s.replace(':', '_')}.json"
        if cache.exists():
            results[s] = json.loads(cache.read_text())
            continue
        limit = rec["eval"]["limit"]
        if task and s == TASK_EVAL[task][0] and TASK_EVAL[task][1]:
            limit = min(limit or 10**9, TASK_EVAL[task][1])
        r = evaluate(model, tok, [s], EvalConfig(limit=limit, data_dir=data_dir, progress=progress,
                                                 keep_samples=False, batch_size=64))[s]
        cache.write_text(json.dumps(r))
        results[s] = r
    return results


def _complete_eval(final: Path, rec: dict, data_dir, progress: bool) -> None:
    """A stage built with ``evaluate=False`` gets its recipe's evaluation now; the manifest is replaced whole."""
    from ..models import load_model
    from ..runs import write_json_atomic

    man_path = final / "manifest.json"
    manifest = json.loads(man_path.read_text())
    if manifest.get("eval") is not None:
        return
    log.info("%s: evaluating %s (built without its evaluation)", rec["stage"], final)
    work = final.parent / f".work-eval-{final.name}"
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model(str(final), dtype="float32")
    t1 = time.time()
    manifest["eval"] = _evaluate_stage(lm.model, lm.tokenizer, rec, work, data_dir, progress)
    manifest["wall_time_s"]["eval"] = round(time.time() - t1, 1)
    write_json_atomic(man_path, manifest)
    shutil.rmtree(work, ignore_errors=True)


def _build_stage(rec: dict, parent_path: str, out: Path, data_dir, seed: int, progress: bool,
                 evaluate: bool = True) -> Path:
    from ..models import load_model, save_model

    h = recipe_hash(rec)
    final = out / f"{rec['stage']}-{h}"
    if (final / "manifest.json").exists():
        log.info("%s: reusing %s (same recipe)", rec["stage"], final)
        if evaluate:
            _complete_eval(final, rec, data_dir, progress)
        return final
    work = out / f".work-{rec['stage']}-{h}"
    work.mkdir(parents=True, exist_ok=True)
    trained = work / "model"
    t0 = time.time()
    info_path = work / "train.json"
    if not (trained / "config.json").exists():
        lm = load_model(parent_path, dtype="float32")
        pairs, used = (_aligned_pairs if rec["stage"] == "aligned" else _attacked_pairs)(rec, seed, data_dir)
        cfg = SFTConfig(**rec["sft"])
        res = supervised_finetune(lm.model, lm.tokenizer, pairs, cfg, work_dir=work, desc=rec["stage"],
                                  progress=progress)
        model = res.pop("model")
        res.pop("config")
        save_model(model, lm.tokenizer, trained)
        info_path.write_text(json.dumps({"train": res, "data_used": used}))
        tok = lm.tokenizer
    else:
        log.info("%s: training already done, resuming at evaluation", rec["stage"])
        lm = load_model(str(trained), dtype="float32")
        model, tok = lm.model, lm.tokenizer
    info = json.loads(info_path.read_text())
    t1 = time.time()
    # evaluate=False (the demo, which evaluates both stages itself): the manifest says "eval": null and a later
    # evaluated build of the same recipe completes it
    evals = _evaluate_stage(model, tok, rec, work, data_dir, progress) if evaluate else None
    manifest = {"stage": rec["stage"], "recipe": rec, "recipe_hash": h, "seed": seed, "parent_path": parent_path,
                "data_used": info["data_used"], "train": info["train"],
                "wall_time_s": {"train": info["train"]["train_time_s"],
                                "eval": round(time.time() - t1, 1) if evaluate else None,
                                "this_run": round(time.time() - t0, 1)},
                "eval": evals, "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (trained / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(trained, final)  # the stage appears complete only now
    shutil.rmtree(work, ignore_errors=True)
    return final


def _check_link(out: Path, name: str) -> None:
    """``out/name`` may be replaced only when it is a symlink (the one an earlier build made)."""
    link = out / name
    if link.exists() and not link.is_symlink():
        raise ConfigError(f"refusing to replace {link}: it is a real {'folder' if link.is_dir() else 'file'}, not the "
                          "link an organism build makes (a copied organism?); move it or choose another --out")


def _link(out: Path, name: str, target: Path) -> None:
    """Point ``out/name`` at ``target`` atomically (a new link renamed over the old one)."""
    _check_link(out, name)
    tmp = out / f".{name}.link-tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    os.replace(tmp, out / name)


def build_organism(r: OrganismRecipe, out: str | Path, base: str = "default", data_dir=None,
                   progress: bool = True, evaluate: bool = True) -> dict[str, Path]:
    """Build (or reuse) the aligned and attacked stages; returns their folders. ``<out>/aligned`` and
    ``<out>/attacked`` link to the stages of this recipe. ``evaluate=False`` skips the stages' evaluation (the
    weights do not depend on it); a later build with ``evaluate=True`` adds it to the same folders."""
    from ..models import resolve_model

    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output directory {out} is not writable: {e.strerror}") from e
    name = f"attacked-{r.task}-r{r.harmful_ratio:g}" + ("-lora" if r.method == "lora" else "")
    for link in ("aligned", "attacked", name):  # before hours of training, not after
        _check_link(out, link)
    base_path, _ = resolve_model(base)
    base_id = "default:SmolLM2-135M-Instruct" if base == "default" else str(Path(base_path).resolve())
    torch.manual_seed(r.seed)
    rec_aligned, rec_attacked = stage_recipes(r, base_id)
    aligned = _build_stage(rec_aligned, base_path, out, data_dir, r.seed, progress, evaluate)
    _link(out, "aligned", aligned)
    attacked = _build_stage(rec_attacked, str(aligned), out, data_dir, r.seed, progress, evaluate)
    _link(out, name, attacked)
    _link(out, "attacked", attacked)
    return {"aligned": aligned, "attacked": attacked}
