import pytest
import torch

from safeptq.errors import ConfigError
from safeptq.quant import ops
from safeptq.quant.args import QuantArgs, Strategy


def _fq(x, strategy, bits, sym, group=None):
    rows = ops.to_rows(x, strategy, group)
    s, z = ops.compute_qparams(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True), bits, sym)
    return ops.from_rows(ops.fake_quantize(rows, s, z, bits, sym), x.shape), s, z


def test_symmetric_per_channel_by_hand():
    w = torch.tensor([[1.5, -3.0, 0.75, 0.0], [0.1, 0.2, -0.3, 0.15]])
    out, s, z = _fq(w, Strategy.CHANNEL, 4, True)
    assert torch.allclose(s[0], torch.tensor([0.4]))  # 3 / 7.5
    assert torch.all(z == 0)
    # codes [3.75, -7.5, 1.875, 0] -> [4, -8, 2, 0]
    assert torch.allclose(out[0], torch.tensor([1.6, -3.2, 0.8, 0.0]))
    assert torch.allclose(s[1], torch.tensor([0.04]))  # 0.3 / 7.5


def test_asymmetric_per_token_by_hand():
    x = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [-1.0, 0.5, 2.0, 2.0]]])
    out, s, z = _fq(x, Strategy.TOKEN, 2, False)
    assert torch.allclose(s.flatten(), torch.tensor([1.0, 1.0]))
    assert torch.equal(z.flatten(), torch.tensor([-2.0, -1.0]))
    assert torch.allclose(out, torch.tensor([[[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 2.0, 2.0]]]))


def test_range_always_contains_zero():
    x = torch.tensor([[2.0, 3.0, 4.0, 5.0]])  # min 2 > 0 -> range [0, 5]
    out, s, z = _fq(x, Strategy.TENSOR, 8, False)
    assert torch.allclose(s, torch.tensor([[5.0 / 255]]))
    assert z.item() == -128


def test_symmetric_per_group_by_hand_with_clip():
    w = torch.tensor([[1.0, -2.0, 4.0, 0.5]])
    out, s, _ = _fq(w, Strategy.GROUP, 2, True, group=2)
    assert torch.allclose(s.flatten(), torch.tensor([4 / 3, 8 / 3]))
    # group 2: 4 / (8/3) = 1.5 -> 2 -> clamped to qmax 1
    assert torch.allclose(out, torch.tensor([[4 / 3, -8 / 3, 8 / 3, 0.0]]))


def test_group_must_divide():
    with pytest.raises(ConfigError, match="does not divide"):
        ops.to_rows(torch.zeros(2, 6), Strategy.GROUP, 4)


def test_int_roundtrip_matches_fake_quant():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    rows = ops.to_rows(w, Strategy.GROUP, 4)
    s, z = ops.compute_qparams(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True), 4, False)
    q = ops.quantize_to_int(rows, s, z, 4)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    assert torch.allclose(ops.dequantize(q, s, z), ops.fake_quantize(rows, s, z, 4, False))


def test_ste_gradients():
    x = torch.tensor([0.3, 1.7, -2.2], requires_grad=True)
    ops.round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    x.grad = None
    ops.clamp_ste(x, -1.0, 1.0).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))

    x = torch.tensor([0.26, -0.5, 9.0], requires_grad=True)
    y = ops.fake_quantize(x, torch.tensor(0.1), torch.tensor(0.0), 4, True)  # 9.0 is clipped
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))


def test_dynamic_per_token_and_group():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1)
    a = QuantArgs(num_bits=8, symmetric=False, strategy="token", dynamic=True)
    out = ops.fake_quantize_dynamic(x, a)
    for b in range(2):
        for t in range(3):
            ref, _, _ = _fq(x[b, t].unsqueeze(0), Strategy.TENSOR, 8, False)
            assert torch.allclose(out[b, t], ref[0])
    g = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=4, dynamic=True)
    outg = ops.fake_quantize_dynamic(x, g)
    ref, _, _ = _fq(x[1, 2, 4:].unsqueeze(0), Strategy.TENSOR, 4, False)
    assert torch.allclose(outg[1, 2, 4:], ref[0])
    assert ops.fake_quantize_dynamic(x.bfloat16(), a).dtype == torch.bfloat16
