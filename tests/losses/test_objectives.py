"""The composed objective: presets, masking, normalisation, placements, config validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from eopd.losses import (
    PRESETS,
    ObjectiveConfig,
    TokenBatch,
    adaptive_kl,
    entropy,
    forward_kl,
    gather_log_probs,
    generalized_jsd,
    objective,
    ppo_clipped_surrogate,
    prepare_weights,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    todi,
    topk_forward_kl,
    total_variation,
)
from eopd.losses.objectives import adaptive_tau_from_batch

ALL_PRESETS = [
    "opd", "eopd", "mixture", "rkl", "fkl", "fixed_mix", "fkl_all", "fkl_random",
    "jsd", "skew_fkl", "skew_rkl", "akl", "todi", "tvd",
]  # fmt: skip
DETACHED_WEIGHT_PRESETS = {"akl", "todi"}


def make_batch(shape=(3, 5), V=9, K=3, seed=0, T=1.0, dtype=torch.float64, mask_p=0.3):
    """Random student logits and a consistent TokenBatch (sampled tokens, r close to 1)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 2.0
    t = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 2.0
    logq = torch.log_softmax(s / T, -1)
    logp_T = torch.log_softmax(t / T, -1)
    tokens = torch.multinomial(logq.exp().reshape(-1, V), 1, generator=g).reshape(shape)
    noise = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * 0.1  # r in (0.95, 1.05)
    logp_old = logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) + noise
    mask = torch.rand(shape, generator=g) > mask_p
    mask.view(-1)[0] = True
    top = logp_T.topk(K, -1)
    batch = TokenBatch(
        tokens=tokens,
        mask=mask.float(),
        logp_old=logp_old.to(dtype),
        teacher_logp=logp_T.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).to(dtype),
        teacher_entropy=entropy(t, temperature=T).to(dtype),
        teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values.to(dtype),
        teacher_logits=t.to(dtype),
    )
    return s.to(dtype), batch


def run(name, s, batch, seed=0, **kw):
    cfg = ObjectiveConfig.preset(name, **kw.pop("overrides", {}))
    return objective(cfg, s, batch, generator=torch.Generator().manual_seed(seed), **kw)


def reference_token_loss(name, s, b, T=1.0, gate=None):
    """Per-token loss of each preset, composed by hand from the (separately tested) divergences."""
    t = b.teacher_logits
    H = entropy(t, temperature=T)
    logp = gather_log_probs(s, b.tokens, temperature=T)
    ppo = ppo_clipped_surrogate(logp, b.logp_old, b.teacher_logp - b.logp_old, 0.2)
    topk = topk_forward_kl(s, b.teacher_topk_ids, b.teacher_topk_logprobs, temperature=T)
    fkl, rkl = forward_kl(s, t, temperature=T), reverse_kl(s, t, temperature=T)
    step = (H >= 0.8).double()
    sig = torch.sigmoid((H - 0.8) / 0.1)
    return {
        "opd": lambda: ppo,
        "eopd": lambda: ppo + step * topk,
        "mixture": lambda: (1 - sig) * rkl + sig * fkl,
        "rkl": lambda: rkl,
        "fkl": lambda: fkl,
        "fixed_mix": lambda: 0.5 * rkl + 0.5 * fkl,
        "fkl_all": lambda: ppo + topk,
        "fkl_random": lambda: ppo + gate * topk,
        "jsd": lambda: generalized_jsd(s, t, 0.5, temperature=T),
        "skew_fkl": lambda: skew_forward_kl(s, t, 0.1, temperature=T),
        "skew_rkl": lambda: skew_reverse_kl(s, t, 0.1, temperature=T),
        "akl": lambda: adaptive_kl(s, t, 0.5, temperature=T),
        "todi": lambda: todi(s, t, 1.0, temperature=T),
        "tvd": lambda: total_variation(s, t, temperature=T),
    }[name]()


def reference_loss(name, s, b, T=1.0, gate=None):
    m = b.mask.bool()
    return torch.where(m, reference_token_loss(name, s, b, T, gate), 0.0).sum() / m.sum()


def test_preset_names():
    assert set(PRESETS) == set(ALL_PRESETS)


# ---------------------------------------------------------------------------------------------------------
# presets against hand compositions, gradients
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_preset_matches_composition(name, T):
    s, b = make_batch(seed=1, T=T)
    out = run(name, s, b, overrides={"temperature": T})
    gate = prepare_weights(
        ObjectiveConfig.preset(name, temperature=T), b, generator=torch.Generator().manual_seed(0)
    ).gate
    expected = reference_loss(name, s, b, T, gate)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    n = int(b.mask.sum())
    assert out.num_valid == n and out.metrics["num_valid"] == n
    torch.testing.assert_close(out.loss, out.loss_sum / n)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float64
    assert out.metrics["loss"] == pytest.approx(out.loss.item())
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values())


def test_presets_see_some_gated_and_some_ungated_tokens():
    """Guard for the tests above: the random batch exercises both sides of the tau = 0.8 gate."""
    s, b = make_batch(seed=1)
    share = run("eopd", s, b).metrics["gated_share"]
    assert 0.1 < share < 0.9


@pytest.mark.parametrize("name", sorted(set(ALL_PRESETS) - DETACHED_WEIGHT_PRESETS))
def test_gradcheck_presets(name):
    s, b = make_batch(shape=(2, 2), V=5, seed=2, mask_p=0.2)
    cfg = ObjectiveConfig.preset(name, temperature=1.3)
    weights = prepare_weights(cfg, b, generator=torch.Generator().manual_seed(0))
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: objective(cfg, x, b, weights=weights).loss, (s,), fast_mode=True)


@pytest.mark.parametrize("name", sorted(DETACHED_WEIGHT_PRESETS))
def test_detached_weight_presets_gradient(name):
    """AKL / ToDi stop gradients through their weights (checked in test_divergences): the objective's
    gradient is the masked mean of the divergence's gradient."""
    s, b = make_batch(shape=(2, 3), V=6, seed=2)
    x = s.clone().requires_grad_(True)
    run(name, x, b).loss.backward()
    y = s.clone().requires_grad_(True)
    reference_loss(name, y, b).backward()
    torch.testing.assert_close(x.grad, y.grad)


# ---------------------------------------------------------------------------------------------------------
# the eopd preset on a hand-worked example
# ---------------------------------------------------------------------------------------------------------
def hand_batch(dtype=torch.float64):
    ln = math.log
    # Student: the same q = (0.4, 0.3, 0.2, 0.1) at every position (logits = log q).
    s = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 4, dtype=dtype))
    batch = TokenBatch(
        tokens=torch.tensor([0, 1, 3, 2]),
        # position 3 is padding, filled with garbage that must not matter
        mask=torch.tensor([1.0, 1.0, 1.0, 0.0]),
        # sampler = current student (r = 1): log q(y_t)
        logp_old=torch.tensor([ln(0.4), ln(0.3), ln(0.1), -math.inf], dtype=dtype),
        teacher_logp=torch.tensor([ln(0.5), ln(0.6), ln(0.05), math.nan], dtype=dtype),
        teacher_entropy=torch.tensor([1.2, 0.5, 0.9, 5.0], dtype=dtype),
        teacher_topk_ids=torch.tensor([[0, 1], [1, 0], [2, 3], [0, 1]]),
        teacher_topk_logprobs=torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.45, 0.45], [0.0, 0.0]], dtype=dtype)),
    )
    return s, batch


# Worked by hand (k = 2, tau = 0.8, alpha = 1, N_valid = 3):
#   advantages A_t = log p_T(y_t) - log q_old(y_t):
#     A_0 = ln(0.5/0.4) = ln 1.25 =  0.223144
#     A_1 = ln(0.6/0.3) = ln 2    =  0.693147
#     A_2 = ln(0.05/0.1) = -ln 2  = -0.693147
#   OPD surrogate at r = 1 is -A_t; its mean is -(0.223144 + 0.693147 - 0.693147) / 3 = -0.074381
#   gate 1[H >= 0.8] on H = (1.2, 0.5, 0.9) -> (1, 0, 1); the padded H = 5.0 is ignored -> share 2/3
#   top-k FKL (teacher renormalised on its top-2, student full-vocabulary q):
#     t0: p~ = (0.5, 0.3)/0.8 = (0.625, 0.375), q = (0.4, 0.3):
#         0.625 ln(0.625/0.4) + 0.375 ln(0.375/0.3) = 0.278929 + 0.083679 = 0.362608
#     t1: p~ = (0.6, 0.2)/0.8 = (0.75, 0.25), q = (0.3, 0.4):
#         0.75 ln(0.75/0.3) + 0.25 ln(0.25/0.4) = 0.687218 - 0.117501 = 0.569717   (not gated)
#     t2: p~ = (0.45, 0.45)/0.9 = (0.5, 0.5), q = (0.2, 0.1):
#         0.5 ln(0.5/0.2) + 0.5 ln(0.5/0.1) = 0.5 ln 12.5 = 1.262864
#   sum of gated FKL = 0.362608 + 1.262864 = 1.625472; / N_valid = 0.541824
#   L = -0.074381 + 1.0 * 0.541824 = 0.467443
A = [math.log(1.25), math.log(2.0), -math.log(2.0)]
FKL = [
    0.625 * math.log(0.625 / 0.4) + 0.375 * math.log(0.375 / 0.3),
    0.75 * math.log(0.75 / 0.3) + 0.25 * math.log(0.25 / 0.4),
    0.5 * math.log(12.5),
]
GATE = [1.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eopd_hand_worked_example(dtype):
    s, b = hand_batch(dtype)
    out = run("eopd", s, b, overrides={"top_k": 2})
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert FKL[0] == pytest.approx(0.362608, abs=1e-6) and FKL[2] == pytest.approx(1.262864, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.467443, abs=1e-6)
    assert out.loss.item() == pytest.approx(-sum(A) / 3 + (FKL[0] + FKL[2]) / 3, abs=tol)
    assert out.num_valid == 3
    m = out.metrics
    assert m["gated_share"] == pytest.approx(2 / 3, abs=tol)
    assert m["tau"] == 0.8
    assert m["loss_rkl"] == pytest.approx(-0.074381, abs=1e-6)
    assert m["loss_fkl"] == pytest.approx(0.541824, abs=1e-6)
    assert m["fkl"] == pytest.approx(sum(FKL) / 3, abs=tol * 10)
    assert m["fkl_high_entropy"] == pytest.approx((FKL[0] + FKL[2]) / 2, abs=tol * 10)
    assert m["rkl_estimate"] == pytest.approx(-sum(A) / 3, abs=tol)
    assert m["teacher_entropy"] == pytest.approx((1.2 + 0.5 + 0.9) / 3, abs=tol)
    # alpha scales only the FKL part
    half = run("eopd", s, b, overrides={"top_k": 2, "alpha": 0.5})
    assert half.loss.item() == pytest.approx(0.196531, abs=1e-6)
    # opd alone is the mean of -A
    assert run("opd", s, b).loss.item() == pytest.approx(-0.074381, abs=1e-6)


def test_eopd_hand_worked_gradient():
    """dL/dz_t = (1/N) [ -A_t (onehot(y_t) - q) + g_t (q - p~_t scattered) ]; padding gets 0."""
    s, b = hand_batch()
    x = s.clone().requires_grad_(True)
    run("eopd", x, b, overrides={"top_k": 2}).loss.backward()
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    p_tilde = torch.tensor([[0.625, 0.375, 0, 0], [0.25, 0.75, 0, 0], [0, 0, 0.5, 0.5]], dtype=torch.float64)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for i, y in enumerate([0, 1, 3]):
        onehot = torch.nn.functional.one_hot(torch.tensor(y), 4).double()
        expected[i] = (-A[i] * (onehot - q) + GATE[i] * (q - p_tilde[i])) / 3
    torch.testing.assert_close(x.grad, expected)


# ---------------------------------------------------------------------------------------------------------
# masking, dtypes
# ---------------------------------------------------------------------------------------------------------
def garbage(b: TokenBatch, where: torch.Tensor) -> TokenBatch:
    """Fill the positions ``where`` with the kind of garbage padding holds: -inf, NaN, inf rows."""

    def fill(x, value):
        if x is None:
            return None
        w = where.view(where.shape + (1,) * (x.dim() - where.dim()))
        return torch.where(w, torch.full_like(x, value), x)

    return dataclasses.replace(
        b,
        logp_old=fill(b.logp_old, -math.inf),
        teacher_logp=fill(b.teacher_logp, math.nan),
        teacher_entropy=fill(b.teacher_entropy, math.nan),
        teacher_topk_logprobs=fill(b.teacher_topk_logprobs, -math.inf),
        teacher_logits=fill(b.teacher_logits, -math.inf),
    )


@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize("dirty", [False, True])
def test_all_masked_gives_zero_loss_and_zero_grad(name, dirty):
    s, b = make_batch(seed=3)
    b = dataclasses.replace(b, mask=torch.zeros_like(b.mask))
    if dirty:
        b = garbage(b, torch.ones_like(b.mask, dtype=torch.bool))
    x = s.clone().requires_grad_(True)
    out = run(name, x, b)
    assert out.loss.item() == 0.0 and out.loss_sum.item() == 0.0 and out.num_valid == 0
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert out.metrics["gated_share"] == 0.0 and out.metrics["num_valid"] == 0.0
    assert all(math.isfinite(v) for v in out.metrics.values())
    # a global normaliser does not change that
    x.grad = None
    out = run(name, x, b, normalizer=17)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_masked_positions_do_not_matter(name):
    """Garbage at masked positions changes neither the loss nor the gradient; they get zero gradient."""
    s, b = make_batch(seed=4)
    masked = ~b.mask.bool()
    assert masked.any()
    x = s.clone().requires_grad_(True)
    clean = run(name, x, b)
    clean.loss.backward()
    y = s.clone().requires_grad_(True)
    dirty = run(name, y, garbage(b, masked))
    dirty.loss.backward()
    assert torch.isfinite(dirty.loss)
    torch.testing.assert_close(dirty.loss, clean.loss)
    torch.testing.assert_close(y.grad, x.grad)
    assert torch.equal(y.grad[masked], torch.zeros_like(y.grad[masked]))
    for key, value in clean.metrics.items():
        assert dirty.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_bf16_inputs_give_float32_loss(name):
    s, b = make_batch(seed=5)
    b = b.map(lambda x: x.bfloat16() if x.is_floating_point() else x)
    x = s.bfloat16().requires_grad_(True)
    out = run(name, x, b)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("name", ["fkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "eopd", "fkl_all"])
def test_teacher_padded_vocabulary_rows_stay_finite(name):
    """-inf teacher logits at padded vocabulary rows (student finite): finite where the math is."""
    s, b = make_batch(seed=6, V=9, K=3)
    t = b.teacher_logits.clone()
    t[..., -2:] = -math.inf
    logp_T = torch.log_softmax(t, -1)
    top = logp_T.topk(3, -1)
    b = dataclasses.replace(
        b, teacher_logits=t, teacher_entropy=entropy(t), teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values, teacher_logp=logp_T.gather(-1, b.tokens.unsqueeze(-1)).squeeze(-1),
    )
    # the sampled tokens must be ones the teacher can emit for the OPD advantage to be finite
    b = dataclasses.replace(b, mask=b.mask * torch.isfinite(b.teacher_logp))
    x = s.clone().requires_grad_(True)
    out = run(name, x, b)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------------------
# normalisation across micro-batches
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_PRESETS)
@pytest.mark.parametrize("precomputed", [False, True])
def test_microbatches_sum_to_full_batch(name, precomputed):
    s, b = make_batch(shape=(5, 4), seed=7)
    cfg = ObjectiveConfig.preset(name)
    if name == "fkl_random" and not precomputed:
        pytest.skip("random placement is decided once per batch: micro-batches take sliced weights")
    weights = prepare_weights(cfg, b, generator=torch.Generator().manual_seed(0))
    x = s.clone().requires_grad_(True)
    full = objective(cfg, x, b, weights=weights)
    full.loss.backward()
    y = s.clone().requires_grad_(True)
    total = 0.0
    n_global = int(b.mask.sum())
    counts = 0
    for sl in (slice(0, 2), slice(2, 5)):
        part = b.map(lambda v, sl=sl: v[sl])
        w = weights.map(lambda v, sl=sl: v[sl]) if precomputed else None
        out = objective(cfg, y[sl], part, weights=w, normalizer=n_global)
        counts += out.num_valid
        total = total + out.loss
    total.backward()
    assert counts == n_global
    torch.testing.assert_close(total, full.loss)
    torch.testing.assert_close(y.grad, x.grad)


def test_normalizer_divides_the_sum():
    s, b = make_batch(seed=8)
    out = run("eopd", s, b, normalizer=100)
    torch.testing.assert_close(out.loss, out.loss_sum / 100)
    assert out.metrics["loss"] == pytest.approx(float(out.loss_sum) / out.num_valid)


# ---------------------------------------------------------------------------------------------------------
# placements: fkl_all, fkl_random; tau override, adaptive
# ---------------------------------------------------------------------------------------------------------
def test_fkl_all_gates_every_valid_token():
    s, b = make_batch(seed=9)
    cfg = ObjectiveConfig.preset("fkl_all")
    w = prepare_weights(cfg, b)
    assert torch.equal(w.gate, b.mask.to(w.gate.dtype))
    assert run("fkl_all", s, b).metrics["gated_share"] == 1.0


def test_fkl_random_same_count_random_positions_reproducible():
    s, b = make_batch(shape=(6, 10), seed=10)
    entropy_gate = prepare_weights(ObjectiveConfig.preset("eopd"), b).gate
    count = int(entropy_gate.sum())
    assert 0 < count < int(b.mask.sum())
    cfg = ObjectiveConfig.preset("fkl_random")
    gates = []
    for seed in range(30):
        gate = prepare_weights(cfg, b, generator=torch.Generator().manual_seed(seed)).gate
        assert int(gate.sum()) == count
        assert set(gate.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(gate * (1 - b.mask), torch.zeros_like(gate))  # valid positions only
        gates.append(gate)
    again = prepare_weights(cfg, b, generator=torch.Generator().manual_seed(3)).gate
    assert torch.equal(again, gates[3])
    assert any(not torch.equal(g, entropy_gate) for g in gates)
    assert len({tuple(g.flatten().tolist()) for g in gates}) > 20
    # every valid position gets picked at about the rate count / n_valid
    rate = torch.stack(gates).mean(0)[b.mask.bool()]
    assert (rate > 0).float().mean() > 0.8
    # the same share is reported as the entropy gate's
    share = run("fkl_random", s, b, seed=5).metrics["gated_share"]
    assert share == pytest.approx(run("eopd", s, b).metrics["gated_share"])


def test_fkl_random_needs_generator():
    s, b = make_batch(seed=11)
    with pytest.raises(ValueError, match="generator"):
        objective(ObjectiveConfig.preset("fkl_random"), s, b)


def test_tau_override_and_adaptive_threshold():
    s, b = make_batch(shape=(8, 16), seed=12)
    cfg = ObjectiveConfig.preset("eopd", adaptive_share=0.25)
    tau = adaptive_tau_from_batch(cfg, b.teacher_entropy, b.mask)
    out = objective(cfg, s, b, tau=tau)
    assert out.metrics["tau"] == pytest.approx(tau)
    assert abs(out.metrics["gated_share"] - 0.25) < 0.03
    assert run("eopd", s, b, tau=100.0).metrics["gated_share"] == 0.0
    with pytest.raises(ValueError, match="adaptive_share"):
        adaptive_tau_from_batch(ObjectiveConfig.preset("eopd"), b.teacher_entropy, b.mask)


def test_mixture_weights_sum_to_one():
    _, b = make_batch(seed=13)
    w = prepare_weights(ObjectiveConfig.preset("mixture", lam=0.6), b)
    m = b.mask.bool()
    torch.testing.assert_close((w.w_rkl + w.w_fkl)[m], torch.ones_like(w.w_rkl[m]))
    assert (w.w_fkl <= 0.6 + 1e-12).all()


def test_entropy_from_teacher_logits_when_not_given():
    s, b = make_batch(seed=14)
    out1 = run("eopd", s, b)
    out2 = run("eopd", s, dataclasses.replace(b, teacher_entropy=None))
    torch.testing.assert_close(out1.loss, out2.loss)


# ---------------------------------------------------------------------------------------------------------
# config validation and needs_*
# ---------------------------------------------------------------------------------------------------------
def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match=r"unknown objective 'bogus'; choose one of: opd, eopd"):
        ObjectiveConfig.preset("bogus")


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match=r"unknown objective field\(s\) \['taux'\]"):
        ObjectiveConfig.preset("eopd", taux=1.0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"tau": -0.1}, "tau must be >= 0"),
        ({"tau": math.nan}, "tau must be >= 0"),
        ({"rkl": "kl"}, "rkl must be one of"),
        ({"fkl": "full"}, "fkl must be one of"),
        ({"divergence": "hellinger"}, "divergence must be one of"),
        ({"weighting": "mult"}, "weighting must be one of"),
        ({"schedule": "cosine"}, "schedule must be one of"),
        ({"placement": "first"}, "placement must be one of"),
        ({"adaptive_share": 0.0}, "adaptive_share"),
        ({"adaptive_share": 1.0}, "adaptive_share"),
        ({"adaptive_momentum": 1.0}, "adaptive_momentum"),
        ({"width": 0.0}, "width"),
        ({"h_low": 1.0, "h_high": 0.5}, "h_high must exceed h_low"),
        ({"alpha": -1.0}, "alpha must be >= 0"),
        ({"lam": 1.5}, "lam must be in"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"clip_eps": -0.2}, "clip_eps"),
        ({"beta": 1.2}, "beta must be in"),
        ({"skew_alpha": 1.0}, "skew_alpha"),
        ({"akl_mu": 0.0}, "akl_mu"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"fkl": "none"}, "objective has no term"),
    ],
)
def test_config_validation(overrides, match):
    base = "rkl" if overrides.get("fkl") == "none" else "eopd"
    if base == "rkl":
        overrides = {**overrides, "rkl": "none"}
    with pytest.raises(ValueError, match=match) as err:
        ObjectiveConfig.preset(base, **overrides)
    assert f"objective {base!r}" in str(err.value)


def test_replace_revalidates():
    cfg = ObjectiveConfig.preset("eopd")
    assert cfg.replace(tau=1.5).tau == 1.5 and cfg.tau == 0.8
    with pytest.raises(ValueError, match="tau"):
        cfg.replace(tau=-1.0)


@pytest.mark.parametrize(
    ("name", "overrides", "logits", "topk", "logp_old"),
    [
        ("opd", {}, False, False, True),
        ("eopd", {}, False, True, True),
        ("eopd", {"fkl": "topk_tail"}, False, True, True),
        ("eopd", {"fkl": "importance"}, False, False, True),
        ("mixture", {}, True, False, False),
        ("rkl", {}, True, False, False),
        ("fkl", {}, True, False, False),
        ("fkl", {"fkl": "importance"}, False, False, True),
        ("fixed_mix", {}, True, False, False),
        ("fkl_all", {}, False, True, True),
        ("fkl_random", {}, False, True, True),
        ("jsd", {}, True, False, False),
        ("skew_fkl", {}, True, False, False),
        ("skew_rkl", {}, True, False, False),
        ("akl", {}, True, False, False),
        ("todi", {}, True, False, False),
        ("tvd", {}, True, False, False),
    ],
)
def test_needs_properties(name, overrides, logits, topk, logp_old):
    cfg = ObjectiveConfig.preset(name, **overrides)
    assert (cfg.needs_teacher_logits, cfg.needs_topk, cfg.needs_logp_old) == (logits, topk, logp_old)
    # what a preset does not need can be left out of the batch
    s, b = make_batch(seed=15)
    slim = dataclasses.replace(
        b,
        teacher_logits=b.teacher_logits if logits else None,
        teacher_topk_ids=b.teacher_topk_ids if topk else None,
        teacher_topk_logprobs=b.teacher_topk_logprobs if topk else None,
        logp_old=b.logp_old if logp_old else None,
    )
    if not logits and cfg.divergence is None and cfg.rkl != "exact":
        full = objective(cfg, s, b, generator=torch.Generator().manual_seed(0))
        out = objective(cfg, s, slim, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.loss, full.loss)
    else:
        assert torch.isfinite(objective(cfg, s, slim, generator=torch.Generator().manual_seed(0)).loss)


@pytest.mark.parametrize(
    ("name", "drop", "match"),
    [
        ("eopd", "teacher_topk_ids", "teacher_topk_ids"),
        ("eopd", "logp_old", "logp_old"),
        ("opd", "teacher_logp", "teacher_logp"),
        ("jsd", "teacher_logits", "teacher_logits"),
        ("rkl", "teacher_logits", "teacher_logits"),
    ],
)
def test_missing_inputs_are_named(name, drop, match):
    s, b = make_batch(seed=16)
    with pytest.raises(ValueError, match=match):
        run(name, s, dataclasses.replace(b, **{drop: None}))


def test_missing_entropy_is_named():
    s, b = make_batch(seed=16)
    with pytest.raises(ValueError, match="teacher_entropy"):
        run("eopd", s, dataclasses.replace(b, teacher_entropy=None, teacher_logits=None))
