"""Nothing lost, nothing mixed (issue 17): ownership of folders, exclusive runs, crash consistency,
identity by content, load integrity, cache integrity, and bad input refused in one line before any
heavy work — each case asserting exit 2 (or the error), the culprit named, and no user file changed."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import break_phase, cli_error, cli_ok, folder_digest, quick_quantize, save_tiny_model


# -- 1. organism links never replace a real folder -------------------------------------------------------
def test_organism_build_refuses_a_real_folder_where_its_link_goes(tmp_path):
    from safeptq.errors import ConfigError

    out = tmp_path / "org"
    (out / "aligned").mkdir(parents=True)
    (out / "aligned" / "model.safetensors").write_text("a copied organism")
    before = folder_digest(out)
    with pytest.raises(ConfigError, match="refusing to replace .*aligned: it is a real folder"):
        import safeptq

        safeptq.build_organism(out)
    assert folder_digest(out) == before


# -- 2. work folders: only marked ones are used, only the engine's files deleted -----------------------------
def test_work_dir_with_the_engines_file_names_but_no_marker_is_refused(tiny_model_dir, tmp_path, data, capsys):
    work = tmp_path / "mine"
    (work / "blocks").mkdir(parents=True)
    (work / "state.pt").write_text("my state")
    (work / "blocks" / "0.pt").write_text("my block")
    before = folder_digest(work)
    cli_error(capsys, quick_quantize(tiny_model_dir, tmp_path / "o", "--work-dir", work), "was not created by safeptq")
    assert folder_digest(work) == before and not (tmp_path / "o").exists()


# -- 3. --out: user files are never replaced; a rerun replaces the old run only once it is complete ---------
def test_out_with_a_users_file_is_refused_then_overwrite_replaces_it(tiny_model_dir, tmp_path, data, capsys):
    out = tmp_path / "o"
    cli_ok(capsys, quick_quantize(tiny_model_dir, out))
    (out / "notes.md").write_text("my notes")
    before = folder_digest(out)
    line = cli_error(capsys, quick_quantize(tiny_model_dir, out), "holds files safeptq did not write (notes.md)")
    assert "--overwrite" in line and folder_digest(out) == before
    cli_ok(capsys, quick_quantize(tiny_model_dir, out, "--overwrite"))
    assert not (out / "notes.md").exists() and (out / "quantize.json").is_file()


# -- 4. exclusive runs --------------------------------------------------------------------------------------
def test_a_held_lock_refuses_and_a_stale_one_is_taken_over(tiny_model_dir, tmp_path, data, capsys, caplog):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import time,sys; from safeptq.runs import FolderLock; "
                               f"FolderLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cli_error(capsys, quick_quantize(tiny_model_dir, out), "is in use by another safeptq run (pid")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".o.lock").exists()  # killed: its lock is stale now
    cli_ok(capsys, quick_quantize(tiny_model_dir, out))
    assert "stale lock" in caplog.text and not (tmp_path / ".o.lock").exists()


# -- 5. identity by content ---------------------------------------------------------------------------------
def test_resume_refuses_a_model_retrained_in_place(tmp_path, data, capsys, monkeypatch):
    from safeptq.cli.main import main
    from safeptq.errors import ExportError

    model = save_tiny_model(tmp_path / "m")
    argv = quick_quantize(model, tmp_path / "o", "--work-dir", tmp_path / "w")
    with monkeypatch.context() as m:
        break_phase(m, "export", ExportError("disk full"))
        assert main([str(a) for a in argv]) == 2
    capsys.readouterr()
    assert (tmp_path / "w" / "state.pt").is_file()
    save_tiny_model(tmp_path / "m", seed=1)  # retrained into the same folder
    cli_error(capsys, [*argv, "--resume"], "was made with another recipe, model or calibration set")


# -- 6. compare pairs only runs judged the same way --------------------------------------------------------
def test_compare_refuses_runs_evaluated_differently(tiny_model_dir, tmp_path, data, capsys):
    common = ["eval", "--model", tiny_model_dir, "--suite", "advbench:eval", "--limit", "3", "--no-progress"]
    cli_ok(capsys, [*common, "--max-new-tokens", "1", "--no-chat-template", "--out", tmp_path / "a.json"])
    cli_ok(capsys, [*common, "--max-new-tokens", "4", "--out", tmp_path / "b.json"])
    cli_error(capsys, ["compare", tmp_path / "a.json", tmp_path / "b.json"],
              "evaluated differently (max_new_tokens, chat_template")
    (tmp_path / "b.samples.jsonl").write_text((tmp_path / "a.samples.jsonl").read_text())  # swapped samples
    cli_ok(capsys, [*common, "--max-new-tokens", "4", "--out", tmp_path / "c.json"])
    (tmp_path / "c.samples.jsonl").write_text((tmp_path / "a.samples.jsonl").read_text())
    cli_error(capsys, ["compare", tmp_path / "c.json", tmp_path / "b.json"], "is not the one its results were written")


# -- 7. load integrity ----------------------------------------------------------------------------------------
def test_a_checkpoint_missing_tensors_or_naming_another_architecture_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    m = save_tiny_model(tmp_path / "m")
    t = load_file(str(m / "model.safetensors"))
    t.pop("model.layers.1.mlp.down_proj.weight")
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    cli_error(capsys, ["eval", "--model", m, "--suite", "advbench:eval"], "lacks model.layers.1.mlp.down_proj.weight")
    cli_error(capsys, quick_quantize(m, tmp_path / "o"), "refusing to fill them with random weights")
    assert not (tmp_path / "o").exists()
    m2 = save_tiny_model(tmp_path / "m2")
    cfg = json.loads((m2 / "config.json").read_text())
    (m2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    cli_error(capsys, ["eval", "--model", m2, "--suite", "advbench:eval"], "lacks lm_head.weight")


# -- 8. caches -----------------------------------------------------------------------------------------------
def test_a_corrupted_reference_cache_is_detected(tmp_path):
    from safeptq.data.calib import CalibSet
    from safeptq.errors import DataError
    from safeptq.objectives import ReferenceCache
    from safeptq.objectives.kl import TopK

    ids = torch.randint(0, 50, (2, 5))
    calib = CalibSet(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(2, dtype=torch.long),
                     last_idx=torch.full((2,), 4), sources=["x", "x"])
    topk = TopK(torch.randint(0, 50, (2, 5, 4)), torch.randn(2, 5, 4).log_softmax(-1))
    from safeptq.objectives.references import calib_digest

    cache = ReferenceCache({"instruct": topk}, {}, 4, {"instruct": "m"}, calib_digest(calib))
    path = cache.save(tmp_path / "refs.pt")
    ReferenceCache.load(path, calib, 4, {"instruct": "m"})
    blob = torch.load(path, weights_only=True)
    blob["topk"]["instruct"]["logp"][0, 0, 0] += 1.0  # one changed number, a valid file
    torch.save(blob, path)
    with pytest.raises(DataError, match="is corrupted"):
        ReferenceCache.load(path, calib, 4, {"instruct": "m"})


def test_a_half_written_probe_cache_entry_is_rebuilt(tiny_model_dir, data, caplog):
    from safeptq.models import load_model
    from safeptq.probes.workflow import ProbeSpec, get_probes

    lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    spec = ProbeSpec(limit=12, seqlen=16)
    probes, folder = get_probes(lm.model, lm.tokenizer, lm.path, spec)
    (folder / "probes.safetensors").write_bytes(b"\x00" * 10)  # a killed writer's leftovers
    again, _ = get_probes(lm.model, lm.tokenizer, lm.path, spec)
    assert "rebuilding the probe cache entry" in caplog.text
    assert torch.equal(again.coef, probes.coef)


# -- 9/10. bad input: one line, exit 2, before the heavy work ---------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--eval", "advbench:eval", "--data-dir", "/no/such/dir"], "--data-dir /no/such/dir is not a folder"),
    (["--calib", "harmful:/no/such.jsonl"], "/no/such.jsonl"),
    (["--device", "cuda:7"], "cuda"),
    (["--lr-lwc", "nan"], "--lr-lwc must be a finite number"),
    (["--epochs", "-1"], "--epochs must be N or A,B"),
])
def test_quantize_bad_input_before_loading(tiny_model_dir, tmp_path, data, capsys, monkeypatch, extra, needle):
    import safeptq.models

    if needle == "cuda" and torch.cuda.device_count() > 7:
        pytest.skip("has 8 CUDA devices")
    monkeypatch.setattr(safeptq.models, "load_model", lambda *a, **k: pytest.fail("loaded before checking"))
    cli_error(capsys, quick_quantize(tiny_model_dir, tmp_path / "o", *extra), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, needle", [
    (["realign", "--scheme", "w8a8", "--probe-c", "nan"], "--probe-c must be a finite number"),
    (["realign", "--scheme", "w8a8", "--benign-anchor", "nan"], "--benign-anchor must be a finite number"),
    (["aaq", "--scheme", "w4a8", "--base", "B", "--tau", "nan"], "--tau must be 'ref' or a positive number"),
])
def test_nan_is_refused(tiny_model_dir, tmp_path, capsys, argv, needle):
    cli_error(capsys, [*argv, "--model", tiny_model_dir, "--out", tmp_path / "o"], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_broken_files_are_one_line_errors(tmp_path, data, capsys):
    m = save_tiny_model(tmp_path / "trunc")
    blob = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    cli_error(capsys, ["eval", "--model", m, "--suite", "advbench:eval"], "cannot load model")
    t = save_tiny_model(tmp_path / "notok")
    for f in t.glob("tokenizer*"):
        f.unlink()
    cli_error(capsys, ["eval", "--model", t, "--suite", "advbench:eval"], "cannot load a tokenizer")
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 13)  # a GGUF header cut short
    cli_error(capsys, ["eval", "--model", gguf, "--suite", "advbench:eval"], "cut.gguf")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": broken\n')
    good = save_tiny_model(tmp_path / "good")
    cli_error(capsys, quick_quantize(good, tmp_path / "o", "--calib", f"harmful:{bad}"), "bad.jsonl")
    w = tmp_path / "o2.work"
    w.mkdir()
    (w / ".safeptq-work.json").write_text("{}")
    (w / "state.pt").write_bytes(b"not a checkpoint")
    cli_error(capsys, quick_quantize(good, tmp_path / "o2", "--resume"), "cannot be read")


def test_aaq_warns_when_training_cannot_change_the_export(tmp_path, data, capsys, caplog):
    pytest.importorskip("llmcompressor")
    m = save_tiny_model(tmp_path / "m")
    cli_ok(capsys, ["aaq", "--model", m, "--objective", "kl_top", "--scheme", "w4a8", "--rotation", "off",
                    "--smoothing", "off", "--nsamples", "4", "--seqlen", "16", "--calib-replies", "0",
                    "--steps", "2", "--topk", "16", "--out", tmp_path / "o", "--no-progress"])
    assert "change nothing in the exported model" in caplog.text
    assert any("change nothing" in n for n in json.loads((tmp_path / "o" / "aaq.json").read_text())["notes"])
