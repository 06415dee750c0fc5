"""``safeptq demo`` end to end on tiny stand-ins for the organism (seconds): every stage runs once, a second call
resumes without redoing finished work, a failed stage is picked up where it stopped, and foreign folders are refused."""

import pytest

from conftest import cli_error, save_tiny_model
from safeptq.demo import DemoOptions, run_demo

FAST = {"nsamples": 4, "seqlen": 16}


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    root = tmp_path_factory.mktemp("organism")
    save_tiny_model(root / "aligned")
    save_tiny_model(root / "attacked", seed=1)
    save_tiny_model(root / "base", seed=2)
    return root


def _opts(organism, out, shared_data):
    return DemoOptions(out=out, organism=organism, limit=2, ppl_windows=1, base=str(organism / "base"),
                       data_dir=str(shared_data), progress=False,
                       realign_overrides={**FAST, "epochs": 1, "sep_limit": 4},
                       aaq_overrides={**FAST, "steps": 2, "topk": 16, "replies": 0, "calib": "wikitext2:calib",
                                      "weights": "rtn"})


def test_demo_runs_to_the_report_and_resumes(organism, shared_data, tmp_path, monkeypatch):
    import safeptq.api

    out = tmp_path / "demo"
    real_aaq = safeptq.api.aaq

    def broken(*a, **k):
        raise RuntimeError("stopped")

    monkeypatch.setattr(safeptq.api, "aaq", broken)
    said = []
    with pytest.raises(RuntimeError, match="stopped"):
        run_demo(_opts(organism, out, shared_data), say=said.append)
    assert (out / "realign-w8a8" / "realign.json").is_file() and not (out / "report.html").exists()
    stamp = (out / "realign-w8a8" / "realign.json").stat().st_mtime_ns

    monkeypatch.setattr(safeptq.api, "aaq", real_aaq)
    said.clear()
    res = run_demo(_opts(organism, out, shared_data), say=said.append)
    assert res["stages"] == {"organism": "cached", "attacked": "done", "rtn-w8a8": "done", "realign-w8a8": "done",
                             "aligned": "done", "aaq-w4a8": "ran", "report": "ran"}
    assert any("estimated:" in ln for ln in said) and any(ln.startswith("[6/7] done in") for ln in said)
    assert (out / "realign-w8a8" / "realign.json").stat().st_mtime_ns == stamp  # finished work is not redone
    html = res["report"].read_text()
    for name in ("attacked", "RTN W8A8", "Q-realign W8A8", "aligned", "AAQ W4A8"):
        assert f"</span>{name}" in html
    assert [r["run"] for r in res["rows"]] == ["attacked", "RTN W8A8", "Q-realign W8A8", "aligned", "AAQ W4A8"]
    assert all(set(r) >= {"advbench:eval", "harmbench", "alpaca:eval", "xstest:safe", "sst2", "wikitext2"}
               for r in res["rows"])
    assert "Paired differences against RTN W8A8" in html and "evaluated differently" not in html
    assert "no per-prompt samples" not in html  # every run is paired with RTN on the same prompts
    md = res["markdown"].read_text()  # the task and perplexity are paired too: per example, per window
    assert "| Q-realign W8A8 | sst2 | accuracy |" in md and "| AAQ W4A8 | wikitext2 | perplexity |" in md


def test_demo_refuses_a_folder_it_did_not_create(organism, shared_data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    cli_error(capsys, ["demo", "--organism", organism, "--out", out, "--data-dir", shared_data],
              "was not created by safeptq demo")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_demo_resumes_only_with_its_own_settings(organism, shared_data, tmp_path, capsys):
    from safeptq.demo import DEMO_MARKER, _claim

    out = tmp_path / "d"
    _claim(out, _opts(organism, out, shared_data))
    assert (out / DEMO_MARKER).is_file()
    _claim(out, _opts(organism, out, shared_data))  # the same settings: fine
    cli_error(capsys, ["demo", "--organism", organism, "--out", out, "--limit", "3", "--ppl-windows", "1",
                       "--data-dir", shared_data], "started with limit=2")
