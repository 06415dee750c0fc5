"""The Python API end to end on tiny models: the README's examples run as written, model cards of real
exports, and `safeptq run` replaying a finished run with identical verdicts."""

import json
import re

import pytest
import yaml

import safeptq
from conftest import REPO
from safeptq.cli.main import main

FAST = {"nsamples": 8, "seqlen": 16, "topk": 32, "steps": 2, "sep_limit": 4}


def _readme_api_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class _Fast:
    """``safeptq`` with the calibration sizes cut to seconds and the tests' data folder (the calls are
    the README's; only their scale changes)."""

    def __init__(self, data_dir):
        self.data_dir = str(data_dir)

    def _kw(self, fn, kw):
        extra = {k: v for k, v in FAST.items() if k not in kw}
        if fn == "quantize" and kw.get("method") in ("rtn", None):
            extra = {}
        elif fn == "quantize":
            extra = {k: v for k, v in extra.items() if k in ("nsamples", "seqlen")}
        elif fn == "realign":
            extra = {k: v for k, v in extra.items() if k in ("nsamples", "seqlen", "sep_limit")} | {"epochs": 1}
        else:
            extra = {k: v for k, v in extra.items() if k in ("nsamples", "seqlen", "topk", "steps")}
            extra |= {"replies": 4}
        return {**kw, **extra, "data_dir": self.data_dir, "progress": False}

    def __getattr__(self, name):
        fn = getattr(safeptq, name)
        if name in ("quantize", "realign", "aaq"):
            return lambda *a, **kw: fn(*a, **self._kw(name, kw))
        if name == "evaluate":
            return lambda *a, **kw: fn(*a, **{**kw, "data_dir": self.data_dir, "progress": False})
        return fn


def test_readme_python_api_examples_run(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    code = _readme_api_block()
    for name in ('quantize("default"', 'base="default"', '"runs/organism/attacked"', '"runs/organism/aligned"'):
        assert name in code
        code = code.replace(name, name.replace(name.split('"')[1], str(tiny_model_dir)))
    code = code.replace('"runs/api/', f'"{tmp_path}/')
    code = code.replace("import safeptq\n", "")
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    ns = {"safeptq": _Fast(shared_data), "print": lambda *a: None}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own example
    q, r, a = ns["q"], ns["r"], ns["a"]
    assert ns["folder"] == tmp_path / "rtn-w8a8" and (ns["folder"] / "quantize.json").is_file()
    assert {"recipe.yaml", "README.md", ".safeptq-run.json"} <= {p.name for p in ns["folder"].iterdir()}
    assert ns["o"].recipe.training.epochs == 1 and ns["o"].recipe.calib.nsamples == 32
    assert (tmp_path / "realign-w8a8" / "realign.json").is_file() and r.path == tmp_path / "realign-w8a8"
    assert a.record["formula"].startswith("KL_top32+tail") and (tmp_path / "aaq-w4a8" / "aaq.json").is_file()
    assert ns["res"]["suites"]["advbench:eval"]["n"] == 32 and q.record["recipe"]["scheme"] == "w8a8"


# -- model cards and replay --------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme, fmt, fake", [("w4a16", "pack-quantized", False), ("w4a8", "dense", True)])
def test_model_card_of_an_export(tiny_model_dir, shared_data, tmp_path, monkeypatch, scheme, fmt, fake):
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    q = safeptq.quantize(str(tiny_model_dir), method="rtn", scheme=scheme, progress=False,
                         eval={"suites": "advbench:eval", "limit": 3}, data_dir=str(shared_data))
    out = q.save(tmp_path / "o")
    card = (out / "README.md").read_text()
    rec = json.loads((out / "quantize.json").read_text())
    assert card.startswith(f"# {scheme.upper()} rtn quantization of `{tiny_model_dir}`")
    assert f"| format | {fmt}" in card and f"| scheme | {scheme} |" in card
    assert "| advbench:eval | harmful rate |" in card and "[" in card.split("| advbench:eval |")[1]
    assert ("**fake-quant**" in card) is fake and ("from vllm import LLM" in card) is (not fake)
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == rec["recipe"]
    assert f"{rec['export']['bits_per_weight']:.2f}" in card


def test_run_replays_a_finished_run_with_identical_verdicts(tiny_model_dir, shared_data, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    first = tmp_path / "first"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "omniquant", "--scheme", "w8a8",
                 "--nsamples", "4", "--seqlen", "16", "--epochs", "1", "--data-dir", str(shared_data),
                 "--eval", "advbench:eval", "--eval-limit", "4", "--out", str(first), "--no-progress"]) == 0
    again = tmp_path / "again"
    assert main(["run", str(first / "recipe.yaml"), "--out", str(again), "--no-progress"]) == 0
    a, b = (json.loads((d / "quantize.json").read_text()) for d in (first, again))
    assert a["recipe"] == b["recipe"] and a["run_id"] != b["run_id"]
    assert (first / "eval.samples.jsonl").read_text() == (again / "eval.samples.jsonl").read_text()
    assert [x["loss_last"] for x in a["calibration"]["blocks"]] == [x["loss_last"] for x in b["calibration"]["blocks"]]
    capsys.readouterr()


