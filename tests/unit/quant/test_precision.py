"""Training precision (fp32 / tf32 / bf16 autocast) and per-layer activation checkpointing of both
calibration engines, on tiny random Llamas (CPU)."""

import pytest
import torch

from conftest import make_tiny_llama
from quant_helpers import calib_set, ids, logits, rel_err, sharp_llama
from safeptq.errors import ConfigError
from safeptq.objectives import MSE, ContrastiveKLTop, ReferenceCache
from safeptq.quant.args import resolve_scheme
from safeptq.quant.e2e import E2EConfig, calibrate_end_to_end
from safeptq.quant.engine import BlockwiseConfig, calibrate_blockwise
from safeptq.quant import precision as prec
from safeptq.quant.precision import forward_precision, resolve_precision
from safeptq.quant.qlinear import wrap_linear






@pytest.fixture(scope="module")
def calib():
    return calib_set()


@pytest.fixture(scope="module")
def refs(calib):
    return ReferenceCache.build({"instruct": sharp_llama(0), "base": sharp_llama(1)}, calib, 64,
                                dtype=torch.float32, progress=False)


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision(None, "cuda") == "bf16"
    assert resolve_precision("tf32", "cpu") == "tf32"
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ConfigError, match="unknown precision"):
        BlockwiseConfig(scheme=resolve_scheme("w8a8"), precision="half")
    with pytest.raises(ConfigError, match="unknown precision"):
        E2EConfig(scheme="w8a8", precision="half")


@pytest.mark.parametrize("flags, native", [("fpu avx2 fma", False),
                                             ("avx512f avx512bw avx512_vnni", False),  # Ice Lake: emulated
                                             ("avx512f avx512_bf16", True),  # Cooper Lake, Zen 4
                                             ("avx512f amx_bf16 amx_tile", True)])  # Sapphire Rapids
def test_native_bf16_reads_the_cpu_flags_not_onednn(tmp_path, monkeypatch, flags, native):
    """oneDNN calls bf16 supported on every AVX512 CPU, where it is emulated and slower than float32."""
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: fpu {flags}\n")
    assert prec._cpu_flags(str(info)) >= set(flags.split())
    assert prec._cpu_flags(str(tmp_path / "absent")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prec, "_cpu_flags", lambda: set(flags.split()))
    assert prec.native_bf16() is native


def test_bf16_weights_are_transformed_and_quantized_in_float32():
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    q = wrap_linear(lin, resolve_scheme("w4a16", group_size=32), "x", lwc=True)
    w, b = q.effective_weight_bias()
    assert w.dtype == torch.float32 and b.dtype == torch.float32 and torch.equal(w, lin.weight.float())
    y = q(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()  # the clipping factors (float32) get gradients through the bf16 weight
    assert q.weight_quantizer.upbound_factor.grad is not None
    assert q.weight_quantizer.upbound_factor.dtype == torch.float32


def test_forward_precision_autocasts_matmuls_only_under_bf16():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with forward_precision("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with forward_precision("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_blockwise_precision_stays_close_to_fp32(precision):
    """tf32 is fp32 on a CPU (same losses); bf16 autocast moves the trained model only by bf16 rounding."""
    x, cal = ids(), calib_set()
    runs = {}
    for p in ("fp32", precision):
        model = make_tiny_llama()
        cfg = BlockwiseConfig(scheme=resolve_scheme("w8a8"), epochs=2, device="cpu", precision=p)
        res = calibrate_blockwise(model, cal, MSE(), cfg, progress=False)
        assert all(par.dtype == torch.float32 for par in model.parameters())
        runs[p] = (logits(model, x), [b["loss_last"] for b in res.blocks])
    (l32, loss32), (lp, lossp) = runs["fp32"], runs[precision]
    if precision == "tf32":
        assert lossp == loss32 and torch.equal(lp, l32)
    else:
        assert rel_err(l32, lp) < 0.05
        assert lossp == pytest.approx(loss32, rel=0.3)


def test_e2e_checkpointing_gives_the_same_run(calib, refs):
    """Recomputing each layer in the backward pass is exact: same losses, same quantized model."""
    x = ids()
    obj = ContrastiveKLTop(k=64, lam=0.2)
    out = {}
    for ckpt in (False, True):
        model = sharp_llama(0)
        res = calibrate_end_to_end(model, calib, obj, refs, E2EConfig(scheme="w4a4", steps=3, batch_size=4,
                                   device="cpu", checkpointing=ckpt), progress=False)
        assert not model.training and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        out[ckpt] = (res, logits(model, x))
    (r0, l0), (r1, l1) = out[False], out[True]
    assert [r["loss"] for r in r1.records] == pytest.approx([r["loss"] for r in r0.records], rel=1e-5)
    assert rel_err(l0, l1) < 1e-4
    for name, qp in r0.qparams.items():
        assert (r1.qparams[name].q.int() - qp.q.int()).abs().max() <= 1, name


def test_e2e_bf16_keeps_frozen_weights_in_bf16_and_tracks_fp32(calib, refs):
    obj = ContrastiveKLTop(k=64, lam=0.2)
    seen_dtypes = []
    model = sharp_llama(0, torch.bfloat16)

    def look(rec):
        seen_dtypes.append({p.dtype for n, p in model.named_parameters() if n.endswith("linear.weight")})

    res = calibrate_end_to_end(model, calib, obj, refs, E2EConfig(scheme="w4a4", steps=3, batch_size=4, device="cpu",
                               precision="bf16", checkpointing=True), progress=False, on_step=look)
    assert seen_dtypes and all(d == {torch.bfloat16} for d in seen_dtypes)  # frozen weights stayed bf16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = sharp_llama(0, torch.bfloat16)
    res32 = calibrate_end_to_end(ref, calib, obj, refs, E2EConfig(scheme="w4a4", steps=3, batch_size=4,
                                 device="cpu"), progress=False)
    assert res.fold_rel_err < 2e-2
    assert res.losses[0] == pytest.approx(res32.losses[0], rel=0.1)
    assert res.loss_end == pytest.approx(res32.loss_end, rel=0.1)
