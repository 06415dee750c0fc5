import pytest
import torch

from conftest import make_tiny_llama
from safeptq.errors import ConfigError
from safeptq.quant.args import resolve_scheme
from safeptq.quant.qlinear import QuantLinear, set_quantizers_enabled, wrap_decoder_layer
from safeptq.quant.smoothing import (
    LayerGeometry,
    LayerSmoothing,
    ScaledNorm,
    attach_smoothing,
    detach_smoothing,
    fold_smoothing,
    init_smoothing,
)
from quant_helpers import VARIANTS, ids, logits, random_smoothings, rel_err, smoothing_stats

TOL = 1e-4


def test_geometry_gqa(tiny_llama):
    g = LayerGeometry.of(tiny_llama.model.layers[0])
    assert (g.hidden, g.head_dim, g.num_heads, g.num_kv_heads, g.n_rep) == (64, 16, 4, 2, 2)
    s = torch.arange(32.0)
    rep = g.per_query_head(s).view(4, 16)
    assert torch.equal(rep[0], rep[1]) and torch.equal(rep[2], rep[3]) and torch.equal(rep[1], s[:16])


def test_smoothquant_init_formula(tiny_llama):
    x = ids()
    stats = smoothing_stats(tiny_llama, x)[0]
    layer = tiny_llama.model.layers[0]
    sm = init_smoothing(layer, stats, alpha=0.5)
    a = layer.self_attn
    w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).abs().amax(0)
    assert torch.allclose(sm.scale("attn_in"), (stats["attn_in"].sqrt() / w.sqrt()), rtol=1e-5)
    qk = sm.scale("qk").view(2, 16)
    assert torch.equal(qk[:, :8], qk[:, 8:])  # equal on RoPE pairs
    ones = init_smoothing(layer, None)
    assert all(torch.equal(p, torch.ones_like(p)) for p in ones.scales.values())
    with pytest.raises(ConfigError, match="alpha"):
        init_smoothing(layer, stats, alpha=1.5)
    with pytest.raises(ConfigError, match="unknown smoothing pair"):
        LayerSmoothing(sm.geometry, ["attn_in", "gate_down"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fold_smoothing_is_exact(variant):
    model = make_tiny_llama(**VARIANTS[variant])
    x = ids()
    ref = logits(model, x)
    before = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    for layer, sm in zip(model.model.layers, random_smoothings(model, x)):
        fold_smoothing(layer, sm)
    assert not torch.allclose(before, model.model.layers[0].self_attn.v_proj.weight)
    assert rel_err(ref, logits(model, x)) <= TOL


def test_attached_scales_match_folded_and_train():
    model = make_tiny_llama()
    x = ids()
    ref = logits(model, x)
    sms = random_smoothings(model, x)
    for i, (layer, sm) in enumerate(zip(model.model.layers, sms)):
        wrap_decoder_layer(layer, resolve_scheme("w4a8"), lwc=True, prefix=f"layers.{i}.")
        attach_smoothing(layer, sm)
    assert isinstance(model.model.layers[0].input_layernorm, ScaledNorm)
    set_quantizers_enabled(model, False)
    assert rel_err(ref, logits(model, x)) <= TOL

    set_quantizers_enabled(model, True)
    quant_attached = logits(model, x)
    model(input_ids=x).logits.pow(2).mean().backward()
    for sm in sms:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sm.scales.values())
    with pytest.raises(ConfigError, match="already attached"):
        attach_smoothing(model.model.layers[0], sms[0])

    for layer, sm in zip(model.model.layers, sms):
        fold_smoothing(layer, sm)
    layer0 = model.model.layers[0]
    assert not isinstance(layer0.input_layernorm, ScaledNorm)
    assert all(not m.transform_keys() for m in layer0.modules() if isinstance(m, QuantLinear))
    assert rel_err(quant_attached, logits(model, x)) <= 1e-2  # same quantized model (rare rounding flips)
    set_quantizers_enabled(model, False)
    assert rel_err(ref, logits(model, x)) <= TOL


def test_detach_restores_and_shape_check(tiny_llama):
    x = ids()
    ref = logits(tiny_llama, x)
    sms = random_smoothings(tiny_llama, x)
    layer = tiny_llama.model.layers[0]
    attach_smoothing(layer, sms[0])
    detach_smoothing(layer)
    assert rel_err(ref, logits(tiny_llama, x)) == 0.0
    other = make_tiny_llama(kv_heads=4)
    with pytest.raises(ConfigError, match="another shape"):
        fold_smoothing(other.model.layers[0], sms[0])
