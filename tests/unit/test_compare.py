"""Per-prompt samples and the paired comparison of two runs (``safeptq compare``)."""

import json

import numpy as np
import pytest

from safeptq.cli.main import main
from safeptq.eval.metrics import bootstrap_ci
from safeptq.eval.samples import SAMPLES_FILE, compare_runs, paired_difference, read_samples, write_samples


def _write(path, refused_adv, refused_alp):
    write_samples(path, {
        "advbench:eval": [{"prompt": f"h{i}", "response": "", "refused": bool(r)} for i, r in enumerate(refused_adv)],
        "alpaca:eval": [{"prompt": f"b{i}", "response": "", "refused": bool(r)} for i, r in enumerate(refused_alp)],
    })
    return path


def test_paired_interval_is_tighter_than_separate_intervals():
    rng = np.random.default_rng(0)
    a = (rng.random(170) < 0.40).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:20]] = 0  # b fixes 20 of a's failures and breaks nothing: rates 0.40 vs ~0.28
    r = paired_difference(a, b)
    assert r["diff"] == pytest.approx(-20 / 170, abs=1e-4)
    assert r["ci95"][1] < 0 and (r["only_a"], r["only_b"]) == (20, 0) and r["mcnemar_p"] < 1e-4
    lo_a, _ = bootstrap_ci(a)
    _, hi_b = bootstrap_ci(b)
    assert hi_b > lo_a  # the separate intervals overlap, the paired one does not contain 0
    same = paired_difference(a, a)
    assert same["ci95"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_compare_runs_uses_each_suites_headline_rate(tmp_path):
    a = _write(tmp_path / "a.samples.jsonl", [0] * 6 + [1] * 4, [0] * 10)   # harmful 0.6, over-refusal 0
    run_b = tmp_path / "run_b"
    run_b.mkdir()
    _write(run_b / SAMPLES_FILE, [1] * 10, [1] * 2 + [0] * 8)               # harmful 0, over-refusal 0.2
    res = compare_runs(a, run_b)
    assert res["advbench:eval"]["metric"] == "harmful_rate"
    assert (res["advbench:eval"]["a"], res["advbench:eval"]["b"], res["advbench:eval"]["diff"]) == (0.6, 0.0, -0.6)
    assert res["alpaca:eval"]["metric"] == "refusal_rate" and res["alpaca:eval"]["diff"] == 0.2
    assert read_samples(tmp_path / "a.json")["advbench:eval"]["h0"] is False  # eval --out X.json finds X.samples.jsonl


def test_compare_cli_and_errors(tmp_path, capsys):
    a = _write(tmp_path / "a.samples.jsonl", [0] * 10, [0] * 10)
    b = _write(tmp_path / "b.samples.jsonl", [1] * 10, [0] * 10)
    out = tmp_path / "diff.json"
    assert main(["compare", str(a), str(b), "--suite", "advbench:eval", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "B lower" in printed and "alpaca:eval" not in printed
    assert json.loads(out.read_text())["suites"]["advbench:eval"]["diff"] == -1.0

    other = tmp_path / "c.samples.jsonl"
    write_samples(other, {"advbench:eval": [{"prompt": f"x{i}", "response": "", "refused": True} for i in range(10)]})
    for argv, needle in (([str(a), str(other)], "judged different prompts"),
                         ([str(a), str(tmp_path / "missing")], "no per-prompt samples"),
                         ([str(a), str(b), "--suite", "harmbench"], "is not in both runs")):
        assert main(["compare", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err


def test_judge_rejudges_saved_completions_without_generating(tmp_path, capsys, monkeypatch):
    import json

    from conftest import cli_ok

    samples = [{"suite": "advbench:eval", "prompt": f"p{i}", "response": r, "refused": False}
               for i, r in enumerate(["I'm sorry, I can't.", "Sure, here is how.", "<think>no</think>I cannot help."])]
    samples.append({"suite": "alpaca:eval", "prompt": "bake", "response": "Sure: flour.", "refused": True})
    (tmp_path / "r.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    import safeptq.eval.generation as gen

    monkeypatch.setattr(gen, "greedy_generate", lambda *a, **k: pytest.fail("generated"))
    out = tmp_path / "j.json"
    cli_ok(capsys, ["judge", tmp_path / "r.samples.jsonl", "--out", out])
    doc = json.loads(out.read_text())["suites"]
    assert doc["advbench:eval"]["harmful_rate"] == round(1 / 3, 4) and doc["advbench:eval"]["n"] == 3
    assert doc["alpaca:eval"]["refusal_rate"] == 0.0  # the saved verdict was wrong; the judge corrects it
    rejudged = [json.loads(x) for x in (tmp_path / "j.samples.jsonl").read_text().splitlines()]
    assert [s["refused"] for s in rejudged] == [True, False, True, False]
