import json
import subprocess
import sys

import pytest

from safeptq.cli.main import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "safeptq", *args], capture_output=True, text=True)


def test_help_for_every_subcommand():
    r = run_cli("--help")
    assert r.returncode == 0 and "eval" in r.stdout
    for sub in ("eval", "ls"):
        h = run_cli(sub, "--help")
        assert h.returncode == 0 and "usage: safeptq " + sub in h.stdout and len(h.stdout) > 150


def _one_line_error(r, needle):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("safeptq: error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_error_missing_model():
    _one_line_error(run_cli("eval", "--model", "./no/such/model", "--suite", "advbench:eval"),
                    "model not found: ./no/such/model")


def test_error_unknown_suite(tiny_model_dir):
    _one_line_error(run_cli("eval", "--model", str(tiny_model_dir), "--suite", "advbench:eval,harmbnch"),
                    "unknown suite 'harmbnch'")


def test_error_file_without_column(tiny_model_dir, tmp_path):
    p = tmp_path / "prompts.csv"
    p.write_text("a,b\n1,2\n")
    _one_line_error(run_cli("eval", "--model", str(tiny_model_dir), "--suite", f"{p}@prompt"),
                    "has no column 'prompt'")


def test_error_no_chat_template(tiny_model_no_template):
    _one_line_error(run_cli("eval", "--model", str(tiny_model_no_template), "--suite", "advbench:eval"),
                    "has no chat template")


def test_eval_writes_json(tiny_model_dir, tmp_path, shared_data, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_model_dir), "--suite", "advbench:eval,sst2", "--limit", "2",
               "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == str(tiny_model_dir)
    assert set(doc["suites"]["advbench:eval"]) >= {"harmful_rate", "refusal_rate", "ci95", "n"}
    assert set(doc["suites"]["sst2"]) >= {"accuracy", "ci95", "n"}
    assert (tmp_path / "r.samples.jsonl").exists()
    assert "harmful_rate" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["0", "-3"])
def test_error_bad_limit(tiny_model_dir, bad):
    _one_line_error(run_cli("eval", "--model", str(tiny_model_dir), "--suite", "advbench:eval", "--limit", bad),
                    "--limit must be positive")
