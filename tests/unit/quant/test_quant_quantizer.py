import math

import pytest
import torch

from safeptq.errors import CalibrationError, ConfigError
from safeptq.quant.args import QuantArgs
from safeptq.quant.quantizer import ActQuantizer, WeightQuantizer, lwc_parameters, quantize_weight

CH4 = QuantArgs(num_bits=4, symmetric=False, strategy="channel")
G4 = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=8)


T8 = QuantArgs(num_bits=8, strategy="tensor")


@pytest.mark.parametrize("args, scale_shape", [(CH4, (6, 1)), (G4, (6, 2)), (T8, (1,))])
def test_quantize_weight_shapes_and_forward_agree(args, scale_shape):
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    qw = quantize_weight(w, args)
    assert qw.scale.shape == scale_shape and qw.zero.shape == scale_shape
    assert qw.q.shape == w.shape and qw.q.dtype == torch.int8 and qw.zero.dtype == torch.int8
    wq = WeightQuantizer(args, (6, 16))
    assert torch.allclose(wq(w), qw.dequantized)
    assert torch.allclose(wq.quantize(w).dequantized, qw.dequantized)
    assert (w - qw.dequantized).abs().max() <= qw.scale.max() * 0.51 + 1e-6  # at most half a step


def test_lwc_init_clips_to_sigmoid_4():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    wq = WeightQuantizer(QuantArgs(num_bits=8, symmetric=False), (1, 4), lwc=True)
    assert torch.all(wq.upbound_factor == 4.0) and wq.upbound_factor.shape == (1, 1)
    sig = 1 / (1 + math.exp(-4))
    assert torch.allclose(wq.quantize(w).scale, torch.tensor([[(2.0 + 1.0) * sig / 255]]))


@pytest.mark.parametrize("args", [CH4, G4])
def test_lwc_gradient_reaches_clip_factors(args):
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    wq = WeightQuantizer(args, (6, 16), lwc=True)
    rows = 6 if args.strategy.value == "channel" else 12
    assert wq.upbound_factor.shape == (rows, 1)
    assert lwc_parameters(wq) == [wq.upbound_factor, wq.lowbound_factor]
    loss = (wq(w) - w).pow(2).sum()
    loss.backward()
    assert wq.upbound_factor.grad is not None and wq.upbound_factor.grad.abs().sum() > 0
    assert wq.lowbound_factor.grad.abs().sum() > 0


def test_weight_gradient_is_straight_through():
    w = torch.randn(4, 8, requires_grad=True)
    WeightQuantizer(CH4, (4, 8))(w).sum().backward()
    # the STE passes 1 to every entry; the row's min and max also feed the scale, as in OmniQuant
    extreme = torch.zeros_like(w, dtype=torch.bool)
    extreme.scatter_(1, w.argmax(1, keepdim=True), True).scatter_(1, w.argmin(1, keepdim=True), True)
    assert torch.allclose(w.grad[~extreme], torch.ones(int((~extreme).sum())))


def test_disabled_is_identity():
    w = torch.randn(3, 8)
    wq = WeightQuantizer(CH4, (3, 8))
    wq.enabled = False
    assert wq(w) is w
    aq = ActQuantizer(QuantArgs(num_bits=4, symmetric=False, strategy="token", dynamic=True))
    aq.enabled = False
    assert aq(w) is w


def test_dynamic_weights_rejected():
    with pytest.raises(ConfigError, match="dynamic"):
        WeightQuantizer(QuantArgs(num_bits=4, dynamic=True), (2, 2))
    with pytest.raises(ConfigError, match="channel or group"):
        WeightQuantizer(QuantArgs(num_bits=4, strategy="token"), (2, 2))


def test_static_activation_quantizer():
    aq = ActQuantizer(QuantArgs(num_bits=8, symmetric=False, strategy="tensor"))
    x = torch.linspace(-1, 3, 20).view(2, 10)
    with pytest.raises(CalibrationError, match="observing"):
        aq(x)
    aq.observing = True
    assert aq(x) is x
    aq.observing = False
    assert aq.x_min.item() == -1 and aq.x_max.item() == 3
    assert (aq(x) - x).abs().max() <= 4 / 255 / 2 + 1e-6
    with pytest.raises(ConfigError, match="tensor"):
        ActQuantizer(QuantArgs(num_bits=8, strategy="token", dynamic=False))
