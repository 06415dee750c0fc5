"""The end-to-end calibration engine on tiny random Llamas (a fraction of a second per run)."""

import pytest
import torch
from torch import nn

from quant_helpers import calib_set, ids, logits, rel_err, sharp_llama
from safeptq.errors import CalibrationError, ConfigError, UnknownNameError
from safeptq.objectives import MSE, ContrastiveKLTop, KLTop, ReferenceCache
from safeptq.quant.args import resolve_scheme
from safeptq.quant.deploy import has_act_quant, rtn_quantize
from safeptq.quant.e2e import E2EConfig, calibrate_end_to_end, fold_end_to_end, prepare_end_to_end
from safeptq.quant.qlinear import LLAMA_LINEARS, QuantLinear, set_quantizers_enabled
from safeptq.quant.rotation import OnlineHadamard






@pytest.fixture(scope="module")
def calib():
    return calib_set()


@pytest.fixture(scope="module")
def refs(calib):
    return ReferenceCache.build({"instruct": sharp_llama(0), "base": sharp_llama(1)}, calib, 64,
                                dtype=torch.float32, progress=False)


def _cfg(scheme="w4a4", **kw):
    kw.setdefault("steps", 5)
    kw.setdefault("batch_size", 8)
    return E2EConfig(scheme=scheme, device="cpu", **kw)


@pytest.mark.parametrize("scheme, objective", [
    ("w4a4", ContrastiveKLTop(k=64, push="bounded", tail=True)),
    ("w4a4", KLTop(k=64)),
    ("w8a8", KLTop(k=64, tail=True)),
])
def test_tiny_run_lowers_objective_folds_exactly_and_ends_on_grid(calib, refs, scheme, objective):
    model = sharp_llama(0)
    seen = []
    res = calibrate_end_to_end(model, calib, objective, refs, _cfg(scheme), progress=False, on_step=seen.append)
    assert [r["step"] for r in seen] == list(range(5)) and res.records == seen
    assert res.loss_end < res.loss_start == res.losses[0]
    assert res.fold_rel_err <= 1e-4
    assert res.peak_rss_mb > 0 and res.wall_time_s > 0
    w = resolve_scheme(scheme).weights
    assert len(res.qparams) == 2 * len(LLAMA_LINEARS)
    for name, qp in res.qparams.items():
        lin = model.get_submodule(name)
        assert type(lin) is nn.Linear
        assert torch.equal(lin.weight, qp.dequantized)
        codes = lin.weight / qp.scale  # symmetric per channel: integer codes in range
        assert (codes - codes.round()).abs().max() < 1e-3
        assert codes.round().min() >= w.qmin and codes.round().max() <= w.qmax
    assert has_act_quant(model)
    assert isinstance(model.model.layers[0].mlp.down_proj.input_transform, OnlineHadamard)
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].input_layernorm).__name__ == "LlamaRMSNorm"


def test_fold_of_perturbed_transforms_is_exact(calib):
    x = ids()
    ref = logits(sharp_llama(0), x)
    model = sharp_llama(0)
    tf = prepare_end_to_end(model, calib, _cfg("w4a4"))
    set_quantizers_enabled(model, False)
    assert rel_err(ref, logits(model, x)) < 1e-4  # attaching changes nothing in full precision
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tf.rotation.weight.copy_(0.05 * torch.randn(tf.rotation.weight.shape, generator=gen))
        for p in tf.smoothing.parameters():
            p.mul_(torch.exp(0.3 * torch.randn(p.shape, generator=gen)))
    attached = logits(model, x)
    assert rel_err(ref, attached) < 1e-4  # perturbed transforms are still equivalences
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"}
    effective = {n: m.effective_weight_bias()[0].detach().clone() for n, m in linears.items()}
    q0 = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(effective[q0], linears[q0].weight)
    fold_end_to_end(model, tf)
    assert rel_err(attached, logits(model, x)) <= 1e-4  # folding is exact...
    for name, mod in linears.items():  # ...and baked what the quantizers saw into the stored weights
        assert model.get_submodule(name) is mod and mod.transform_keys() == []
        assert torch.allclose(mod.weight, effective[name], atol=1e-5)


def test_plain_config_without_steps_is_rtn(calib, refs):
    x = ids()
    rtn = sharp_llama(0)
    rtn_q = rtn_quantize(rtn, resolve_scheme("w8a8"))
    model = sharp_llama(0)
    cfg = _cfg("w8a8", steps=3, rotation=False, smoothing=False, lwc=False)
    res = calibrate_end_to_end(model, calib, KLTop(k=64), refs, cfg, progress=False)
    assert res.records == []  # nothing to train
    assert torch.equal(logits(model, x), logits(rtn, x))
    assert set(res.qparams) == set(rtn_q)


class _Killed(Exception):
    pass


def test_resume_matches_uninterrupted_run(calib, refs, tmp_path):
    x = ids()
    obj = ContrastiveKLTop(k=64, lam=0.2)
    cfg = _cfg("w4a4", steps=4, batch_size=3, save_every=2)
    full = sharp_llama(0)
    res_full = calibrate_end_to_end(full, calib, obj, refs, cfg, progress=False)

    def kill(rec):
        if rec["step"] == 2:
            raise _Killed

    with pytest.raises(_Killed):
        calibrate_end_to_end(sharp_llama(0), calib, obj, refs, cfg, work_dir=tmp_path, progress=False, on_step=kill)
    resumed = sharp_llama(0)
    res = calibrate_end_to_end(resumed, calib, obj, refs, cfg, work_dir=tmp_path, resume=True, progress=False)
    assert res.resumed_from == 2
    assert [r["loss"] for r in res.records] == pytest.approx([r["loss"] for r in res_full.records], abs=1e-6)
    assert torch.allclose(logits(resumed, x), logits(full, x), atol=1e-5)
    for name, qp in res_full.qparams.items():
        assert torch.equal(res.qparams[name].q, qp.q)
    with pytest.raises(CalibrationError, match="another recipe"):
        calibrate_end_to_end(sharp_llama(0), calib, obj, refs, _cfg("w4a4", steps=4, batch_size=3, lr_lwc=0.5),
                             work_dir=tmp_path, resume=True, progress=False)


def test_input_errors(calib, refs):
    kl_only = ReferenceCache.build({"instruct": sharp_llama(0)}, calib, 8, progress=False)
    with pytest.raises(ConfigError, match=r"needs reference\(s\) \['base'\]"):
        calibrate_end_to_end(sharp_llama(0), calib, ContrastiveKLTop(k=8), kl_only, _cfg(), progress=False)
    with pytest.raises(ConfigError, match="needs an end-to-end objective"):
        calibrate_end_to_end(sharp_llama(0), calib, MSE(), refs, _cfg(), progress=False)
    with pytest.raises(ConfigError, match="another calibration set"):
        calibrate_end_to_end(sharp_llama(0), calib_set(seed=1), KLTop(k=64), refs, _cfg(), progress=False)
    with pytest.raises(ConfigError, match="steps must be non-negative"):
        _cfg(steps=-1)
    with pytest.raises(ConfigError, match="lr_rotation must be non-negative"):
        _cfg(lr_rotation=-1.0)
    with pytest.raises(ConfigError, match="unknown smoothing pair"):
        _cfg(smooth_pairs=("attn_in", "gate_down"))
    with pytest.raises(UnknownNameError, match="unknown quantization scheme"):
        _cfg("w3a3")


def test_transform_search_picks_the_lowest_initial_kl_and_leaves_the_model(calib, refs):
    from safeptq.quant.e2e import choose_transforms, initial_kl

    model = sharp_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objective = ContrastiveKLTop(k=64, push="bounded", tail=True)
    best, table = choose_transforms(model, calib, objective, refs, _cfg("w4a8"))
    assert [(r["rotation"], r["smoothing"]) for r in table] == [(False, False), (False, True), (True, False),
                                                                 (True, True)]
    low = min(table, key=lambda r: r["initial_kl"])
    assert (best.rotation, best.smoothing) == (low["rotation"], low["smoothing"])
    assert len({round(r["initial_kl"], 6) for r in table}) == 4  # the transforms do change the start
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # searched on copies
    # a fixed dimension is not searched; the value is the pull term, whatever the objective
    _, only = choose_transforms(model, calib, KLTop(k=64, tail=True), refs, _cfg("w4a8"), rotation=(True,))
    assert [(r["rotation"], r["smoothing"]) for r in only] == [(True, False), (True, True)]
    assert only[1]["initial_kl"] == pytest.approx(table[3]["initial_kl"], rel=1e-5)
    assert initial_kl(model, calib, objective, refs, _cfg("w4a8", rotation=True, smoothing=True)) == \
        pytest.approx(table[3]["initial_kl"], rel=1e-6)


def test_full_transforms_fold_exactly_and_train(calib, refs):
    """The v/o head rotations and the up->down smoothing pair: equivalences when attached (perturbed too), folded
    exactly, trained as parameters of their own, and resumable under their names."""
    x = ids()
    ref = logits(sharp_llama(0), x)
    model = sharp_llama(0)
    cfg = _cfg("w4a4", vo_rotation=True, smooth_pairs=("attn_in", "mlp_in", "vo", "qk", "up_down"))
    tf = prepare_end_to_end(model, calib, cfg)
    assert sorted(tf.head_rotations) == [str(i) for i in range(len(model.model.layers))]
    assert all("up_down" in sm.pairs for sm in tf.smoothing)
    set_quantizers_enabled(model, False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in tf.head_rotations.values():
            r.weight.copy_(0.05 * torch.randn(r.weight.shape, generator=gen))
        for p in tf.smoothing.parameters():
            p.mul_(torch.exp(0.3 * torch.randn(p.shape, generator=gen)))
    assert rel_err(ref, logits(model, x)) < 1e-4
    fold_end_to_end(model, tf)
    assert rel_err(ref, logits(model, x)) < 1e-4
    assert all(not m.transform_keys() for m in model.modules() if isinstance(m, QuantLinear))

    trained = sharp_llama(0)
    res = calibrate_end_to_end(trained, calib, KLTop(k=64), refs, cfg, progress=False)
    assert res.loss_end < res.loss_start and res.fold_rel_err <= 1e-4
    assert res.head_rotation_layers == [str(i) for i in range(len(trained.model.layers))]
