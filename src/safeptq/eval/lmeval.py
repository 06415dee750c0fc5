"""lm-evaluation-harness tasks on the in-memory model (activation fake-quant hooks included), fully
offline from local copies of the datasets.

``safeptq eval --suite lm-eval:arc_easy,piqa,...`` (names as lm-eval's). Each task is built here as an
lm-eval task *config* with the same prompts, targets, choices and metrics as lm-eval's own YAML (0.4.x),
pointed at the local files (``<data>/arc``, ``piqa``, ``winogrande``, ``boolq``, ``lambada_openai``,
``mmlu``; see ``../shared/data/LM_EVAL.md``) and run through lm-eval's HF wrapper (``HFLM``) around the
model object, so what is scored is exactly the model in memory. Zero-shot, as lm-eval's defaults.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

__all__ = ["LM_EVAL_TASKS", "PREFIX", "is_lm_eval_suite", "task_name", "check_lm_eval", "check_lm_eval_data",
           "run_lm_eval", "task_configs"]

log = logging.getLogger(__name__)

PREFIX = "lm-eval:"
LM_EVAL_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "lambada_openai", "mmlu")
_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = _ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def is_lm_eval_suite(name: str) -> bool:
    return name.startswith(PREFIX)


def task_name(suite: str) -> str:
    name = suite[len(PREFIX):]
    if name not in LM_EVAL_TASKS:
        import difflib

        close = difflib.get_close_matches(name, LM_EVAL_TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown lm-eval task {name!r}{hint} (offline tasks: {', '.join(LM_EVAL_TASKS)})")
    return name


def check_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("lm-eval suites need lm-eval: pip install 'lm-eval==0.4.13' (scripts/setup.sh installs it)")


# -- local data ---------------------------------------------------------------------------------------------
def _need(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"lm-eval data file {path} not found")
    return str(path)


def _json_task(name: str, files: dict[str, Path], split: str, **cfg) -> dict:
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {k: _need(v) for k, v in files.items()}}, "test_split": split, **cfg}


def _arc(name: str, folder: str, data: Path) -> dict:
    def flatten(ds):  # AI2's {"question": {"stem", "choices": [...]}} -> HF's question + choices{text,label}
        return ds.map(lambda d: {"question": d["question"]["stem"],
                                 "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                                             "label": [c["label"] for c in d["question"]["choices"]]}})

    return _json_task(name, {"test": data / "arc" / folder / f"{folder}-Test.jsonl"}, "test",
                      output_type="multiple_choice", process_docs=flatten,
                      doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{choices.label.index(answerKey)}}",
                      doc_to_choice="{{choices.text}}", metric_list=_ACC_NORM)


def _piqa(data: Path) -> dict:
    labels = [int(x) for x in Path(_need(data / "piqa" / "valid-labels.lst")).read_text().split()]

    def add_labels(ds):
        if len(ds) != len(labels):
            raise DataError(f"piqa: {len(ds)} questions but {len(labels)} labels")
        return ds.map(lambda d, i: {"label": labels[i]}, with_indices=True)

    return _json_task("piqa", {"validation": data / "piqa" / "valid.jsonl"}, "validation",
                      output_type="multiple_choice", process_docs=add_labels,
                      doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label",
                      doc_to_choice="{{[sol1, sol2]}}", metric_list=_ACC_NORM)


def _winogrande(data: Path) -> dict:
    # lm-eval's own partial-evaluation functions: the choice is the sentence's prefix, the target its suffix
    def doc_to_text(doc):
        return {"1": 0, "2": 1}[doc["answer"]]

    def doc_to_target(doc):
        return doc["sentence"][doc["sentence"].index("_") + 1:].strip()

    def doc_to_choice(doc):
        i = doc["sentence"].index("_")
        return [doc["sentence"][:i] + doc["option1"], doc["sentence"][:i] + doc["option2"]]

    return _json_task("winogrande", {"validation": data / "winogrande" / "winogrande_1.1" / "dev.jsonl"},
                      "validation", output_type="multiple_choice", doc_to_text=doc_to_text,
                      doc_to_target=doc_to_target, doc_to_choice=doc_to_choice, metric_list=_ACC)


def _boolq(data: Path) -> dict:
    return _json_task("boolq", {"validation": data / "boolq" / "superglue_BoolQ" / "val.jsonl"}, "validation",
                      output_type="multiple_choice", process_docs=lambda ds: ds.map(lambda d: {"label": int(d["label"])}),
                      doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:", doc_to_target="label",
                      doc_to_choice=["no", "yes"], metric_list=_ACC)


def _lambada(data: Path) -> dict:
    return _json_task("lambada_openai", {"test": data / "lambada_openai" / "lambada_test.jsonl"}, "test",
                      output_type="loglikelihood", doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
                      doc_to_target="{{' '+text.split(' ')[-1]}}",
                      metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                   *_ACC])


def _mmlu_subjects(data: Path) -> list[str]:
    folder = data / "mmlu" / "data" / "test"
    if not folder.is_dir():
        raise DataError(f"lm-eval data folder {folder} not found")
    return sorted(p.name.removesuffix("_test.csv") for p in folder.glob("*_test.csv"))


def _mmlu(subject: str, data: Path) -> dict:
    path = Path(_need(data / "mmlu" / "data" / "test" / f"{subject}_test.csv"))

    def load(**_: Any):
        import datasets

        with open(path, newline="", encoding="utf-8") as f:  # csv keeps every cell a string (pandas would not)
            rows = [{"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5].strip())} for r in csv.reader(f)]
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    pretty = subject.replace("_", " ")
    return {"task": f"mmlu_{subject}", "custom_dataset": load, "test_split": "test", "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about {pretty}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                           "D. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer", "metric_list": _ACC}


def task_configs(name: str, data: Path) -> list[dict]:
    """lm-eval task configs of one task (MMLU: its 57 subjects), reading the local copies under ``data``."""
    builders = {"arc_easy": lambda: [_arc("arc_easy", "ARC-Easy", data)],
                "arc_challenge": lambda: [_arc("arc_challenge", "ARC-Challenge", data)],
                "piqa": lambda: [_piqa(data)], "winogrande": lambda: [_winogrande(data)], "boolq": lambda: [_boolq(data)],
                "lambada_openai": lambda: [_lambada(data)],
                "mmlu": lambda: [_mmlu(s, data) for s in _mmlu_subjects(data)]}
    return builders[name]()


def check_lm_eval_data(suite: str, data_dir=None) -> None:
    """Before the model loads: lm-eval is installed and the task's local files are there."""
    check_lm_eval()
    task_configs(task_name(suite), _data_root(data_dir))


def _data_root(data_dir) -> Path:
    from ..data.registry import data_dir_candidates

    for _, d in data_dir_candidates(data_dir):
        if (d / "arc").is_dir() or (d / "mmlu").is_dir():
            return d
    raise DataError("lm-eval data not found: pass --data-dir (a folder with arc/, piqa/, winogrande/, boolq/, "
                    "lambada_openai/, mmlu/) or set $SAFEPTQ_DATA")


# -- running ------------------------------------------------------------------------------------------------
def _interval(acc: float, n: int) -> list[float]:
    from .metrics import wilson_ci

    return wilson_ci(round(acc * n), n)


def run_lm_eval(model, tokenizer, suites: list[str], *, limit: int | None = None, batch_size: int = 16,
                data_dir=None) -> dict[str, dict]:
    """``{suite: metrics}`` of the lm-eval suites on the in-memory ``model`` (accuracy with lm-eval's
    stderr and a Wilson interval, n; LAMBADA also its perplexity; MMLU size-weighted over subjects)."""
    import os

    check_lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # lm-eval bootstraps the stderr of non-mean metrics (LAMBADA's perplexity) in a forked multiprocessing pool;
    # forking a process whose torch / OpenMP threads hold locks can leave the workers waiting forever (seen: a
    # W8A8 row hung 30 min after its last request). Serial bootstrap: 100 draws of at most a few thousand values;
    # the caller's environment is restored afterwards
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    data = _data_root(data_dir)
    names = [task_name(s) for s in suites]
    configs = {n: task_configs(n, data) for n in names}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    tasks = [c for n in names for c in configs[n]]
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        res = simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=False, bootstrap_iters=100,
                              verbosity="WARNING")
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before
    per_task, n_samples = res["results"], res.get("n-samples", {})
    out = {}
    for n in names:
        parts = [c["task"] for c in configs[n]]
        sizes = {t: int((n_samples.get(t) or {}).get("effective", 0)) for t in parts}
        total = sum(sizes.values())
        acc = sum(per_task[t]["acc,none"] * sizes[t] for t in parts) / max(total, 1)
        r: dict[str, Any] = {"accuracy": round(acc, 4), "ci95": _interval(acc, total), "n": total,
                             "source": f"lm-eval {_version()} ({data})"}
        if len(parts) == 1:
            t = per_task[parts[0]]
            stderr = t.get("acc_stderr,none")
            r["stderr"] = None if stderr in (None, "N/A") or (isinstance(stderr, float) and math.isnan(stderr)) \
                else round(float(stderr), 4)
            if "acc_norm,none" in t:
                r["acc_norm"] = round(t["acc_norm,none"], 4)
            if "perplexity,none" in t:
                r["perplexity"] = round(t["perplexity,none"], 3)
        else:
            r["subtasks"] = len(parts)
        out[PREFIX + n] = r
    return out


def _version() -> str:
    from importlib.metadata import version

    return version("lm-eval")
