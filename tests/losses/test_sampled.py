"""Sampled-token estimators: OPD advantage, PPO clipped surrogate, importance-weighted forward KL."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eopd.losses import (
    forward_kl,
    gather_log_probs,
    importance_weighted_fkl,
    ppo_clipped_surrogate,
    reverse_kl,
    sampled_rkl_advantage,
)


def pair(N=4, V=6, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    return s, t


# ---------------------------------------------------------------------------------------------------------
# advantage
# ---------------------------------------------------------------------------------------------------------
def test_advantage_is_detached_difference():
    tl = torch.tensor([-0.5, -2.0, -0.1], requires_grad=True)
    lo = torch.tensor([-1.0, -0.5, -0.1], requires_grad=True)
    a = sampled_rkl_advantage(tl, lo)
    assert not a.requires_grad
    torch.testing.assert_close(a, torch.tensor([0.5, -1.5, 0.0]))
    assert sampled_rkl_advantage(tl.bfloat16(), lo.bfloat16()).dtype == torch.float32
    assert sampled_rkl_advantage(tl.double(), lo.double()).dtype == torch.float64


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_negative_advantage_expectation_is_reverse_kl(T):
    """E_{y~q}[-A(y)] = sum_y q(y) (log q(y) - log p_T(y)) = KL(q || p_T), by exact enumeration."""
    s, t = pair()
    logq = torch.log_softmax(s / T, -1)
    logp = torch.log_softmax(t / T, -1)
    A = sampled_rkl_advantage(logp, logq)  # every (position, y) pair is one "sample"
    expectation = (logq.exp() * -A).sum(-1)
    torch.testing.assert_close(expectation, reverse_kl(s, t, temperature=T))


# ---------------------------------------------------------------------------------------------------------
# PPO clipped surrogate
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("A", [1.5, -0.7, 0.0])
@pytest.mark.parametrize("r", [0.5, 0.85, 1.0, 1.1, 1.3, 2.0])
@pytest.mark.parametrize("eps", [0.2, 0.0])
def test_ppo_value_by_hand(A, r, eps):
    logp_old = torch.tensor(-1.3, dtype=torch.float64)
    logp = logp_old + math.log(r)
    out = ppo_clipped_surrogate(logp, logp_old, torch.tensor(A, dtype=torch.float64), clip_eps=eps)
    clipped = min(max(r, 1 - eps), 1 + eps)
    expected = max(-r * A, -clipped * A)
    assert out.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("r", "A", "passes"),
    [
        (1.5, 1.0, False),  # A > 0, r above 1 + eps: clipped, no gradient
        (0.5, 1.0, True),  # A > 0, r below 1 - eps: the unclipped term is the max (pessimistic)
        (0.5, -1.0, False),  # A < 0, r below 1 - eps: clipped
        (1.5, -1.0, True),  # A < 0, r above 1 + eps: unclipped
        (1.1, 1.0, True),  # inside the range
        (0.9, -1.0, True),
    ],
)
def test_ppo_clipping_gradient(r, A, passes):
    logp_old = torch.tensor([-0.8], dtype=torch.float64)
    logp = (logp_old + math.log(r)).requires_grad_(True)
    ppo_clipped_surrogate(logp, logp_old, torch.tensor([A], dtype=torch.float64), 0.2).sum().backward()
    expected = -A * r if passes else 0.0  # d(-r A)/d log q = -r A
    assert logp.grad.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("T", [1.0, 0.6])
def test_ppo_gradient_at_ratio_one_is_policy_gradient(T):
    """At r = 1: value -A and gradient -A * grad log q(y) = -A (onehot(y) - q) / T w.r.t. the logits."""
    s, _ = pair(N=5, V=7, seed=1)
    y = torch.tensor([0, 3, 6, 2, 2])
    A = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.4], dtype=torch.float64)
    x = s.clone().requires_grad_(True)
    logp = gather_log_probs(x, y, temperature=T)
    out = ppo_clipped_surrogate(logp, logp.detach(), A, clip_eps=0.2)
    torch.testing.assert_close(out, -A)
    out.sum().backward()
    q = torch.softmax(s / T, -1)
    onehot = torch.nn.functional.one_hot(y, 7).double()
    torch.testing.assert_close(x.grad, -A[:, None] * (onehot - q) / T)


def test_ppo_gradcheck_and_no_grad_to_old_and_advantage():
    g = torch.Generator().manual_seed(2)
    logp_old = -torch.rand(6, generator=g, dtype=torch.float64) * 3
    # ratios away from the clip boundaries 0.8 / 1.2
    log_r = torch.tensor([-0.5, -0.1, 0.05, 0.1, 0.4, 0.0], dtype=torch.float64)
    A = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -3.0], dtype=torch.float64)
    logp = (logp_old + log_r).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ppo_clipped_surrogate(x, logp_old, A, 0.2), (logp,))
    lo = logp_old.clone().requires_grad_(True)
    adv = A.clone().requires_grad_(True)
    ppo_clipped_surrogate(logp, lo, adv, 0.2).sum().backward()
    assert lo.grad is None and adv.grad is None


def test_ppo_rejects_negative_eps_and_upcasts():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_clipped_surrogate(z, z, z, clip_eps=-0.1)
    assert ppo_clipped_surrogate(z.bfloat16(), z.bfloat16(), z.bfloat16()).dtype == torch.float32
    assert ppo_clipped_surrogate(z.double(), z.double(), z.double()).dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------
# importance-weighted forward KL
# ---------------------------------------------------------------------------------------------------------
def enumerate_iw(s: torch.Tensor, t: torch.Tensor, T: float = 1.0, max_weight=None):
    """Exact expectation over y ~ q (q_old = q) of the per-token estimate and of its gradient.

    Every vocabulary id is one possible sample; its probability q(y) is the sampler's (no gradient).
    """
    x = s.clone().requires_grad_(True)
    logq = torch.log_softmax(x / T, -1)  # [N, V]: log q(y) for every y
    logq_old = logq.detach()
    teacher = torch.log_softmax(t / T, -1)
    est = importance_weighted_fkl(logq, logq_old, teacher, max_weight=max_weight)  # [N, V]
    expectation = (logq_old.exp() * est).sum(-1)
    expectation.sum().backward()
    return expectation.detach(), x.grad


@pytest.mark.parametrize("T", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_importance_weighted_fkl_is_unbiased(T, seed):
    s, t = pair(N=3, V=6, seed=seed, scale=3.0)
    value, grad = enumerate_iw(s, t, T)
    torch.testing.assert_close(value, forward_kl(s, t, temperature=T), rtol=1e-10, atol=1e-12)
    x = s.clone().requires_grad_(True)
    forward_kl(x, t, temperature=T).sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-10, atol=1e-12)


def test_importance_weighted_fkl_per_sample_value():
    """One sample: w (log p_T - log q), w = p_T / q_old, with no gradient to the teacher or the weight."""
    logp = torch.tensor([math.log(0.2)], dtype=torch.float64, requires_grad=True)
    logp_old = torch.tensor([math.log(0.25)], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([math.log(0.5)], dtype=torch.float64, requires_grad=True)
    out = importance_weighted_fkl(logp, logp_old, teacher)
    # w = 0.5 / 0.25 = 2; 2 * (ln 0.5 - ln 0.2) = 2 ln 2.5
    assert out.item() == pytest.approx(2 * math.log(2.5), rel=1e-12)
    out.sum().backward()
    assert logp.grad.item() == pytest.approx(-2.0)
    assert logp_old.grad is None and teacher.grad is None


def test_importance_weight_truncation():
    logp = torch.tensor([math.log(0.01), math.log(0.3)], dtype=torch.float64)
    teacher = torch.tensor([math.log(0.5), math.log(0.3)], dtype=torch.float64)
    out = importance_weighted_fkl(logp, logp, teacher, max_weight=5.0)
    # weights 50 -> 5 and 1 -> 1
    torch.testing.assert_close(out, torch.tensor([5.0 * math.log(50.0), 0.0], dtype=torch.float64))
    # truncation biases the expectation downwards where it bites (positive terms only shrink here)
    s, t = pair(N=3, V=6, seed=3, scale=3.0)
    truncated, _ = enumerate_iw(s, t, max_weight=1.0)
    exact, _ = enumerate_iw(s, t)
    assert not torch.allclose(truncated, exact)


def test_importance_weighted_dtypes():
    z = torch.full((4,), -1.0)
    assert importance_weighted_fkl(z.bfloat16(), z.bfloat16(), z.bfloat16()).dtype == torch.float32
    assert importance_weighted_fkl(z.double(), z.double(), z.double()).dtype == torch.float64


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 30),
    st.floats(0.01, 30.0),
    st.floats(0.3, 3.0),
    st.integers(0, 2**31 - 1),
)
def test_hypothesis_importance_weighted_unbiased(V, scale, T, seed):
    s, t = pair(N=2, V=V, seed=seed, scale=scale)
    value, grad = enumerate_iw(s, t, T)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(value, forward_kl(s, t, temperature=T), rtol=1e-8, atol=1e-9)
