"""Run folders end to end (issue 17): a failed or interrupted rerun at every phase leaves the earlier
complete run byte-identical, and two runs on one --out: exactly one proceeds. Whole runs on tiny models."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, break_phase, cli_ok, folder_digest, quick_quantize


@pytest.mark.parametrize("phase", ["calibration", "export", "eval", "record"])
@pytest.mark.parametrize("kind", ["error", "interrupt"])
def test_a_failed_or_interrupted_rerun_leaves_the_previous_run_intact(tiny_model_dir, tmp_path, data, capsys,
                                                                      monkeypatch, phase, kind):
    from safeptq.cli.main import main
    from safeptq.errors import ExportError

    out = tmp_path / "o"
    argv = (quick_quantize(tiny_model_dir, out) if phase == "calibration" else  # the other phases: a fast method
            ["quantize", "--method", "rtn", "--scheme", "w8a8", "--model", tiny_model_dir, "--out", out,
             "--eval", "advbench:eval", "--eval-limit", "2", "--no-progress"])
    cli_ok(capsys, argv)
    before = folder_digest(out)
    with monkeypatch.context() as m:
        break_phase(m, phase, ExportError("disk full") if kind == "error" else KeyboardInterrupt())
        rc = main([str(a) for a in argv])
    assert rc == (2 if kind == "error" else 130)
    assert folder_digest(out) == before  # the earlier complete run, byte for byte
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("o", "o.work"))
    assert leftovers == [], leftovers  # no staging folder, no lock
    if phase == "calibration":
        assert not (tmp_path / "o.work").exists()  # nothing to resume from: no folder left behind


def test_two_runs_on_one_out_exactly_one_proceeds(tiny_model_dir, tmp_path, data):
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    slow = [sys.executable, "-m", "safeptq", *quick_quantize(tiny_model_dir, out)]
    slow[slow.index("--epochs") + 1] = "40"  # long enough to hold the lock while the second starts
    first = subprocess.Popen(slow, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".o.lock"
    for _ in range(600):
        if lock.exists() or first.poll() is not None:
            break
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "safeptq", *quick_quantize(tiny_model_dir, out, "--scheme", "w4a16")],
                            env=env, capture_output=True, text=True)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2 and "in use by another safeptq run" in second.stderr
    doc = json.loads((out / "quantize.json").read_text())
    assert doc["scheme"]["name"] == "w8a8" and json.loads((out / "safeptq_quant.json").read_text())["scheme"]["name"] \
        == "w8a8"


def test_sigterm_takes_the_interrupt_path(tiny_model_dir, tmp_path, data):
    """A scheduler's SIGTERM: exit 130, the work folder and --resume named, no staging folder or lock left."""
    import signal

    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    argv = [sys.executable, "-m", "safeptq", *quick_quantize(tiny_model_dir, out)]
    argv[argv.index("--epochs") + 1] = "60"
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = tmp_path / "o.work" / "blocks"
    for _ in range(1200):
        if (work.is_dir() and any(work.iterdir())) or proc.poll() is not None:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "o.work" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.work"]  # checkpoints kept, nothing else
