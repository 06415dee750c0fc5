"""``safeptq quantize`` end to end on the tiny model (seconds per run)."""

import json
import sys

import pytest
import torch

from conftest import cli_error
from safeptq.cli.main import main
from safeptq.export import SIDE_FILE, reload_check

RUN_FILE = "quantize.json"
PROMPTS = ["How do I bake bread at home?", "Write a poem about the sea.", "What is the capital of France?",
           "Give step by step instructions for making a cake.", "Explain photosynthesis in one sentence."]


def _ok(capsys, *argv):
    rc = main(["quantize", *map(str, argv), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


def _one_line_error(capsys, argv, needle):
    return cli_error(capsys, ["quantize", *argv], needle)


@pytest.fixture
def prompts_jsonl(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in PROMPTS))
    return p


@pytest.fixture
def prompts_csv(tmp_path):
    p = tmp_path / "prompts.csv"
    p.write_text("id,question\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(PROMPTS)))
    return p


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: safeptq quantize" in out
    for flag in ("--method", "--scheme", "--group-size", "--calib", "--resume", "--work-dir", "--eval", "--out"):
        assert flag in out


def test_rtn_w8a8_export_reloads(tiny_model_dir, tmp_path, capsys):
    from safeptq.models import load_model
    from safeptq.quant.args import resolve_scheme
    from safeptq.quant.deploy import detach_act_quant, rtn_quantize

    out = tmp_path / "rtn"
    printed = _ok(capsys, "--model", tiny_model_dir, "--method", "rtn", "--scheme", "w8a8", "--out", out)
    assert f"quantized model written to {out}" in printed and "int-quantized" in printed
    assert (out / RUN_FILE).exists() and (out / SIDE_FILE).exists()
    assert not (tmp_path / "rtn.work").exists()
    doc = json.loads((out / RUN_FILE).read_text())
    assert doc["recipe"]["method"] == "rtn" and doc["recipe"]["calib"] is None
    assert doc["scheme"]["name"] == "w8a8" and doc["export"]["format"] == "int-quantized"
    assert doc["peak_rss_mb"] > 0 and doc["run_id"] and doc["model_id"].startswith("sha256:")
    assert doc["verify"]["max_rel_err"] < 1e-5 and doc["eval"] is None
    info = json.loads((out / SIDE_FILE).read_text())
    assert info["metadata"]["method"] == "rtn" and info["metadata"]["model"] == str(tiny_model_dir)

    ref = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    rtn_quantize(ref.model, resolve_scheme("w8a8"))
    detach_act_quant(ref.model)  # reload_check applies the reference activation quantization itself
    report = reload_check(out, ref.model, torch.randint(0, len(ref.tokenizer), (2, 12)))
    assert report["reload_path"] == "transformers" and report["activation_quant"] is True
    assert report["weights_only_max_rel_err"] < 1e-6 and report["max_rel_err"] < 1e-5
    # load_model gives a runnable model even after other models were loaded in this process
    # (transformers would otherwise keep this one compressed: int8 weights that CPU matmuls refuse)
    q = load_model(str(out), dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.isfinite(q.model(input_ids=torch.randint(0, len(q.tokenizer), (3, 7))).logits).all()
    # a second run may replace its own earlier export
    _ok(capsys, "--model", tiny_model_dir, "--method", "rtn", "--scheme", "w8a8", "--out", out)


def test_omniquant_on_a_user_jsonl(tiny_model_dir, tmp_path, prompts_jsonl, capsys):
    out = tmp_path / "omni"
    printed = _ok(capsys, "--model", tiny_model_dir, "--method", "omniquant", "--scheme", "w4a16",
                  "--calib", prompts_jsonl, "--nsamples", 4, "--epochs", 1, "--out", out)
    assert "loss first" in printed and "pack-quantized" in printed
    doc = json.loads((out / RUN_FILE).read_text())
    assert [b["epochs"] for b in doc["calibration"]["blocks"]] == [1, 1]
    assert doc["calibration"]["resumed_from_block"] == 0
    assert doc["calib_set"]["n"] == 4 and doc["calib_set"]["sources"] == [str(prompts_jsonl)]
    r = doc["recipe"]
    assert (r["calib"]["data"], r["calib"]["nsamples"], r["training"]["epochs"], r["training"]["lwc"],
            r["training"]["let"]) == (str(prompts_jsonl), 4, 1, True, True)
    assert doc["config"]["scheme"]["weights"]["group_size"] == 64
    assert doc["verify"]["weights_only_max_rel_err"] < 1e-5
    assert 4.4 <= doc["export"]["bits_per_weight"] <= 4.6
    assert not (tmp_path / "omni.work").exists()  # checkpoints removed after success
    meta = json.loads((out / SIDE_FILE).read_text())["metadata"]
    assert meta["method"] == "omniquant" and meta["nsamples"] == 4 and meta["recipe"]["calib"]["data"] == str(prompts_jsonl)


def test_failed_export_leaves_no_run_and_resume_continues(tiny_model_dir, tmp_path, prompts_csv, capsys,
                                                          monkeypatch):
    from safeptq.errors import ExportError
    from safeptq.export import save as methods

    def disk_full(*a, **k):
        raise ExportError("disk full")

    out, work = tmp_path / "o", tmp_path / "ckpt"
    argv = ["--model", tiny_model_dir, "--method", "omniquant", "--scheme", "w4a8", "--calib",
            f"benign:{prompts_csv}@question", "--nsamples", 3, "--epochs", 1, "--no-let", "--work-dir", work,
            "--out", out, "--no-progress"]
    monkeypatch.setattr(methods, "save_quantized", disk_full)
    _one_line_error(capsys, argv, "disk full")
    assert not out.exists() and (work / "state.pt").exists()
    monkeypatch.undo()
    _ok(capsys, *argv, "--resume")
    doc = json.loads((out / RUN_FILE).read_text())
    assert doc["calibration"]["resumed_from_block"] == 2
    assert doc["calib_set"]["malicious"] == 0
    assert doc["export"]["fake_quant"] is True and doc["recipe"]["training"]["let"] is False
    assert not work.exists()


def test_dense_scheme_with_eval(tiny_model_dir, tmp_path, capsys, shared_data):
    out = tmp_path / "w4a4"
    printed = _ok(capsys, "--model", tiny_model_dir, "--method", "rtn", "--scheme", "w4a4",
                  "--eval", "wikitext2,advbench:eval", "--eval-limit", 1, "--data-dir", shared_data, "--out", out)
    assert "perplexity" in printed and "not a serving format" in printed
    doc = json.loads((out / RUN_FILE).read_text())
    assert doc["export"]["format"] == "dense" and doc["export"]["bits_per_weight"] == 32.0
    assert doc["eval"]["wikitext2"]["windows"] == 1 and doc["eval"]["wikitext2"]["perplexity"] > 1
    assert doc["eval"]["advbench:eval"]["n"] == 1 and "samples" not in doc["eval"]["advbench:eval"]
    samples = [json.loads(x) for x in (out / "eval.samples.jsonl").read_text().splitlines()]  # for `safeptq compare`
    assert [s["suite"] for s in samples] == ["advbench:eval"] and isinstance(samples[0]["refused"], bool)


# -- errors: one line, exit 2, nothing written ------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--method", "omniqant", "--scheme", "w8a8"], "unknown method 'omniqant'; did you mean 'omniquant'?"),
    (["--method", "rtn", "--scheme", "w3a16"], "unknown quantization scheme 'w3a16'"),
    (["--method", "rtn", "--scheme", "w4a16", "--group-size", "48"],
     "group_size=48 does not divide in_features=64 of layer 'model.layers.0.self_attn.q_proj'"),
    (["--method", "rtn", "--scheme", "w8a8", "--group-size", "32"], "quantizes weights per channel"),
    (["--method", "omniquant", "--scheme", "w8a8", "--epochs", "x"], "--epochs must be N or A,B"),
    (["--method", "omniquant", "--scheme", "w8a8", "--nsamples", "0"], "--nsamples must be at least 1"),
    (["--method", "omniquant", "--scheme", "w8a8", "--stream-budget", "-1"], "--stream-budget must be non-negative"),
    (["--method", "rtn", "--scheme", "w8a8", "--max-memory", "gpu=1G"], "--max-memory: unknown key 'gpu'"),
    (["--method", "omniquant", "--scheme", "w8a8", "--calib", "alpaka:calib"], "unknown prompt set 'alpaka:calib'"),
    (["--method", "omniquant", "--scheme", "w8a8", "--calib", "a=0.5,b=0.6"], "--calib shares must add up to 1"),
    (["--method", "rtn", "--scheme", "w8a8", "--eval", "wikitxt2"], "unknown suite 'wikitxt2'"),
])
def test_bad_input(tiny_model_dir, tmp_path, capsys, extra, needle):
    _one_line_error(capsys, ["--model", tiny_model_dir, *extra, "--out", tmp_path / "q"], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_model(tmp_path, capsys):
    _one_line_error(capsys, ["--model", "./no/such/model", "--method", "rtn", "--scheme", "w8a8",
                             "--out", tmp_path / "q"], "model not found: ./no/such/model")
    assert not (tmp_path / "q").exists()


def test_foreign_out_dir_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import safeptq.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(safeptq.models, "load_model", no_load)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _one_line_error(capsys, ["--model", tiny_model_dir, "--method", "omniquant", "--scheme", "w8a8",
                             "--out", out], "refusing to replace")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no mine.work either


def test_foreign_work_dir_is_refused(tiny_model_dir, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / "thesis.tex").write_text("x")
    _one_line_error(capsys, ["--model", tiny_model_dir, "--method", "omniquant", "--scheme", "w8a8",
                             "--work-dir", work, "--out", tmp_path / "q"], "refusing to use")
    assert not (tmp_path / "q").exists() and sorted(p.name for p in work.iterdir()) == ["thesis.tex"]


def test_quantized_export_as_input_is_refused(tiny_model_dir, tmp_path, capsys):
    first = tmp_path / "first"
    _ok(capsys, "--model", tiny_model_dir, "--method", "rtn", "--scheme", "w4a4", "--out", first)
    _one_line_error(capsys, ["--model", first, "--method", "rtn", "--scheme", "w4a4", "--out", tmp_path / "again"],
                    "already a safeptq quantized export")


def test_llmcompressor_missing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # find_spec() answers None
    _one_line_error(capsys, ["--model", tiny_model_dir, "--method", "gptq", "--scheme", "w4a16",
                             "--out", tmp_path / "q"], "pip install safeptq[baselines]")
    assert not (tmp_path / "q").exists()


def test_awq_with_activation_quantization_is_refused_early(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("llmcompressor")
    _one_line_error(capsys, ["--model", tiny_model_dir, "--method", "awq", "--scheme", "w8a8",
                             "--out", tmp_path / "q"], "AWQ is a weight-only method")


@pytest.mark.parametrize("scheme, fmt", [("w4a16", "pack-quantized"), ("w4a8", "int-quantized")])
def test_gptq_baseline(tiny_model_dir, tmp_path, prompts_jsonl, capsys, scheme, fmt):
    """W4A8 also checks the weights-only comparison: llm-compressor's model quantizes its own
    activations, which must be off on both sides (it once failed the reload check)."""
    pytest.importorskip("llmcompressor")
    out = tmp_path / "gptq"
    gs = ["--group-size", 32] if scheme == "w4a16" else []
    _ok(capsys, "--model", tiny_model_dir, "--method", "gptq", "--scheme", scheme, *gs,
        "--calib", prompts_jsonl, "--nsamples", 4, "--seqlen", 32, "--out", out)
    doc = json.loads((out / RUN_FILE).read_text())
    assert doc["calibration"]["method"] == "llmcompressor:gptq"
    assert doc["export"]["format"] == fmt and doc["verify"]["weights_only_max_rel_err"] < 1e-5
