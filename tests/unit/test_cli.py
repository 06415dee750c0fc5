"""``safeptq`` entry point and ``safeptq eval`` errors: one line, exit 2, the culprit named, before loading."""

import json
import subprocess
import sys

import pytest

from conftest import cli_error, cli_ok


def test_entry_point_and_help_for_every_subcommand(capsys):
    r = subprocess.run([sys.executable, "-m", "safeptq", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "eval" in r.stdout and "quantize" in r.stdout
    from safeptq.cli.main import COMMANDS, main

    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd.name, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and f"usage: safeptq {cmd.name}" in out and len(out) > 150


def test_error_missing_model(capsys):
    cli_error(capsys, ["eval", "--model", "./no/such/model", "--suite", "advbench:eval"],
              "model not found: ./no/such/model")


def test_error_unknown_suite(tiny_model_dir, capsys):
    cli_error(capsys, ["eval", "--model", tiny_model_dir, "--suite", "advbench:eval,harmbnch"], "unknown suite 'harmbnch'")


def test_error_file_without_column(tiny_model_dir, tmp_path, capsys):
    p = tmp_path / "prompts.csv"
    p.write_text("a,b\n1,2\n")
    cli_error(capsys, ["eval", "--model", tiny_model_dir, "--suite", f"{p}@prompt"], "has no column 'prompt'")


def test_error_no_chat_template(tiny_model_no_template, capsys):
    cli_error(capsys, ["eval", "--model", tiny_model_no_template, "--suite", "advbench:eval"], "has no chat template")


def test_eval_writes_json_and_never_leaves_stale_samples(tiny_model_dir, tmp_path, shared_data, capsys):
    out = tmp_path / "r.json"
    printed = cli_ok(capsys, ["eval", "--model", tiny_model_dir, "--suite", "advbench:eval,sst2", "--limit", "2",
                              "--max-new-tokens", "4", "--data-dir", shared_data, "--out", out, "--no-progress"])
    doc = json.loads(out.read_text())
    assert doc["model"] == str(tiny_model_dir) and doc["config"]["max_new_tokens"] == 4
    assert set(doc["suites"]["advbench:eval"]) >= {"harmful_rate", "refusal_rate", "ci95", "n"}
    assert set(doc["suites"]["sst2"]) >= {"accuracy", "ci95", "n"}
    assert (tmp_path / "r.samples.jsonl").exists() and doc["samples_file"]["name"] == "r.samples.jsonl"
    assert "harmful_rate" in printed
    # a later run without per-prompt samples removes the old samples file instead of leaving it to be paired
    cli_ok(capsys, ["eval", "--model", tiny_model_dir, "--suite", "sst2", "--limit", "2", "--max-new-tokens", "4",
                    "--data-dir", shared_data, "--out", out, "--no-progress"])
    assert not (tmp_path / "r.samples.jsonl").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--limit", "0"], "--limit must be positive"),
    (["--limit", "-3"], "--limit must be positive"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--context-length", "1"], "--context-length must be at least 2"),
    (["--ppl-windows", "0"], "--ppl-windows must be positive"),
    (["--judge", "gpt4"], "--judge 'gpt4': use keyword or FORMAT=MODEL"),
    pytest.param(["--device", "cuda:7"], "cuda", marks=pytest.mark.skipif(
        __import__("torch").cuda.device_count() > 7, reason="has 8 CUDA devices")),
    (["--data-dir", "/no/such/dir"], "--data-dir /no/such/dir is not a folder"),
])
def test_eval_bad_input_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch, argv, needle):
    import safeptq.models

    monkeypatch.setattr(safeptq.models, "load_model", lambda *a, **k: pytest.fail("loaded before checking"))
    monkeypatch.setenv("SAFEPTQ_DATA", "/no/such/dir")
    base = ["eval", "--model", tiny_model_dir, "--suite", "advbench:eval"]
    cli_error(capsys, [*base[:-2], *(argv if "--suite" in argv else [*base[-2:], *argv])], needle)


def test_eval_out_that_is_a_folder_is_refused_before_generation(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import safeptq.models

    monkeypatch.setattr(safeptq.models, "load_model", lambda *a, **k: pytest.fail("loaded before checking"))
    cli_error(capsys, ["eval", "--model", tiny_model_dir, "--suite", "advbench:eval", "--out", tmp_path],
              "is a folder")


def test_sigterm_handler_lets_forked_workers_die_quietly():
    """Worker processes forked by datasets / lm-eval inherit the handler; a SIGTERM that their pool sends at
    shutdown must end them as the default action does, not raise KeyboardInterrupt with a traceback."""
    import multiprocessing
    import os
    import signal

    from safeptq.cli.main import _sigterm_as_interrupt

    old = signal.getsignal(signal.SIGTERM)
    try:
        _sigterm_as_interrupt()
        ctx = multiprocessing.get_context("fork")
        p = ctx.Process(target=lambda: (os.kill(os.getpid(), signal.SIGTERM), __import__("time").sleep(5)))
        p.start()
        p.join(10)
        assert p.exitcode == -signal.SIGTERM  # killed by the signal, not an exception exit (1)
    finally:
        signal.signal(signal.SIGTERM, old)
