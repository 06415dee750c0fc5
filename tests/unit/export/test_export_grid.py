import pytest
import torch

from safeptq.errors import ExportError
from safeptq.export import check_qparams, recover_qparams, serving_format
from safeptq.export.grid import grid_error
from safeptq.quant.args import QuantArgs, resolve_scheme
from safeptq.quant.quantizer import WeightQuantizer, quantize_weight

SYM_G = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=16)
ASYM_G = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=16)
SYM_CH8 = QuantArgs(num_bits=8, symmetric=True, strategy="channel")


@pytest.mark.parametrize(
    "preset, group, fmt",
    [
        ("w4a16", 64, "pack-quantized"),
        ("w4a16-asym", 64, "pack-quantized"),
        ("w8a16", None, "pack-quantized"),
        ("w8a8", None, "int-quantized"),
        ("w4a8", None, None),
        ("w4a4", None, None),
        ("w4a4kv4", None, None),
    ],
)
def test_serving_format_table(preset, group, fmt):
    out = serving_format(resolve_scheme(preset, group_size=group))
    assert out.format == fmt
    assert out.served is (fmt is not None)
    assert out.reason


@pytest.mark.parametrize("args", [SYM_G, ASYM_G, SYM_CH8], ids=["sym-g16", "asym-g16", "sym-ch8"])
def test_recover_reproduces_minmax_fake_quant(args):
    torch.manual_seed(0)
    deq = quantize_weight(torch.randn(24, 64), args).dequantized
    rec = recover_qparams("layer", deq, args)
    assert torch.allclose(rec.dequantized, deq, rtol=0, atol=1e-6)  # same grid up to rounding
    assert grid_error(deq, rec, args) < 1e-5


def test_symmetric_minmax_is_not_idempotent_so_recovery_is_needed():
    torch.manual_seed(0)
    deq = quantize_weight(torch.randn(24, 64), SYM_G).dequantized
    again = quantize_weight(deq, SYM_G).dequantized
    assert (again - deq).abs().max() > 1e-3  # absmax/7.5 applied twice moves the grid
    assert torch.allclose(recover_qparams("layer", deq, SYM_G).dequantized, deq, rtol=0, atol=1e-6)


def test_recover_handles_learned_clipping():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    wq = WeightQuantizer(SYM_G, (8, 32), lwc=True)
    with torch.no_grad():
        wq.upbound_factor.fill_(0.5)  # clip to sigmoid(0.5) ≈ 0.62 of the range
        wq.lowbound_factor.fill_(0.5)
    deq = wq(w).detach()
    rec = recover_qparams("layer", deq, SYM_G)
    assert torch.allclose(rec.dequantized, deq, atol=1e-6)


def test_off_grid_weights_raise_naming_the_layer():
    torch.manual_seed(0)
    deq = quantize_weight(torch.randn(8, 32), SYM_G).dequantized
    deq[3, 5] += 0.013
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.up_proj.*not on a 4-bit"):
        recover_qparams("model.layers.0.mlp.up_proj", deq, SYM_G)


def test_check_qparams_rejects_foreign_qparams():
    torch.manual_seed(0)
    a = quantize_weight(torch.randn(8, 32), ASYM_G)
    b = quantize_weight(torch.randn(8, 32), ASYM_G)
    check_qparams("q_proj", a.dequantized, a, ASYM_G)
    with pytest.raises(ExportError, match="q_proj"):
        check_qparams("q_proj", a.dequantized, b, ASYM_G)
