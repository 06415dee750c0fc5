import pytest
from pydantic import ValidationError

from safeptq.errors import ConfigError, UnknownNameError
from safeptq.quant.args import PRESETS, QuantArgs, Strategy, check_group_size, preset_names, resolve_scheme


def test_group_strategy_needs_group_size():
    with pytest.raises(ValidationError, match="group_size"):
        QuantArgs(num_bits=4, strategy="group")
    with pytest.raises(ValidationError, match="group_size"):
        QuantArgs(num_bits=4, strategy="group", group_size=0)
    with pytest.raises(ValidationError, match="only meaningful"):
        QuantArgs(num_bits=4, strategy="channel", group_size=64)


@pytest.mark.parametrize("bad", [{"num_bits": 1}, {"num_bits": 9}, {"typo": 1}, {"strategy": "row"}])
def test_quant_args_rejects(bad):
    with pytest.raises(ValidationError):
        QuantArgs(**bad)


def test_strategy_case_insensitive_and_range():
    a = QuantArgs(num_bits=4, strategy="GROUP", group_size=32)
    assert a.strategy is Strategy.GROUP
    assert (a.qmin, a.qmax) == (-8, 7)


@pytest.mark.parametrize(
    "name, w_bits, w_strategy, w_sym, a_bits, kv",
    [
        ("w8a8", 8, "channel", True, 8, False),
        ("w8a16", 8, "channel", True, None, False),
        ("w4a16", 4, "group", True, None, False),
        ("w4a16-asym", 4, "group", False, None, False),
        ("w4a8", 4, "channel", True, 8, False),
        ("w4a4", 4, "channel", True, 4, False),
        ("w4a4kv4", 4, "channel", True, 4, True),
    ],
)
def test_presets(name, w_bits, w_strategy, w_sym, a_bits, kv):
    s = resolve_scheme(name)
    assert s.name == name
    assert (s.weights.num_bits, s.weights.strategy.value, s.weights.symmetric) == (w_bits, w_strategy, w_sym)
    assert not s.weights.dynamic
    if a_bits is None:
        assert s.input_activations is None
    else:
        a = s.input_activations
        assert (a.num_bits, a.strategy, a.symmetric, a.dynamic) == (a_bits, Strategy.TOKEN, False, True)
    assert (s.kv_cache is not None) == kv


def test_resolve_is_deep_copy_and_normalizes():
    s = resolve_scheme("W4A16_ASYM")
    s.weights.num_bits = 3
    assert PRESETS["w4a16-asym"].weights.num_bits == 4
    assert resolve_scheme("w4a16").weights.group_size == 64


def test_group_override_and_kv_clamp():
    assert resolve_scheme("w4a16", group_size=128).weights.group_size == 128
    with pytest.raises(ConfigError, match="per channel"):
        resolve_scheme("w8a8", group_size=128)
    kv = resolve_scheme("w4a4kv4", head_dim=64).kv_cache
    assert (kv.group_size, kv.symmetric, kv.num_bits) == (64, False, 4)
    assert resolve_scheme("w4a4kv4", head_dim=128).kv_cache.group_size == 128


def test_unknown_scheme_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        resolve_scheme("w3a3")
    msg = str(e.value)
    assert "w3a3" in msg and all(n in msg for n in preset_names())
    assert isinstance(e.value, KeyError)


def test_check_group_size_names_layer():
    check_group_size("model.layers.0.mlp.down_proj", 1536, 64)
    check_group_size("x", 100, None)
    with pytest.raises(ConfigError, match=r"in_features=1536 of layer 'model\.layers\.3\.mlp\.down_proj'"):
        check_group_size("model.layers.3.mlp.down_proj", 1536, 100)
