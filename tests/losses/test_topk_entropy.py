"""Entropy bounds and the gate from a top-k-only teacher (``eopd.losses.topk_entropy``) against brute force.

The references compute the full-vocabulary entropy in float64 from every probability (``brute_entropy``)
and build, by hand, the distributions that attain each bound; they share no code with the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eopd.losses.topk_entropy import (
    DEFAULT_RULE,
    RULES,
    gate_undecided,
    topk_entropy_bounds,
    topk_entropy_estimate,
)

INF = float("inf")


def brute_entropy(p: list[float]) -> float:
    """``-sum p log p`` over every id, in Python floats."""
    return -sum(x * math.log(x) for x in p if x > 0)


def topk_logprobs(p_NV: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` log-probs of the k largest probabilities of each row (float64)."""
    return p_NV.topk(k, dim=-1).values.log()


def random_probs(seed: int, n: int, vocab: int, scale: float, heavy: bool) -> torch.Tensor:
    """``[n, V]`` float64 distributions: softmax of Gaussian (or heavy-tailed Cauchy) logits times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    if heavy:
        z = torch.tan(math.pi * (torch.rand(n, vocab, generator=g, dtype=torch.float64) - 0.5))
    else:
        z = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    return torch.softmax(z * scale, dim=-1)


# --- hand-computed values -----------------------------------------------------------------------------------


def test_hand_computed_tiny_case() -> None:
    """p = (1/2, 1/4) of V = 4: tail 1/4 fills one id at p_k (lower) or spreads over two (upper)."""
    lp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    lower, upper = topk_entropy_bounds(lp, 4)
    ln2 = math.log(2.0)
    assert float(lower) == pytest.approx(1.5 * ln2, rel=1e-12)  # H(1/2, 1/4, 1/4, 0)
    assert float(upper) == pytest.approx(1.75 * ln2, rel=1e-12)  # H(1/2, 1/4, 1/8, 1/8)
    assert float(lower) == pytest.approx(brute_entropy([0.5, 0.25, 0.25, 0.0]), rel=1e-12)
    assert float(upper) == pytest.approx(brute_entropy([0.5, 0.25, 0.125, 0.125]), rel=1e-12)


def test_hand_computed_partial_id_and_geometric() -> None:
    """p = (0.6, 0.3) of V = 5: the tail 0.1 < p_k fits in one id (lower 0.1 ln 10, not 0.1 ln(1/0.3))."""
    lp = torch.tensor([[math.log(0.6), math.log(0.3)]], dtype=torch.float64)
    head = 0.6 * math.log(1 / 0.6) + 0.3 * math.log(1 / 0.3)
    lower, upper = topk_entropy_bounds(lp, 5)
    assert float(lower) == pytest.approx(head + 0.1 * math.log(10.0), rel=1e-12)
    assert float(upper) == pytest.approx(head + 0.1 * math.log(30.0), rel=1e-12)  # 0.1 log(3 / 0.1)
    # geometric tail from p_k = 0.3 with mass 0.1: rho = 0.1 / 0.4
    rho = 0.25
    tail = [0.3 * rho**j for j in range(1, 200)]
    assert sum(tail) == pytest.approx(0.1, rel=1e-12)
    geometric = topk_entropy_estimate(lp, 5, "geometric")
    assert float(geometric) == pytest.approx(head + brute_entropy(tail), rel=1e-12)
    assert float(topk_entropy_estimate(lp, 5, "midpoint")) == pytest.approx(float(lower + upper) / 2, rel=1e-12)


# --- bounds against brute force on random distributions ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(20, 3000),
    k=st.sampled_from([1, 5, 10, 20]),
    scale=st.sampled_from([0.01, 0.3, 1.0, 3.0, 8.0, 30.0]),
    heavy=st.booleans(),
)
def test_hypothesis_bounds_contain_entropy(seed: int, vocab: int, k: int, scale: float, heavy: bool) -> None:
    """lower <= H <= upper; the simpler bound m (-log p_k) <= lower; every rule inside; gate agrees if decided."""
    p_NV = random_probs(seed, 4, vocab, scale, heavy)
    h_N = torch.tensor([brute_entropy(row.tolist()) for row in p_NV], dtype=torch.float64)
    lp_NK = topk_logprobs(p_NV, k)
    lower_N, upper_N = topk_entropy_bounds(lp_NK, vocab)
    eps = 1e-9
    assert bool((lower_N <= h_N + eps).all()), (lower_N, h_N)
    assert bool((h_N <= upper_N + eps).all()), (h_N, upper_N)
    p_NK = lp_NK.exp()
    present_N = p_NK[:, -1] > 0  # a probability that underflowed to 0 is padding, not a p_k
    m_N = (1 - p_NK.sum(-1)).clamp(min=0)
    simple_N = -(p_NK * lp_NK).sum(-1) + m_N * -lp_NK[:, -1]
    assert bool((simple_N <= lower_N + eps)[present_N].all())
    for rule in RULES:
        est_N = topk_entropy_estimate(lp_NK, vocab, rule)
        assert bool(((lower_N <= est_N) & (est_N <= upper_N)).all()), rule
        for tau in (0.1, 0.8, 2.0, float(h_N.mean())):
            decided_N = ~gate_undecided(lower_N, upper_N, tau) & ((h_N - tau).abs() > eps)  # clear of rounding
            assert torch.equal((est_N >= tau)[decided_N], (h_N >= tau)[decided_N]), (rule, tau)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(25, 400), k=st.sampled_from([1, 5, 10, 20]),
       scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_hypothesis_bounds_are_attained(seed: int, vocab: int, k: int, scale: float) -> None:
    """Each bound is the entropy of a distribution with the same top-k: the bounds cannot be tightened."""
    p = random_probs(seed, 1, vocab, scale, False)[0].sort(descending=True).values.tolist()
    top = p[:k]
    m, pk = 1.0 - sum(top), top[-1]
    n = math.floor(m / pk)
    low_tail = [pk] * n + [m - n * pk]
    up_tail = [m / (vocab - k)] * (vocab - k)
    assert max(low_tail + up_tail) <= pk * (1 + 1e-12)  # both are tails of the observed top-k
    lower, upper = topk_entropy_bounds(torch.tensor([top], dtype=torch.float64).log(), vocab)
    assert float(lower) == pytest.approx(brute_entropy(top + low_tail), rel=1e-9, abs=1e-12)
    assert float(upper) == pytest.approx(brute_entropy(top + up_tail), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_bounds_exact_without_tail(k: int) -> None:
    """m = 0: k == V, or all mass on the top-k (the rest -inf logits); both bounds and every rule equal H."""
    g = torch.Generator().manual_seed(k)
    for vocab, logits in ((k, torch.randn(3, k, generator=g, dtype=torch.float64)),
                          (k + 50, torch.cat([torch.randn(3, k, generator=g, dtype=torch.float64),
                                              torch.full((3, 50), -INF, dtype=torch.float64)], -1))):
        p_NV = torch.softmax(logits, -1)
        h_N = torch.tensor([brute_entropy(row.tolist()) for row in p_NV], dtype=torch.float64)
        lp_NK = topk_logprobs(p_NV, k)
        lower_N, upper_N = topk_entropy_bounds(lp_NK, vocab)
        torch.testing.assert_close(lower_N, h_N, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(upper_N, h_N, rtol=1e-12, atol=1e-12)
        for rule in RULES:
            torch.testing.assert_close(topk_entropy_estimate(lp_NK, vocab, rule), h_N, rtol=1e-12, atol=1e-12)


# --- input conventions ---------------------------------------------------------------------------------------


def test_unsorted_and_padded_input() -> None:
    """Order does not matter, and -inf padding equals leaving the entry out (same V)."""
    p_NV = random_probs(3, 5, 300, 2.0, False)
    lp_NK = topk_logprobs(p_NV, 10)
    want = topk_entropy_bounds(lp_NK[:, :7], 300)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([lp_NK[:, :7][:, perm], torch.full((5, 3), -INF, dtype=torch.float64)], -1)
    got = topk_entropy_bounds(padded[:, torch.tensor([0, 7, 1, 2, 8, 3, 4, 9, 5, 6])], 300)
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-12)
    for rule in RULES:
        torch.testing.assert_close(topk_entropy_estimate(padded, 300, rule),
                                   topk_entropy_estimate(lp_NK[:, :7], 300, rule), rtol=1e-12, atol=1e-12)


def test_all_padding_gives_the_trivial_interval() -> None:
    """No entry at all: anything from one-hot (0) to uniform (log V)."""
    lower, upper = topk_entropy_bounds(torch.full((2, 4), -INF), 1000)
    assert torch.equal(lower, torch.zeros(2))
    torch.testing.assert_close(upper, torch.full((2,), math.log(1000.0)))


def test_rounding_and_float32() -> None:
    """A top-k summing past 1 by rounding has no tail; float32 input stays float32 and NaN-free."""
    over = torch.tensor([[math.log(0.5), math.log(0.5) + 1e-6]], dtype=torch.float64)
    lower, upper = topk_entropy_bounds(over, 100)
    assert float(lower) == float(upper) == pytest.approx(math.log(2.0), rel=1e-5)
    p_NV = random_probs(5, 64, 2000, 3.0, True)
    lp64 = topk_logprobs(p_NV, 20)
    for rule in RULES:
        e32 = topk_entropy_estimate(lp64.float(), 2000, rule)
        assert e32.dtype == torch.float32 and bool(torch.isfinite(e32).all())
        torch.testing.assert_close(e32.double(), topk_entropy_estimate(lp64, 2000, rule), rtol=1e-4, atol=1e-5)
    lp_k_eq_v = torch.log_softmax(torch.randn(8, 20), -1)  # float32: sums to 1 only to rounding
    lower, upper = topk_entropy_bounds(lp_k_eq_v, 20)
    torch.testing.assert_close(lower, upper, rtol=0.0, atol=0.0)


def test_inconsistent_top_k_keeps_lower_below_upper() -> None:
    """A 'top-k' whose tail cannot fit under p_k (not the distribution's top-k) still gives lower <= upper."""
    lp = torch.tensor([[math.log(0.05), math.log(0.05)]])  # tail 0.9 on 3 ids would need 0.3 > p_k each
    lower, upper = topk_entropy_bounds(lp, 5)
    assert float(lower) <= float(upper)


def test_gate_undecided_and_argument_errors() -> None:
    lower = torch.tensor([0.1, 0.5, 0.9, 0.8])
    upper = torch.tensor([0.7, 1.0, 1.2, 0.8])
    assert gate_undecided(lower, upper, 0.8).tolist() == [False, True, False, False]
    assert DEFAULT_RULE in RULES
    with pytest.raises(ValueError, match="rule"):
        topk_entropy_estimate(torch.zeros(1, 1), 2, "median")
    with pytest.raises(ValueError, match="vocab_size"):
        topk_entropy_bounds(torch.zeros(1, 5), 4)
