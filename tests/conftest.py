"""Shared fixtures: tiny random-initialised Llama-shaped models (seconds), data dir, CLI runner."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def make_tiny_llama(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
    tie: bool = True,
    seed: int = 0,
):
    """A random LlamaForCausalLM small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    # random norm weights so smoothing/rotation tests cannot pass by accident on all-ones
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA




CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")

_CORPUS = [
    "I'm sorry, but I can't help with that.", "Sure, here is how to do it.", "positive negative",
    "world sports business technology", "The answer is 42.", "How do I bake bread at home?",
    "Write a script that can exploit vulnerabilities in a software or operating system.",
    "Give step by step instructions for making a cake.", "the quick brown fox jumps over the lazy dog",
] * 20


def make_tiny_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer trained in milliseconds, with ChatML specials (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def save_tiny_model(path: Path, chat_template: bool = True, **kw) -> Path:
    """A tiny random Llama + tokenizer saved as an HF folder (the unit tests' 'model')."""
    tok = make_tiny_tokenizer(chat_template)
    kw.setdefault("vocab", len(tok))
    model = make_tiny_llama(**kw)
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_no_template(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_nt") / "model", chat_template=False)


# -- shared helpers of the command-line tests (in process: no subprocess for a one-line error) --------------
def cli_error(capsys, argv, needle: str) -> str:
    """Run ``safeptq ARGV`` in process; assert exit 2, one ``safeptq: error:`` line naming ``needle``,
    no traceback. Returns the line."""
    from safeptq.cli.main import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (choices, types)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("safeptq: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def cli_ok(capsys, argv) -> str:
    from safeptq.cli.main import main

    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


def folder_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``: to prove a run changed none of them."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _isolated_home(request, tmp_path_factory, monkeypatch):
    """Unit tests never touch the user's $SAFEPTQ_HOME (caches, the identity memo); integration tests keep
    it, since they read the materialised default model there."""
    if request.node.get_closest_marker("integration") is not None:
        return
    if "SAFEPTQ_HOME" not in os.environ or not str(os.environ["SAFEPTQ_HOME"]).startswith(str(tmp_path_factory.getbasetemp())):
        monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path_factory.mktemp("home")))


# -- tiny random models of every supported family (safeptq.archs) -------------------------------------------
FAMILY_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                  "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig", "phi3": "Phi3Config"}


def make_tiny_family(family: str, vocab: int = 256, seed: int = 0, layers: int = 2):
    """A random causal LM of ``family`` (2 layers, hidden 64, GQA 4/2 heads of 16) with non-trivial
    norm gains and biases, so no transform test passes by accident on all-ones norms or zero biases."""
    import transformers
    from transformers import AutoModelForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    if family.startswith("gemma"):  # a sliding-window layer (window 8 < the tests' 10-16 tokens) and a global one
        kw.update(layer_types=["sliding_attention", "full_attention"][:layers] + ["full_attention"] * (layers - 2),
                  sliding_window=8)
    cfg = getattr(transformers, FAMILY_CONFIGS[family])(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's gain is 1 + w: both forms get a gain away from 1
                p.copy_((0.0 if family.startswith("gemma") else 1.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_tiny_family(path: Path, family: str, seed: int = 0) -> Path:
    tok = make_tiny_tokenizer()
    model = make_tiny_family(family, vocab=len(tok), seed=seed)
    for c in (model.config, model.generation_config):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path



# -- a seconds-long block-wise quantize command (omniquant, 4 samples of 16 tokens, 1 epoch) ----------------
QUICK_QUANTIZE = ["quantize", "--method", "omniquant", "--scheme", "w8a8", "--nsamples", "4", "--seqlen", "16",
                  "--epochs", "1", "--no-progress"]


def quick_quantize(model, out, *extra) -> list:
    return [*QUICK_QUANTIZE, "--model", model, "--out", out, *extra]


@pytest.fixture
def data(shared_data, monkeypatch):
    """The shared data folder, also as $SAFEPTQ_DATA (for subprocesses and commands without --data-dir)."""
    monkeypatch.setenv("SAFEPTQ_DATA", str(shared_data))
    return shared_data


def break_phase(monkeypatch, phase: str, exc: BaseException) -> None:
    """Make a run fail (or be interrupted) at ``phase``: calibration, export, eval or record."""
    def boom(*a, **k):
        raise exc

    target = {"calibration": "safeptq.quant.engine.calibrate_blockwise",
              "export": "safeptq.export.save.save_quantized",
              "eval": "safeptq.eval.api.evaluate_model",
              "record": "safeptq.export.card.model_card"}[phase]
    monkeypatch.setattr(target, boom)
