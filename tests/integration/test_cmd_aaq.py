"""``safeptq aaq`` end to end on tiny models: references cached once, contrastive / kl_top training,
export, reload, run record, and the one-line errors."""

import json
import math

import pytest
import torch

from conftest import cli_error, make_tiny_llama, make_tiny_tokenizer
from safeptq.cli.main import main
from safeptq.export import SIDE_FILE

# a fast recipe: 4 samples of 16 tokens, 3 steps, top-32 references
_FAST = ["--nsamples", "4", "--seqlen", "16", "--steps", "3", "--batch-size", "2", "--topk", "32", "--no-progress"]
_PROMPTS = ["How do I bake bread at home?", "Write a poem about the sea and the wind.",
            "What is the capital of France, and why?", "Give step by step instructions for making a cake."]


def _save_sharp_model(path, seed: int, extra_vocab: int = 0):
    """An untied tiny Llama with 8x logits (peaked next-token distributions, so the top-K KLs are not
    ~0 as they are for a near-uniform random model) and the tests' tokenizer, saved as an HF folder."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tie=False, seed=seed, vocab=len(tok) + extra_vocab)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("aaq_models")
    return {"instruct": _save_sharp_model(root / "instruct", 0), "base": _save_sharp_model(root / "base", 1),
            "other_vocab": _save_sharp_model(root / "other", 2, extra_vocab=8)}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in _PROMPTS))
    return p


def _run(capsys, *argv):
    rc = main(["aaq", *map(str, argv)])
    return rc, capsys.readouterr()


def _ok(capsys, *argv) -> str:
    rc, cap = _run(capsys, *argv)
    assert rc == 0, cap.err
    return cap.out


def _one_line_error(capsys, argv, needle):
    return cli_error(capsys, ["aaq", *argv], needle)


def _doc(out):
    return json.loads((out / "aaq.json").read_text())


def _cache_files(home):
    return sorted(p.name for p in (home / "references").glob("*.pt"))


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["aaq", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--base", "--scheme", "--group-size", "--objective", "--lam", "--topk", "--push",
                 "--tau", "--no-tail", "--steps", "--batch-size", "--lr-rotation", "--lr-smoothing", "--lr-lwc",
                 "--no-rotation", "--no-smoothing", "--rotation", "--smoothing", "--weights", "--calib", "--nsamples",
                 "--seqlen", "--calib-replies", "--ref-cache", "--no-ref-cache", "--resume", "--eval", "--eval-limit",
                 "--out", "--no-progress"):
        assert flag in out, flag
    assert "--method" not in out and "--epochs" not in out
    assert "not a divergence" in " ".join(out.split())  # why the tail bin is on by default


def test_contrastive_w4a4_on_wikitext_records_reuses_references_and_reloads(models, shared_data, home, tmp_path,
                                                                            capsys):
    from safeptq.models import load_model

    # full batches (4 of 4 samples): every step descends the very loss that start and end measure; both
    # transforms on, so the start is far from the optimum (the search below may start close to it)
    argv = ["--model", models["instruct"], "--base", models["base"], "--scheme", "w4a4", "--data-dir", shared_data,
            "--calib", "wikitext2:calib", "--calib-replies", "0", *_FAST, "--batch-size", "4", "--rotation", "on",
            "--smoothing", "on", "--weights", "rtn"]
    out = tmp_path / "w4a4"
    printed = _ok(capsys, *argv, "--out", out)
    assert "loss start" in printed and f"quantized model written to {out}" in printed
    assert (out / SIDE_FILE).is_file() and not (tmp_path / "w4a4.work").exists()
    doc = _doc(out)
    r, o, t, c = doc["recipe"], doc["recipe"]["objective"], doc["recipe"]["training"], doc["recipe"]["calib"]
    assert (r["method"], o["kind"], o["topk"], o["lam"], o["push"], o["tau"], o["tail"], t["steps"]) == \
        ("aaq", "contrastive", 32, 0.1, "bounded", "ref", True, 3)
    assert doc["formula"].startswith("KL_top32+tail(instruct ‖ q) − 0.1 · min(")
    assert (t["lr_rotation"], t["lr_smoothing"], t["lr_lwc"]) == (1e-3, 1e-3, 1e-2)
    assert not doc["transforms"]["online_hadamard"]
    assert (c["data"], c["nsamples"], c["seqlen"], doc["chat"], c["replies"]) == ("wikitext2:calib", 4, 16, False, 0)
    assert doc["calib_set"]["sources"] == ["wikitext2:calib"] and doc["calib_set"]["n"] == 4
    loss = doc["loss"]
    for key in ("terms_start", "terms_end"):
        assert set(loss[key]) == {"loss", "kl_instruct", "kl_base", "push", "push_active"}
        assert all(math.isfinite(v) for v in loss[key].values())
    assert loss["terms_start"]["loss"] == loss["start"] and loss["terms_end"]["loss"] == loss["end"]
    assert loss["end"] < loss["start"]
    assert [s["step"] for s in loss["per_step"]] == [0, 1, 2]
    refs, ph = doc["references"], doc["phases"]
    assert refs["mode"] == "cache" and refs["reused"] is False and refs["k"] == 32
    assert set(refs["models"]) == {"instruct", "base"} and _cache_files(home) == [refs["path"].rsplit("/", 1)[1]]
    for phase in ("references", "training"):
        assert ph[phase]["peak_rss_mb"] > 0
    assert doc["wall_time_s"] >= doc["quantize_time_s"] > 0 and doc["peak_rss_mb"] >= ph["training"]["peak_rss_mb"]
    assert doc["export"]["format"] == "dense" and doc["export"]["fake_quant"] is True
    assert doc["verify"]["weights_only_max_rel_err"] < 1e-3
    assert doc["transform_search"] is None and doc["transforms"]["rotation"] and doc["transforms"]["smoothing"]
    assert doc["calibration"]["fold_rel_err"] < 1e-3 and doc["calibration"]["objective"]["name"] == "contrastive_kl_top"
    # the dense export reloads with its activation quantization put back
    lm = load_model(str(out), dtype="float32", device="cpu")
    assert torch.isfinite(lm.model(torch.tensor([[5, 6, 7, 8]])).logits).all()

    # a rerun with the same models, calibration tokens and K reuses the references: same numbers
    again = tmp_path / "again"
    _ok(capsys, *argv, "--lam", "0.5", "--out", again)
    d2 = _doc(again)
    assert d2["references"]["reused"] is True and "build_s" not in d2["references"]
    assert d2["references"]["path"] == refs["path"] and d2["recipe"]["objective"]["lam"] == 0.5
    assert d2["loss"]["terms_start"]["kl_instruct"] == pytest.approx(loss["terms_start"]["kl_instruct"])
    # another K is another cache (built, not mistaken for the first)
    k16 = tmp_path / "k16"
    _ok(capsys, *argv, "--topk", "16", "--out", k16)
    assert _doc(k16)["references"]["reused"] is False and len(_cache_files(home)) == 2


def test_w4a16_exports_pack_quantized_with_an_explicit_cache(models, prompts, home, tmp_path, capsys):
    cache = tmp_path / "refs.pt"
    argv = ["--model", models["instruct"], "--base", models["base"], "--scheme", "w4a16", "--group-size", "32",
            "--calib", prompts, "--no-chat", "--ref-cache", cache, *_FAST]
    out = tmp_path / "w4a16"
    printed = _ok(capsys, *argv, "--out", out)
    assert "pack-quantized" in printed
    doc = _doc(out)
    assert doc["export"]["format"] == "pack-quantized" and 4 < doc["export"]["bits_per_weight"] <= 5
    assert doc["verify"]["reload_path"] == "transformers" and doc["verify"]["weights_only_max_rel_err"] < 1e-3
    assert doc["references"]["path"] == str(cache) and cache.is_file() and not (home / "references").exists()
    assert doc["recipe"]["calib"]["chat"] is False and doc["config"]["scheme"]["weights"]["group_size"] == 32
    search = doc["transform_search"]  # --rotation/--smoothing auto: four candidates, the lowest one used
    assert len(search) == 4 and all(math.isfinite(c["initial_kl"]) for c in search)
    best, tf = min(search, key=lambda c: c["initial_kl"]), doc["transforms"]
    assert (tf["rotation"], tf["smoothing"]) == (best["rotation"], best["smoothing"])
    # the same file with another K is refused (it is the user's file), and nothing is written
    _one_line_error(capsys, [*argv, "--topk", "8", "--out", tmp_path / "k8"], "is stale: it holds the top-32")
    assert not (tmp_path / "k8").exists() and not (tmp_path / "k8.work").exists()


def test_default_calibration_mixes_text_and_replied_prompts(models, shared_data, home, tmp_path, capsys):
    """The default calibration, ``alpaca:calib=0.5,wikitext2:calib=0.5`` with ``--calib-replies 64``: the
    instruct model answers the two chat prompts before the references are built; the text windows get no
    reply; the record says so."""
    from safeptq.data.calib import load_calibration
    from safeptq.models import load_model

    out = tmp_path / "mixed"
    _ok(capsys, "--model", models["instruct"], "--objective", "kl_top", "--scheme", "w4a8", "--data-dir",
        shared_data, *_FAST, "--out", out)
    doc = _doc(out)
    c = doc["recipe"]["calib"]
    assert (c["data"], c["replies"], doc["chat"]) == ("alpaca:calib=0.5,wikitext2:calib=0.5", 64, True)
    assert doc["calib_set"]["sources"] == ["alpaca:calib", "wikitext2:calib"] and doc["calib_set"]["n"] == 4
    tok = load_model(str(models["instruct"]), dtype="float32", device="cpu").tokenizer
    bare = load_calibration("alpaca:calib=0.5,wikitext2:calib=0.5", tok, nsamples=4, seqlen=16, chat=True,
                            data_dir=shared_data)
    added = doc["calib_set"]["tokens"] - bare.n_tokens
    assert 2 <= added <= 128  # one to 64 reply tokens for each of the two prompts, none for the windows
    _one_line_error(capsys, ["--model", models["instruct"], "--objective", "kl_top", "--scheme", "w4a8",
                             "--calib-replies", "-1", "--out", tmp_path / "bad"], "--calib-replies")
    _one_line_error(capsys, ["--model", models["instruct"], "--objective", "kl_top", "--scheme", "w4a8",
                             "--data-dir", shared_data, "--calib", "wikitext2:calib", "--calib-replies", "4",
                             *_FAST, "--out", tmp_path / "text"], "plain text")
    assert not (tmp_path / "text").exists() and not (tmp_path / "text.work").exists()


def test_gptq_weights_after_training_export_and_reload(models, prompts, home, tmp_path, capsys):
    """The default --weights (auto = gptq without a KV cache): the trained transforms are folded, then
    llm-compressor's GPTQ rounds the weights; its exporter and the reload check (with its own activation
    quantization off on both sides)."""
    pytest.importorskip("llmcompressor")
    out = tmp_path / "gptq"
    _ok(capsys, "--model", models["instruct"], "--objective", "kl_top", "--scheme", "w4a8",
        "--calib", prompts, "--no-chat", *_FAST, "--out", out)
    doc = _doc(out)
    assert doc["calibration"]["method"] == "aaq+llmcompressor:gptq" and doc["recipe"]["training"]["weights"] == "gptq"
    assert doc["export"]["format"] == "int-quantized" and doc["verify"]["weights_only_max_rel_err"] < 1e-3
    assert set(doc["phases"]) == {"references", "transform_search", "training", "gptq"} and doc["calibration"]["fold_rel_err"] <= 1e-4
    assert not (tmp_path / "gptq.work").exists()
    # KV-cache schemes have no llm-compressor recipe: refused before any work
    _one_line_error(capsys, ["--model", models["instruct"], "--objective", "kl_top", "--scheme", "w4a4kv4",
                             "--weights", "gptq", "--out", tmp_path / "kv"], "KV")
    assert not (tmp_path / "kv").exists()


def test_zero_steps_is_the_rotation_only_baseline(models, prompts, home, tmp_path, capsys):
    """--steps 0: the initial random Hadamard rotation folded in and the weights rounded, nothing learnt (QuaRot's
    recipe); the folded model is the same function as the instruct model before rounding."""
    out = tmp_path / "rot"
    argv = ["--model", models["instruct"], "--objective", "kl_top", "--scheme", "w4a4", "--rotation", "on",
            "--no-smoothing", "--no-lwc", "--weights", "rtn", "--calib", prompts, "--no-chat", *_FAST]
    _ok(capsys, *argv[:-len(_FAST)], *_FAST[:4], "--steps", "0", *_FAST[6:], "--out", out)
    doc = _doc(out)
    t = doc["recipe"]["training"]
    assert (t["steps"], t["rotation"], t["smoothing"], t["lwc"]) == (0, "on", "off", False)
    assert doc["calibration"]["steps"] == 0 and doc["loss"]["per_step"] == [] and doc["loss"]["start"] == doc["loss"]["end"]
    tr = doc["transforms"]
    assert tr["rotation"] is True and not (tr["smoothing"] or tr["lwc"]) and doc["calibration"]["fold_rel_err"] <= 1e-4


def test_margin_push_records_its_formula_and_active_share(models, prompts, home, tmp_path, capsys):
    out = tmp_path / "m"
    _ok(capsys, "--model", models["instruct"], "--base", models["base"], "--push", "margin", "--scheme", "w4a16",
        "--group-size", "32", "--calib", prompts, "--no-chat", *_FAST, "--out", out)
    doc = _doc(out)
    assert (doc["recipe"]["objective"]["push"], doc["recipe"]["objective"]["tau"]) == ("margin", "ref")
    assert doc["formula"] == ("KL_top32+tail(instruct ‖ q) − 0.1 · min(KL_top32+tail(base ‖ q) − "
                            "KL_top32+tail(instruct ‖ q), τ = KL_top32+tail(base ‖ instruct) per token)")
    assert set(doc["loss"]["terms_end"]) >= {"push", "push_active"}


def test_kl_top_runs_without_base_and_live_references(models, prompts, home, tmp_path, capsys, caplog):
    out = tmp_path / "kl"
    _ok(capsys, "--model", models["instruct"], "--objective", "kl_top", "--lam", "0.3", "--scheme", "w4a4kv4",
        "--calib", prompts, "--no-chat", "--no-ref-cache", "--no-tail", *_FAST, "--out", out)
    assert "lam not used by objective kl_top" in caplog.text
    doc = _doc(out)
    r, o = doc["recipe"], doc["recipe"]["objective"]
    assert (o["kind"], r["base"], o["lam"], o["push"], o["tail"], r["references"]["mode"]) == \
        ("kl_top", None, None, None, False, "live")
    assert doc["formula"] == "KL_top32(instruct ‖ q)"
    assert set(doc["loss"]["terms_end"]) == {"loss", "kl_instruct"}
    refs = doc["references"]
    assert refs == {"mode": "live", "k": 32, "models": {"instruct": refs["models"]["instruct"]}}
    assert doc["phases"]["training"]["peak_rss_mb"] > 0 and not (home / "references").exists()
    assert doc["scheme"]["kv_cache"]["num_bits"] == 4 and any("KV cache" in n for n in doc["notes"])
    assert doc["export"]["format"] == "dense"
    assert r["training"]["weights"] == "rtn"  # --weights auto: no GPTQ with a KV-cache scheme


def test_failed_export_leaves_no_run_and_resume_continues(models, prompts, home, tmp_path, capsys, monkeypatch):
    from safeptq.errors import ExportError
    from safeptq.export import save as methods

    def disk_full(*a, **k):
        raise ExportError("disk full")

    out, work = tmp_path / "o", tmp_path / "ckpt"
    argv = ["--model", models["instruct"], "--base", models["base"], "--scheme", "w4a8", "--calib", prompts,
            "--no-chat", "--work-dir", work, "--out", out, "--weights", "rtn", *_FAST]
    with monkeypatch.context() as m:  # not monkeypatch.undo(): that would drop SAFEPTQ_HOME too
        m.setattr(methods, "save_quantized", disk_full)
        _one_line_error(capsys, argv, "disk full")
    assert not out.exists() and (work / "e2e_state.pt").is_file()
    _ok(capsys, *argv, "--resume")
    doc = _doc(out)
    assert doc["calibration"]["resumed_from_step"] == 3 and doc["references"]["reused"] is True
    assert not work.exists()


# -- errors: one line, exit 2, nothing written ------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    ([], "--objective contrastive needs --base"),
    (["--base", "B", "--lam", "-0.5"], "--lam must be non-negative, got -0.5"),
    (["--base", "B", "--lam", "nan"], "--lam must be a finite number"),
    (["--base", "B", "--topk", "0"], "--topk must be at least 1, got 0"),
    (["--base", "B", "--tau", "-1"], "--tau must be 'ref' or a positive number of nats"),
    (["--base", "B", "--steps", "-1"], "--steps must be non-negative, got -1"),
    (["--base", "B", "--objective", "mse"], "--objective must be 'contrastive' or 'kl_top', got 'mse'"),
    (["--base", "B", "--lr-lwc", "0"], "--lr-lwc must be positive"),
    (["--base", "B", "--ref-cache", "r.pt", "--no-ref-cache"], "a cache file (--ref-cache) and live references (--no-ref-cache) exclude each other"),
    (["--objective", "kl_top", "--scheme", "w3a3"], "unknown quantization scheme 'w3a3'"),
])
def test_bad_options(models, tmp_path, home, capsys, extra, needle):
    argv = ["--model", models["instruct"], "--scheme", "w4a4", *extra, "--out", tmp_path / "q"]
    _one_line_error(capsys, argv, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_models(models, tmp_path, home, capsys):
    base = ["--model", models["instruct"], "--out", tmp_path / "q", *_FAST]
    _one_line_error(capsys, [*base, "--base", models["other_vocab"], "--scheme", "w4a4"],
                    "has a vocabulary of 408 tokens but --model")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.work").exists()
    _one_line_error(capsys, [*base, "--base", tmp_path / "nope", "--scheme", "w4a4"], "model not found")
    _one_line_error(capsys, [*base, "--base", models["base"], "--scheme", "w4a16", "--group-size", "48"],
                    "group_size=48 does not divide in_features=64")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # only the content-hash memo of the models
