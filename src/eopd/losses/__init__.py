"""Pure loss functions for on-policy distillation (math in float32, NaN-safe masking).

``divergences`` (token-level divergences on full logits), ``sampled`` (estimators on sampled tokens),
``weights`` (entropy weighting, adaptive tau), ``spec`` (the objective's config, presets and per-position types),
``objectives`` (the composed objective),
``fused`` (the chunked lm_head + loss path that never materialises ``[N, V]``), ``topk_entropy`` (the
entropy gate from a teacher that serves only top-k log-probs), ``alignment`` (the public code's one-position
offset of the forward-KL term, ``official_alignment``).
"""

from eopd.losses.alignment import fkl_mask_of, loss_positions, shift_gate, shift_right
from eopd.losses.divergences import (
    adaptive_kl,
    entropy,
    forward_kl,
    gather_log_probs,
    generalized_jsd,
    kl_from_log_probs,
    log_probs,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    todi,
    topk_forward_kl,
    topk_forward_kl_with_tail,
    total_variation,
)
from eopd.losses.fused import FusedOutput, fused_objective, reference_objective
from eopd.losses.objectives import (
    objective,
    prepare_weights,
    sparse_token_losses,
    summarize,
    token_losses,
)
from eopd.losses.sampled import importance_weighted_fkl, ppo_clipped_surrogate, sampled_rkl_advantage
from eopd.losses.scoring import TokenScores, score_chunked, score_from_logits, with_teacher_scores
from eopd.losses.spec import PRESETS, ObjectiveConfig, ObjectiveOutput, TokenBatch, TokenWeights
from eopd.losses.topk_entropy import gate_undecided, topk_entropy_bounds, topk_entropy_estimate
from eopd.losses.weights import AdaptiveTau, entropy_quantile, entropy_weight

__all__ = [
    "PRESETS",
    "AdaptiveTau",
    "FusedOutput",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "TokenBatch",
    "TokenScores",
    "TokenWeights",
    "adaptive_kl",
    "entropy",
    "entropy_quantile",
    "entropy_weight",
    "fkl_mask_of",
    "forward_kl",
    "fused_objective",
    "gate_undecided",
    "gather_log_probs",
    "generalized_jsd",
    "importance_weighted_fkl",
    "kl_from_log_probs",
    "log_probs",
    "loss_positions",
    "objective",
    "ppo_clipped_surrogate",
    "prepare_weights",
    "reference_objective",
    "reverse_kl",
    "sampled_rkl_advantage",
    "score_chunked",
    "score_from_logits",
    "shift_gate",
    "shift_right",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_token_losses",
    "summarize",
    "todi",
    "token_losses",
    "topk_entropy_bounds",
    "topk_entropy_estimate",
    "topk_forward_kl",
    "topk_forward_kl_with_tail",
    "total_variation",
    "with_teacher_scores",
]
