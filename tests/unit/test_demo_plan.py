"""The demo's plan (no stage runs): its estimates follow the machine's bfloat16 support and float32 speed."""
import pytest

import safeptq.demo as demo
import safeptq.quant.precision as prec
from safeptq.demo import COST, REF_GFLOPS, DemoOptions, _fmt, plan_demo, run_demo


@pytest.fixture(autouse=True)
def reference_speed(monkeypatch):
    """Plans as on the reference machine, unless a test says otherwise."""
    monkeypatch.setattr(demo, "slowdown", lambda: 1.0)


@pytest.mark.parametrize("native,key", [(True, "organism"), (False, "organism_fp32")])
def test_organism_estimate_follows_bf16_units(native, key, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(prec, "native_bf16", lambda: native)
    stages = plan_demo(DemoOptions(out=tmp_path / "demo"))
    org = stages[0]
    assert org.name == "organism" and not org.done() and org.estimate_s == COST[key]
    assert [s.name for s in stages] == ["organism", "attacked", "rtn-w8a8", "realign-w8a8", "aligned", "aaq-w4a8",
                                        "report"]


def test_no_bf16_units_are_announced_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(prec, "native_bf16", lambda: False)
    said = []

    class Stop(Exception):
        pass

    def say(msg):
        said.append(msg)
        if msg.startswith("[1/"):  # the first stage starts: stop before any training
            raise Stop

    with pytest.raises(Stop):
        run_demo(DemoOptions(out=tmp_path / "demo"), say=say)
    text = "\n".join(said)
    assert "no bfloat16 units" in text and _fmt(COST["organism_fp32"]) in text


def test_durations_read_as_a_person_would():
    assert (_fmt(42), _fmt(125), _fmt(11000)) == ("42 s", "2 min 05 s", "3 h 03 min")


def test_shorter_schedules_are_estimated_shorter(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    est = {s.name: s.estimate_s for s in plan_demo(DemoOptions(out=tmp_path / "a"))}
    short = {s.name: s.estimate_s for s in plan_demo(DemoOptions(out=tmp_path / "b", ppl_windows=4,
                                                               realign_overrides={"nsamples": 100, "epochs": 2},
                                                               aaq_overrides={"steps": 40}))}
    assert short["realign-w8a8"] < est["realign-w8a8"] and short["aaq-w4a8"] < est["aaq-w4a8"]
    assert short["attacked"] < est["attacked"]  # fewer perplexity windows
    assert est["realign-w8a8"] - est["attacked"] == pytest.approx(COST["realign"])  # the defaults: the measured cost


def test_estimates_scale_with_this_cpus_float32_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(prec, "native_bf16", lambda: False)
    ref = {s.name: s.estimate_s for s in plan_demo(DemoOptions(out=tmp_path / "a"))}
    monkeypatch.undo()
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(prec, "native_bf16", lambda: False)
    monkeypatch.setattr(prec, "matmul_gflops", lambda *a, **k: REF_GFLOPS / 4)  # a CPU four times slower
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    demo.slowdown.cache_clear()
    try:
        slow = {s.name: s.estimate_s for s in plan_demo(DemoOptions(out=tmp_path / "b"))}
    finally:
        demo.slowdown.cache_clear()
    assert demo.slowdown.__wrapped__() == pytest.approx(4.0)
    assert {k: slow[k] / ref[k] for k in ref if k != "report"} == pytest.approx(
        {k: 4.0 for k in ref if k != "report"})


def test_matmul_rate_is_measured():
    assert 0.1 < prec.matmul_gflops(tokens=64, reps=1) < 1e5


def test_schedules_set_windows_and_overrides_and_explicit_values_win():
    from safeptq.demo import DEMO_SCHEDULES
    from safeptq.errors import ConfigError

    assert (DemoOptions().ppl_windows, DemoOptions().realign_overrides) == (8, {})
    q = DemoOptions(schedule="quicker")
    assert (q.ppl_windows, q.realign_overrides, q.aaq_overrides) == DEMO_SCHEDULES["quicker"]
    mixed = DemoOptions(schedule="quick", ppl_windows=2, aaq_overrides={"steps": 5})
    assert mixed.ppl_windows == 2 and mixed.aaq_overrides == {"steps": 5} and mixed.realign_overrides["epochs"] == 2
    with pytest.raises(ConfigError, match="unknown demo schedule 'fast'; choose one of default, quick, quicker"):
        DemoOptions(schedule="fast")


def test_a_demo_resumes_only_with_its_schedule(tmp_path, monkeypatch):
    from safeptq.demo import _claim
    from safeptq.errors import ConfigError

    _claim(tmp_path / "d", DemoOptions(out=tmp_path / "d", schedule="quick"))
    _claim(tmp_path / "d", DemoOptions(out=tmp_path / "d", schedule="quick"))  # the same settings: resumes
    with pytest.raises(ConfigError, match="started with ppl_windows=4"):
        _claim(tmp_path / "d", DemoOptions(out=tmp_path / "d"))
