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


def test_sentencepiece_bpe_gguf_tokenizer_merges_by_score(tmp_path):
    """Gemma's GGUF tokenizer is SentencePiece BPE: rebuilt with merges ranked by score, "abc" is one
    piece (transformers' own GGUF converter made it a Unigram that split every word into characters)."""
    from gguf import GGUFWriter

    from safeptq.models import _spm_bpe_tokenizer

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "a", "b", "c", "▁", "ab", "abc", "▁abc"]
    scores = [-1000.0] * 5 + [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0]
    types = [3, 3, 3, 2, 3] + [1] * 7
    w = GGUFWriter(str(tmp_path / "t.gguf"), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = _spm_bpe_tokenizer(tmp_path / "t.gguf")
    assert tok.tokenize("abc abc") == ["abc", "▁abc"]
    assert tok("abc<start_of_turn>")["input_ids"] == [2, 10, 4]  # BOS added, the control token kept whole
    assert tok.decode([10, 11]) == "abc abc"
