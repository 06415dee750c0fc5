"""Calibration sets: spec parsing, tokenization (right padding, left truncation), named mixes."""

import json

import pytest
import torch

from conftest import make_tiny_tokenizer
from safeptq.data.calib import BENIGN, MALICIOUS, build_calib_set, load_calibration, parse_calib_spec
from safeptq.data.chat import format_chat
from safeptq.errors import ConfigError, DataError, UnknownNameError


@pytest.fixture(scope="module")
def tok():
    t = make_tiny_tokenizer()
    t.pad_token = t.eos_token
    return t


# -- parse_calib_spec ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("alpaca:calib", [("alpaca:calib", None)]),
    (" wikitext2 ", [("wikitext2", None)]),
    ("advbench:calib=0.75,alpaca:calib=0.25", [("advbench:calib", 0.75), ("alpaca:calib", 0.25)]),
    ("a=0.5, b=0.3 ,c=0.2", [("a", 0.5), ("b", 0.3), ("c", 0.2)]),
    ("harmful:/tmp/x.csv@goal=0.6,benign:/tmp/y.jsonl=0.4", [("harmful:/tmp/x.csv@goal", 0.6),
                                                            ("benign:/tmp/y.jsonl", 0.4)]),
    ("alpaca:calib=1", [("alpaca:calib", 1.0)]),
])
def test_parse_calib_spec_valid(spec, expected):
    assert parse_calib_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("", "empty --calib"),
    (" , ", "empty --calib"),
    ("alpaca:calib=half", "must be a number"),
    ("alpaca:calib=0", r"must be in \(0, 1\]"),
    ("alpaca:calib=1.5", r"must be in \(0, 1\]"),
    ("advbench:calib=0.75,alpaca:calib", "needs a share for each"),
    ("advbench:calib=0.75,alpaca:calib=0.5", "must add up to 1, got 1.25"),
])
def test_parse_calib_spec_invalid(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_calib_spec(spec)


# -- build_calib_set ----------------------------------------------------------------------------------------
def test_right_padding_mask_and_last_idx(tok):
    texts = ["How do I bake bread at home?", "The answer is 42.", "Sure"]
    cs = build_calib_set(tok, texts, labels=[MALICIOUS, BENIGN, BENIGN], seqlen=64, chat=True, sources=["a", "b", "b"])
    rows = [tok(format_chat(tok, t), add_special_tokens=False)["input_ids"] for t in texts]
    lens = [len(r) for r in rows]
    assert cs.input_ids.shape == (3, max(lens)) and len(cs) == 3
    for i, r in enumerate(rows):
        assert cs.input_ids[i, : lens[i]].tolist() == r
        assert (cs.input_ids[i, lens[i]:] == tok.pad_token_id).all()
        assert cs.attention_mask[i].tolist() == [1] * lens[i] + [0] * (max(lens) - lens[i])
        assert cs.last_idx[i] == lens[i] - 1
        assert cs.attention_mask[i, cs.last_idx[i]] == 1
    assert cs.labels.tolist() == [1, 0, 0]
    assert cs.n_tokens == sum(lens)
    d = cs.describe()
    assert d == {"n": 3, "max_len": max(lens), "tokens": sum(lens), "malicious": 1, "sources": ["a", "b"]}
    # the last real token of a chat sample is the end of the assistant prompt
    ends = tok(format_chat(tok, "x"), add_special_tokens=False)["input_ids"][-2:]
    assert cs.input_ids[1, cs.last_idx[1] - 1: cs.last_idx[1] + 1].tolist() == ends


def test_left_truncation_keeps_the_end(tok):
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 20) + " The answer is 42."
    full = tok(long, add_special_tokens=False)["input_ids"]
    cs = build_calib_set(tok, [long, "short"], seqlen=16, chat=False)
    assert len(full) > 16
    assert cs.input_ids.shape[1] == 16
    assert cs.input_ids[0].tolist() == full[-16:]
    assert cs.last_idx[0] == 15 and cs.attention_mask[0].all()
    assert cs.labels.tolist() == [BENIGN, BENIGN] and cs.sources == ["user", "user"]
    chat = build_calib_set(tok, [long], seqlen=16, chat=True)
    assert chat.input_ids[0].tolist() == tok(format_chat(tok, long), add_special_tokens=False)["input_ids"][-16:]


def test_build_calib_set_errors(tok):
    with pytest.raises(ConfigError, match="empty"):
        build_calib_set(tok, [])
    with pytest.raises(ConfigError, match="--seqlen must be at least 2"):
        build_calib_set(tok, ["a"], seqlen=1)
    with pytest.raises(ConfigError, match="2 calibration texts but 1 labels"):
        build_calib_set(tok, ["a", "b"], labels=[1])


# -- load_calibration -----------------------------------------------------------------------------------------
def test_qrealign_mix_on_shared_data(tok, shared_data):
    cs = load_calibration("advbench:calib=0.75,alpaca:calib=0.25", tok, nsamples=8, seqlen=64,
                          data_dir=shared_data)
    assert len(cs) == 8
    assert cs.labels.tolist() == [1] * 6 + [0] * 2
    assert cs.sources == ["advbench:calib"] * 6 + ["alpaca:calib"] * 2
    assert cs.describe()["malicious"] == 6
    assert cs.input_ids.shape[1] <= 64
    assert (cs.attention_mask.sum(1) - 1).tolist() == cs.last_idx.tolist()
    # fixed splits: the first advbench:calib prompt is row 200 of the shipped file
    from safeptq.data import load_prompt_set

    first = load_prompt_set("advbench:calib", data_dir=shared_data).texts[0]
    want = tok(format_chat(tok, first), add_special_tokens=False)["input_ids"][-64:]
    assert cs.input_ids[0, : len(want)].tolist() == want
    # same spec, same set
    again = load_calibration("advbench:calib=0.75,alpaca:calib=0.25", tok, nsamples=8, seqlen=64,
                             data_dir=shared_data)
    assert torch.equal(again.input_ids, cs.input_ids)


def test_wikitext2_windows(tok, shared_data):
    cs = load_calibration("wikitext2", tok, nsamples=4, seqlen=32, data_dir=shared_data, seed=3)
    assert cs.input_ids.shape == (4, 32)
    assert cs.attention_mask.all() and cs.last_idx.tolist() == [31] * 4
    assert cs.labels.tolist() == [0] * 4 and cs.sources == ["wikitext2"] * 4
    other = load_calibration("wikitext2", tok, nsamples=4, seqlen=32, data_dir=shared_data, seed=4)
    assert not torch.equal(other.input_ids, cs.input_ids)


def test_text_and_prompt_sets_mix(tok, shared_data):
    """``wikitext2=0.5,alpaca:calib=0.5``: the chat rows as the prompt set alone gives them, then the
    text windows as wikitext2 alone gives them, right-padded to one width."""
    cs = load_calibration("alpaca:calib=0.5,wikitext2=0.5", tok, nsamples=4, seqlen=32, data_dir=shared_data,
                          seed=3)
    chat = load_calibration("alpaca:calib", tok, nsamples=2, seqlen=32, data_dir=shared_data)
    text = load_calibration("wikitext2", tok, nsamples=2, seqlen=32, data_dir=shared_data, seed=3)
    assert cs.sources == ["alpaca:calib"] * 2 + ["wikitext2"] * 2
    assert cs.input_ids.shape == (4, 32) and cs.labels.tolist() == [0] * 4
    for got, want in zip(cs.token_lists(), chat.token_lists() + text.token_lists()):
        assert torch.equal(got, want)
    assert cs.last_idx.tolist() == chat.last_idx.tolist() + [31, 31]
    assert cs.input_ids[0, len(chat.token_lists()[0]):].eq(tok.pad_token_id).all()


def test_wikitext2_calib_is_the_second_half_only(shared_data):
    """AAQ's default calibration text never meets the first perplexity windows of ``wikitext2``."""
    from safeptq.data import load_prompt_set

    full = load_prompt_set("wikitext2:lines", data_dir=shared_data).texts[0]
    half = load_prompt_set("wikitext2:calib", data_dir=shared_data).texts[0]
    assert full.endswith(half) and len(full) // 2 <= len(full) - len(half) < len(full) // 2 + 2000
    assert full[len(full) - len(half) - 1] == "\n"  # cut at a line break


def test_wikitext2_is_the_gptq_convention_string(shared_data):
    """``"\n\n".join`` of the 4,358 HF test rows, empty ones included, rebuilt from the local files."""
    from safeptq.data import load_prompt_set

    text = load_prompt_set("wikitext2", data_dir=shared_data).texts[0]
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert len(text) == 1_294_336 and text.count("\n\n") >= 4357


def test_user_file_labels(tok, tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"question number {i}?"}) for i in range(5)) + "\n")
    harmful = load_calibration(str(p), tok, nsamples=3, seqlen=32)
    assert harmful.labels.tolist() == [1, 1, 1] and harmful.sources == [str(p)] * 3
    benign = load_calibration(f"benign:{p}@question", tok, nsamples=3, seqlen=32, chat=False)
    assert benign.labels.tolist() == [0, 0, 0]
    assert benign.input_ids[0, : benign.last_idx[0] + 1].tolist() == tok("question number 0?")["input_ids"]


def test_load_calibration_errors(tok, shared_data):
    with pytest.raises(ConfigError, match="must add up to 1"):
        load_calibration("advbench:calib=0.7,alpaca:calib=0.2", tok, nsamples=8, data_dir=shared_data)
    with pytest.raises(DataError, match=r"alpaca:calib has 150 prompts, 151 requested"):
        load_calibration("alpaca:calib", tok, nsamples=151, data_dir=shared_data)
    with pytest.raises(DataError, match=r"advbench:calib has 150 prompts, 160 requested"):
        load_calibration("advbench:calib=0.8,alpaca:calib=0.2", tok, nsamples=200, data_dir=shared_data)
    with pytest.raises(ConfigError, match="--nsamples must be positive"):
        load_calibration("alpaca:calib", tok, nsamples=0, data_dir=shared_data)
    with pytest.raises(UnknownNameError, match="unknown prompt set 'alpaka:calib'"):
        load_calibration("alpaka:calib", tok, nsamples=4, data_dir=shared_data)
    with pytest.raises(DataError, match="fewer than --seqlen"):
        load_calibration("wikitext2", tok, nsamples=1, seqlen=10**7, data_dir=shared_data)


# -- add_responses (self-distillation replies) -----------------------------------------------------------
def test_add_responses_appends_each_prompts_own_greedy_reply(tok):
    """Batched with left padding, every chat row gets exactly the reply the model gives that prompt
    alone; text rows, labels and last_idx are untouched."""
    from conftest import make_tiny_llama
    from safeptq.data.calib import CalibSet, _concat, add_responses

    model = make_tiny_llama(vocab=len(tok), seed=3)
    model.generation_config.eos_token_id = tok.eos_token_id
    chat = build_calib_set(tok, ["How do I bake bread at home?", "The answer is 42.", "world sports"],
                           labels=[BENIGN, MALICIOUS, BENIGN], seqlen=64, sources=["a", "h", "a"])
    window = torch.tensor([tok("the quick brown fox jumps over the lazy dog")["input_ids"][:8]])
    text = CalibSet(window, torch.ones_like(window), torch.tensor([0]), torch.tensor([7]), ["text"])
    cs = _concat([chat, text], tok.pad_token_id)
    out = add_responses(cs, model, tok, max_new_tokens=6, batch_size=2, text_sources={"text"}, progress=False)
    assert out.labels.tolist() == [0, 1, 0, 0] and out.last_idx.tolist() == cs.last_idx.tolist()
    assert out.sources == cs.sources
    rows, before = out.token_lists(), cs.token_lists()
    assert torch.equal(rows[3], before[3])  # the text window gets no reply
    for i in range(3):
        prompt = before[i]
        alone = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], do_sample=False,
                               max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0]
        reply = alone[len(prompt):].tolist()
        if tok.eos_token_id in reply:
            reply = reply[: reply.index(tok.eos_token_id) + 1]
        assert rows[i].tolist() == prompt.tolist() + reply
        assert 1 <= len(reply) <= 6


def test_add_responses_errors(tok):
    from conftest import make_tiny_llama
    from safeptq.data.calib import CalibSet, add_responses

    model = make_tiny_llama(vocab=len(tok))
    ids = torch.tensor([[5, 6, 7, 8]])
    text = CalibSet(ids, torch.ones_like(ids), torch.tensor([0]), torch.tensor([3]), ["wikitext2"])
    with pytest.raises(ConfigError, match="plain text"):
        add_responses(text, model, tok, 4, text_sources={"wikitext2"}, progress=False)
    with pytest.raises(ConfigError, match="at least 1"):
        add_responses(text, model, tok, 0, progress=False)
