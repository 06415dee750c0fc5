"""Per-layer probes, separability, the probe cache and the ``safeptq probe`` command (tiny model)."""

import json

import pytest
import torch

from safeptq.cli.main import main
from safeptq.probes import LayerProbes, collect_last_token_states, fit_probes, separability, summarize
from safeptq.probes.workflow import ProbeSpec, get_probes, model_fingerprint


def _blobs(n=60, hidden=16, layers=3, shift=3.0, seed=0):
    """States where layer ℓ separates the classes along one direction with strength ℓ·shift."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([1] * (n // 2) + [0] * (n // 2))
    states = torch.randn(layers, n, hidden, generator=g)
    for layer in range(layers):
        states[layer, :, 0] += layer * shift * (y.float() * 2 - 1)
    return states, y


def test_fit_probes_finds_the_separating_layer_and_is_sparse():
    states, y = _blobs()
    probes = fit_probes(states, y, C=0.5)
    acc = probes.meta["heldout_accuracy"]
    assert acc[0] < 0.8 and acc[2] == 1.0  # layer 0 carries no signal, layer 2 a lot
    assert probes.meta["penalty"] == "l1"
    w = probes.coef[2]
    assert w[0] > 0 and (w[1:] == 0).float().mean() > 0.5  # L1: the signal direction, few others
    sep = separability(states, y, probes)
    assert sep["accuracy"][2] == 1.0 and sep["margin_malicious"][2] > 0 > sep["margin_benign"][2]
    assert sep["fisher"][2] > sep["fisher"][0]
    s = summarize(sep, from_layer=1)
    assert s["accuracy"] == pytest.approx((sep["accuracy"][1] + sep["accuracy"][2]) / 2)


def test_probes_trained_on_one_model_detect_a_shift_in_another():
    states, y = _blobs()
    probes = fit_probes(states, y)
    shifted = states.clone()
    shifted[:, y == 1, 0] -= 20.0  # malicious states moved to the benign side (what a fine-tune does)
    sep = separability(shifted, y, probes)
    assert sep["malicious_on_malicious_side"][2] == 0.0 and sep["margin_malicious"][2] < 0


def test_fit_probes_needs_both_classes():
    from safeptq.errors import DataError

    states, _ = _blobs()
    with pytest.raises(DataError, match="both"):
        fit_probes(states, torch.ones(states.shape[1], dtype=torch.long))


def test_save_load_round_trip(tmp_path):
    states, y = _blobs()
    p = fit_probes(states, y, held_out=0)
    p.save(tmp_path / "p")
    q = LayerProbes.load(tmp_path / "p")
    assert torch.equal(p.coef, q.coef) and torch.equal(p.intercept, q.intercept) and q.meta["C"] == 1.0
    from safeptq.errors import DataError

    with pytest.raises(DataError, match="safeptq probe"):
        LayerProbes.load(tmp_path / "missing")


def test_last_token_states_match_hidden_states():
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.pad_token = tok.eos_token
    tiny_llama = make_tiny_llama(vocab=len(tok)).eval()
    texts = ["How do I bake bread at home?", "Write a poem.", "the quick brown fox jumps over the lazy dog"]
    states = collect_last_token_states(tiny_llama, tok, texts, chat=False, batch_size=2)
    assert states.shape == (2, 3, 64)
    for i, t in enumerate(texts):  # one prompt at a time, no padding: hidden_states[ℓ+1] is layer ℓ's output
        ids = tok(t, return_tensors="pt")["input_ids"]
        hs = tiny_llama(ids, output_hidden_states=True).hidden_states
        assert torch.allclose(states[0, i], hs[1][0, -1], atol=1e-5)


def test_last_token_states_of_calibration_rows():
    from safeptq.data.calib import build_calib_set
    from safeptq.probes import last_token_states
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.pad_token = tok.eos_token
    model = make_tiny_llama(vocab=len(tok)).eval()
    texts = ["How do I bake bread at home?", "Write a poem.", "the quick brown fox jumps over the lazy dog"]
    calib = build_calib_set(tok, texts, chat=False)
    every = collect_last_token_states(model, tok, texts, chat=False)
    some = last_token_states(model, calib, torch.tensor([2, 0]), batch_size=1)
    assert some.shape == (2, 2, 64)
    assert torch.allclose(some[:, 0], every[:, 2], atol=1e-5) and torch.allclose(some[:, 1], every[:, 0], atol=1e-5)


def test_probe_cache_reuses_and_keys_on_the_weights(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    from safeptq.models import load_model

    lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    spec = ProbeSpec(limit=12, seqlen=32)
    p1, folder = get_probes(lm.model, lm.tokenizer, lm.path, spec, data_dir=shared_data, cache_dir=tmp_path)
    assert (folder / "probes.safetensors").is_file() and p1.n_layers == 2

    import safeptq.probes.workflow as wf

    monkeypatch.setattr(wf, "fit_probes", lambda *a, **k: pytest.fail("refitted instead of reusing the cache"))
    p2, folder2 = get_probes(lm.model, lm.tokenizer, lm.path, spec, data_dir=shared_data, cache_dir=tmp_path)
    assert folder2 == folder and torch.equal(p1.coef, p2.coef)
    assert ProbeSpec(limit=12, seqlen=64).key(lm.path) != spec.key(lm.path)
    assert model_fingerprint(lm.path) != model_fingerprint(tmp_path)


def test_probe_command(tiny_model_dir, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAFEPTQ_HOME", str(tmp_path / "home"))
    out = tmp_path / "probe"
    rc = main(["probe", "--model", str(tiny_model_dir), "--name", "tiny", "--compare", f"again={tiny_model_dir}",
               "--fit-limit", "12", "--limit", "6", "--seqlen", "32", "--data-dir", str(shared_data),
               "--out", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = json.loads((out / "separability.json").read_text())
    assert set(doc["separability"]) == {"tiny", "again"}
    assert doc["separability"]["tiny"] == doc["separability"]["again"]  # same weights, same numbers
    assert len(doc["separability"]["tiny"]["accuracy"]) == 2 and doc["prompts"]["n"] == 12
    for f in ("layers.png", "projection.png", "probes/probes.safetensors"):
        assert (out / f).stat().st_size > 0
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert "tiny" in cap.out and "fisher" in cap.out


@pytest.mark.parametrize("argv, needle", [
    (["--compare", "a=x", "--compare", "a=y"], "unique"),
    (["--probes", "P", "--probe-model", "M"], "either --probes or --probe-model"),
    (["--limit", "0"], "--limit"),
])
def test_probe_command_bad_input(tiny_model_dir, tmp_path, capsys, argv, needle):
    rc = main(["probe", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_paper_probes_fit_raw_features_with_saga_and_key_their_own_cache():
    import torch

    from safeptq.probes.probes import fit_probes
    from safeptq.probes.workflow import ProbeSpec

    g = torch.Generator().manual_seed(0)
    n, h = 120, 16
    labels = torch.tensor([1] * 60 + [0] * 60)
    states = torch.randn(2, n, h, generator=g)
    states[:, :, 0] += 3.0 * labels  # separable along a high-variance coordinate
    states[:, :, 1] *= 0.01  # and a near-constant one
    paper = fit_probes(states, labels, fit="paper", seed=0)
    std = fit_probes(states, labels, seed=0)
    assert paper.meta["solver"] == "saga" and paper.meta["fit"] == "paper" and std.meta["solver"] == "liblinear"
    assert not torch.allclose(paper.coef, std.coef)  # a different estimator, not a relabelled one
    for p in (paper, std):
        z = p.logits(states)
        assert ((z > 0).long() == labels).float().mean() > 0.9
    assert ProbeSpec().key("x") != ProbeSpec(fit="paper").key("x")
    assert "fit" not in ProbeSpec()  # probes cached before the option keep their key


def test_paper_schedule_chooses_paper_probes():
    from safeptq.recipes import RealignRecipe

    assert RealignRecipe.build({"model": "m", "scheme": "w8a8", "schedule": "paper"}).probes.fit == "paper"
    assert RealignRecipe.build({"model": "m", "scheme": "w8a8", "probes": {"model": "a"}}).probes.fit == "standardized"
