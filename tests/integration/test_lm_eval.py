"""lm-eval tasks offline on the in-memory model, through `safeptq eval` and a quantized model's own
evaluation (its activation fake-quant hooks included)."""

import json

import pytest

import safeptq
from conftest import cli_ok

pytest.importorskip("lm_eval")


def test_eval_lm_eval_suites_offline(tiny_model_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    printed = cli_ok(capsys, ["eval", "--model", tiny_model_dir, "--suite", "lm-eval:arc_easy,winogrande,mmlu",
                              "--limit", "3", "--data-dir", shared_data, "--out", out, "--no-progress"])
    doc = json.loads(out.read_text())["suites"]
    assert set(doc) == {"lm-eval:arc_easy", "lm-eval:winogrande", "lm-eval:mmlu"}
    assert doc["lm-eval:arc_easy"]["n"] == 3 and doc["lm-eval:mmlu"]["n"] == 3 * 57
    for r in doc.values():
        assert 0 <= r["accuracy"] <= 1 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    assert "lm-eval:mmlu" in printed


def test_a_quantized_model_is_scored_with_its_activation_quantization(tiny_model_dir, shared_data, monkeypatch):
    from safeptq.quant.quantizer import ActQuantizer

    q = safeptq.quantize(str(tiny_model_dir), method="rtn", scheme="w4a4", progress=False)
    calls = []
    forward = ActQuantizer.forward
    monkeypatch.setattr(ActQuantizer, "forward", lambda self, x: calls.append(1) or forward(self, x))
    res = q.evaluate(["lm-eval:piqa"], limit=4, data_dir=str(shared_data))["lm-eval:piqa"]
    assert res["n"] == 4 and len(calls) > 0  # lm-eval ran the in-memory model, activation quantizers and all
    assert q.record["eval"]["lm-eval:piqa"] == res


def test_bootstrap_never_forks(tiny_model_dir, shared_data, monkeypatch):
    """LAMBADA's perplexity stderr is bootstrapped; lm-eval would do it in a forked pool, which can deadlock under
    torch's threads. A pool here fails the test."""
    import multiprocessing

    def no_pool(*a, **k):
        raise AssertionError("lm-eval forked a multiprocessing pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    lm = safeptq.load_model(str(tiny_model_dir))
    res = safeptq.evaluate(lm, ["lm-eval:lambada_openai"], limit=3, data_dir=str(shared_data))
    r = res["suites"]["lm-eval:lambada_openai"]
    assert r["n"] == 3 and "perplexity" in r
