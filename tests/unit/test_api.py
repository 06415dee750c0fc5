"""The Python API: the README's examples run as written (on tiny models), the CLI and the API resolve the
same recipes, recipes validate once with errors naming the field, YAML round trips, model cards, replay."""

import json
import re
from pathlib import Path

import pytest
import yaml

import safeptq
from conftest import REPO
from safeptq.cli.main import main
from safeptq.recipes import AAQRecipe, QuantizeRecipe, RealignRecipe, RecipeError, load_recipe, make_recipe

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


# -- the CLI and the API resolve the same recipes ------------------------------------------------------------
def _captured(monkeypatch):
    import safeptq.methods.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run", lambda recipe, *a, **k: seen.append(recipe) or _Stub())
    monkeypatch.setattr("safeptq.cli.summary.print_run", lambda rec: None)
    return seen


class _Stub:
    record: dict = {}


@pytest.mark.parametrize("flags, api", [
    (["quantize", "--method", "rtn", "--scheme", "w8a8"], lambda: safeptq.quantize("M", method="rtn", scheme="w8a8")),
    (["quantize", "--method", "omniquant", "--scheme", "w4a16"],
     lambda: safeptq.quantize("M", method="omniquant", scheme="w4a16")),
    (["quantize", "--method", "gptq", "--scheme", "w4a8"], lambda: safeptq.quantize("M", method="gptq", scheme="w4a8")),
    (["realign", "--scheme", "w8a8"], lambda: safeptq.realign("M")),
    (["realign", "--scheme", "w8a8", "--probe-model", "A"], lambda: safeptq.realign("M", probe_model="A")),
    (["realign", "--scheme", "w8a8", "--schedule", "paper"], lambda: safeptq.realign("M", schedule="paper")),
    (["aaq", "--scheme", "w4a8", "--base", "B"], lambda: safeptq.aaq("M", base="B")),
    (["aaq", "--scheme", "w4a4", "--base", "B", "--preset", "paper"],
     lambda: safeptq.aaq("M", base="B", scheme="w4a4", preset="paper")),
    (["aaq", "--scheme", "w4a8", "--objective", "kl_top"], lambda: safeptq.aaq("M", objective="kl_top")),
])
def test_cli_and_api_defaults_resolve_to_the_same_recipe(monkeypatch, tmp_path, flags, api):
    seen = _captured(monkeypatch)
    assert main([*flags, "--model", "M", "--out", str(tmp_path / "o")]) == 0
    api()
    cli_recipe, api_recipe = seen
    assert cli_recipe.model_dump() == api_recipe.model_dump()
    assert type(cli_recipe) is type(api_recipe)


def test_presets_are_defined_once_and_differ_where_the_papers_do():
    default = make_recipe(RealignRecipe, None, model="M", scheme="w8a8", probes={"model": "A"})
    paper = make_recipe(RealignRecipe, None, model="M", scheme="w8a8", schedule="paper", probes={"model": "A"})
    assert (default.training.epochs, default.objective.malicious_target, default.training.train_norms) == \
        (3, "state", True)
    assert (paper.training.epochs, paper.training.batch_size, paper.objective.malicious_target) == ((5, 15), 1, "probe")
    assert paper.calib.data == "advbench:calib=0.75,alpaca:calib=0.25" and paper.calib.nsamples == 200
    aaq_paper = make_recipe(AAQRecipe, None, model="M", base="B", scheme="w4a4", preset="paper")
    assert (aaq_paper.calib.data, aaq_paper.calib.replies, aaq_paper.objective.push, aaq_paper.objective.tail) == \
        ("wikitext2:calib", 0, "unbounded", False)
    assert aaq_paper.training.weights == "gptq"


# -- recipes: validation, overrides, YAML ----------------------------------------------------------------------
@pytest.mark.parametrize("kw, field, words", [
    ({"epochs": "x"}, "training.epochs", "N or A,B"),
    ({"lr_lwc": 0}, "training.lr_lwc", "positive"),
    ({"lr_lwc": float("nan")}, "training.lr_lwc", "finite"),
    ({"nsamples": 0}, "calib.nsamples", "at least 1"),
    ({"let_alpha": 2}, "training.let_alpha", "at most 1"),
    ({"calib": {"data": "a=0.5,b=0.6"}}, "calib.data", "add up to 1"),
    ({"eval": {"suites": "wikitxt2"}}, "eval.suites", "unknown suite"),
])
def test_recipe_errors_name_the_field(kw, field, words):
    with pytest.raises(RecipeError) as e:
        make_recipe(QuantizeRecipe, None, model="M", method="omniquant", scheme="w8a8", **kw)
    assert e.value.field == field and words in str(e.value) and "\n" not in str(e.value)


def test_overrides_route_short_names_and_refuse_unknown_ones():
    r = make_recipe(RealignRecipe, None, model="M", scheme="w8a8", epochs=2, margin=1.5, C=0.5)
    assert (r.training.epochs, r.objective.margin, r.probes.C) == (2, 1.5, 0.5)
    with pytest.raises(RecipeError, match="did you mean 'epochs'"):
        make_recipe(RealignRecipe, None, model="M", scheme="w8a8", epoch=2)
    a = make_recipe(AAQRecipe, None, model="M", scheme="w4a8", kind="kl_top", lwc=False, **{"training.steps": 7})
    assert (a.objective.kind, a.training.lwc, a.training.steps, a.base) == ("kl_top", False, 7, None)
    with pytest.raises(RecipeError, match="not a field"):
        QuantizeRecipe.build({"model": "M", "scheme": "w8a8", "shceme": "w4a16"})


def test_recipe_yaml_round_trips(tmp_path):
    r = make_recipe(RealignRecipe, None, model="M", scheme="w4a16", group_size=32, schedule="paper",
                    probes={"model": "A"}, eval={"suites": "advbench:eval,wikitext2", "limit": 8})
    (tmp_path / "recipe.yaml").write_text(r.to_yaml())
    back = load_recipe(tmp_path)
    assert back == r and isinstance(back, RealignRecipe) and back.training.epochs == (5, 15)
    assert yaml.safe_load(r.to_yaml())["training"]["epochs"] == [5, 15]
    (tmp_path / "bad.yaml").write_text("method: omniquant\nscheme: w8a8\ntraining: {epochs: 2, lr: 1}\n")
    with pytest.raises(RecipeError, match="training.lr"):
        load_recipe(tmp_path / "bad.yaml")


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


def test_in_memory_model_and_lazy_import(tiny_llama):
    import subprocess
    import sys

    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    q = safeptq.quantize((tiny_llama, tok), method="rtn", scheme="w8a8", progress=False)
    assert q.model is tiny_llama and q.record["model"] == "<in-memory>" and q.record["model_id"].startswith("sha256:")
    code = "import sys, safeptq; assert 'torch' not in sys.modules and 'safeptq.api' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert Path(safeptq.__file__).parent.name == "safeptq"
