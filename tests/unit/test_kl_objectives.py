"""Top-K KL objectives (kl_top, AAQ's contrastive KL) and the reference cache."""

import pytest
import torch
from torch.nn import functional as F

from conftest import make_tiny_llama
from safeptq.data.calib import CalibSet
from safeptq.errors import ConfigError, UnknownNameError
from safeptq.objectives import (
    ContrastiveKLTop,
    E2EObjective,
    KLTop,
    LiveReferences,
    RefBatch,
    ReferenceCache,
    e2e_objective_names,
    get_e2e_objective,
    kl_topk,
    objective_names,
    topk_reference,
)
from safeptq.objectives.kl import kl_topk_per_token

V = 16


def _logits(seed=0, shape=(2, 5, V), scale=3.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _refs(instruct: torch.Tensor, base: torch.Tensor, k: int = V) -> RefBatch:
    """A RefBatch for two reference logit tensors, with the cross KLs a cache would hold."""
    t = {"instruct": topk_reference(instruct, k), "base": topk_reference(base, k)}
    lg = {"instruct": instruct, "base": base}
    cross = {(a, b, tail): kl_topk_per_token(*t[a], lg[b], tail)
             for a in t for b in t if a != b for tail in (False, True)}
    return RefBatch(t, cross)


# -- kl_topk ---------------------------------------------------------------------------------------
def test_kl_topk_zero_for_reference_positive_otherwise():
    ref, mask = _logits(0), torch.ones(2, 5)
    idx, lp = topk_reference(ref, 6)
    assert abs(kl_topk(idx, lp, ref, mask).item()) < 1e-6
    assert abs(kl_topk(idx, lp, ref, mask, tail=True).item()) < 1e-6
    other = ref + _logits(1)
    assert kl_topk(idx, lp, other, mask).item() > 0.1
    assert kl_topk(idx, lp, other, mask, tail=True).item() > 0.1


def test_kl_topk_by_hand_and_full_vocab_is_exact_kl():
    ref = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    stu = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    p, q = F.softmax(ref, -1), F.log_softmax(stu, -1)
    idx, lp = topk_reference(ref, 2)
    assert idx.tolist() == [[0, 1]]
    by_hand = sum(p[0, i] * (p[0, i].log() - q[0, i]) for i in (0, 1))
    assert torch.allclose(kl_topk(idx, lp, stu, torch.ones(1)), by_hand, atol=1e-6)
    idx, lp = topk_reference(ref, 4)
    full = F.kl_div(q, p, reduction="sum")
    assert torch.allclose(kl_topk(idx, lp, stu, torch.ones(1)), full, atol=1e-6)


def test_k_is_capped_at_vocab_and_must_be_positive():
    idx, lp = topk_reference(_logits(0), 1000)
    assert idx.shape == (2, 5, V) and lp.shape == (2, 5, V)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError, match="positive integer"):
            topk_reference(_logits(0), bad)


def test_mask_selects_tokens():
    ref, stu = _logits(0), _logits(1)
    idx, lp = topk_reference(ref, 4)
    mask = torch.zeros(2, 5)
    mask[0, :2] = 1
    per = kl_topk_per_token(idx, lp, stu)
    assert torch.allclose(kl_topk(idx, lp, stu, mask), per[0, :2].mean())


def test_truncation_rewards_overconfidence_and_tail_bin_does_not():
    """The documented caveat: without the tail bin a student that piles mass on the reference's
    top-K scores below 0; with it the value is a true KL (>= 0)."""
    ref = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    stu = torch.tensor([[4.0, 4.0, 0.0, 0.0]])  # same ratio on the top-2, more mass there
    idx, lp = topk_reference(ref, 2)
    assert kl_topk(idx, lp, stu, torch.ones(1)).item() < 0
    assert kl_topk(idx, lp, stu, torch.ones(1), tail=True).item() > 0


# -- objectives ------------------------------------------------------------------------------------
def _sgd(obj, z0, refs, steps=20, lr=0.5):
    z = z0.clone().requires_grad_(True)
    mask = torch.ones(z.shape[:-1])
    for _ in range(steps):
        z.grad = None
        obj(z, refs, mask).backward()
        with torch.no_grad():
            z -= lr * z.grad
    return z.detach()


def _kls(z, refs):
    m = torch.ones(z.shape[:-1])
    return (kl_topk(*refs.topk["instruct"], z, m).item(), kl_topk(*refs.topk["base"], z, m).item())


def test_contrastive_pulls_to_instruct_and_pushes_away_from_base():
    a, b = _logits(0), _logits(1)
    refs = _refs(a, b)
    z0 = (a + b) / 2
    ki0, kb0 = _kls(z0, refs)
    push = _sgd(ContrastiveKLTop(k=V, lam=0.5), z0, refs)
    plain = _sgd(ContrastiveKLTop(k=V, lam=0.0), z0, refs)
    ki, kb = _kls(push, refs)
    assert ki < ki0 and kb > kb0
    assert kb > _kls(plain, refs)[1] + 0.05  # the push moved it further from the base than the pull alone
    # lambda = 0: exactly the pull term (kl_top)
    z = z0.clone().requires_grad_(True)
    g0 = torch.autograd.grad(ContrastiveKLTop(k=V, lam=0.0)(z, refs, torch.ones(2, 5)), z)[0]
    g1 = torch.autograd.grad(KLTop(k=V)(z, refs, torch.ones(2, 5)), z)[0]
    assert torch.allclose(g0, g1)


def test_bounded_push_stops_at_its_cap():
    a, b = _logits(0), _logits(1)
    refs = _refs(a, b)
    mask = torch.ones(2, 5)

    def grad(obj, z):
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(obj(z, refs, mask), z)[0]

    pull = ContrastiveKLTop(k=V, lam=0.0)
    far = (a + b) / 2  # every token already further from the base than the cap
    cap = 0.5 * kl_topk_per_token(*refs.topk["base"], far).min().item()
    bounded = ContrastiveKLTop(k=V, lam=0.5, push="bounded", tau=cap)
    assert torch.allclose(grad(bounded, far), grad(pull, far))
    assert bounded.terms(far, refs, mask)["push_active"].item() == 0.0  # reported: the push is inert here
    near = b + 0.01 * _logits(2)  # near the base: the push acts
    assert not torch.allclose(grad(bounded, near), grad(pull, near))
    assert bounded.terms(near, refs, mask)["push_active"].item() > 0.0
    assert "push_active" not in ContrastiveKLTop(k=V, lam=0.5).terms(near, refs, mask)  # unbounded: always acts
    # unbounded runs away from the base; tau='ref' stops near KL(base || instruct)
    tau = kl_topk(*refs.topk["base"], a, mask).item()
    run = _kls(_sgd(ContrastiveKLTop(k=V, lam=1.0), a, refs, steps=100, lr=1.0), refs)[1]
    held = _kls(_sgd(ContrastiveKLTop(k=V, lam=1.0, push="bounded"), a, refs, steps=100, lr=1.0), refs)[1]
    assert run > 3 * tau
    assert held < 1.2 * tau
    z = (10 * _logits(3)).requires_grad_(True)
    floor = -refs.cross_kl[("base", "instruct", False)].max()  # -lambda * the largest cap
    assert ContrastiveKLTop(k=V, lam=1.0, push="bounded")(z, refs, mask) >= floor


def test_margin_push_keeps_a_gradient_where_the_bounded_one_has_none():
    """A student far from both references (quantization noise): the bounded push is capped on every
    token and trains as the pull alone; the margin push still pushes away from the base, and a student
    equal to the instruct model sits on the margin's boundary."""
    a, b = _logits(0), _logits(1)
    refs = _refs(a, b)
    mask = torch.ones(2, 5)
    noisy = a + 3.0 * _logits(5)

    def grad(obj, z):
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(obj(z, refs, mask), z)[0]

    pull = ContrastiveKLTop(k=V, lam=0.0)
    bounded = ContrastiveKLTop(k=V, lam=0.5, push="bounded")
    margin = ContrastiveKLTop(k=V, lam=0.5, push="margin")
    assert bounded.terms(noisy, refs, mask)["push_active"].item() == 0.0
    assert torch.allclose(grad(bounded, noisy), grad(pull, noisy))
    assert margin.terms(noisy, refs, mask)["push_active"].item() > 0.0
    assert not torch.allclose(grad(margin, noisy), grad(pull, noisy))
    # at the instruct model: d = KL(base ‖ instruct) = τ on every token, the boundary (no token under the cap)
    at = margin.terms(a, refs, mask)
    assert at["push_active"].item() == 0.0
    assert at["push"].item() == pytest.approx(refs.cross_kl[("base", "instruct", False)].mean().item(), rel=1e-4)
    # training with the margin push ends closer to the instruct model, relative to the base, than the pull alone
    ki_m, kb_m = _kls(_sgd(margin, noisy, refs, steps=60, lr=0.5), refs)
    ki_p, kb_p = _kls(_sgd(pull, noisy, refs, steps=60, lr=0.5), refs)
    assert kb_m - ki_m > kb_p - ki_p
    assert margin.describe()["tau"] == "ref"


@pytest.mark.parametrize("kwargs, match", [
    ({"push": "sideways"}, "unknown push form 'sideways'"),
    ({"k": 0}, "k must be a positive integer"),
    ({"lam": -0.1}, "lambda must be a finite number >= 0"),
    ({"push": "bounded", "tau": -1.0}, "tau must be 'ref' or a positive number"),
    ({"instruct": "x", "base": "x"}, "two different references"),
])
def test_contrastive_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ContrastiveKLTop(**kwargs)


def test_objective_errors_on_missing_references():
    a = _logits(0)
    refs = RefBatch({"instruct": topk_reference(a, 4)}, {})
    with pytest.raises(ConfigError, match="no reference named 'base'"):
        ContrastiveKLTop(k=4)(a, refs, torch.ones(2, 5))
    with pytest.raises(ConfigError, match="hold only 4"):
        KLTop(k=8)(a, refs, torch.ones(2, 5))
    both = _refs(a, _logits(1), k=4)
    both.cross_kl.clear()
    with pytest.raises(ConfigError, match="tau='ref' needs"):
        ContrastiveKLTop(k=4, push="bounded")(a, both, torch.ones(2, 5))


def test_e2e_registry():
    assert {"kl_top", "contrastive_kl_top"} <= set(e2e_objective_names())
    assert not {"kl_top", "contrastive_kl_top"} & set(objective_names())  # block-wise registry untouched
    obj = get_e2e_objective("contrastive_kl_top", lam=0.5, push="bounded")
    assert isinstance(obj, E2EObjective) and obj.describe()["lambda"] == 0.5 and obj.k == 1000
    assert obj.references == ("instruct", "base")
    with pytest.raises(UnknownNameError, match="unknown end-to-end objective 'kl-topp'"):
        get_e2e_objective("kl-topp")


# -- references ------------------------------------------------------------------------------------
def _sharp(seed):
    m = make_tiny_llama(tie=False, seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(8)
    return m


@pytest.fixture(scope="module")
def ref_models():
    return {"instruct": _sharp(0), "base": _sharp(1)}


def _calib(n=6, t=8, seed=0):
    x = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(x)
    mask[0, 5:] = 0
    return CalibSet(x, mask, torch.zeros(n, dtype=torch.long), mask.sum(1) - 1, ["rand"] * n)


def test_cached_and_live_references_give_the_same_loss(ref_models):
    calib = _calib()
    cache = ReferenceCache.build(ref_models, calib, 32, batch_size=4, dtype=torch.float32, progress=False)
    live = LiveReferences(ref_models, 32)
    half = ReferenceCache.build(ref_models, calib, 32, batch_size=6, progress=False)
    assert cache.topk["base"].indices.dtype == torch.int32 and half.topk["base"].logp.dtype == torch.float16
    idx = torch.tensor([4, 0, 2])
    ids, mask = calib.input_ids[idx], calib.attention_mask[idx]
    student = make_tiny_llama(tie=False, seed=5)(input_ids=ids).logits.detach()
    for obj in (KLTop(k=32), ContrastiveKLTop(k=32), ContrastiveKLTop(k=32, push="bounded", lam=1.0, tail=True)):
        a = obj(student, cache.batch(idx, ids), mask).item()
        b = obj(student, live.batch(idx, ids), mask).item()
        c = obj(student, half.batch(idx, ids), mask).item()
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b))
        assert abs(c - b) <= 1e-2 * max(1.0, abs(b))
    assert cache.describe() == live.describe()


def test_reference_cache_roundtrip_and_stale_refusal(ref_models, tmp_path):
    calib = _calib()
    path = tmp_path / "refs.pt"
    ids = {"instruct": "org/instruct", "base": "org/base"}
    built = ReferenceCache.build(ref_models, calib, 32, model_ids=ids, progress=False, path=path)
    loaded = ReferenceCache.load(path, calib, 32, ids)
    assert torch.equal(loaded.topk["base"].logp, built.topk["base"].logp)
    assert torch.equal(loaded.cross_kl[("base", "instruct", True)], built.cross_kl[("base", "instruct", True)])
    with pytest.raises(ConfigError, match=r"stale: it holds the top-32 log-probs but K=64 was asked"):
        ReferenceCache.load(path, calib, 64, ids)
    with pytest.raises(ConfigError, match="stale: it was built on another calibration set"):
        ReferenceCache.load(path, _calib(seed=1), 32, ids)
    with pytest.raises(ConfigError, match="stale: it was built for models"):
        ReferenceCache.load(path, calib, 32, {"instruct": "org/other", "base": "org/base"})
    with pytest.raises(ConfigError, match="another calibration set"):
        loaded.check_calib(_calib(seed=1))
    with pytest.raises(ConfigError, match="does not exist"):
        ReferenceCache.load(tmp_path / "nope.pt", calib, 32, ids)

    def no_models():
        raise AssertionError("an existing cache must not load the models")

    again = ReferenceCache.load_or_build(path, calib, 32, ids, no_models)
    assert torch.equal(again.topk["instruct"].indices, built.topk["instruct"].indices)
