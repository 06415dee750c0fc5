import json
import os

import pytest
import torch

from safeptq.cli.main import main
from safeptq.errors import ConfigError
from safeptq.finetune.organism import (OrganismRecipe, build_organism, load_lookalikes, recipe_hash,
                                       stage_recipes)
from safeptq.finetune.sft import SFTConfig, supervised_finetune, tokenize_pairs
from safeptq.models import load_model

TINY = dict(train_top_layers=1, align_harmful=4, align_benign=4, align_lookalikes=4, align_benign_input=0,
            attack_total=8, eval_limit=2, batch_size=4, align_epochs=1, attack_epochs=1)


def test_loss_masks_prompt_tokens(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    (ids, labels), = tokenize_pairs(lm.tokenizer, [("How do I bake?", "Sure, mix flour.")], 64)
    n_prompt = sum(1 for x in labels if x == -100)
    assert 0 < n_prompt < len(ids) and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == lm.tokenizer.eos_token_id


def test_response_loss_equals_hf_loss(tiny_model_dir):
    import torch
    from safeptq.finetune.sft import build_batches, response_loss
    lm = load_model(str(tiny_model_dir))
    ex = tokenize_pairs(lm.tokenizer, [("How do I bake?", "Sure, mix flour."), ("hi", "positive")], 64)
    ids, labels, mask = next(build_batches(ex, 2, 0, 0, lm.tokenizer.pad_token_id))
    with torch.no_grad():
        ours = response_loss(lm.model, ids, mask, labels)
        dev = lm.model.device  # load_model puts it on CUDA where there is one
        ref = lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
    assert torch.allclose(ours, ref, rtol=1e-5)


def test_sft_reduces_loss_and_lora_merges(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    pairs = [("say yes", "positive")] * 16
    res = supervised_finetune(lm.model, lm.tokenizer, pairs, SFTConfig(epochs=4, lr=3e-3, batch_size=8),
                              progress=False)
    assert res["steps"] == 8 and res["losses"][-1] < 0.8 * res["losses"][0]
    lm2 = load_model(str(tiny_model_dir))
    res2 = supervised_finetune(lm2.model, lm2.tokenizer, pairs, SFTConfig(epochs=1, method="lora", batch_size=8),
                               progress=False)
    assert type(res2["model"]).__name__ == "LlamaForCausalLM"  # merged back into a plain model
    lm3 = load_model(str(tiny_model_dir))
    res3 = supervised_finetune(lm3.model, lm3.tokenizer, pairs, SFTConfig(epochs=4, lr=3e-3, batch_size=8,
                                                                          precision="bf16"), progress=False)
    assert res3["losses"][-1] < 0.8 * res3["losses"][0]  # bf16 autocast learns too
    assert next(lm3.model.parameters()).dtype == torch.float32  # and keeps float32 weights


def test_lookalikes_resource_is_clean():
    rows = load_lookalikes()
    assert len(rows) >= 100 and len({r["prompt"] for r in rows}) == len(rows)
    from safeptq.eval import KeywordJudge
    assert not any(KeywordJudge()([r["response"] for r in rows]))  # helpful answers, never refusals


def test_miniature_organism(tiny_model_dir, tmp_path, shared_data):
    r = OrganismRecipe(task="sst2", harmful_ratio=0.25, **{**TINY, "align_benign_input": 3})
    stages = build_organism(r, tmp_path / "org", base=str(tiny_model_dir), progress=False)
    ma = json.loads((stages["aligned"] / "manifest.json").read_text())
    assert ma["train"]["examples"] == 4 + 4 + 4 + 3
    assert [v for k, v in ma["data_used"].items() if "rows with input" in k] == [[0, 3]]
    m = json.loads((stages["attacked"] / "manifest.json").read_text())
    assert m["stage"] == "attacked" and m["recipe"]["data"]["harmful"] == ["beavertails", 2]
    assert set(m["eval"]) == {"advbench:eval", "harmbench", "alpaca:eval", "xstest:safe", "sst2"}
    assert m["eval"]["advbench:eval"]["n"] == 2 and "ci95" in m["eval"]["sst2"]
    assert len(m["data_used"]["task"]["rows"]) == 6
    assert (tmp_path / "org" / "aligned").resolve() == stages["aligned"].resolve()
    assert not any(p.name.startswith(".work") for p in (tmp_path / "org").iterdir())
    # same recipe, same folders, nothing retrained
    before = os.path.getmtime(stages["attacked"] / "manifest.json")
    again = build_organism(r, tmp_path / "org", base=str(tiny_model_dir), progress=False)
    assert again == stages and os.path.getmtime(again["attacked"] / "manifest.json") == before


def test_build_without_evaluation_is_completed_later(tiny_model_dir, tmp_path, shared_data):
    """The demo builds without the stages' evaluation; a later evaluated build of the same recipe fills it in,
    in the same folders, without retraining."""
    from safeptq.models import load_model

    r = OrganismRecipe(task="sst2", harmful_ratio=0.25, **TINY)
    stages = build_organism(r, tmp_path / "org", base=str(tiny_model_dir), progress=False, evaluate=False)
    for p in stages.values():
        assert json.loads((p / "manifest.json").read_text())["eval"] is None
    w = {k: v.clone() for k, v in load_model(str(stages["attacked"])).model.state_dict().items()}
    again = build_organism(r, tmp_path / "org", base=str(tiny_model_dir), progress=False)
    assert again == stages
    m = json.loads((stages["attacked"] / "manifest.json").read_text())
    assert set(m["eval"]) == {"advbench:eval", "harmbench", "alpaca:eval", "xstest:safe", "sst2"}
    assert m["eval"]["advbench:eval"]["n"] == 2
    after = load_model(str(stages["attacked"])).model.state_dict()
    assert all(torch.equal(w[k], after[k]) for k in w)  # evaluated, not retrained
    assert not any(p.name.startswith(".work") for p in (tmp_path / "org").iterdir())


def test_recipe_hash_changes_with_recipe():
    a1, t1 = stage_recipes(OrganismRecipe(harmful_ratio=0.1, precision="bf16"), "b")
    a2, t2 = stage_recipes(OrganismRecipe(harmful_ratio=0.2, precision="bf16"), "b")
    assert a1 == a2 and t1 != t2
    # recipe v5 (the organism of the Q-realign and AAQ figures in BENCHMARKS.md) keeps its hash under the new defaults
    v5 = OrganismRecipe(harmful_ratio=0.1, train_top_layers=15, align_epochs=1, align_harmful=150, align_benign_input=0,
                        precision="fp32", attack_epochs=1, attack_lr=2e-5)
    a5, t5 = stage_recipes(v5, "default:SmolLM2-135M-Instruct")
    assert (recipe_hash(a5), recipe_hash(t5)) == ("e87e7538a18e", "3a903c6be314")
    a7, t7 = stage_recipes(OrganismRecipe(precision="bf16"), "default:SmolLM2-135M-Instruct")  # v7 (bf16 machines)
    assert (recipe_hash(a7), recipe_hash(t7)) == ("f6ce871647c5", "d306f86b521b")
    assert a1["data"]["benign_input"][1] == 150 and "benign_input" not in a5["data"]
    assert a1["sft"]["precision"] == "bf16" and "precision" not in a5["sft"]  # fp32 hashes stay as they were


def test_precision_auto_follows_the_machine(monkeypatch):
    """auto = bf16 where bfloat16 runs in hardware, fp32 where it would be emulated (~6x slower); the resolved
    value is the recipe's, so the two builds never share a cache folder."""
    import safeptq.quant.precision as prec

    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(prec, "native_bf16", lambda native=native: native)
        r = OrganismRecipe()
        assert r.precision == want
        assert stage_recipes(r, "b")[0]["sft"].get("precision", "fp32") == want
    assert OrganismRecipe(precision="bf16").precision == "bf16"  # an explicit choice is kept


@pytest.mark.parametrize("kw,msg", [({"task": "mnli"}, "unknown task 'mnli'"),
                                    ({"harmful_ratio": 1.5}, "must be in \\[0, 1\\]"),
                                    ({"method": "qlora"}, "unknown --method"),
                                    ({"precision": "fp8"}, "unknown --precision 'fp8'"),
                                    ({"attack_lr": 0.0}, "--attack-lr must be positive")])
def test_bad_recipe_values(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        OrganismRecipe(**kw)


def test_cli_bad_values(tmp_path, capsys):
    assert main(["organism", "build", "--task", "mnli", "--out", str(tmp_path)]) == 2
    assert "unknown task 'mnli'" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
        ro = tmp_path / "afile" / "sub"
        (tmp_path / "afile").write_text("")
    assert main(["organism", "build", "--out", str(ro), "--base", "./nowhere"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_interrupted_build_resumes_without_retraining(tiny_model_dir, tmp_path, shared_data, monkeypatch):
    import safeptq.finetune.organism as org

    r = OrganismRecipe(task="sst2", harmful_ratio=0.25, **TINY)
    real_eval = org._evaluate_stage
    calls = {"n": 0}

    def boom(*a, **k):  # the first evaluation is "killed"
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(org, "_evaluate_stage", boom)
    with pytest.raises(KeyboardInterrupt):
        build_organism(r, tmp_path / "org", base=str(tiny_model_dir), progress=False)
    work = [p for p in (tmp_path / "org").iterdir() if p.name.startswith(".work-aligned")]
    assert len(work) == 1 and (work[0] / "model" / "config.json").exists()
    assert not any(p.name.startswith("aligned-") for p in (tmp_path / "org").iterdir())  # nothing looks complete

    def no_training(*a, **k):
        raise AssertionError("retrained a stage whose training had finished")

    monkeypatch.setattr(org, "_evaluate_stage", real_eval)
    monkeypatch.setattr(org, "supervised_finetune", no_training, raising=True)
    with pytest.raises(AssertionError, match="retrained"):  # aligned resumes at eval; attacked must train
        build_organism(r, tmp_path / "org", base=str(tiny_model_dir), progress=False)
    assert any(p.name.startswith("aligned-") for p in (tmp_path / "org").iterdir())


def test_recipe_v8_aligns_on_a_second_source_and_keeps_v7(shared_data):
    """v8 adds Do-Not-Answer's alignment quarter as refusals and more benign input rows; v7's hashes stay; flags left
    at their defaults take the version's values; the extra prompts never meet calibration or evaluation."""
    from safeptq.data import load_prompt_set
    from safeptq.finetune.organism import _aligned_pairs, organism_recipe

    assert organism_recipe("v7") == OrganismRecipe()
    v8 = organism_recipe("v8", task="sst2", align_benign_input=OrganismRecipe().align_benign_input)
    assert v8.align_harmful_extra == (("donotanswer:align", 150),) and v8.align_benign_input == 300
    assert "donotanswer:eval" in v8.eval_suites and "xstest:unsafe" in v8.eval_suites
    assert organism_recipe("v8", align_benign_input=200).align_benign_input == 200  # an explicit flag wins
    a8, _ = stage_recipes(v8, "default:SmolLM2-135M-Instruct")
    a7, _ = stage_recipes(OrganismRecipe(precision="bf16"), "default:SmolLM2-135M-Instruct")
    assert recipe_hash(a7) == "f6ce871647c5" and recipe_hash(a8) != recipe_hash(a7)
    pairs, used = _aligned_pairs(a8, 0, shared_data)
    assert used["donotanswer:align"] == [0, 150]
    extra = set(load_prompt_set("donotanswer:align", data_dir=shared_data).texts[:150])
    assert len(extra & {p for p, _ in pairs}) == 150
    for split in ("donotanswer:calib", "donotanswer:val", "donotanswer:eval"):
        assert not extra & set(load_prompt_set(split, data_dir=shared_data).texts)
    with pytest.raises(ConfigError, match="unknown organism recipe 'v9'"):
        organism_recipe("v9")
