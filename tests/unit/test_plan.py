"""The memory plan (issue 22): parameter counts from the config alone, scaling, --max-memory, and the
refusal before any weight is loaded."""

import json

import pytest
import torch

from conftest import make_tiny_llama
from safeptq.cli.main import main
from safeptq.errors import ConfigError
from safeptq.plan import model_shape, parse_max_memory, plan_blockwise, plan_end_to_end


def test_shape_from_config_matches_the_real_model():
    model = make_tiny_llama(layers=3, tie=False)
    s = model_shape(model.config)
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert (s.n_layers, s.hidden, s.vocab) == (3, 64, 256)


def _seven_b():
    from transformers import LlamaConfig

    return model_shape(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000))


def test_blockwise_plan_is_one_model_copy_plus_streams_and_one_block():
    s = _seven_b()
    assert 6.6e9 < s.params < 6.8e9
    kw = dict(device="cpu", nsamples=128, seqlen=128, batch_size=4, epochs=2, weight_bits=8)
    bf16, fp32 = plan_blockwise(s, dtype="bfloat16", **kw), plan_blockwise(s, dtype="float32", **kw)
    model_gib = s.params * 2 / 2**30
    cal = bf16.phases["calibration"]["host_mb"] / 1024
    codes_gib = s.linear_params / 2**30  # int8 codes kept for the exporter
    # one bf16 copy + the codes + streams (0.25 GiB) + one float32 block being trained (on the CPU)
    assert model_gib + codes_gib < cal < model_gib + codes_gib + 6
    assert fp32.phases["calibration"]["host_mb"] > cal + 0.9 * model_gib
    gpu = plan_blockwise(s, dtype="bfloat16", **{**kw, "device": "cuda"})
    assert gpu.device_mb / 1024 < 6  # one block, not the model
    assert plan_blockwise(s, dtype="bfloat16", **{**kw, "device": "cuda"}, probe_model=True).device_mb / 1024 > 12
    assert "memory plan: peak host" in bf16.describe()


def test_end_to_end_plan_checkpointing_and_bf16_shrink_the_device_peak():
    s = _seven_b()
    kw = dict(device="cuda", nsamples=16, seqlen=2048, batch_size=4, steps=10, weight_bits=4, topk=1000,
              n_references=2)
    full = plan_end_to_end(s, dtype="bfloat16", precision="fp32", checkpointing=False, **kw)
    ckpt = plan_end_to_end(s, dtype="bfloat16", precision="bf16", checkpointing=True, **kw)
    assert ckpt.phases["training"]["device_mb"] < 0.5 * full.phases["training"]["device_mb"]
    assert ckpt.phases["training"]["device_mb"] / 1024 < 60


def test_max_memory_parsing():
    assert parse_max_memory(None) is None
    assert parse_max_memory("none") == (None, None)
    assert parse_max_memory("64") == (64 * 1024, None)
    assert parse_max_memory("host=2GiB,device=512MiB") == (2048, 512)
    with pytest.raises(ConfigError, match="cannot read size"):
        parse_max_memory("lots")
    with pytest.raises(ConfigError, match="unknown key 'gpu'"):
        parse_max_memory("gpu=3G")


def test_plan_refuses_before_loading_and_is_recorded(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import safeptq.models

    real_load = safeptq.models.load_model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the memory check")

    monkeypatch.setattr(safeptq.models, "load_model", no_load)
    rc = main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--scheme", "w8a8",
               "--out", str(tmp_path / "q"), "--max-memory", "host=10MiB"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("safeptq: error:")]
    assert rc == 2 and len(lines) == 1 and "of host memory and 10 MiB is available" in lines[0], err
    assert not (tmp_path / "q").exists()
    monkeypatch.setattr(safeptq.models, "load_model", real_load)
    rc = main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--scheme", "w8a8",
               "--out", str(tmp_path / "q"), "--no-progress"])
    assert rc == 0
    rec = json.loads((tmp_path / "q" / "quantize.json").read_text())
    plan = rec["memory_plan"]
    assert plan["host_mb"] >= max(p["host_mb"] for p in plan["phases"].values()) - 1
    assert rec["dtype"] == "float32" and rec["recipe"]["dtype"] == "auto"
    assert plan["phases"]["export"]["host_mb"] > plan["phases"]["load"]["host_mb"]  # export holds two copies
    # (no plan-vs-peak ratio here: pytest's RSS peak is the whole test session's)
