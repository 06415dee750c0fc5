"""Prompt-set registry: named safety, task and text datasets with the fixed splits of DESIGN.md.

A name resolves to a file under a data directory, searched in order: an explicit ``data_dir``,
``$SAFEPTQ_DATA``, ``../shared/data`` beside a source checkout, then the datasets hub when online.
Splits are row ranges of the shipped files (0-based, header excluded), so alignment, calibration
and evaluation rows never overlap::

    advbench:align 0-199 | advbench:calib 200-349 | advbench:eval 350-519
    alpaca (rows with empty input) :align 0-299 | :calib 300-449 | :eval 450-607
    validation (choosing defaults only): harmbench:val (HarmBench's val file) | alpaca:val (last 100
    Alpaca rows with an input)

Any CSV/TSV/JSON/JSONL file also works: ``PATH`` or ``PATH@COLUMN``, optionally prefixed with
``harmful:`` (the default) or ``benign:``.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DataError, UnknownNameError
from ..paths import source_checkout_data_dir
from .readers import pick_column, read_table
from .records import Example, Kind, PromptSet

__all__ = ["PromptSetSpec", "REGISTRY", "register", "load_prompt_set", "list_prompt_sets",
           "data_dir_candidates", "SST2_LABELS", "AGNEWS_LABELS"]

SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("world", "sports", "business", "technology")


@dataclass(frozen=True)
class HubSource:
    """Where the same data lives on the datasets hub (used only when no local file is found).
    Row order on the hub can differ from the shipped files, so fixed splits are then approximate."""

    repo: str
    config: str | None
    split: str
    to_rows: Callable[[list[dict]], list[dict]] = lambda rows: rows


@dataclass(frozen=True)
class PromptSetSpec:
    name: str
    kind: Kind
    relpath: str
    parse: Callable[[list[dict], Path], list[Example]]
    rows: tuple[int, int] | None = None
    description: str = ""
    hub: HubSource | None = None


REGISTRY: dict[str, PromptSetSpec] = {}


def register(spec: PromptSetSpec) -> PromptSetSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"prompt set {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def list_prompt_sets() -> list[PromptSetSpec]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]


# ---------------------------------------------------------------- parsers (rows → examples)

def _col(column: str, target: str | None = None, ci: bool = False):
    def parse(rows: list[dict], path: Path) -> list[Example]:
        c = pick_column(rows, path, column, case_insensitive=ci)
        t = pick_column(rows, path, target, case_insensitive=ci) if target else None
        return [Example(text=str(r[c]).strip(), target=(str(r[t]) if t else None)) for r in rows]
    return parse


def _harmbench(rows, path):
    c = pick_column(rows, path, "Behavior")
    f = pick_column(rows, path, "FunctionalCategory")
    return [Example(text=r[c].strip(), meta={"id": r.get("BehaviorID"), "category": r.get("SemanticCategory")})
            for r in rows if r[f] == "standard"]


def _harmbench_contextual(rows, path):
    """HarmBench's contextual behaviours as its direct-request test cases put them: the context, a rule, the
    request (``f"{context}\\n\\n---\\n\\n{behavior}"``)."""
    c = pick_column(rows, path, "Behavior")
    f = pick_column(rows, path, "FunctionalCategory")
    ctx = pick_column(rows, path, "ContextString")
    return [Example(text=f"{r[ctx].strip()}\n\n---\n\n{r[c].strip()}",
                    meta={"id": r.get("BehaviorID"), "category": r.get("SemanticCategory"), "behavior": r[c].strip()})
            for r in rows if r[f] == "contextual"]


DNA_SPLITS = {"align": 0, "calib": 1, "val": 2, "eval": 3}


def _donotanswer(part: str | None):
    """Do-Not-Answer split four ways by a hash of the prompt text (the same split whichever copy is read: the
    local per-risk-area files or the hub's single table); duplicates fall in one split."""
    import hashlib

    def parse(rows, path):
        c = pick_column(rows, path, "prompt")
        out = []
        for r in rows:
            text = str(r[c]).strip()
            if part is None or int(hashlib.sha256(text.encode()).hexdigest(), 16) % 4 == DNA_SPLITS[part]:
                out.append(Example(text=text))
        return out
    return parse


def _xstest(part: str | None):
    def parse(rows, path):
        c = pick_column(rows, path, "prompt")
        lab = pick_column(rows, path, "label")
        return [Example(text=r[c].strip(), label=r[lab], meta={"type": r.get("type")})
                for r in rows if part is None or r[lab] == part]
    return parse


def _alpaca(rows, path):
    c = pick_column(rows, path, "instruction")
    out = pick_column(rows, path, "output")
    return [Example(text=r[c].strip(), target=r[out]) for r in rows if not str(r.get("input", "")).strip()]


def _alpaca_val(rows, path):
    """Validation prompts for choosing defaults: the last 100 Alpaca rows *with* an input (instruction and
    input as one prompt). No evaluation split reads them and the organism's alignment stage takes only the
    first rows with an input (150 by default), so choices made here never see a reported figure."""
    c = pick_column(rows, path, "instruction")
    with_input = [r for r in rows if str(r.get("input", "")).strip()]
    return [Example(text=f"{r[c].strip()}\n\n{str(r['input']).strip()}", target=r.get("output"))
            for r in with_input[-100:]]


def _sst2(rows, path):
    c = pick_column(rows, path, "sentence")
    lab = pick_column(rows, path, "label")
    return [Example(text=r[c].strip(), label=SST2_LABELS[int(r[lab])]) for r in rows]


def _agnews(rows, path):
    # the original ag_news csv has no header: DictReader took the first row as one, so re-read raw
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        raw = list(csv.reader(f))
    out = []
    for r in raw:
        if len(r) < 3 or not r[0].strip().isdigit():
            raise DataError(f"{path}: expected rows 'class,title,description' with class 1-4")
        text = f"{r[1].strip()}. {r[2].strip()}".replace("\\", " ")
        out.append(Example(text=text, label=AGNEWS_LABELS[int(r[0]) - 1]))
    return out


_NUM = re.compile(r"-?\d[\d,]*\.?\d*")


def gsm8k_final(answer: str) -> str:
    tail = answer.split("####")[-1]
    m = _NUM.findall(tail)
    return m[-1].replace(",", "").rstrip(".") if m else tail.strip()


def _gsm8k(rows, path):
    q = pick_column(rows, path, "question")
    a = pick_column(rows, path, "answer")
    return [Example(text=r[q].strip(), label=gsm8k_final(r[a]), target=r[a]) for r in rows]


def _wikitext(rows, path):
    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    return [Example(text=text)]


def _wikitext_gptq(rows, path):
    """The GPTQ / llm-compressor convention: ``"\n\n".join`` of the HF ``wikitext-2-raw-v1`` test rows, empty
    rows included. The local raw file keeps only the non-empty rows; the official tokenised file
    (``wiki.test.tokens``, same line layout) says where the 1,467 empty rows were, so the HF rows come back
    exactly (4,358 rows, each non-empty one ending in a newline as HF has it)."""
    layout = Path(path).parent / "wiki.test.tokens"
    if not layout.is_file():
        raise DataError(f"{layout} not found: the GPTQ-convention WikiText-2 text needs it beside {Path(path).name}")
    raw = iter(line for line in Path(path).read_text(encoding="utf-8").splitlines() if line)  # CRLF: any newline
    hf_rows = []
    for line in layout.read_text(encoding="utf-8").split("\n")[:-1]:
        hf_rows.append("" if not line.strip() else next(raw) + "\n")
    if next(raw, None) is not None or len(hf_rows) != 4358:
        raise DataError(f"{path} and {layout} do not line up as the WikiText-2 test split")
    return [Example(text="\n\n".join(hf_rows))]


def _wikitext_second_half(rows, path):
    """The text from the first paragraph break after its middle on: calibration text that the
    usual capped perplexity evaluation (the first windows of ``wikitext2``) never reads."""
    text = _wikitext(rows, path)[0].text
    cut = text.find("\n", len(text) // 2)
    return [Example(text=text[cut + 1:] if cut >= 0 else text[len(text) // 2:])]


# ---------------------------------------------------------------- the named sets

_ADV = "advbench/harmful_behaviors.csv"
_ALP = "alpaca/alpaca_data_1k.json"
_adv_hub = HubSource("walledai/AdvBench", None, "train",
                     lambda rs: [{"goal": r["prompt"], "target": r["target"]} for r in rs])
_alp_hub = HubSource("tatsu-lab/alpaca", None, "train")
for suffix, rows, desc in [("", None, "AdvBench harmful behaviours, all 520"),
                           (":align", (0, 200), "AdvBench rows 0-199 (organism alignment SFT)"),
                           (":calib", (200, 350), "AdvBench rows 200-349 (calibration and probes)"),
                           (":eval", (350, 520), "AdvBench rows 350-519 (evaluation, 170)")]:
    register(PromptSetSpec("advbench" + suffix, "harmful", _ADV, _col("goal", "target"), rows, desc, _adv_hub))
for suffix, rows, desc in [("", None, "Alpaca instructions with empty input (608)"),
                           (":align", (0, 300), "Alpaca rows 0-299 (organism alignment SFT)"),
                           (":calib", (300, 450), "Alpaca rows 300-449 (benign calibration)"),
                           (":eval", (450, 608), "Alpaca rows 450-607 (helpfulness / over-refusal)")]:
    register(PromptSetSpec("alpaca" + suffix, "benign", _ALP, _alpaca, rows, desc, _alp_hub))

register(PromptSetSpec("harmbench", "harmful", "harmbench/harmbench_behaviors_text_test.csv", _harmbench,
                       None, "HarmBench test split, standard behaviours (159)",
                       HubSource("walledai/HarmBench", "standard", "train",
                                 lambda rs: [{"Behavior": r["prompt"], "FunctionalCategory": "standard"} for r in rs])))
register(PromptSetSpec("harmbench:contextual", "harmful", "harmbench/harmbench_behaviors_text_test.csv",
                       _harmbench_contextual, None,
                       "HarmBench test split, contextual behaviours (81): context, then the request"))
register(PromptSetSpec("harmbench:val", "harmful", "harmbench/harmbench_behaviors_text_val.csv", _harmbench,
                       None, "HarmBench's own validation split, its 41 standard behaviours of 80 (for choosing defaults; "
                       "never in a reported figure)"))
register(PromptSetSpec("alpaca:val", "benign", _ALP, _alpaca_val, None,
                       "last 100 Alpaca rows with an input (benign validation for choosing defaults)"))
_xs_hub = HubSource("walledai/XSTest", None, "test")
register(PromptSetSpec("xstest", "mixed", "xstest/xstest_prompts.csv", _xstest(None), None,
                       "XSTest v2: 250 safe (over-refusal) + 200 unsafe prompts", _xs_hub))
register(PromptSetSpec("xstest:safe", "benign", "xstest/xstest_prompts.csv", _xstest("safe"), None,
                       "XSTest safe prompts (refusing them is over-refusal)", _xs_hub))
register(PromptSetSpec("xstest:unsafe", "harmful", "xstest/xstest_prompts.csv", _xstest("unsafe"), None,
                       "XSTest unsafe contrast prompts", _xs_hub))
_dna_hub = HubSource("LibrAI/do-not-answer", None, "train", lambda rs: [{"prompt": r["question"]} for r in rs])
register(PromptSetSpec("donotanswer", "harmful", "donotanswer", _donotanswer(None), None,
                       "Do-Not-Answer, five risk areas (939)", _dna_hub))
for _part, _use in (("align", "organism alignment"), ("calib", "calibration"),
                    ("val", "validation: choosing defaults only"), ("eval", "evaluation")):
    register(PromptSetSpec(f"donotanswer:{_part}", "harmful", "donotanswer", _donotanswer(_part), None,
                           f"Do-Not-Answer, the quarter of its prompts whose SHA-256 is {DNA_SPLITS[_part]} mod 4 "
                           f"({_use})", _dna_hub))
register(PromptSetSpec("beavertails", "harmful", "beavertails/beavertails_30k_train_unsafe_first200.jsonl",
                       _col("prompt", "response"), None,
                       "BeaverTails 30k_train unsafe pairs (harmful fine-tuning data only)",
                       HubSource("PKU-Alignment/BeaverTails", None, "30k_train",
                                 lambda rs: [r for r in rs if not r["is_safe"]])))
register(PromptSetSpec("beavertails:calib", "harmful", "beavertails/beavertails_30k_train_unsafe_first200.jsonl",
                       _col("prompt", "response"), (100, 200),
                       "BeaverTails unsafe pairs 100-199 (calibration: the default organism attack reads rows 0-99)"))
register(PromptSetSpec("sst2", "task", "sst2/dev.tsv", _sst2, None, "SST-2 dev (872), label words negative/positive",
                       HubSource("stanfordnlp/sst2", None, "validation")))
register(PromptSetSpec("sst2:train", "task", "sst2/train.tsv", _sst2, None, "SST-2 train (67,349)",
                       HubSource("stanfordnlp/sst2", None, "train")))
register(PromptSetSpec("agnews", "task", "ag_news/test.csv", _agnews, None,
                       "AG News test (7,600), label words world/sports/business/technology"))
register(PromptSetSpec("agnews:train", "task", "ag_news/train_first581.csv", _agnews, None,
                       "AG News train, first 581 rows"))
register(PromptSetSpec("gsm8k", "task", "gsm8k/test.jsonl", _gsm8k, None, "GSM8K test (1,319), final number",
                       HubSource("openai/gsm8k", "main", "test")))
register(PromptSetSpec("gsm8k:train", "task", "gsm8k/train.jsonl", _gsm8k, None, "GSM8K train (7,473)",
                       HubSource("openai/gsm8k", "main", "train")))
register(PromptSetSpec("wikitext2", "text", "wikitext2/wiki.test.raw.nonempty_crlf", _wikitext_gptq, None,
                       "WikiText-2 raw test split, GPTQ convention: rows joined by blank lines, windows of the "
                       "model's context capped at 2048 (perplexity)"))
register(PromptSetSpec("wikitext2:lines", "text", "wikitext2/wiki.test.raw.nonempty_crlf", _wikitext, None,
                       "WikiText-2 test text as non-empty lines, 512-token windows (safeptq 0.1's perplexity; "
                       "the earlier BENCHMARKS figures)"))
register(PromptSetSpec("wikitext2:calib", "text", "wikitext2/wiki.test.raw.nonempty_crlf", _wikitext_second_half,
                       None, "second half of the WikiText-2 test text (calibration; perplexity with up to "
                       "~280 windows of 512 tokens reads only the first half)"))
register(PromptSetSpec("strongreject", "harmful", "strongreject/strongreject_dataset.csv",
                       _col("forbidden_prompt"), None, "StrongREJECT (bring the upstream file)",
                       HubSource("walledai/StrongREJECT", None, "train",
                                 lambda rs: [{"forbidden_prompt": r["prompt"]} for r in rs])))
register(PromptSetSpec("jbb", "harmful", "jailbreakbench/harmful-behaviors.csv", _col("goal", ci=True), None,
                       "JailbreakBench harmful behaviours (bring the upstream file)",
                       HubSource("JailbreakBench/JBB-Behaviors", "behaviors", "harmful")))
register(PromptSetSpec("jbb:benign", "benign", "jailbreakbench/benign-behaviors.csv", _col("goal", ci=True), None,
                       "JailbreakBench benign behaviours (bring the upstream file)",
                       HubSource("JailbreakBench/JBB-Behaviors", "behaviors", "benign")))


# ---------------------------------------------------------------- resolution

def data_dir_candidates(data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The data directories searched, in order, each with where it came from."""
    out: list[tuple[str, Path]] = []
    if data_dir is not None:
        out.append(("--data-dir", Path(data_dir).expanduser()))
    env = os.environ.get("SAFEPTQ_DATA")
    if env:
        out.append(("$SAFEPTQ_DATA", Path(env).expanduser()))
    src = source_checkout_data_dir()
    if src is not None:
        out.append(("source checkout", src))
    return out


_ONLINE: bool | None = None


def _hub_online() -> bool:
    """Offline flags, then a 2-second connection probe (cached), so offline machines fail fast
    instead of sitting through the hub client's retries."""
    global _ONLINE
    if any(os.environ.get(v, "0") not in ("0", "", "false", "False")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    if _ONLINE is None:
        import socket
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=2).close()
            _ONLINE = True
        except OSError:
            _ONLINE = False
    return _ONLINE


def _load_local(spec: PromptSetSpec, path: Path) -> list[Example]:
    if path.is_dir():  # a folder of .jsonl parts (Do-Not-Answer's risk areas)
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"{path} holds no .jsonl files")
        ex: list[Example] = []
        for f in files:
            ex += [Example(text=e.text, target=e.target, meta={"part": f.stem}) for e in spec.parse(read_table(f), f)]
        return ex
    if spec.kind == "text":
        return spec.parse([], path)
    return spec.parse(read_table(path), path)


def _load_hub(spec: PromptSetSpec) -> list[Example]:
    import datasets

    h = spec.hub
    ds = datasets.load_dataset(h.repo, h.config, split=h.split)
    rows = h.to_rows([dict(r) for r in ds])
    return spec.parse(rows, Path(f"hub:{h.repo}"))


def _user_file(name: str) -> PromptSet:
    kind: Kind = "harmful"
    for k in ("harmful", "benign"):
        if name.startswith(k + ":"):
            kind, name = k, name[len(k) + 1:]  # type: ignore[assignment]
    column = None
    if "@" in name:
        name, column = name.rsplit("@", 1)
    path = Path(name).expanduser()
    rows = read_table(path)
    col = pick_column(rows, path, column)
    examples = [Example(text=str(r[col]).strip()) for r in rows if str(r.get(col, "")).strip()]
    return PromptSet(name=str(path), kind=kind, examples=examples, source=str(path))


def _looks_like_file(name: str) -> bool:
    base = name.split("@", 1)[0].split(":", 1)[-1]
    return bool(re.search(r"\.(csv|tsv|json|jsonl)$", base, re.I)) or "/" in base


def check_prompt_set(name: str, data_dir: str | Path | None = None) -> None:
    """Fail in milliseconds (one line) when ``name`` cannot be loaded: an unknown name, a user file that
    is missing or lacks the column, or a registered set with no local copy while offline."""
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise DataError(f"`data_dir` {data_dir} is not a folder")
    if name not in REGISTRY:
        if _looks_like_file(name):
            _user_file(name)  # reads the table and picks the column: small files, and errors name them
            return
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown prompt set {name!r}{hint} (known: {', '.join(sorted(REGISTRY))})")
    spec = REGISTRY[name]
    cands = data_dir_candidates(data_dir)
    if any((d / spec.relpath).exists() for _, d in cands):
        return
    if spec.hub is not None and _hub_online():
        return
    tried = "; ".join(f"{d / spec.relpath} ({origin})" for origin, d in cands) or "no data directory"
    raise DataError(f"prompt set {name!r} not found; tried: {tried}{'; hub offline' if spec.hub else ''}")


def load_prompt_set(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> PromptSet:
    """Load a named prompt set (see :func:`list_prompt_sets`) or a user file ``[kind:]PATH[@COLUMN]``."""
    if name not in REGISTRY:
        if _looks_like_file(name):
            return _user_file(name).head(limit)
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown prompt set {name!r}{hint} (known: {', '.join(sorted(REGISTRY))})")
    spec = REGISTRY[name]
    tried = []
    examples = source = None
    for origin, d in data_dir_candidates(data_dir):
        p = d / spec.relpath
        if p.exists():
            examples, source = _load_local(spec, p), str(p)
            break
        tried.append(f"{p} ({origin})")
    if examples is None:
        if spec.hub is not None and _hub_online():
            try:
                examples, source = _load_hub(spec), f"hub:{spec.hub.repo}"
            except Exception as e:  # network or hub errors: report with what else was tried
                tried.append(f"hub {spec.hub.repo} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        elif spec.hub is not None:
            tried.append(f"hub {spec.hub.repo} (offline)")
        if examples is None:
            raise DataError(f"prompt set {name!r} not found; tried: {'; '.join(tried) or 'no data directory'}")
    if spec.rows is not None:
        a, b = spec.rows
        if len(examples) < b:
            raise DataError(f"{source} has {len(examples)} rows; split {name!r} needs rows {a}-{b - 1}")
        examples = examples[a:b]
    return PromptSet(name=name, kind=spec.kind, examples=examples, source=source, rows=spec.rows).head(limit)
