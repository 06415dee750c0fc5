import pytest

from safeptq.errors import ModelError
from safeptq.models import ensure_pad_token, load_model, require_chat_template, resolve_model


def test_load_local_folder(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    assert lm.tokenizer.pad_token == "<|im_end|>"
    assert next(lm.model.parameters()).dtype.is_floating_point
    assert lm.model.config.num_hidden_layers == 2


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model not found: ./nowhere"):
        resolve_model("./nowhere")
    with pytest.raises(ModelError, match="model file not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="hub is offline"):
        resolve_model("someone/some-model")


def test_chat_template_required(tiny_model_no_template):
    lm = load_model(str(tiny_model_no_template))
    with pytest.raises(ModelError, match="has no chat template"):
        require_chat_template(lm.tokenizer, "m")


def test_pad_token_fallback(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    ensure_pad_token(tok)
    assert tok.pad_token == "<|im_end|>"
