"""The Python API: the CLI and the API resolve the same recipes, recipes validate once with errors naming
the field, overrides route to their section, YAML round trips, in-memory models, a lazy import. (The
README's examples, model cards and replay run whole quantizations: tests/integration/test_api_e2e.py.)"""

from pathlib import Path

import pytest
import yaml

import safeptq
from safeptq.cli.main import main
from safeptq.recipes import AAQRecipe, QuantizeRecipe, RealignRecipe, RecipeError, load_recipe, make_recipe


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


def test_ls_lists_the_registries(capsys):
    from safeptq.methods import METHODS
    from safeptq.objectives import OBJECTIVES
    from safeptq.quant.args import SCHEMES

    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in [*METHODS, *OBJECTIVES, *SCHEMES, "advbench:eval"]:
        assert f"\n{name} " in out, name


def test_eval_cli_defaults_are_the_apis():
    from dataclasses import fields

    from safeptq.cli.main import build_parser
    from safeptq.eval.api import EvalOptions

    args = vars(build_parser().parse_args(["eval", "--model", "M", "--suite", "advbench:eval"]))
    defaults = EvalOptions()
    for f in fields(EvalOptions):
        if f.name in args:
            assert args[f.name] == getattr(defaults, f.name), f.name
    assert args["no_chat_template"] is (not defaults.chat_template) and args["no_progress"] is (not defaults.progress)
