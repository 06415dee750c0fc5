import pytest
import torch
from torch import nn

from safeptq.errors import ConfigError
from safeptq.quant.args import resolve_scheme
from safeptq.quant.qlinear import (
    LLAMA_LINEARS,
    QuantLinear,
    set_quantizers_enabled,
    unwrap_decoder_layer,
    wrap_decoder_layer,
    wrap_linear,
)
from quant_helpers import ids, logits, rel_err


def test_no_scheme_is_identity():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    q = wrap_linear(lin, None, "x")
    x = torch.randn(3, 16)
    assert torch.equal(q(x), lin(x))
    assert q.weight is lin.weight and (q.in_features, q.out_features) == (16, 8)


def test_fold_matches_weight_only_forward():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    q = wrap_linear(lin, resolve_scheme("w4a8"), "x", lwc=True)
    with torch.no_grad():
        q.weight_quantizer.upbound_factor.fill_(1.0)  # a non-trivial clip
    x = torch.randn(5, 32)
    set_quantizers_enabled(q, False, weights=False)
    folded = q.fold()
    assert type(folded) is nn.Linear
    assert torch.allclose(folded(x), q(x), atol=1e-6)
    assert torch.allclose(folded.weight, q.quantized_weight().dequantized)
    assert not torch.equal(folded.weight, lin.weight)
    set_quantizers_enabled(q, True)
    assert not torch.allclose(q(x), folded(x), atol=1e-4)  # 8-bit activations now change it


def test_transform_chain_and_bake():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    q = QuantLinear(lin)
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref_w = lin.weight.detach().clone()
    q.add_weight_transform("a", lambda w, b: (w * s.to(w.dtype), b))
    q.add_weight_transform("b", lambda w, b: (w + 1, b))
    x = torch.randn(2, 4)
    y = q(x)
    with pytest.raises(ConfigError, match="fold that one first"):
        q.bake_transforms(["b"])
    q.bake_transforms(["a"])
    assert q.transform_keys() == ["b"]
    assert torch.allclose(lin.weight, ref_w * s)
    assert torch.allclose(q(x), y, atol=1e-6)


def test_wrap_unwrap_layer(tiny_llama):
    layer = tiny_llama.model.layers[0]
    originals = {n: layer.get_submodule(n) for n in LLAMA_LINEARS}
    x = ids()
    ref = logits(tiny_llama, x)
    wrapped = wrap_decoder_layer(layer, resolve_scheme("w4a4kv4", head_dim=16), lwc=True, prefix="layers.0.")
    assert set(wrapped) == set(LLAMA_LINEARS)
    assert wrapped["self_attn.k_proj"].output_quantizer is not None
    assert wrapped["self_attn.q_proj"].output_quantizer is None
    assert wrapped["self_attn.v_proj"].output_quantizer.args.group_size == 16
    quant = logits(tiny_llama, x)
    assert 1e-4 < rel_err(ref, quant) < 0.5
    set_quantizers_enabled(layer, False)
    assert rel_err(ref, logits(tiny_llama, x)) == 0.0
    with pytest.raises(ConfigError, match="already has quantizers"):
        wrap_decoder_layer(layer, resolve_scheme("w8a8"))
    unwrap_decoder_layer(layer, fold=False)
    assert all(layer.get_submodule(n) is m for n, m in originals.items())

    wrap_decoder_layer(layer, resolve_scheme("w4a16"))
    unwrap_decoder_layer(layer, fold=True)
    assert all(type(layer.get_submodule(n)) is nn.Linear for n in LLAMA_LINEARS)
    assert 0 < rel_err(ref, logits(tiny_llama, x)) < 0.5


def test_group_that_does_not_divide_names_layer(tiny_llama):
    layer = tiny_llama.model.layers[1]
    with pytest.raises(ConfigError, match=r"layers\.1\.self_attn\.q_proj"):
        wrap_decoder_layer(layer, resolve_scheme("w4a16", group_size=48), prefix="layers.1.")
