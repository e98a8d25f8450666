"""Token-level divergences between a student ``q`` and a teacher ``p_T``, as pure functions.

Every function takes logits of shape ``[..., V]`` and returns one value per position, shape ``[...]``.
Conventions shared by all of them:

- Math runs in float32 (float64 when the input is float64): bf16 logits are upcast first, because a
  log-softmax over 151k entries in bf16 loses the tail the forward KL is about.
- ``temperature`` divides *both* models' logits, so the loss sees the distributions the sampler used.
- ``-inf`` logits (padded vocabulary rows, masked ids) are zero-probability entries: they contribute exactly
  0 where the math is finite and never turn into NaN, in the value or in the gradient. Terms of the form
  ``p * (log p - log q)`` are computed with ``log p`` and ``log q`` replaced by 0 wherever ``p == 0``.

Naming: ``forward_kl`` is KL(p_T || q) (mode covering), ``reverse_kl`` is KL(q || p_T) (mode seeking).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def upcast(x: Tensor) -> Tensor:
    """float64 stays float64; every other float dtype becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary log-softmax of ``logits / temperature`` in float32 (or float64)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.log_softmax(upcast(logits) / temperature, dim=-1)


def kl_from_log_probs(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the last dim, NaN-safe where p == 0.

    Args:
        logp: ``[..., V]`` log-probabilities of the first argument (may hold ``-inf``).
        logq: ``[..., V]`` log-probabilities of the second argument (may hold ``-inf``).

    Returns:
        ``[...]``; ``+inf`` only where p > 0 and q == 0 (the true value).
    """
    p = logp.exp()
    support = p > 0
    logp_s = logp.masked_fill(~support, 0.0)
    logq_s = logq.masked_fill(~support, 0.0)
    return (p * (logp_s - logq_s)).sum(dim=-1)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Shannon entropy in nats of ``softmax(logits / temperature)`` over the full vocabulary.

    Args:
        logits: ``[..., V]``.
        temperature: Divides the logits.

    Returns:
        ``[...]``, in ``[0, log V]``.
    """
    logp = log_probs(logits, temperature)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact KL(p_T || q) over the full vocabulary; shape ``[...]``.

    Its gradient with respect to the student logits is ``(q - p_T) / temperature``.
    """
    return kl_from_log_probs(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact KL(q || p_T) over the full vocabulary; shape ``[...]``."""
    return kl_from_log_probs(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


def _log_mixture(logp: Tensor, logq: Tensor, w_p: float) -> Tensor:
    """log(w_p * p + (1 - w_p) * q) computed stably from log-probs, for 0 < w_p < 1.

    Where both are ``-inf`` (a row padded in both models) the result is ``-inf`` with a zero gradient:
    ``logaddexp``'s own backward is NaN there (``exp(-inf - -inf)``), so those entries are routed around it.
    """
    a = logp + math.log(w_p)
    b = logq + math.log1p(-w_p)
    both_zero = torch.isneginf(a) & torch.isneginf(b)
    return torch.logaddexp(a.masked_fill(both_zero, 0.0), b.masked_fill(both_zero, 0.0)).masked_fill(
        both_zero, float("-inf")
    )


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0
) -> Tensor:
    """Generalised Jensen-Shannon divergence in TRL's (GKD) convention; shape ``[...]``.

    ``beta * KL(p_T || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p_T + (1 - beta) * q``.
    The endpoints are not the limit of that formula (which is 0 at both ends) but the two KLs, exactly as
    TRL defines them: ``beta = 0`` is KL(p_T || q) (forward), ``beta = 1`` is KL(q || p_T) (reverse).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    if beta == 0.0:
        return kl_from_log_probs(logp, logq)
    if beta == 1.0:
        return kl_from_log_probs(logq, logp)
    logm = _log_mixture(logp, logq, beta)
    return beta * kl_from_log_probs(logp, logm) + (1.0 - beta) * kl_from_log_probs(logq, logm)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM skew forward KL: KL(p_T || alpha * p_T + (1 - alpha) * q); shape ``[...]``.

    ``alpha = 0`` is the forward KL; the skew keeps the value and gradient bounded where q -> 0.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    if alpha == 0.0:
        return kl_from_log_probs(logp, logq)
    return kl_from_log_probs(logp, _log_mixture(logp, logq, alpha))


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM skew reverse KL: KL(q || (1 - alpha) * p_T + alpha * q); shape ``[...]``."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    if alpha == 0.0:
        return kl_from_log_probs(logq, logp)
    return kl_from_log_probs(logq, _log_mixture(logq, logp, alpha))


def total_variation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Total variation distance 0.5 * sum_v |p_T(v) - q(v)|; shape ``[...]``."""
    p = log_probs(teacher_logits, temperature).exp()
    q = log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(dim=-1)


def adaptive_kl(
    student_logits: Tensor, teacher_logits: Tensor, mu: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """AKL (Wu et al., 2024): forward and reverse KL weighted by the head/tail gaps; shape ``[...]``.

    The head is the smallest set of the teacher's most likely tokens whose mass reaches ``mu`` (the top
    token always belongs to it); the tail is the rest. With ``g_head = sum_head |p_T - q|`` and
    ``g_tail = sum_tail |p_T - q|`` (no gradient through the weights), AKL is
    ``g_head / (g_head + g_tail) * FKL + g_tail / (g_head + g_tail) * RKL``: the forward KL fixes the head,
    the reverse KL the tail. Where the two distributions are equal both gaps are 0 and AKL is 0.
    """
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"AKL mu must be in (0, 1], got {mu}")
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    with torch.no_grad():
        p, q = logp.exp(), logq.exp()
        p_sorted, order = torch.sort(p, dim=-1, descending=True)
        mass_before = p_sorted.cumsum(-1) - p_sorted
        head_sorted = mass_before < mu
        head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        gap = (p - q).abs()
        g_head = (gap * head).sum(-1)
        g_tail = (gap * ~head).sum(-1)
        total = g_head + g_tail
        safe = total > 0
        w_head = torch.where(safe, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return w_head * kl_from_log_probs(logp, logq) + (1.0 - w_head) * kl_from_log_probs(logq, logp)


def todi(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, temperature: float = 1.0) -> Tensor:
    """ToDi (Token-wise Distillation): per-vocabulary sigmoid mix of forward and reverse KL terms.

    ``sum_v a_v * p_T(v) log(p_T(v)/q(v)) + (1 - a_v) * q(v) log(q(v)/p_T(v))`` with
    ``a_v = sigmoid(beta * log(p_T(v) / q(v)))`` computed without gradient: where the student
    under-estimates the teacher the forward term dominates (pull mass up), where it over-estimates the
    reverse term does (push mass down). Shape ``[...]``.
    """
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    p, q = logp.exp(), logq.exp()
    both = (p > 0) & (q > 0)
    with torch.no_grad():
        ratio = torch.where(both, logp - logq, torch.where(p > 0, torch.inf, -torch.inf).to(logp.dtype))
        a = torch.sigmoid(beta * ratio)
    lp_f = logp.masked_fill(p == 0, 0.0)
    lq_f = logq.masked_fill(p == 0, 0.0)
    lp_r = logp.masked_fill(q == 0, 0.0)
    lq_r = logq.masked_fill(q == 0, 0.0)
    fwd = p * (lp_f - lq_f)
    rev = q * (lq_r - lp_r)
    return (a * fwd + (1.0 - a) * rev).sum(dim=-1)


def gather_log_probs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary log-softmax of ``logits / temperature`` gathered at ``ids``.

    Args:
        logits: ``[..., V]``.
        ids: ``[...]`` or ``[..., K]`` integer ids.

    Returns:
        Same shape as ``ids``.
    """
    logq = log_probs(logits, temperature)
    if ids.dim() == logits.dim() - 1:
        return logq.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logq.gather(-1, ids)


def _renormalised(teacher_topk_logprobs: Tensor) -> Tensor:
    """log p~_T on the top-k: the teacher's top-k log-probs renormalised to sum to 1 over k."""
    return torch.log_softmax(upcast(teacher_topk_logprobs), dim=-1)


def topk_kl_from_student_logprobs(student_topk_logprobs: Tensor, teacher_topk_logprobs: Tensor) -> Tensor:
    """EOPD Eq. 10 given the student's full-vocabulary log-probs already gathered at the teacher's top-k.

    Args:
        student_topk_logprobs: ``[..., K]`` log q(v) (full-vocabulary normalisation).
        teacher_topk_logprobs: ``[..., K]`` log p_T(v) of the teacher's top-k ids.

    Returns:
        ``[...]``: sum_k p~_T(v_k) (log p~_T(v_k) - log q(v_k)).
    """
    return kl_from_log_probs(_renormalised(teacher_topk_logprobs), upcast(student_topk_logprobs))


def topk_forward_kl(
    student_logits: Tensor, teacher_topk_ids: Tensor, teacher_topk_logprobs: Tensor, temperature: float = 1.0
) -> Tensor:
    """Top-k forward KL of EOPD (Eq. 10, the official code); shape ``[...]``.

    ``sum_{v in topk} p~_T(v) (log p~_T(v) - log q(v))`` where ``p~_T`` is the teacher renormalised on its
    top-k and ``log q`` is the student's FULL-vocabulary log-softmax gathered at those ids. Because q is not
    renormalised, the value is not a KL between two distributions on the top-k; it is still >= 0 (log-sum
    inequality: it is >= -log sum_k q(v_k) >= 0) and is 0 only when q = p~_T on the top-k (no student mass
    outside it). Its gradient ``q - p~_T`` pulls q towards p~_T on the top-k and pushes every other id down.
    See ``topk_forward_kl_with_tail`` for the unbiased variant.

    Args:
        student_logits: ``[..., V]``.
        teacher_topk_ids: ``[..., K]``.
        teacher_topk_logprobs: ``[..., K]`` teacher log-probs (at the same temperature) of those ids.
        temperature: Divides the student logits (the teacher's are already at that temperature).
    """
    return topk_kl_from_student_logprobs(
        gather_log_probs(student_logits, teacher_topk_ids, temperature), teacher_topk_logprobs
    )


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_forward_kl_with_tail(
    student_logits: Tensor, teacher_topk_ids: Tensor, teacher_topk_logprobs: Tensor, temperature: float = 1.0
) -> Tensor:
    """Forward KL on the top-k plus one tail bucket; shape ``[...]``.

    Treats every id outside the teacher's top-k as one outcome: ``sum_k p_T(v) log(p_T(v)/q(v)) +
    p_tail log(p_tail / q_tail)`` with ``p_tail = 1 - sum_k p_T`` and ``q_tail = 1 - sum_k q``. This is the KL
    between two distributions on K + 1 outcomes, so it is >= 0, never exceeds the full forward KL (data
    processing) and equals it when the teacher's tail is empty; no renormalisation bias. ``q_tail`` is
    computed as a log-sum-exp over the non-top-k logits, so it has no cancellation error.

    When no id outside the top-k has student mass (k = V, or only ``-inf`` padded rows are left) the bucket
    is empty on both sides: ``p_tail``, which is ``1 - sum_k p_T`` and so only known to rounding, is set to 0
    there instead of giving ``p_tail log(p_tail / 0) = +inf``.
    """
    logq_full = log_probs(student_logits, temperature)
    logq_k = logq_full.gather(-1, teacher_topk_ids)
    logq_rest = logq_full.scatter(-1, teacher_topk_ids, float("-inf"))
    tail_empty = torch.isneginf(logq_rest).all(dim=-1, keepdim=True)
    logq_tail = torch.logsumexp(logq_rest.masked_fill(tail_empty, 0.0), dim=-1, keepdim=True)
    logq_tail = logq_tail.masked_fill(tail_empty, float("-inf"))
    logp_k = upcast(teacher_topk_logprobs)
    logp_tail = log1mexp(torch.logsumexp(logp_k, dim=-1, keepdim=True)).masked_fill(tail_empty, float("-inf"))
    return kl_from_log_probs(torch.cat([logp_k, logp_tail], -1), torch.cat([logq_k, logq_tail], -1))
