"""CUDA paths of the engine, the end-to-end scope, the references and the evaluation (marked ``gpu``:
skipped without a CUDA device; run them on a GPU machine with ``pytest -m gpu``)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "quant"))
from conftest import make_tiny_llama  # noqa: E402
from quant_helpers import ids, logits, rel_err  # noqa: E402
from safeptq.data.calib import CalibSet  # noqa: E402
from safeptq.objectives import MSE, ContrastiveKLTop, ReferenceCache  # noqa: E402
from safeptq.quant.args import resolve_scheme  # noqa: E402
from safeptq.quant.deploy import rtn_quantize  # noqa: E402
from safeptq.quant.e2e import E2EConfig, calibrate_end_to_end  # noqa: E402
from safeptq.quant.engine import BlockwiseConfig, calibrate_blockwise  # noqa: E402
from safeptq.quant.rotation import fuse_residual_rotation, random_hadamard  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _calib(n: int = 8, t: int = 16, seed: int = 0) -> CalibSet:
    x = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))
    return CalibSet(x, torch.ones_like(x), torch.zeros(n, dtype=torch.long), torch.full((n,), t - 1), ["rand"] * n)


def _on_cpu(model) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def test_untrained_blockwise_engine_on_cuda_matches_cpu_rtn():
    rtn = make_tiny_llama()
    rtn_q = rtn_quantize(rtn, resolve_scheme("w4a16"))
    model = make_tiny_llama()
    cfg = BlockwiseConfig(scheme=resolve_scheme("w4a16"), epochs=0, lwc=False, let=False, device="cuda")
    res = calibrate_blockwise(model, _calib(), MSE(), cfg, progress=False)
    assert _on_cpu(model) and res.peak_accel_mb and res.peak_accel_mb > 0
    assert all(t.device.type == "cpu" for qw in res.qparams.values() for t in qw)  # none left on the GPU
    # Seen on an H200 (torch 2.11): 0.55% of the codes differ from the CPU's, by one step where
    # w / scale sits at a rounding boundary; the reconstruction error must be the same.
    for name, qw in rtn_q.items():
        q = res.qparams[name]
        assert (q.q.cpu().float() - qw.q.float()).abs().max() <= 1, name
        w = make_tiny_llama().get_submodule(name).weight
        err_gpu = ((q.dequantized.cpu() - w) ** 2).mean()
        err_cpu = ((qw.dequantized - w) ** 2).mean()
        assert torch.isclose(err_gpu, err_cpu, rtol=0.02), name
    same = sum(int((res.qparams[n].q.cpu() == q.q).sum()) for n, q in rtn_q.items())
    assert same / sum(q.q.numel() for q in rtn_q.values()) > 0.99


def test_trained_blockwise_engine_on_cuda_beats_rtn_like_on_cpu():
    x = ids()
    fp = logits(make_tiny_llama(), x)
    errs = {}
    for dev in ("cpu", "cuda"):
        model = make_tiny_llama()
        cfg = BlockwiseConfig(scheme=resolve_scheme("w4a8"), epochs=3, device=dev)
        res = calibrate_blockwise(model, _calib(), MSE(), cfg, progress=False)
        assert _on_cpu(model)
        assert all(b["loss_last"] <= b["loss_first"] for b in res.blocks)
        errs[dev] = rel_err(fp, logits(model, x))
    assert errs["cuda"] <= 1.5 * errs["cpu"] + 1e-3, errs


def test_reference_cache_built_on_cuda_matches_cpu():
    calib = _calib()
    models = {"instruct": make_tiny_llama(tie=False, seed=0), "base": make_tiny_llama(tie=False, seed=1)}
    cpu = ReferenceCache.build(models, calib, 32, dtype=torch.float32, progress=False)
    gpu = ReferenceCache.build({k: m.cuda() for k, m in models.items()}, calib, 32, dtype=torch.float32,
                               progress=False)
    idx = torch.arange(4)
    a, b = cpu.batch(idx, calib.input_ids[idx]), gpu.batch(idx, calib.input_ids[idx])
    for name in ("instruct", "base"):
        ta, tb = a.topk[name], b.topk[name]
        assert (ta.indices == tb.indices.cpu()).float().mean() > 0.99
        assert torch.allclose(ta.logp.sort(-1).values, tb.logp.cpu().sort(-1).values, atol=1e-4)


def test_end_to_end_on_cuda_lowers_objective_and_folds_exactly():
    calib = _calib()
    models = {"instruct": make_tiny_llama(tie=False, seed=0), "base": make_tiny_llama(tie=False, seed=1)}
    for m in models.values():
        with torch.no_grad():
            m.lm_head.weight.mul_(8)
    refs = ReferenceCache.build(models, calib, 64, dtype=torch.float32, progress=False)
    model = models["instruct"]
    res = calibrate_end_to_end(model, calib, ContrastiveKLTop(k=64, push="bounded", tail=True), refs,
                               E2EConfig(scheme="w4a4", steps=5, batch_size=8, device="cuda"), progress=False)
    assert res.loss_end < res.loss_start and res.fold_rel_err <= 1e-4
    assert _on_cpu(model)
    assert all(t.device.type == "cpu" for qw in res.qparams.values() for t in qw)


def test_fused_rotation_is_exact_on_cuda():
    x = ids()
    model = make_tiny_llama(tie=False).cuda()
    with torch.no_grad():
        ref = model(input_ids=x.cuda()).logits.double()
        fuse_residual_rotation(model, random_hadamard(model.config.hidden_size, seed=1))
        out = model(input_ids=x.cuda()).logits.double()
    assert rel_err(ref, out) <= 1e-4


def test_greedy_generation_on_cuda_matches_cpu(tiny_model_dir):
    from safeptq.eval.generation import greedy_generate
    from safeptq.models import load_model

    lm = load_model(str(tiny_model_dir))
    texts = ["hello there", "How do I bake bread at home?", "positive"]
    cpu = greedy_generate(lm.model, lm.tokenizer, texts, max_new_tokens=8, batch_size=2, progress=False)
    gpu = greedy_generate(lm.model.cuda(), lm.tokenizer, texts, max_new_tokens=8, batch_size=2, progress=False)
    assert gpu == cpu


def test_blockwise_bf16_autocast_on_cuda_tracks_fp32():
    """Issue 22: bf16 autocast for the training matmuls keeps the block losses and the quantized model
    close to plain float32 on the same device."""
    x = ids()
    fp = logits(make_tiny_llama(), x)
    out = {}
    for precision in ("fp32", "tf32", "bf16"):
        model = make_tiny_llama()
        cfg = BlockwiseConfig(scheme=resolve_scheme("w4a8"), epochs=3, device="cuda", precision=precision)
        res = calibrate_blockwise(model, _calib(), MSE(), cfg, progress=False)
        assert _on_cpu(model) and all(p.dtype == torch.float32 for p in model.parameters())
        out[precision] = (rel_err(fp, logits(model, x)), [b["loss_last"] for b in res.blocks])
    for precision in ("tf32", "bf16"):
        err, losses = out[precision]
        assert err <= 1.5 * out["fp32"][0] + 1e-3, out
        assert losses == pytest.approx(out["fp32"][1], rel=0.3), out


def _deep_pair(layers: int = 6):
    models = {}
    for seed, name in ((0, "instruct"), (1, "base")):
        m = make_tiny_llama(hidden=256, intermediate=512, layers=layers, heads=4, kv_heads=4, tie=False, seed=seed)
        with torch.no_grad():
            m.lm_head.weight.mul_(8)
        models[name] = m
    return models


def test_end_to_end_checkpointing_on_cuda_is_exact_and_saves_memory():
    calib = _calib(n=8, t=256)
    models = _deep_pair()
    refs = ReferenceCache.build(models, calib, 64, dtype=torch.float32, progress=False)
    peaks, losses = {}, {}
    for ckpt in (False, True):
        model = _deep_pair()["instruct"].to(torch.bfloat16)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        res = calibrate_end_to_end(model, calib, ContrastiveKLTop(k=64), refs,
                                   E2EConfig(scheme="w4a4", steps=3, batch_size=8, device="cuda", precision="bf16",
                                             checkpointing=ckpt), progress=False)
        peaks[ckpt] = torch.cuda.max_memory_allocated()
        losses[ckpt] = res.losses
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert res.fold_rel_err < 2e-2
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert peaks[True] < 0.8 * peaks[False], peaks
