"""Entropy weighting schedules and the adaptive threshold."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eopd.losses import AdaptiveTau, entropy_quantile, entropy_weight

SCHEDULES = ["step", "sigmoid", "linear", "constant"]


def test_step_gate_is_inclusive_indicator():
    h = torch.tensor([0.0, 0.5, 0.8, 0.80001, 3.0], dtype=torch.float64)
    torch.testing.assert_close(entropy_weight(h, "step", tau=0.8), torch.tensor([0, 0, 1, 1, 1.0], dtype=torch.float64))
    # a 0-d tensor threshold (adaptive tau) works the same
    torch.testing.assert_close(entropy_weight(h, "step", tau=torch.tensor(0.6, dtype=torch.float64)),
                               torch.tensor([0, 0, 1, 1, 1.0], dtype=torch.float64))


def test_sigmoid_schedule_values():
    h = torch.tensor([0.8, 0.9, 0.7, 10.0, -10.0], dtype=torch.float64)
    out = entropy_weight(h, "sigmoid", tau=0.8, width=0.1)
    expected = [0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 1.0, 0.0]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_linear_schedule_values():
    h = torch.tensor([0.0, 0.4, 0.6, 0.8, 1.2, 5.0], dtype=torch.float64)
    out = entropy_weight(h, "linear", h_low=0.4, h_high=1.2)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0, 1.0], dtype=torch.float64))


def test_constant_schedule_is_one():
    h = torch.rand(3, 4)
    assert torch.equal(entropy_weight(h, "constant"), torch.ones(3, 4))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_weights_detached_shaped_and_float(schedule):
    h = torch.rand(2, 5, requires_grad=True)
    w = entropy_weight(h, schedule)
    assert w.shape == (2, 5) and not w.requires_grad and w.dtype == torch.float32
    assert entropy_weight(h.detach().bfloat16(), schedule).dtype == torch.float32


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(0.0, 12.0), min_size=1, max_size=50),
    st.sampled_from(SCHEDULES),
    st.floats(0.0, 3.0),
    st.floats(0.01, 1.0),
    st.floats(0.0, 2.0),
    st.floats(0.01, 2.0),
)
def test_hypothesis_weights_monotone_in_unit_interval(hs, schedule, tau, width, h_low, ramp):
    h = torch.tensor(sorted(hs), dtype=torch.float64)
    w = entropy_weight(h, schedule, tau=tau, width=width, h_low=h_low, h_high=h_low + ramp)
    assert ((w >= 0) & (w <= 1)).all()
    assert (w[1:] >= w[:-1]).all()


def test_invalid_schedule_arguments():
    h = torch.rand(3)
    with pytest.raises(ValueError, match="unknown entropy schedule 'cosine'"):
        entropy_weight(h, "cosine")
    with pytest.raises(ValueError, match="width"):
        entropy_weight(h, "sigmoid", width=0.0)
    with pytest.raises(ValueError, match="h_high > h_low"):
        entropy_weight(h, "linear", h_low=1.0, h_high=1.0)


# ---------------------------------------------------------------------------------------------------------
# quantile and adaptive tau
# ---------------------------------------------------------------------------------------------------------
def test_entropy_quantile_ignores_masked_tokens():
    h = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 9.0, 9.0, 9.0, 9.0, 9.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    tau = entropy_quantile(h, mask, share=0.2)
    assert tau.item() == pytest.approx(0.5)  # one of five valid tokens gated
    assert float(((h >= tau) & mask.bool()).sum()) == 1
    assert entropy_quantile(h, torch.zeros(10), 0.2).item() == math.inf
    assert entropy_quantile(h, mask.bool(), 0.6).item() == pytest.approx(0.3)


def two_gaussians(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Synthetic teacher entropies: 75% confident tokens near 0.2 nats, 25% uncertain near 1.5 nats."""
    g = torch.Generator().manual_seed(seed)
    low = 0.2 + 0.1 * torch.randn(3 * n // 4, generator=g)
    high = 1.5 + 0.4 * torch.randn(n - 3 * n // 4, generator=g)
    h = torch.cat([low, high]).clamp_min(0.0) + shift
    return h[torch.randperm(n, generator=g)]


def gated_share(h, mask, tau):
    mask = mask.bool()
    return float(((h >= tau) & mask).sum() / mask.sum())


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_adaptive_tau_hits_target_share(momentum):
    adaptive = AdaptiveTau(target_share=0.2, momentum=momentum)
    assert adaptive.tau is None
    for step in range(5):
        h = two_gaussians(4000, seed=step)
        mask = torch.ones(4000)
        mask[torch.randperm(4000, generator=torch.Generator().manual_seed(100 + step))[:500]] = 0
        adaptive.update(h, mask)
    fresh = two_gaussians(4000, seed=99)
    assert abs(gated_share(fresh, torch.ones(4000), adaptive.tau) - 0.2) <= 0.02
    # the threshold sits inside the uncertain mode, far from the fixed 0.8 nats
    assert 1.0 < adaptive.tau < 2.0


def test_adaptive_tau_share_counts_valid_tokens_only():
    h = two_gaussians(2000, seed=7)
    mask = torch.ones(4000)
    mask[2000:] = 0
    h_all = torch.cat([h, torch.full((2000,), 5.0)])  # padding with a huge entropy must not be gated share
    adaptive = AdaptiveTau(target_share=0.3, momentum=0.0)
    tau = adaptive.update(h_all, mask)
    assert abs(gated_share(h_all, mask, tau) - 0.3) <= 0.01


def test_adaptive_tau_ema():
    adaptive = AdaptiveTau(target_share=0.5, momentum=0.9)
    ones = torch.ones(5)
    # first update takes the batch quantile as is ("higher" interpolation: the 3rd of 5 sorted values)
    assert adaptive.update(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), ones) == pytest.approx(3.0)
    # then EMA: 0.9 * 3 + 0.1 * 13
    assert adaptive.update(torch.tensor([11.0, 12.0, 13.0, 14.0, 15.0]), ones) == pytest.approx(4.0)
    assert adaptive.tau == pytest.approx(4.0)
    # a shifted distribution: the error decays geometrically, by momentum per step
    for _ in range(20):
        adaptive.update(torch.tensor([11.0, 12.0, 13.0, 14.0, 15.0]), ones)
    assert adaptive.tau == pytest.approx(13.0 - 9.0 * 0.9**20)  # error 9 after the first EMA step
    # momentum 0 follows each batch
    follower = AdaptiveTau(target_share=0.5, momentum=0.0)
    follower.update(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3))
    assert follower.update(torch.tensor([7.0, 8.0, 9.0]), torch.ones(3)) == pytest.approx(8.0)


def test_adaptive_tau_no_valid_tokens_keeps_state():
    adaptive = AdaptiveTau(target_share=0.2)
    assert adaptive.update(torch.rand(6), torch.zeros(6)) == math.inf
    assert adaptive.tau is None
    adaptive.update(torch.tensor([1.0, 2.0]), torch.ones(2))
    before = adaptive.tau
    assert adaptive.update(torch.rand(6), torch.zeros(6)) == before
    assert adaptive.tau == before


def test_adaptive_tau_state_dict_round_trip():
    a = AdaptiveTau(target_share=0.25, momentum=0.8)
    for step in range(3):
        a.update(two_gaussians(500, seed=step), torch.ones(500))
    b = AdaptiveTau()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert (b.target_share, b.momentum, b.tau) == (0.25, 0.8, a.tau)
    h = two_gaussians(500, seed=10)
    assert b.update(h, torch.ones(500)) == a.update(h, torch.ones(500))
    # the state is plain Python (checkpoint friendly)
    assert all(isinstance(v, float) for v in a.state_dict().values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_share": 0.0}, "target_share"),
        ({"target_share": 1.0}, "target_share"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
    ],
)
def test_adaptive_tau_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveTau(**kwargs)
