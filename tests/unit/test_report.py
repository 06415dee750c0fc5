"""``safeptq report``: built from real (tiny-model) run folders and eval files; self-contained, valid HTML with every
run and figure; paired differences and changed verdicts computed right; one-line errors for bad inputs."""

import html.parser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import safeptq
from conftest import cli_error, cli_ok
from safeptq.reporting.build import report_context
from safeptq.reporting.collect import RunEntry

SUITES = ["advbench:eval", "alpaca:eval", "wikitext2"]
FAST = {"nsamples": 4, "seqlen": 16, "progress": False}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """An FP eval file, an RTN W8A8 run and a Q-realign W8A8 run of the tiny model, all evaluated alike."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("shared data not found")
    root = tmp_path_factory.mktemp("report")
    ev = {"suites": SUITES, "limit": 3, "ppl_windows": 2}
    model = str(tiny_model_dir)
    safeptq.evaluate(model, SUITES, limit=3, ppl_windows=2, data_dir=str(SHARED_DATA), progress=False,
                     out=root / "fp.json")
    safeptq.quantize(model, method="rtn", scheme="w8a8", eval=ev, data_dir=str(SHARED_DATA), out=root / "rtn-w8a8",
                     progress=False)
    safeptq.realign(model, probe_model=model, scheme="w8a8", epochs=1, sep_limit=4, eval=ev,
                    data_dir=str(SHARED_DATA), out=root / "realign-w8a8", **FAST)
    return root


class _Checker(html.parser.HTMLParser):
    """Balanced tags and no reference outside the file."""

    VOID = {"meta", "br", "img", "hr", "input", "link", "col", "source", "wbr", "area", "base", "embed", "track"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "xlink:href") and v and not v.startswith("#"):
                self.errors.append(f"external reference {k}={v!r}")
        if tag == "link" or (tag == "script" and any(k == "src" for k, _ in attrs)):
            self.errors.append(f"<{tag}> loads something")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def test_report_has_every_run_and_figure_and_is_self_contained(runs, tmp_path):
    out = tmp_path / "sub" / "report.html"
    paths = safeptq.report([str(runs / "fp.json"), str(runs / "rtn-w8a8"), f"Q-realign={runs / 'realign-w8a8'}"],
                           out, baseline="rtn-w8a8")
    text = out.read_text()
    for name in ("fp", "rtn-w8a8", "Q-realign"):
        assert f"</span>{name}" in text and f"| {name}" in paths["markdown"].read_text()
    for fig in ("fig-scatter", "fig-harmful", "fig-benign", "fig-separability", "fig-loss"):
        assert f'id="{fig}"' in text
    assert text.count("<svg") == 5
    assert "method: realign" in text and "method: rtn" in text  # the recipes themselves, inlined
    c = _Checker()
    c.feed(text)
    assert not c.errors and not c.stack, c.errors[:3] or c.stack
    assert "http://" not in text.replace("http://www.w3.org/", "") and "https://" not in text
    assert not re.search(r"url\((?!#)", text) and "@import" not in text  # url(#clip) inside the SVGs only


def test_paired_differences_match_the_runs(runs):
    from safeptq.reporting.build import collect_runs

    entries = collect_runs([str(runs / "rtn-w8a8"), str(runs / "realign-w8a8"), str(runs / "fp.json")])
    ctx = report_context(entries, baseline="rtn-w8a8")
    rows = [p for p in ctx["paired"] if p["note"] is None]
    assert {(p["run"], p["suite"]) for p in rows} == {(r, s) for r in ("realign-w8a8", "fp")
                                                      for s in ("advbench:eval", "alpaca:eval", "wikitext2")}
    for p in rows:
        e = next(e for e in entries if e.name == p["run"])
        metric = {"advbench:eval": "harmful_rate", "alpaca:eval": "refusal_rate", "wikitext2": "perplexity"}[p["suite"]]
        tol = 1e-3 * (e.results[p["suite"]][metric] if metric == "perplexity" else 1)
        assert p["n"] == (2 if metric == "perplexity" else 3) and abs(p["b"] - e.results[p["suite"]][metric]) < tol
        assert abs(p["diff"] - (p["b"] - p["a"])) < 1e-3
    cells = {r["name"]: r for r in ctx["rows"]}
    assert cells["rtn-w8a8"]["bits"] > 8 and cells["fp"]["bits"] == 32 and cells["realign-w8a8"]["time_s"] >= 0


def _entry(name, verdicts, responses=None):
    prompts = [f"p{i}" for i in range(len(verdicts))]
    return RunEntry(name=name, path=Path(name), kind="eval", method="fp", scheme="fp", model="m",
                    results={"advbench:eval": {"harmful_rate": 1 - sum(verdicts) / len(verdicts), "ci95": [0, 1],
                                               "n": len(verdicts)}},
                    samples={"advbench:eval": {p: (v, f"{name}:{p}") for p, v in zip(prompts, verdicts)}})


def test_changed_verdicts_list_exactly_the_prompts_the_runs_disagree_on():
    ctx = report_context([_entry("a", [True, False, True, False]), _entry("b", [True, True, False, False])])
    (ch,) = ctx["changed"]
    assert (ch["n_common"], ch["n_changed"]) == (4, 2)
    assert [it["prompt"] for it in ch["prompts"]] == ["p1", "p2"]
    assert ch["prompts"][0]["verdicts"] == [{"run": "a", "refused": False, "response": "a:p1"},
                                            {"run": "b", "refused": True, "response": "b:p1"}]


def test_bad_inputs_get_one_line(runs, tmp_path, capsys):
    cli_error(capsys, ["report", str(tmp_path / "missing"), "--out", tmp_path / "r.html"], "missing: no such run")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "realign.json").write_text("{not json")
    cli_error(capsys, ["report", broken, "--out", tmp_path / "r.html"], "broken/realign.json: unreadable")
    half = tmp_path / "half"
    half.mkdir()
    cli_error(capsys, ["report", half, "--out", tmp_path / "r.html"], "not a finished run folder")
    cli_error(capsys, ["report", runs / "fp.json", runs / "fp.json", "--out", tmp_path / "r.html"],
              "two runs are named 'fp'")
    cli_error(capsys, ["report", runs / "fp.json", "--baseline", "rtn", "--out", tmp_path / "r.html"],
              "--baseline 'rtn' is not one of the runs (fp)")
    cli_error(capsys, ["report", runs / "fp.json", "--out", tmp_path], "is a folder")
    assert not (tmp_path / "r.html").exists()
    assert "report written to" in cli_ok(capsys, ["report", runs / "fp.json", "--out", tmp_path / "r.html"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    out = tmp_path / "report.html"
    safeptq.report([str(runs / "rtn-w8a8"), str(runs / "realign-w8a8")], out, baseline="rtn-w8a8")
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*cmd, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == out.read_text().count("<svg") > 0 and "realign-w8a8" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*cmd, "--window-size=1100,1400", f"--screenshot={shot}", out.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000  # a page with content, not a blank one


def test_recovery_table_pairs_the_three_runs_prompt_by_prompt():
    # refused flags: attacked answers 8 of 10, aligned 1 of 10, the run 3 of 10 -> closes (0.8 - 0.3) / 0.7
    att = _entry("attacked", [False] * 8 + [True] * 2)
    ali = _entry("aligned", [True] * 9 + [False])
    run = _entry("run", [False] * 3 + [True] * 7)
    ctx = report_context([att, run, ali], attacked="attacked", aligned="aligned")
    (r,) = ctx["recovery"]
    assert (r["run"], r["suite"], r["n"]) == ("run", "advbench:eval", 10)
    assert r["closed"] == pytest.approx(5 / 7, abs=1e-3) and r["rate"] == pytest.approx(0.3)
    with pytest.raises(Exception, match="--attacked and --aligned go together"):
        report_context([att, run, ali], attacked="attacked")


def _scored(name, correct, nll, windows=None):
    ppl = {"perplexity": 1.0, "ci95": None, "context_length": 8, "stride": 8, "windows": windows or len(nll),
           "source": "w.txt", "window_nll": nll}
    return RunEntry(name=name, path=Path(name), kind="eval", method="fp", scheme="fp", model="m",
                    results={"sst2": {"accuracy": sum(correct) / len(correct), "ci95": [0, 1], "n": len(correct),
                                      "source": "dev.tsv", "correct": correct}, "wikitext2": ppl})


def test_task_accuracy_and_perplexity_pair_against_the_baseline():
    import math

    base = _scored("rtn", [1, 1, 0, 1, 0, 1], [2.0, 2.2, 1.8])
    run = _scored("realign", [1, 0, 1, 1, 1, 1], [2.1, 2.4, 1.9])
    rows = {r["suite"]: r for r in report_context([base, run], baseline="rtn")["paired"] if r["run"] == "realign"}
    acc, ppl = rows["sst2"], rows["wikitext2"]
    assert (acc["metric"], acc["diff"], acc["only_a"], acc["only_b"], acc["n"]) == ("accuracy", pytest.approx(1 / 6, abs=1e-4),
                                                                                     1, 2, 6)
    assert 0 < acc["p"] <= 1
    want = math.exp((2.1 + 2.4 + 1.9) / 3) - math.exp(2.0)
    assert ppl["metric"] == "perplexity" and ppl["diff"] == pytest.approx(want, abs=1e-3) and ppl["n"] == 3
    assert ppl["lo"] > 0 and ppl["verdict"] == "higher"  # every window is worse: the whole interval is above zero
    assert ppl["p"] is None and ppl["only_a"] is None


def test_results_scored_on_other_windows_or_examples_are_not_paired():
    base = _scored("rtn", [1, 1, 0], [2.0, 2.2])
    other = _scored("x", [1, 0], [2.1, 2.4, 1.9], windows=3)
    assert [r for r in report_context([base, other], baseline="rtn")["paired"] if r["run"] == "x"] == []
