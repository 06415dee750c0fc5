"""Block-wise objectives: masked MSE, Q-realign's probe push, the registry."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from safeptq.errors import ConfigError, UnknownNameError
from safeptq.objectives import MSE, BlockBatch, ProbePush, get_objective, objective_names
from safeptq.objectives.reconstruction import masked_mse

B, T, H = 3, 5, 8


def _batch(seed=0, layer=0, labels=(0, 0, 0), lengths=(5, 3, 1)):
    g = torch.Generator().manual_seed(seed)
    out, tgt = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return BlockBatch(layer, out, tgt, mask, torch.tensor(labels), mask.sum(1) - 1)


def _probes(layers=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(coef=torch.randn(layers, H, generator=g), intercept=torch.randn(layers, generator=g))


def test_masked_mse_by_hand():
    b = _batch()
    loss = MSE()(b)
    assert loss.shape == (B,)
    for i, n in enumerate((5, 3, 1)):
        want = ((b.output[i, :n] - b.target[i, :n]) ** 2).mean()
        assert torch.allclose(loss[i], want, rtol=1e-6)
    assert torch.equal(masked_mse(b), loss)


def test_masked_positions_do_not_count():
    b = _batch()
    changed = b.output.clone()
    changed[b.mask == 0] += 100.0
    b2 = BlockBatch(0, changed, b.target, b.mask, b.labels, b.last_idx)
    assert torch.equal(MSE()(b2), MSE()(b))
    changed[0, 0] += 1.0  # a real token does count
    assert not torch.equal(MSE()(b2), MSE()(b))


def test_mse_of_identical_outputs_is_zero_and_an_empty_mask_is_safe():
    b = _batch()
    same = BlockBatch(0, b.target, b.target, b.mask, b.labels, b.last_idx)
    assert torch.equal(MSE()(same), torch.zeros(B))
    empty = BlockBatch(0, b.output, b.target, torch.zeros_like(b.mask), b.labels, b.last_idx)
    assert torch.isfinite(MSE()(empty)).all()


def test_last_token_picks_each_samples_last_real_position():
    b = _batch()
    h = b.last_token()
    assert torch.equal(h, torch.stack([b.output[0, 4], b.output[1, 2], b.output[2, 0]]))
    assert torch.equal(b.last_token(b.target)[1], b.target[1, 2])


def test_probe_push_malicious_softplus_benign_mse():
    probes = _probes()
    obj = ProbePush(probes, margin=0.5)
    b = _batch(layer=1, labels=(1, 0, 1))
    loss = obj(b)
    mse = masked_mse(b)
    h = b.last_token()
    z = h @ probes.coef[1] + probes.intercept[1]
    assert torch.allclose(obj.probe_logit(1, h), z, rtol=1e-6)
    assert torch.allclose(loss[0], F.softplus(0.5 - z[0]), rtol=1e-6)
    assert torch.allclose(loss[2], F.softplus(0.5 - z[2]), rtol=1e-6)
    assert torch.equal(loss[1], mse[1])
    # the probe term reads the last prompt token only: other tokens of a malicious sample do not matter
    out = b.output.clone()
    out[0, :4] += 10.0
    assert torch.equal(obj(BlockBatch(1, out, b.target, b.mask, b.labels, b.last_idx))[0], loss[0])
    # weight scales the probe term only
    w2 = ProbePush(probes, probe_weight=2.0, margin=0.5)(b)
    assert torch.allclose(w2[0], 2 * loss[0]) and torch.equal(w2[1], loss[1])
    # an all-benign batch is plain MSE
    benign = _batch(layer=1)
    assert torch.equal(obj(benign), masked_mse(benign))
    d = obj.describe()
    assert {k: d[k] for k in ("name", "probe_weight", "margin", "layers")} == {
        "name": "realign", "probe_weight": 1.0, "margin": 0.5, "layers": 2}
    assert d["probes_sha"] != ProbePush(_probes(seed=2)).describe()["probes_sha"]  # resume keys on the probes


def test_probe_push_moves_the_last_token_across_the_probe():
    """A toy linear 'block' trained on the probe-push loss of one malicious sample: the state at
    its last prompt token starts on the benign side of the probe and ends on the malicious side."""
    torch.manual_seed(0)
    probes = _probes(layers=1)
    x = torch.randn(1, T, H)
    block = torch.nn.Linear(H, H)
    last = torch.tensor([3])
    with torch.no_grad():
        h0 = block(x)[0, 3]
        probes.intercept[0] = -3.0 - h0 @ probes.coef[0]  # start at logit -3 (benign side)
    obj = ProbePush(probes)
    mask = torch.ones(1, T, dtype=torch.long)
    target = x.clone()

    def step_logit():
        out = block(x)
        return obj.probe_logit(0, out[torch.arange(1), last]).item()

    assert step_logit() == pytest.approx(-3.0, abs=1e-5)
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    for _ in range(30):
        loss = obj(BlockBatch(0, block(x), target, mask, torch.tensor([1]), last)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert step_logit() > 0


def test_probe_push_errors():
    with pytest.raises(ConfigError, match="--probe-weight must be non-negative"):
        ProbePush(_probes(), probe_weight=-1)
    obj = ProbePush(_probes(layers=2))
    with pytest.raises(ConfigError, match="no probe for layer 5: the probes cover 2 layers"):
        obj(_batch(layer=5, labels=(1, 0, 0)))


def test_state_target_pulls_malicious_last_tokens_to_the_probe_models_state():
    b = _batch(labels=(1, 0, 1))
    states = torch.randn(2, 10, H, generator=torch.Generator().manual_seed(4))  # [layers, calib rows, H]
    rows = torch.tensor([7, 2, 5])
    b = BlockBatch(1, b.output, b.target, b.mask, b.labels, b.last_idx, rows)
    obj = ProbePush(_probes(), malicious_target="state", states=states)
    loss = obj(b)
    h = b.last_token()
    assert torch.allclose(loss[0], ((h[0] - states[1, 7]) ** 2).mean())
    assert torch.allclose(loss[2], ((h[2] - states[1, 5]) ** 2).mean())
    assert torch.allclose(loss[1], masked_mse(b)[1])  # benign: the MSE, as with the probe target
    # a malicious sample already at the probe model's state costs nothing
    out = b.output.clone()
    out[0, b.last_idx[0]] = states[1, 7]
    assert obj(BlockBatch(1, out, b.target, b.mask, b.labels, b.last_idx, rows))[0].item() == 0.0
    assert obj.describe()["malicious_target"] == "state" and "states_sha" in obj.describe()


def test_state_target_errors():
    with pytest.raises(ConfigError, match="unknown malicious target 'logits'"):
        ProbePush(_probes(), malicious_target="logits")
    with pytest.raises(ConfigError, match="needs the probe model's last-token states"):
        ProbePush(_probes(), malicious_target="state")
    obj = ProbePush(_probes(), malicious_target="state", states=torch.zeros(2, 3, H))
    with pytest.raises(ConfigError, match="calibration rows"):
        obj(_batch(labels=(1, 0, 0)))


def test_registry():
    assert {"mse", "realign"} <= set(objective_names())
    assert isinstance(get_objective("mse"), MSE)
    assert isinstance(get_objective("realign", probes=_probes(), margin=1.0), ProbePush)
    with pytest.raises(UnknownNameError, match="unknown block-wise objective 'msee'; did you mean 'mse'") as e:
        get_objective("msee")
    assert "mse" in str(e.value) and "realign" in str(e.value)


def test_auto_margin_is_the_probe_models_median_per_layer():
    probes = _probes(layers=2)
    probes.meta = {"median_margin_malicious": [3.0, -1.0]}  # a negative median is floored at 0
    obj = ProbePush(probes, margin="auto")
    assert obj.margin == [3.0, 0.0]
    b = _batch(layer=0, labels=(1, 1, 1))
    z = obj.probe_logit(0, b.last_token())
    assert torch.allclose(obj(b), torch.nn.functional.softplus(3.0 - z))
    with pytest.raises(ConfigError, match="margin auto"):
        ProbePush(_probes(), margin="auto")
    with pytest.raises(ConfigError, match="3 margins for 2 probe layers"):
        ProbePush(_probes(layers=2), margin=[1.0, 2.0, 3.0])


def test_benign_anchor_penalises_only_benign_drift_along_the_probe():
    probes = _probes()
    b = _batch(labels=(1, 0, 0))
    plain, anchored = ProbePush(probes), ProbePush(probes, benign_anchor=2.0)
    base, with_anchor = plain(b), anchored(b)
    assert torch.equal(with_anchor[0], base[0])  # a malicious sample's loss is untouched
    w, c = probes.coef[0], probes.intercept[0]
    for i in (1, 2):
        drift = (b.last_token()[i] @ w + c) - (b.last_token(b.target)[i] @ w + c)
        assert torch.allclose(with_anchor[i], base[i] + 2.0 * drift ** 2, rtol=1e-5)
    # moving a benign state orthogonally to the probe costs only MSE, along it costs the anchor too
    out = b.target.clone()
    ortho = torch.randn(H)
    ortho -= (ortho @ w) / (w @ w) * w
    out[1, b.last_idx[1]] += ortho
    moved = BlockBatch(0, out, b.target, b.mask, b.labels, b.last_idx)
    assert torch.allclose(anchored(moved)[1], plain(moved)[1], atol=1e-5)
    out[1, b.last_idx[1]] += w
    moved = BlockBatch(0, out, b.target, b.mask, b.labels, b.last_idx)
    assert anchored(moved)[1] > plain(moved)[1] + 1e-3
    with pytest.raises(ConfigError, match="benign-anchor"):
        ProbePush(probes, benign_anchor=-1)


def test_state_probe_target_is_the_state_loss_along_the_probe_direction_only():
    b = _batch(labels=(1, 0, 1))
    states = torch.randn(2, 10, H, generator=torch.Generator().manual_seed(4))
    rows = torch.tensor([7, 2, 5])
    b = BlockBatch(1, b.output, b.target, b.mask, b.labels, b.last_idx, rows)
    probes = _probes()
    obj = ProbePush(probes, malicious_target="state_probe", states=states)
    h = b.last_token()
    u = probes.coef[1] / probes.coef[1].norm()
    loss = obj(b)
    assert torch.allclose(loss[0], ((h[0] - states[1, 7]) @ u) ** 2 / H)
    assert torch.allclose(loss[1], masked_mse(b)[1])
    # moving the state orthogonally to the probe costs nothing; along it, it does
    out = b.output.clone()
    ortho = torch.randn(H, generator=torch.Generator().manual_seed(9))
    ortho -= (ortho @ u) * u
    out[0, b.last_idx[0]] = states[1, 7] + 3 * ortho
    assert obj(BlockBatch(1, out, b.target, b.mask, b.labels, b.last_idx, rows))[0].item() < 1e-10
    out[0, b.last_idx[0]] = states[1, 7] + 3 * u
    assert obj(BlockBatch(1, out, b.target, b.mask, b.labels, b.last_idx, rows))[0].item() == pytest.approx(9 / H)


def test_mean_difference_probes_point_from_benign_to_malicious():
    from safeptq.objectives.probe_push import mean_difference_probes

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1] * 20 + [0] * 20)
    states = torch.randn(2, 40, H, generator=g)
    states[:, :20, 3] += 5.0  # malicious prompts sit further along dim 3
    p = mean_difference_probes(states, labels)
    assert torch.allclose(p.coef.norm(dim=-1), torch.ones(2))
    assert (p.coef[:, 3] > 0.9).all()
    z = torch.einsum("lnh,lh->ln", states, p.coef) + p.intercept[:, None]
    assert (z[:, :20].mean(1) > 0).all() and (z[:, 20:].mean(1) < 0).all()  # the midpoint is the origin
    assert len(p.meta["median_margin_malicious"]) == 2 and min(p.meta["median_margin_malicious"]) > 0
    obj = ProbePush(p, margin="auto")  # usable by the probe push as it is
    assert obj.margin == [max(0.0, m) for m in p.meta["median_margin_malicious"]]
    with pytest.raises(ConfigError, match="both malicious and benign"):
        mean_difference_probes(states, torch.ones(40))


def test_the_recipe_and_the_objective_know_the_same_targets():
    from safeptq.objectives.probe_push import MALICIOUS_TARGETS
    from safeptq.recipes.realign import MALICIOUS_TARGETS as RECIPE_TARGETS

    assert RECIPE_TARGETS == MALICIOUS_TARGETS
