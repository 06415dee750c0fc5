"""``safeptq realign`` end to end on the tiny model: probes, probe-push calibration, export, reload."""

import json

import pytest
import torch

from safeptq.cli.main import main
from safeptq.cli.realign_cmd import SCHEDULES

_FAST = ["--nsamples", "8", "--seqlen", "32", "--epochs", "1", "--batch-size", "4", "--sep-limit", "4", "--no-progress"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _run(capsys, *argv):
    rc = main(["realign", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap


def test_help_lists_the_papers_options(capsys):
    with pytest.raises(SystemExit):
        main(["realign", "--help"])
    out = capsys.readouterr().out
    for flag in ("--probe-model", "--probes", "--schedule", "--malicious-share", "--probe-weight", "--margin",
                 "--scheme", "--resume", "--out"):
        assert flag in out
    assert "--method" not in out  # fixed to the block-wise engine with the probe objective
    assert SCHEDULES["paper"] == {"training": {"epochs": (5, 15), "batch_size": 1, "lr_lwc": 1e-2, "lr_let": 1e-3,
                                               "train_norms": False},
                                  "objective": {"margin": 0.0, "benign_anchor": 0.0, "malicious_target": "probe"},
                                  "probes": {"fit": "paper"}}


def _cli_recipe(*flags):
    from safeptq.cli.flags import recipe_overrides
    from safeptq.cli.main import build_parser
    from safeptq.recipes import RealignRecipe, make_recipe

    args = build_parser().parse_args(["realign", "--model", "m", "--scheme", "w8a8", "--out", "o", *flags])
    return make_recipe(RealignRecipe, None, **recipe_overrides(args))


def test_schedule_fills_only_what_the_command_line_left_unset():
    r = _cli_recipe("--schedule", "paper", "--lr-lwc", "0.05")
    t = r.training
    assert (t.epochs, t.batch_size, t.lr_lwc, t.lr_let, t.train_norms, r.objective.margin) == \
        ((5, 15), 1, 0.05, 1e-3, False, 0.0)
    assert t.lr_norm == 1e-3  # not in the paper schedule: the engine's default
    r = _cli_recipe("--no-train-norms", "--margin", "2")
    d = SCHEDULES["default"]["training"]
    assert (r.training.epochs, r.training.batch_size, r.training.lr_lwc, r.training.train_norms, r.objective.margin) \
        == (d["epochs"], d["batch_size"], d["lr_lwc"], False, 2.0)
    assert r.objective.malicious_target == "probe"  # the default schedule's state target needs --probe-model
    r = _cli_recipe("--probe-model", "aligned")
    assert r.objective.malicious_target == SCHEDULES["default"]["objective"]["malicious_target"] == "state"


def test_realign_w8a8_exports_reloads_and_records_separability(tiny_model_dir, shared_data, tmp_path, home, capsys):
    from safeptq.export import SIDE_FILE, reload_check
    from safeptq.models import load_model

    out = tmp_path / "r"
    rc, cap = _run(capsys, "--model", tiny_model_dir, "--probe-model", tiny_model_dir, "--scheme", "w8a8",
                   "--data-dir", shared_data, "--out", out, *_FAST)
    assert rc == 0, cap.err
    assert (out / "realign.json").is_file() and (out / SIDE_FILE).is_file() and not (tmp_path / "r.work").exists()
    doc = json.loads((out / "realign.json").read_text())
    assert doc["recipe"]["method"] == "realign" and doc["recipe"]["calib"]["data"] == "advbench:calib=0.75,alpaca:calib=0.25"
    assert doc["calibration"]["objective"]["name"] == "realign"
    assert doc["calib_set"]["malicious"] == 6 and doc["calib_set"]["n"] == 8
    sep = doc["separability"]
    assert set(sep) >= {"before", "after", "prompts"}
    assert len(sep["before"]["per_layer"]["accuracy"]) == 2 and "fisher" in sep["after"]["mean_late_layers"]
    assert doc["probes"]["source"] == str(tiny_model_dir) and any((home / "probes").iterdir())
    assert doc["export"]["format"] == "int-quantized" and doc["verify"]["weights_only_max_rel_err"] < 1e-3
    assert doc["wall_time_s"] > 0 and doc["peak_rss_mb"] > 0

    # the export reloads through transformers' compressed-tensors support
    lm = load_model(str(out), dtype="float32", device="cpu")
    logits = lm.model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    del reload_check


def test_realign_state_target_end_to_end(tiny_model_dir, shared_data, tmp_path, home, capsys):
    out = tmp_path / "s"
    rc, cap = _run(capsys, "--model", tiny_model_dir, "--probe-model", tiny_model_dir, "--scheme", "w8a8",
                   "--malicious-target", "state", "--data-dir", shared_data, "--out", out, *_FAST)
    assert rc == 0, cap.err
    obj = json.loads((out / "realign.json").read_text())["calibration"]["objective"]
    assert obj["malicious_target"] == "state" and obj["states_sha"]


@pytest.mark.parametrize("target", ["state_probe", "mean_diff"])
def test_ablation_targets_end_to_end_record_the_shift_cosine(tiny_model_dir, shared_data, tmp_path, home, capsys,
                                                             target):
    """The ablation targets run through the command; the record carries, per layer, the cosine between the
    quantized model's and the probe model's shifts from the fine-tuned model (the probe
    model is another random model)."""
    out = tmp_path / target
    other = tmp_path / "aligned"
    from conftest import save_tiny_model

    save_tiny_model(other, seed=3)
    rc, cap = _run(capsys, "--model", tiny_model_dir, "--probe-model", other, "--scheme", "w8a8",
                   "--malicious-target", target, "--data-dir", shared_data, "--out", out, *_FAST)
    assert rc == 0, cap.err
    rec = json.loads((out / "realign.json").read_text())
    assert rec["calibration"]["objective"]["malicious_target"] == target
    sc = rec["shift_cosine"]
    assert len(sc["per_layer"]) == 2 and sc["n"] == 4 and all(-1 <= c <= 1 for c in sc["per_layer"])


def test_probe_push_moves_malicious_states_further_than_mse():
    """Same model, data and schedule through the engine: with the Q-realign objective the
    quantized model's malicious last-token states move towards the probe's malicious side, with
    OmniQuant's MSE they do not (the probe term reaches the clipping and smoothing parameters)."""
    import copy

    from conftest import make_tiny_llama
    from safeptq.data.calib import CalibSet
    from safeptq.objectives import MSE, ProbePush
    from safeptq.probes import LayerProbes
    from safeptq.quant.args import resolve_scheme
    from safeptq.quant.engine import BlockwiseConfig, calibrate_blockwise

    n, t = 16, 12
    x = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 0] * (n // 2))
    calib = CalibSet(x, torch.ones_like(x), labels, torch.full((n,), t - 1), ["toy"] * n)
    base = make_tiny_llama(seed=3).eval()
    with torch.no_grad():  # blocks whose output matters next to the residual (random init is near-identity)
        for w in base.model.layers.parameters():
            if w.dim() == 2:
                w.mul_(10.0)

    def last_states(model):
        out = []
        hooks = [m.register_forward_hook(lambda mod, a, o: out.append(o[0] if isinstance(o, tuple) else o))
                 for m in model.model.layers]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return [s[:, -1] for s in out]

    coef = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)) / 8
    fp = last_states(base)
    probes = LayerProbes(coef, torch.stack([-((fp[i] @ coef[i]).max() + 0.5) for i in range(2)]))

    def malicious_score(model):
        return (last_states(model)[-1][labels == 1] @ coef[1] + probes.intercept[1]).mean().item()

    cfg = BlockwiseConfig(scheme=resolve_scheme("w4a16", group_size=32), epochs=20, batch_size=8, device="cpu",
                          lr_lwc=0.05, lr_let=0.01)
    m_mse, m_push = copy.deepcopy(base), copy.deepcopy(base)
    calibrate_blockwise(m_mse, calib, MSE(), cfg, progress=False)
    calibrate_blockwise(m_push, calib, ProbePush(probes, margin=2.0), cfg, progress=False)
    assert malicious_score(base) < 0
    assert malicious_score(m_push) > malicious_score(m_mse) + 0.3


@pytest.mark.parametrize("argv, needle", [
    (["--malicious-share", "1.5"], "--malicious-share"),
    (["--probes", "P", "--probe-model", "M"], "either --probes or --probe-model"),
    (["--probe-weight", "-1"], "--probe-weight"),
    (["--malicious-target", "state"], "--malicious-target state needs --probe-model"),
    (["--schedule", "fast"], "invalid choice"),
    (["--scheme", "w3a99"], "scheme"),
])
def test_bad_input_is_one_line(tiny_model_dir, tmp_path, home, capsys, argv, needle):
    base = {"--scheme": "w8a8"}
    flags = [x for k, v in base.items() if k not in argv for x in (k, v)]
    try:
        rc, cap = _run(capsys, "--model", tiny_model_dir, "--out", tmp_path / "o", *flags, *argv)
    except SystemExit as e:  # argparse choices
        rc, cap = e.code, capsys.readouterr()
    assert rc == 2 and needle in cap.err and "Traceback" not in cap.err
    assert not (tmp_path / "o" / "realign.json").exists()


def test_probes_of_another_depth_are_refused(tiny_model_dir, shared_data, tmp_path, home, capsys):
    from safeptq.probes import LayerProbes

    LayerProbes(torch.zeros(5, 64), torch.zeros(5)).save(tmp_path / "p5")
    rc, cap = _run(capsys, "--model", tiny_model_dir, "--probes", tmp_path / "p5", "--scheme", "w8a8",
                   "--data-dir", shared_data, "--out", tmp_path / "o", *_FAST)
    assert rc == 2 and "cover 5 layers" in cap.err
    assert not (tmp_path / "o" / "realign.json").exists()


def test_quantize_points_realign_users_to_the_realign_command(tiny_model_dir, tmp_path, capsys):
    rc = main(["quantize", "--model", str(tiny_model_dir), "--method", "realign", "--scheme", "w8a8",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "safeptq realign" in capsys.readouterr().err
