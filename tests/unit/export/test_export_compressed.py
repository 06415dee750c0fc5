import json

import pytest
import torch
from export_helpers import fake_quantize_model, ids
from safetensors.torch import load_file

from conftest import make_tiny_llama, make_tiny_tokenizer
from safeptq.errors import ExportError
from safeptq.export import README_FILE, SIDE_FILE, export_compressed, reload_check
from safeptq.export import compressed_tensors as ct_export
from safeptq.quant.args import resolve_scheme
from safeptq.quant.qlinear import wrap_linear

ROUND_TRIPS = {
    # name: (preset, group_size, format, bits-per-weight range on the tiny model, fp32 scales)
    "w4a16-g32-sym": ("w4a16", 32, "pack-quantized", (4.9, 5.1)),
    "w4a16-g32-asym": ("w4a16-asym", 32, "pack-quantized", (5.0, 5.2)),
    "w8a8": ("w8a8", None, "int-quantized", (8.2, 8.6)),
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _quantized_model(tokenizer, preset, group=None, dtype=torch.float32):
    scheme = resolve_scheme(preset, group_size=group)
    model = make_tiny_llama(vocab=len(tokenizer)).to(dtype)
    qparams = fake_quantize_model(model, scheme)
    return model, scheme, qparams


@pytest.fixture(scope="module", params=sorted(ROUND_TRIPS))
def round_trip(request, tokenizer, tmp_path_factory):
    preset, group, fmt, bits = ROUND_TRIPS[request.param]
    model, scheme, _ = _quantized_model(tokenizer, preset, group)
    out = tmp_path_factory.mktemp("rt") / request.param
    export_compressed(model, tokenizer, scheme, out, metadata={"method": "rtn", "recipe": "unit"})
    report = reload_check(out, model, ids(len(tokenizer)))
    return dict(out=out, model=model, scheme=scheme, fmt=fmt, bits=bits, report=report)


def test_round_trip_logits_match(round_trip):
    r = round_trip["report"]
    assert r["reload_path"] == "transformers"
    assert r["max_rel_err"] < 1e-5 and r["weights_only_max_rel_err"] < 1e-5


def test_config_has_quantization_config_and_ignores_lm_head(round_trip):
    cfg = json.loads((round_trip["out"] / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["format"] == round_trip["fmt"]
    assert cfg["ignore"] == ["lm_head"]
    assert cfg["quantization_status"] == "compressed"
    weights = cfg["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == round_trip["scheme"].weights.num_bits
    assert weights["symmetric"] == round_trip["scheme"].weights.symmetric
    assert "safeptq" not in json.dumps(cfg) and "recipe" not in cfg


def test_side_file_holds_project_metadata(round_trip):
    info = json.loads((round_trip["out"] / SIDE_FILE).read_text())
    assert info["scheme_name"] == round_trip["scheme"].name
    assert info["format"] == round_trip["fmt"] and info["fake_quant"] is False
    assert info["metadata"] == {"method": "rtn", "recipe": "unit"}
    assert "safeptq_version" in info
    assert not (round_trip["out"] / README_FILE).exists()


def test_bits_per_weight_in_expected_range(round_trip):
    lo, hi = round_trip["bits"]
    assert lo <= round_trip["report"]["bits_per_weight"] <= hi


def test_tensors_on_disk_are_compressed(round_trip):
    tensors = load_file(str(round_trip["out"] / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert "lm_head.weight" not in tensors or tensors["lm_head.weight"].is_floating_point()
    assert not any(k.endswith("g_idx") for k in tensors)
    if round_trip["fmt"] == "pack-quantized":
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert (f"{name}.weight_zero_point" in tensors) is (not round_trip["scheme"].weights.symmetric)
    else:
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert f"{name}.weight_zero_point" not in tensors  # symmetric weights drop the zero point


@pytest.mark.parametrize("round_trip", ["w8a8"], indirect=True)
def test_w8a8_reload_applies_activation_quant(round_trip):
    r = round_trip["report"]
    assert r["activation_quant"] is True
    # the activation-quant comparison differs from the weights-only one, so it is not vacuous
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(round_trip["out"]))
    x = ids(400)
    with torch.no_grad():
        with_acts = reloaded(input_ids=x).logits
        ct_export._set_ct_quant(reloaded, False)
        without = reloaded(input_ids=x).logits
    assert (with_acts - without).abs().max() > 100 * max(r["max_abs_err"], 1e-7)


def test_given_qparams_are_written_exactly(tokenizer, tmp_path):
    model, scheme, qparams = _quantized_model(tokenizer, "w4a16-asym", 32)
    out = export_compressed(model, tokenizer, scheme, tmp_path / "q", qparams=qparams)
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(tensors[f"{name}.weight_scale"], qparams[name].scale)


def test_bfloat16_model_round_trips_within_bf16_precision(tokenizer, tmp_path):
    model, scheme, _ = _quantized_model(tokenizer, "w4a16", 64, dtype=torch.bfloat16)
    out = export_compressed(model, tokenizer, scheme, tmp_path / "bf16")
    report = reload_check(out, model, ids(len(tokenizer)))
    assert report["max_rel_err"] < 2e-2
    assert 4.2 <= report["bits_per_weight"] <= 4.3  # bf16 scales, group 64


def test_fallback_reload_through_compressed_tensors(round_trip, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("transformers cannot load this")

    monkeypatch.setattr(ct_export, "_reload_transformers", refuse)
    r = reload_check(round_trip["out"], round_trip["model"], ids(400))
    assert r["reload_path"] == "compressed-tensors"
    assert r["max_rel_err"] < 1e-5


def test_w4a4_is_saved_dense_with_a_note(tokenizer, tmp_path):
    model, scheme, _ = _quantized_model(tokenizer, "w4a4")
    out = export_compressed(model, tokenizer, scheme, tmp_path / "w4a4")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    info = json.loads((out / SIDE_FILE).read_text())
    assert info["format"] == "dense" and info["fake_quant"] is True
    assert "not a serving format" in info["note"]
    assert "not a serving format" in (out / README_FILE).read_text()
    report = reload_check(out, model, ids(len(tokenizer)))
    assert report["max_abs_err"] == 0.0 and report["activation_quant"] is False
    assert report["bits_per_weight"] == 32.0


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_off_grid_weights_raise_and_leave_no_folder(tokenizer, tmp_path):
    model, scheme, _ = _quantized_model(tokenizer, "w4a16", 32)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] += 1e-2
    with pytest.raises(ExportError, match=r"model\.layers\.1\.self_attn\.v_proj"):
        export_compressed(model, tokenizer, scheme, tmp_path / "bad")
    assert _leftovers(tmp_path) == []


def test_failure_while_writing_leaves_no_folder_and_keeps_the_old_export(tokenizer, tmp_path, monkeypatch):
    model, scheme, _ = _quantized_model(tokenizer, "w8a8")
    out = export_compressed(model, tokenizer, scheme, tmp_path / "exp")
    before = (out / "model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ct_export, "_save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_compressed(model, tokenizer, scheme, out)
    assert _leftovers(tmp_path) == ["exp"]
    assert (out / "model.safetensors").read_bytes() == before

    with pytest.raises(OSError):
        export_compressed(model, tokenizer, scheme, tmp_path / "new")
    assert _leftovers(tmp_path) == ["exp"]


def test_refuses_to_replace_a_folder_that_is_not_an_export(tokenizer, tmp_path):
    model, scheme, _ = _quantized_model(tokenizer, "w8a8")
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="not a safeptq export"):
        export_compressed(model, tokenizer, scheme, tmp_path / "orig")


def test_qparams_for_unknown_layers_and_unfolded_layers_raise(tokenizer, tmp_path):
    model, scheme, qparams = _quantized_model(tokenizer, "w8a8")
    bogus = {"model.layers.9.mlp.up_proj": qparams["model.layers.0.mlp.up_proj"]}
    with pytest.raises(ExportError, match="layers.9"):
        export_compressed(model, tokenizer, scheme, tmp_path / "a", qparams=bogus)
    layer = model.model.layers[0].self_attn
    layer.q_proj = wrap_linear(layer.q_proj, scheme, "model.layers.0.self_attn.q_proj")
    with pytest.raises(ExportError, match="QuantLinear.*fold"):
        export_compressed(model, tokenizer, scheme, tmp_path / "b")
    assert _leftovers(tmp_path) == []
