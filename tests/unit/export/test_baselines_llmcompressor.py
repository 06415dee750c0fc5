import importlib.util
import json

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from safeptq.baselines import llmcompressor as lc
from safeptq.errors import ConfigError
from safeptq.export import SIDE_FILE, reload_check
from safeptq.quant.args import resolve_scheme

HAS_LLMCOMPRESSOR = importlib.util.find_spec("llmcompressor") is not None
needs_llmcompressor = pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor not installed")
TEXTS = ["the quick brown fox jumps over the lazy dog", "", "How do I bake bread at home?",
         "Sure, here is how to do it.", "The answer is 42."]


def test_missing_llmcompressor_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llmcompressor" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install safeptq\[baselines\]"):
        lc.run_llmcompressor(make_tiny_llama(), None, "gptq", resolve_scheme("w8a8"), ["x"])


def test_calibration_batches_from_texts_and_ids():
    tok = make_tiny_tokenizer()
    batches = lc.calibration_batches(TEXTS, tok, nsamples=3, seqlen=4)
    assert len(batches) == 3  # the empty text is skipped
    assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= 4 for b in batches)
    from_ids = lc.calibration_batches(torch.arange(40).reshape(4, 10), None, nsamples=8, seqlen=6)
    assert len(from_ids) == 4 and from_ids[0]["input_ids"].tolist() == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ConfigError, match="tokenizer"):
        lc.calibration_batches(TEXTS, None, nsamples=2, seqlen=4)


@needs_llmcompressor
@pytest.mark.parametrize(
    "method, preset, match",
    [
        ("rtn", "w4a16", "unknown baseline method 'rtn'; choose one of gptq, awq, smoothquant\\+gptq"),
        ("awq", "w8a8", "weight-only"),
        ("gptq", "w4a4kv4", "KV cache"),
    ],
)
def test_build_recipe_rejects_bad_requests(method, preset, match):
    with pytest.raises(ConfigError, match=match):
        lc.build_recipe(method, resolve_scheme(preset))


@needs_llmcompressor
@pytest.mark.parametrize(
    "method, kinds",
    [
        ("gptq", ["GPTQModifier"]),
        ("awq", ["AWQModifier", "QuantizationModifier"]),
        ("smoothquant+gptq", ["SmoothQuantModifier", "GPTQModifier"]),
    ],
)
def test_build_recipe_dispatch(method, kinds):
    scheme = resolve_scheme("w4a16", group_size=32) if method == "awq" else resolve_scheme("w8a8")
    recipe = lc.build_recipe(method, scheme)
    assert [type(m).__name__ for m in recipe] == kinds
    quant = recipe[-1]
    assert quant.ignore == ["lm_head"]
    assert quant.config_groups["group_0"].weights.num_bits == scheme.weights.num_bits


@needs_llmcompressor
def test_model_object_without_a_source_folder_is_refused():
    with pytest.raises(ConfigError, match="name_or_path"):
        lc.run_llmcompressor(make_tiny_llama(), make_tiny_tokenizer(), "gptq",
                             resolve_scheme("w8a8"), ["x"])


@needs_llmcompressor
def test_gptq_baseline_on_tiny_model(tiny_model_dir, tmp_path):
    from safeptq.models import load_model

    loaded = load_model(str(tiny_model_dir))
    scheme = resolve_scheme("w4a16", group_size=32)
    out = tmp_path / "gptq"
    model = lc.run_llmcompressor(loaded.model, loaded.tokenizer, "gptq", scheme, TEXTS,
                                 nsamples=4, seqlen=16, out_dir=out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
    info = json.loads((out / SIDE_FILE).read_text())
    assert info["metadata"]["method"] == "llmcompressor:gptq" and info["metadata"]["nsamples"] == 4
    assert len(info["layers"]) == 14
    report = reload_check(out, model, torch.randint(0, 300, (1, 10)))
    assert report["max_rel_err"] < 1e-5
    assert 4.9 <= report["bits_per_weight"] <= 5.1
