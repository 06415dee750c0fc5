"""Every method end to end on a tiny Qwen3 and a tiny Gemma 3 (q/k norms; Gemma's 1 + w norms and sandwich
norms): the exports reload with logits within 1e-3 of the in-memory quantized model (the save's reload check,
float32 tolerance), illegal transforms are switched off with the reason recorded."""

import pytest

import safeptq
from conftest import save_tiny_family

FAST = {"nsamples": 4, "seqlen": 16, "progress": False}


@pytest.fixture(scope="module", params=["qwen3", "gemma3", "phi3"])
def family_model(request, tmp_path_factory):
    return request.param, save_tiny_family(tmp_path_factory.mktemp(request.param) / "m", request.param)


def _check(q, out, fmt):
    rec = q.record
    assert rec["verify"]["weights_only_max_rel_err"] <= 1e-3 and rec["export"]["format"] == fmt
    assert (out / "README.md").is_file()


@pytest.mark.parametrize("method, scheme, fmt", [("rtn", "w8a8", "int-quantized"), ("omniquant", "w4a16", "pack-quantized")])
def test_quantize(family_model, shared_data, tmp_path, method, scheme, fmt):
    family, model = family_model
    kw = {} if method == "rtn" else {**FAST, "epochs": 1, "data_dir": str(shared_data)}
    q = safeptq.quantize(str(model), method=method, scheme=scheme, out=tmp_path / "o", **kw)
    _check(q, tmp_path / "o", fmt)


def test_realign(family_model, shared_data, tmp_path):
    family, model = family_model
    q = safeptq.realign(str(model), probe_model=str(model), scheme="w8a8", out=tmp_path / "o", epochs=1,
                        sep_limit=4, data_dir=str(shared_data), **FAST)
    _check(q, tmp_path / "o", "int-quantized")
    assert len(q.record["separability"]["after"]["per_layer"]["accuracy"]) == 2


def test_aaq(family_model, shared_data, tmp_path):
    family, model = family_model
    q = safeptq.aaq(str(model), objective="kl_top", scheme="w4a8", steps=2, topk=16, replies=0,
                    calib="wikitext2:calib", weights="rtn", out=tmp_path / "o", data_dir=str(shared_data), **FAST)
    _check(q, tmp_path / "o", "dense")
    if family == "gemma3":  # sandwich norms: the rotation is switched off, with the reason in the record
        assert not q.record["transforms"]["rotation"]
        assert any("rotation off on gemma3" in n for n in q.record["notes"])


def test_aaq_full_transforms(family_model, shared_data, tmp_path):
    """AAQ with the v/o head rotations and the up->down smoothing pair: folded into servable weights (the export's
    reload check holds), recorded; Phi-3's fused qkv keeps no head rotation."""
    family, model = family_model
    q = safeptq.aaq(str(model), objective="kl_top", scheme="w4a16", steps=2, topk=16, replies=0, smoothing="on",
                    rotation="off", vo_rotation=True, up_down=True, calib="wikitext2:calib", weights="rtn",
                    out=tmp_path / "o", data_dir=str(shared_data), **FAST)
    _check(q, tmp_path / "o", "pack-quantized")
    t = q.record["transforms"]
    assert "up_down" in t["smooth_pairs"]
    assert t["vo_rotation"] == ([] if family == "phi3" else [0, 1])


def test_aaq_online_hadamard_is_stored_with_the_fake_quant_export(family_model, shared_data, tmp_path):
    """W4A8 with an online Hadamard on every down_proj input: the export stores the matrices and a reload applies
    them before the activation quantizers (the save's reload check compares logits, so a reload without them
    fails it); served schemes and GPTQ weights are refused before any work."""
    import json

    from safeptq.errors import ConfigError
    from safeptq.models import load_model
    from safeptq.quant.rotation import OnlineHadamard

    family, model = family_model
    out = tmp_path / "o"
    q = safeptq.aaq(str(model), objective="kl_top", scheme="w4a8", steps=2, topk=16, replies=0, rotation="off",
                    online_hadamard=True, calib="wikitext2:calib", weights="rtn", out=out, data_dir=str(shared_data),
                    **FAST)
    _check(q, out, "dense")
    side = json.loads((out / "safeptq_quant.json").read_text())
    assert side["online_transforms"]["layers"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert (out / "safeptq_online.safetensors").is_file()
    assert "run-time op" in (out / "README.md").read_text()
    lm = load_model(str(out))
    assert isinstance(lm.model.model.layers[1].mlp.down_proj.input_transform, OnlineHadamard)
    for kw, needle in (({"scheme": "w4a16", "weights": "rtn"}, "cannot carry"),
                       ({"scheme": "w4a8", "weights": "gptq"}, "not supported with GPTQ weights")):
        with pytest.raises(ConfigError, match=needle):
            safeptq.aaq(str(model), objective="kl_top", online_hadamard=True, out=tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()


def test_aaq_qk_hadamard_quantizes_k_after_rope(family_model, shared_data, tmp_path):
    """W4A4KV4 with the post-RoPE q/k Hadamard: K is quantized in the attention (not at k_proj), the export stores
    the matrices and a reload puts the transform and its K quantizer back."""
    import json

    from safeptq.models import load_model
    from safeptq.quant.deploy import has_act_quant

    family, model = family_model
    out = tmp_path / "o"
    kv = family != "phi3"  # a fused qkv_proj refuses KV-cache schemes; the q/k transform itself still applies
    q = safeptq.aaq(str(model), objective="kl_top", scheme="w4a4kv4" if kv else "w4a8", steps=2, topk=16, replies=0,
                    rotation="off", qk_hadamard=True, calib="wikitext2:calib", weights="rtn", out=out,
                    data_dir=str(shared_data), **FAST)
    _check(q, out, "dense")
    assert q.record["transforms"]["qk_hadamard"] and not any("before RoPE" in n for n in q.record["notes"])
    side = json.loads((out / "safeptq_quant.json").read_text())
    assert side["online_transforms"]["attention"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for m in (q.model, load_model(str(out)).model):
        attn = m.model.layers[0].self_attn
        assert attn.qk_transform.h is not None and has_act_quant(m)
        if kv:
            assert attn.qk_transform.k_quant is not None
            assert not attn.k_proj._forward_hooks  # no K quantizer before RoPE
            assert attn.v_proj._forward_hooks  # V keeps its KV quantizer
