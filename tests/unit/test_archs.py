"""Every supported family (safeptq.archs), on tiny random models: each equivalent transform folds
exactly (relative logit error <= 1e-4 in float32) or is refused with its reason; unsupported
architectures are refused before any weight is loaded."""

import pytest
import torch

from conftest import FAMILY_CONFIGS, cli_error, make_tiny_family
from safeptq.archs import SPECS, spec_for_config, spec_of_model
from safeptq.errors import ConfigError, UnknownNameError

FAMILIES = list(FAMILY_CONFIGS)
TOL = 1e-4
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _stats(model):
    from safeptq.quant.smoothing import record_smoothing_stats

    layer = model.model.layers[0]
    with record_smoothing_stats(layer) as st:
        model(input_ids=IDS)
    return st


def test_every_family_has_a_spec_and_the_linears_exist():
    assert set(SPECS) == set(FAMILIES)
    for fam in FAMILIES:
        m = make_tiny_family(fam)
        spec = spec_of_model(m)
        assert spec.family == fam
        for rel in spec.linears:
            assert isinstance(m.model.layers[0].get_submodule(rel), torch.nn.Linear)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pair", ["attn_in", "mlp_in", "vo", "qk", "up_down"])
def test_smoothing_pair_folds_exactly_or_is_refused(family, pair):
    from safeptq.quant.smoothing import LayerGeometry, LayerSmoothing, attach_smoothing, fold_smoothing

    model = make_tiny_family(family)
    spec = spec_of_model(model)
    ref = _logits(model)
    layer = model.model.layers[0]
    sm = LayerSmoothing(LayerGeometry.of(layer), (pair,))
    with torch.no_grad():
        sm.scales[pair].copy_(0.5 + torch.rand_like(sm.scales[pair]))
    if pair in spec.not_equivalent:
        with pytest.raises(ConfigError, match=f"not an equivalent transform on {family}"):
            attach_smoothing(layer, sm)
        return
    attach_smoothing(layer, sm)
    assert _rel(_logits(model), ref) <= TOL  # attached: the function is unchanged
    fold_smoothing(layer, sm)
    assert _rel(_logits(model), ref) <= TOL  # folded: still unchanged
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                          make_tiny_family(family).state_dict().values()))
    assert changed  # the fold did move weights (a no-op would pass the equality trivially)


@pytest.mark.parametrize("family", FAMILIES)
def test_init_smoothing_switches_illegal_pairs_off(family, caplog):
    from safeptq.quant.smoothing import PAIRS, init_smoothing

    model = make_tiny_family(family)
    spec = spec_of_model(model)
    sm = init_smoothing(model.model.layers[0], _stats(model), 0.5, PAIRS)
    assert set(sm.pairs) == set(spec.legal_pairs())
    for pair in spec.not_equivalent:
        if pair in PAIRS:
            assert pair not in sm.pairs


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_rotation_is_exact_or_refused(family):
    from safeptq.quant.rotation import fuse_residual_rotation, random_hadamard

    model = make_tiny_family(family)
    spec = spec_of_model(model)
    ref = _logits(model)
    q = random_hadamard(64, seed=1)
    if not spec.rotation_ok:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ConfigError, match=f"not an equivalent transform on {family}"):
            fuse_residual_rotation(model, q)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any change
        return
    fuse_residual_rotation(model, q)
    assert _rel(_logits(model), ref) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_online_hadamard_on_down_proj_is_exact(family):
    from safeptq.quant.rotation import add_online_hadamard

    model = make_tiny_family(family)
    ref = _logits(model)
    add_online_hadamard(model)
    assert _rel(_logits(model), ref) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_engine_runs_and_folds_on_every_family(family):
    from safeptq.data.calib import CalibSet
    from safeptq.objectives import MSE
    from safeptq.quant.args import resolve_scheme
    from safeptq.quant.engine import BlockwiseConfig, calibrate_blockwise

    model = make_tiny_family(family)
    ids = torch.randint(3, 256, (4, 10), generator=torch.Generator().manual_seed(1))
    calib = CalibSet(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(4, dtype=torch.long),
                     last_idx=torch.full((4,), 9), sources=["x"] * 4)
    cfg = BlockwiseConfig(scheme=resolve_scheme("w8a8"), epochs=1, batch_size=2, device="cpu")
    res = calibrate_blockwise(model, calib, MSE(), cfg, progress=False)
    assert len(res.qparams) == 2 * len(spec_of_model(model).linears)
    assert torch.isfinite(_logits(model)).all()


def test_unsupported_architecture_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    import safeptq.models

    cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=256)
    with pytest.raises(UnknownNameError, match="architecture 'gpt_neox' .* is not supported"):
        spec_for_config(cfg)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    from conftest import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(tmp_path / "neox")
    monkeypatch.setattr(safeptq.models, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    cli_error(capsys, ["quantize", "--model", tmp_path / "neox", "--method", "rtn", "--scheme", "w8a8",
                       "--out", tmp_path / "o"], "architecture 'gpt_neox' (GPTNeoXForCausalLM) is not supported")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_gets_its_own_kwargs(family):
    """Sliding-window and global layers (Gemma 2/3) get other masks and RoPE tables: the block-wise
    engine must run each block with what the model itself passes that block."""
    from safeptq.quant.engine import capture_layer_kwargs

    model = make_tiny_family(family)  # Gemma: one sliding-window layer, one global
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
             for layer in model.model.layers]
    with torch.no_grad():
        model.model(input_ids=IDS[:1], use_cache=False)
    for h in hooks:
        h.remove()
    got = capture_layer_kwargs(model, IDS[:1], "cpu")
    assert len(got) == len(seen) == 2
    if family.startswith("gemma"):  # the two layers are called differently (mask and/or RoPE)
        def same(a, b):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.shape == b.shape and torch.equal(a, b)
            if isinstance(a, tuple) and isinstance(b, tuple):
                return all(same(x, y) for x, y in zip(a, b))
            return a == b
        assert not all(same(seen[0][k], seen[1][k]) for k in seen[0] if k != "hidden_states")
    for want, have in zip(seen, got):
        for key, value in want.items():
            if key in ("past_key_values", "past_key_value", "hidden_states"):
                continue
            v2 = have[key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, v2), key
            elif isinstance(value, tuple):
                assert all(torch.equal(a, b) for a, b in zip(value, v2)), key


@pytest.mark.parametrize("family", FAMILIES)
def test_up_down_smoothing_starts_from_the_down_proj_statistics(family):
    """SmoothQuant's initialisation for up→down reads down_proj's input range; a fused gate_up_proj (Phi-3)
    keeps its gate half untouched by the fold."""
    from safeptq.quant.qlinear import base_linear
    from safeptq.quant.smoothing import fold_smoothing, init_smoothing

    model = make_tiny_family(family)
    spec = spec_of_model(model)
    layer = model.model.layers[0]
    st = _stats(model)
    assert st["down_in"].shape == (base_linear(layer.get_submodule(spec.mlp_writer)).in_features,)
    sm = init_smoothing(layer, st, 0.5, ("up_down",))
    assert not torch.allclose(sm.scales["up_down"], torch.ones_like(sm.scales["up_down"]))
    ref = _logits(model)
    up = base_linear(layer.get_submodule(spec.mlp_up)).weight.detach().clone()
    fold_smoothing(layer, sm)
    assert _rel(_logits(model), ref) <= TOL
    new = base_linear(layer.get_submodule(spec.mlp_up)).weight.detach()
    half = up.shape[0] // 2
    if spec.mlp_up_offset:  # only the up half of gate_up_proj moved
        assert torch.equal(new[:half], up[:half]) and not torch.equal(new[half:], up[half:])
    else:
        assert not torch.equal(new, up)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_rotation_of_values_is_exact_or_refused(family):
    """A learnable per-head rotation of v_proj's output, undone in o_proj's input (with GQA: shared by a kv
    head's query heads), after v/o smoothing: exact attached and folded, on every family with separate v."""
    from safeptq.quant.rotation import CayleyRotation, attach_head_rotation, fold_head_rotation
    from safeptq.quant.smoothing import LayerGeometry, LayerSmoothing, attach_smoothing, fold_smoothing

    model = make_tiny_family(family)
    spec = spec_of_model(model)
    layer = model.model.layers[0]
    g = LayerGeometry.of(layer)
    rot = CayleyRotation(g.head_dim, seed=3)
    with torch.no_grad():
        rot.weight.normal_(0, 0.1)  # away from the Hadamard start, so the Cayley part is exercised too
    if "vo" in spec.not_equivalent:
        with pytest.raises(ConfigError, match=f"not an equivalent transform on {family}"):
            attach_head_rotation(layer, rot)
        return
    ref = _logits(model)
    sm = LayerSmoothing(g, ("vo",))
    with torch.no_grad():
        sm.scales["vo"].copy_(0.5 + torch.rand_like(sm.scales["vo"]))
    attach_smoothing(layer, sm)
    v_before = layer.self_attn.v_proj.linear.weight.detach().clone()
    attach_head_rotation(layer, rot)
    assert _rel(_logits(model), ref) <= TOL
    fold_smoothing(layer, sm)
    fold_head_rotation(layer, rot)
    assert _rel(_logits(model), ref) <= TOL
    assert not layer.self_attn.v_proj.transform_keys() and not layer.self_attn.o_proj.transform_keys()
    assert not torch.allclose(layer.self_attn.v_proj.linear.weight, v_before, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_qk_transform_after_rope_is_exact(family, impl):
    """A Hadamard on every head's q and k after RoPE leaves q·kᵀ (and so the model) unchanged, through the
    family's sdpa or its own eager attention (Gemma 2's soft-capping included); detaching restores the base."""
    from safeptq.quant.attention import attach_qk_transform, detach_qk_transform
    from safeptq.quant.rotation import random_hadamard

    model = make_tiny_family(family)
    model.config._attn_implementation = impl
    ref = _logits(model)
    for layer in model.model.layers:
        attach_qk_transform(model, layer.self_attn, random_hadamard(layer.self_attn.head_dim, 1).float(), None)
    assert model.config._attn_implementation == f"safeptq_{impl}"
    assert _rel(_logits(model), ref) <= TOL
    detach_qk_transform(model)
    assert model.config._attn_implementation == impl and _rel(_logits(model), ref) == 0
    with pytest.raises(ConfigError, match="orthogonal"):
        attach_qk_transform(model, model.model.layers[0].self_attn, 2 * torch.eye(model.model.layers[0].self_attn.head_dim), None)
