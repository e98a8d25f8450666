"""Estimators that only see the tokens the student sampled (no full teacher distribution needed).

Inputs are per-position log-probabilities of the sampled token ``y_t``, shape ``[...]``:
``logp`` (current student, with gradient), ``logp_old`` (the sampler's, no gradient) and ``teacher_logp``.
"""

from __future__ import annotations

import torch

from eopd.losses.divergences import upcast

Tensor = torch.Tensor


def sampled_rkl_advantage(teacher_logp: Tensor, logp_old: Tensor) -> Tensor:
    """On-policy distillation advantage ``A_t = log p_T(y_t) - log q_old(y_t)``, without gradient.

    Its negative mean over student samples is the single-sample (k1) estimate of KL(q || p_T); maximising
    ``E[r_t A_t]`` follows the reverse-KL policy gradient.
    """
    return (upcast(teacher_logp) - upcast(logp_old)).detach()


def ppo_clipped_surrogate(logp: Tensor, logp_old: Tensor, advantages: Tensor, clip_eps: float = 0.2) -> Tensor:
    """PPO's clipped surrogate per token: ``max(-r A, -clip(r, 1 - eps, 1 + eps) A)``, ``r = q / q_old``.

    On the first minibatch of a fresh rollout ``r = 1`` and the gradient is the plain policy gradient
    ``-A * grad log q``; later PPO epochs are kept near the sampler by the clip.

    Args:
        logp: ``[...]`` current student log-prob of the sampled token (carries gradient).
        logp_old: ``[...]`` sampler log-prob of the same token.
        advantages: ``[...]`` (no gradient).
        clip_eps: The clip range epsilon (0.2 in the paper).
    """
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    ratio = torch.exp(upcast(logp) - upcast(logp_old).detach())
    adv = advantages.detach()
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    return torch.maximum(unclipped, clipped)


def importance_weighted_fkl(
    logp: Tensor, logp_old: Tensor, teacher_logp: Tensor, max_weight: float | None = None
) -> Tensor:
    """Forward KL estimated on the student's own samples by importance weighting, per token.

    ``KL(p_T || q) = E_{y ~ q_old}[w (log p_T(y) - log q(y))]`` with ``w = p_T(y) / q_old(y)``. The
    returned per-token value is ``sg(w) * (sg(log p_T) - log q)``: its expectation is the forward KL and its
    gradient ``-w grad log q`` is unbiased for the forward-KL gradient.

    Variance: ``Var = E_q[w^2 (log p_T - log q)^2] - KL^2``, which grows with ``E_q[w^2]`` =
    ``1 + chi^2(p_T || q)`` and is unbounded when the student puts little mass where the teacher puts much —
    exactly the tokens the forward KL exists to fix, and the ones a sampler rarely visits. It is the
    cheapest estimator (no top-k, no full logits) and the noisiest; ``max_weight`` truncates ``w`` (biased,
    bounded variance).

    Args:
        logp: ``[...]`` current student log-prob of the sampled token.
        logp_old: ``[...]`` sampler log-prob of that token.
        teacher_logp: ``[...]`` teacher log-prob of that token.
        max_weight: Optional truncation of the importance weight.
    """
    w = torch.exp(upcast(teacher_logp) - upcast(logp_old)).detach()
    if max_weight is not None:
        w = w.clamp(max=max_weight)
    return w * (upcast(teacher_logp).detach() - upcast(logp))
