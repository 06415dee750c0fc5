import math

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from safeptq.errors import ConfigError
from safeptq.quant.args import resolve_scheme
from safeptq.quant.qlinear import (
    QuantLinear,
    set_quantizers_enabled,
    unwrap_decoder_layer,
    wrap_decoder_layer,
)
from safeptq.quant.rotation import (
    CayleyRotation,
    OnlineHadamard,
    add_online_hadamard,
    attach_residual_rotation,
    fold_norms,
    fold_residual_rotation,
    fuse_residual_rotation,
    random_hadamard,
    sylvester_hadamard,
)
from safeptq.quant.smoothing import attach_smoothing, fold_smoothing
from quant_helpers import VARIANTS, ids, logits, random_smoothings, rel_err

TOL = 1e-4


@pytest.mark.parametrize("n", [1, 2, 64, 576, 1536, 12, 9])
def test_random_hadamard_is_orthonormal(n):
    h = random_hadamard(n, seed=3)
    assert h.dtype == torch.float64
    assert torch.allclose(h.T @ h, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, random_hadamard(n, seed=3))
    if n & (n - 1) == 0:
        assert torch.allclose(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    if n >= 12:
        assert not torch.equal(h, random_hadamard(n, seed=4))


def test_sylvester():
    h = sylvester_hadamard(8)
    assert torch.equal(h @ h.T, 8 * torch.eye(8, dtype=torch.float64))
    with pytest.raises(ConfigError, match="power of two"):
        sylvester_hadamard(12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fuse_residual_rotation_is_exact(variant):
    model = make_tiny_llama(**VARIANTS[variant])
    x = ids()
    ref = logits(model, x)
    fuse_residual_rotation(model, random_hadamard(64, seed=1))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert rel_err(ref, logits(model, x)) <= TOL


def test_non_orthogonal_rejected(tiny_llama):
    with pytest.raises(ConfigError, match="not orthogonal"):
        fuse_residual_rotation(tiny_llama, torch.eye(64) * 1.1)
    with pytest.raises(ConfigError, match=r"\[64, 64\]"):
        fuse_residual_rotation(tiny_llama, torch.eye(32))


def test_online_hadamard_plain_and_wrapped(tiny_llama):
    x = ids()
    ref = logits(tiny_llama, x)
    add_online_hadamard(tiny_llama, seed=0)
    down = tiny_llama.model.layers[0].mlp.down_proj
    assert isinstance(down.input_transform, OnlineHadamard)
    assert "input_transform" not in "".join(tiny_llama.state_dict())  # buffer is not persistent
    assert rel_err(ref, logits(tiny_llama, x)) <= TOL
    # wrapping moves the transform in front of the activation quantizer; unwrapping brings it back
    layer = tiny_llama.model.layers[0]
    wrap_decoder_layer(layer, resolve_scheme("w4a4"))
    assert isinstance(layer.mlp.down_proj.input_transform, OnlineHadamard)
    set_quantizers_enabled(layer, False)
    assert rel_err(ref, logits(tiny_llama, x)) <= TOL
    unwrap_decoder_layer(layer, fold=False)
    assert rel_err(ref, logits(tiny_llama, x)) <= TOL
    wrap_decoder_layer(layer, None)
    unwrap_decoder_layer(layer, fold=True)
    assert rel_err(ref, logits(tiny_llama, x)) <= TOL


def test_norm_that_is_not_rmsnorm_is_rejected(tiny_llama):
    class OnePlusNorm(nn.Module):  # Gemma-style weight offset: not foldable as weight * x
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(n) + 0.3)
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    tiny_llama.model.layers[1].post_attention_layernorm = OnePlusNorm(64)
    with pytest.raises(ConfigError, match=r"layers\.1\.post_attention_layernorm"):
        fold_norms(tiny_llama)


@pytest.mark.parametrize("variant", ["gqa-tied", "mha-untied"])
def test_rotation_hadamard_smoothing_folded_together(variant):
    model = make_tiny_llama(**VARIANTS[variant])
    x = ids()
    ref = logits(model, x)
    fuse_residual_rotation(model, random_hadamard(64, seed=2))
    add_online_hadamard(model, seed=5)
    for layer, sm in zip(model.model.layers, random_smoothings(model, x)):
        fold_smoothing(layer, sm)
    assert rel_err(ref, logits(model, x)) <= TOL


def _randomized_cayley(n=64, seed=0, scale=0.05):
    rot = CayleyRotation(n, seed=seed)
    with torch.no_grad():
        rot.weight.copy_(scale * torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return rot


def test_cayley_is_orthogonal_and_starts_at_init():
    rot = CayleyRotation(64, seed=1)
    assert torch.allclose(rot().double(), random_hadamard(64, seed=1), atol=1e-6)
    rot = _randomized_cayley()
    r = rot.matrix(torch.float64)
    assert torch.allclose(r.T @ r, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(r, random_hadamard(64, seed=0), atol=1e-2)


def test_learnable_rotation_and_smoothing_match_folded():
    model = make_tiny_llama()
    x = ids()
    ref = logits(model, x)
    rot = _randomized_cayley()
    attach_residual_rotation(model, rot)
    assert isinstance(model.lm_head, QuantLinear)
    assert rel_err(ref, logits(model, x)) <= TOL
    sms = random_smoothings(model, x)
    for i, (layer, sm) in enumerate(zip(model.model.layers, sms)):
        wrap_decoder_layer(layer, resolve_scheme("w4a4"), lwc=True, prefix=f"layers.{i}.")
        attach_smoothing(layer, sm)
    set_quantizers_enabled(model, False)
    attached = logits(model, x)
    assert rel_err(ref, attached) <= TOL

    set_quantizers_enabled(model, True)
    assert model.model.layers[0].self_attn.q_proj.weight_quantizer is not None  # wrapped after attach
    assert rel_err(ref, logits(model, x)) > 1e-3
    for _ in range(2):  # two forwards/backwards without a step: gradient accumulation must work
        model(input_ids=x).logits.pow(2).mean().backward()
    assert rot.weight.grad is not None and rot.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in sms[1].scales.values())

    with pytest.raises(ConfigError, match="fold"):
        fold_smoothing(model.model.layers[0], sms[0])  # rotation sits in front of the smoothing
    fold_residual_rotation(model, rot)
    assert type(model.lm_head) is nn.Linear
    set_quantizers_enabled(model, False)
    assert rel_err(attached, logits(model, x)) <= TOL
    for layer, sm in zip(model.model.layers, sms):
        fold_smoothing(layer, sm)
    assert rel_err(ref, logits(model, x)) <= TOL
    for layer in model.model.layers:
        unwrap_decoder_layer(layer, fold=False)
    assert rel_err(ref, logits(model, x)) <= TOL


def test_rotated_model_survives_save_and_reload(tmp_path):
    from transformers import LlamaForCausalLM

    model = make_tiny_llama(tie=True)
    x = ids()
    ref = logits(model, x)
    fuse_residual_rotation(model, random_hadamard(64, seed=0))
    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.lm_head.weight.data_ptr() != again.model.embed_tokens.weight.data_ptr()
    assert rel_err(ref, logits(again, x)) <= TOL
