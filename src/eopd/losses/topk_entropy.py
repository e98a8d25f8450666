"""The EOPD entropy gate from a teacher that returns only its top-k log-probs.

Why this file exists: a teacher behind an inference server (vLLM's OpenAI-compatible ``prompt_logprobs``)
returns per position only its ``k <= 20`` most likely ids and their log-probs, never the full-vocabulary
entropy ``H_t`` that EOPD's gate ``1[H_t >= tau]`` reads. Top-k alone does not determine ``H_t``, but it
confines it to an interval, and for most tokens the whole interval lies on one side of ``tau``:

- ``topk_entropy_bounds``: the smallest and largest entropy of any distribution over ``V`` ids whose top-k
  is the one observed (both bounds are attained, so no method can decide more tokens from top-k alone);
- ``gate_undecided``: the tokens whose interval contains ``tau`` (the only ones where the gate is a guess);
- ``topk_entropy_estimate``: a point estimate inside the interval (one of ``RULES``) to feed to the gate
  as ``teacher_entropy``. Because it never leaves ``[lower, upper]``, the gate on it agrees with the exact
  gate on every decided token; the rule only matters on undecided ones. ``DEFAULT_RULE`` was chosen by
  measurement (``benchmarks/topk_gate_agreement.py``, ``docs/topk_gate.md``).

Shapes: ``logprobs_NK`` is ``[..., K]`` (any leading shape, written ``N``); results are ``[...]``. Math runs
in float32 (float64 for float64 input). The served log-probs are at temperature 1, so the gate they feed is
the gate of the temperature-1 teacher.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from eopd.losses.divergences import log1mexp, upcast

Tensor = torch.Tensor

#: Point estimates of ``H`` for ``topk_entropy_estimate``, all clamped to ``[lower, upper]``.
RULES = ("lower", "upper", "midpoint", "geometric")
#: The rule with the fewest gate disagreements at k = 20 in ``benchmarks/topk_gate_agreement.py``, and the
#: minimax estimate (its error never exceeds half the interval); measurements in docs/topk_gate.md.
DEFAULT_RULE = "midpoint"


class TopkSummary(NamedTuple):
    """What the bounds need from one row of top-k log-probs (all ``[...]``, float32 or float64).

    Attributes:
        head: ``sum_i p_i (-log p_i)`` over the observed (non-padding) entries.
        p_min: ``p_k``, the smallest observed probability (1 when every entry is padding).
        tail: ``m = 1 - sum_i p_i``, clamped to ``[0, 1]``; 0 when no id is left outside the top-k.
        log_tail: ``log m`` (``-inf`` where ``m = 0``).
        slots: ``V - k``, the number of ids outside the top-k (``k`` counts non-padding entries only).
    """

    head: Tensor
    p_min: Tensor
    tail: Tensor
    log_tail: Tensor
    slots: Tensor


def _xlogx_neg(p: Tensor, logp: Tensor) -> Tensor:
    """``-p log p`` elementwise with ``0`` where ``p == 0`` (no ``0 * -inf``)."""
    return torch.where(p > 0, -p * logp.masked_fill(p == 0, 0.0), torch.zeros_like(p))


def summarize_topk(logprobs_NK: Tensor, vocab_size: int) -> TopkSummary:
    """Head entropy, smallest probability, tail mass and free slots of top-k log-probs.

    Order is not relied on (the smallest entry is a ``min``, the rest are sums), so unsorted input is fine.
    ``-inf`` entries are padding (a teacher that returned fewer than ``K`` ids) and count neither in ``k``
    nor in the head (NaN is not padding: it propagates). The ids are assumed distinct. The tail
    ``m = exp(log1mexp(logsumexp(log p)))`` has no cancellation error beyond the input's; rounding that
    makes it negative is clamped to 0, and where no id is left outside the top-k (``k == V``) it is 0.

    Args:
        logprobs_NK: ``[..., K]`` log-probs (full-vocabulary normalisation) of the teacher's top-k ids.
        vocab_size: ``V`` (``>= K``).

    Returns:
        ``TopkSummary`` with ``[...]`` fields.
    """
    if logprobs_NK.dim() < 1 or logprobs_NK.shape[-1] < 1:
        raise ValueError(f"logprobs must be [..., K] with K >= 1, got shape {tuple(logprobs_NK.shape)}")
    if vocab_size < logprobs_NK.shape[-1]:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the number of top-k entries "
                         f"{logprobs_NK.shape[-1]}")
    logp_NK = upcast(logprobs_NK)
    present_NK = ~torch.isneginf(logp_NK)
    p_NK = logp_NK.exp()
    head_N = _xlogx_neg(p_NK, logp_NK).sum(-1)
    p_min_N = p_NK.masked_fill(~present_NK, 1.0).amin(-1)
    slots_N = (vocab_size - present_NK.sum(-1)).to(logp_NK.dtype)
    lse_N = torch.logsumexp(logp_NK, dim=-1)
    no_tail_N = (slots_N <= 0) | (lse_N >= 0)
    log_tail_N = log1mexp(lse_N).masked_fill(no_tail_N, float("-inf"))
    tail_N = log_tail_N.exp()
    return TopkSummary(head_N, p_min_N, tail_N, log_tail_N, slots_N)


def _lower_tail(s: TopkSummary) -> Tensor:
    """Least entropy of a tail of mass ``m`` whose ids each hold ``<= p_k``: ``n f(p_k) + f(r)``, ``[...]``."""
    # n <= V - k for a genuine top-k; the clamps only keep an underflowed p_k (= 0) from giving 0/0 or inf * 0
    per_id_N = s.p_min.clamp(min=torch.finfo(s.p_min.dtype).tiny)
    n_N = torch.minimum(torch.floor(s.tail / per_id_N), s.slots.clamp(min=0.0))
    rest_N = (s.tail - n_N * s.p_min).clamp(min=0.0)
    rest_N = torch.minimum(rest_N, s.p_min)
    return n_N * _xlogx_neg(s.p_min, s.p_min.log()) + _xlogx_neg(rest_N, rest_N.log())


def _upper_tail(s: TopkSummary) -> Tensor:
    """Greatest entropy of a tail of mass ``m`` on ``V - k`` ids: ``m log((V - k) / m)``, ``[...]``."""
    has_tail_N = s.tail > 0
    log_ratio_N = s.slots.clamp(min=1.0).log() - s.log_tail.masked_fill(~has_tail_N, 0.0)
    return torch.where(has_tail_N, s.tail * log_ratio_N, torch.zeros_like(s.tail))


def topk_entropy_bounds(logprobs_NK: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Tight lower and upper bounds on the full-vocabulary entropy from the top-k log-probs alone.

    With the observed probabilities ``p_1 >= ... >= p_k``, tail mass ``m = 1 - sum_i p_i`` spread over the
    ``V - k`` other ids (``t_j``, ``sum_j t_j = m``, each ``t_j <= p_k`` because the observed ids ARE the top
    k) and ``f(x) = -x log x`` (concave, ``f(0) = 0``)::

        H = head + sum_j f(t_j),   head = sum_i f(p_i)
        lower = head + n f(p_k) + f(r),     n = floor(m / p_k),  r = m - n p_k
        upper = head + m log((V - k) / m)   (0 for m = 0)

    Proof of the lower bound. ``sum_j f(t_j)`` is concave in ``t``, so its minimum over the polytope
    ``{0 <= t_j <= p_k, sum_j t_j = m}`` is attained at a vertex. A vertex has every coordinate but at most
    one at a bound (0 or ``p_k``), and the mass fixes the rest: ``n`` ids at ``p_k``, one at ``r < p_k``, the
    others 0 (``n + 1 <= V - k`` since ``m <= (V - k) p_k``). Every vertex is such a permutation, so the
    minimum is ``n f(p_k) + f(r)``, attained by that tail. It is at least the simpler per-term bound
    ``m (-log p_k)`` (each ``t_j (-log t_j) >= t_j (-log p_k)`` as ``t_j <= p_k``; the two differ by
    ``r log(p_k / r) <= p_k / e``) and equals it when ``m / p_k`` is an integer, e.g. ``m = 0``.

    Proof of the upper bound. By Jensen (concavity of ``f``) over the ``V - k`` tail ids,
    ``sum_j f(t_j) <= (V - k) f(m / (V - k)) = m log((V - k) / m)``, with equality iff the tail is uniform;
    the uniform tail is feasible (``m / (V - k) <= p_k``), so the bound is attained.

    Both bounds are exact (``= head``) when ``m = 0`` and in particular when ``k == V``. They hold for the
    true top-k; a top-k that is not the distribution's (another temperature, or rounding that puts the tail
    above ``p_k``) can only break the lower bound, so it is clamped to ``<= upper``.

    Args:
        logprobs_NK: ``[..., K]`` teacher log-probs of its top-k ids (any order; ``-inf`` = padding).
        vocab_size: ``V``, the teacher's vocabulary (ids with zero probability count as slots: that only
            loosens the upper bound).

    Returns:
        ``(lower, upper)``, both ``[...]`` in nats, ``0 <= lower <= upper <= log V`` (to rounding).
    """
    s = summarize_topk(logprobs_NK, vocab_size)
    upper_N = s.head + _upper_tail(s)
    lower_N = torch.minimum(s.head + _lower_tail(s), upper_N)
    return lower_N, upper_N


def _geometric_tail(s: TopkSummary) -> Tensor:
    """Entropy of the tail ``t_j = p_k rho^j`` (``j >= 1``) of mass ``m``: ``rho = m / (p_k + m)``, ``[...]``.

    ``H_tail = m (-log p_k) + m (1 + m / p_k) log((p_k + m) / m)`` (sum of ``t_j (-log p_k - j log rho)``
    with ``sum_j j rho^j = rho / (1 - rho)^2``); 0 for ``m = 0``.
    """
    has_tail_N = s.tail > 0
    safe_N = has_tail_N & (s.p_min > 0)  # p_k underflowed to 0: no geometric tail fits; the caller clamps
    log_pk_N = s.p_min.masked_fill(~safe_N, 1.0).log()
    log_m_N = s.log_tail.masked_fill(~safe_N, 0.0)
    ratio_N = (s.tail / s.p_min).masked_fill(~safe_N, 0.0)
    value_N = s.tail * (-log_pk_N) + s.tail * (1.0 + ratio_N) * (torch.logaddexp(log_pk_N, log_m_N) - log_m_N)
    value_N = torch.where(safe_N, value_N, torch.zeros_like(value_N))
    return torch.where(has_tail_N & ~safe_N, torch.full_like(value_N, float("inf")), value_N)


def topk_entropy_estimate(logprobs_NK: Tensor, vocab_size: int, rule: str = DEFAULT_RULE) -> Tensor:
    """A point estimate of the full-vocabulary entropy inside ``topk_entropy_bounds``.

    Rules (each clamped to ``[lower, upper]``, so a gate ``estimate >= tau`` agrees with the exact gate on
    every token the bounds decide):

    - ``lower`` / ``upper``: the bound itself (the gate then fires only when certain / whenever possible);
    - ``midpoint`` (default): ``(lower + upper) / 2``. Every entropy in ``[lower, upper]`` is attained by
      some distribution with this top-k, so it is the estimate with the least worst-case error (half the
      width); it also disagreed least with the exact gate at k = 20 on Qwen3-sized vocabularies;
    - ``geometric``: the tail continues geometrically from ``p_k`` with the observed mass,
      ``t_j = p_k rho^j``, ``rho = m / (p_k + m)`` (``_geometric_tail``); best on fast-decaying tails
      (random-weight models), but it puts the tail on few ids and so underestimates a broad one.

    Args:
        logprobs_NK: ``[..., K]`` teacher top-k log-probs (see ``topk_entropy_bounds``).
        vocab_size: ``V``.
        rule: One of ``RULES``.

    Returns:
        ``[...]`` entropy estimate in nats.
    """
    if rule not in RULES:
        raise ValueError(f"unknown top-k entropy rule {rule!r}; choose one of {', '.join(RULES)}")
    lower_N, upper_N = topk_entropy_bounds(logprobs_NK, vocab_size)
    if rule == "lower":
        return lower_N
    if rule == "upper":
        return upper_N
    if rule == "midpoint":
        return 0.5 * (lower_N + upper_N)
    s = summarize_topk(logprobs_NK, vocab_size)
    return torch.minimum(torch.maximum(s.head + _geometric_tail(s), lower_N), upper_N)


def gate_undecided(lower_N: Tensor, upper_N: Tensor, tau: float) -> Tensor:
    """Tokens whose entropy interval contains ``tau``: ``lower < tau <= upper``, ``bool [...]``.

    Elsewhere the step gate ``1[H >= tau]`` is known from top-k alone: gated where ``lower >= tau``, not
    gated where ``upper < tau``.
    """
    return (lower_N < tau) & (upper_N >= tau)
