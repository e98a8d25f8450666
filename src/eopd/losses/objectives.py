"""The composed distillation objective and its named presets.

Every preset is one instance of the general per-token form

    L_t = w_R(H_t) * RKL_t + w_F(H_t) * FKL_t          (averaged over valid tokens)

where ``H_t`` is the teacher's full-vocabulary entropy and the weights come from ``weights.entropy_weight``:

- additive:  ``w_R = 1``,      ``w_F = alpha * g(H_t)``   (official EOPD: g = 1[H >= tau])
- mixture:   ``w_R = 1 - w_F``, ``w_F = lam * g(H_t)``     (the design doc's (1 - lambda) RKL + lambda FKL)

``RKL_t`` is either the PPO-clipped surrogate on the sampled token (``ppo``, the OPD base, advantage
``log p_T(y_t) - log q_old(y_t)``) or the exact full-vocabulary reverse KL (``exact``). ``FKL_t`` is the
official top-k estimate (``topk``), top-k plus a tail bucket (``topk_tail``), the exact full-vocabulary value
(``exact``) or an importance-weighted estimate on the sampled token (``importance``). Presets that are a
single other divergence (GKD's JSD, DistiLLM's skew KLs, AKL, ToDi, TVD) set ``divergence`` instead.

The configuration, the presets and the per-position types (``TokenBatch``, ``TokenWeights``,
``ObjectiveOutput``) live in ``spec``. The pieces are split so the fused chunked path can reuse them:
``prepare_weights`` (teacher-only, whole batch: thresholds, random placement), ``token_losses`` (per token, any
chunk of positions) and ``summarize`` (metrics). ``objective`` chains the three on full logits.

``official_alignment`` (``alignment``: the public code's pipeline, not the paper's equation) moves the forward-KL
term one position later; the batch then carries ``fkl_mask`` beside ``mask`` and every helper here reads both.
"""

from __future__ import annotations

import dataclasses

import torch

from eopd.losses import divergences as D
from eopd.losses.alignment import shift_gate
from eopd.losses.sampled import importance_weighted_fkl, ppo_clipped_surrogate, sampled_rkl_advantage
from eopd.losses.spec import ObjectiveConfig, ObjectiveOutput, TokenBatch, TokenWeights
from eopd.losses.weights import entropy_quantile, entropy_weight

Tensor = torch.Tensor

#: Prefix of metric sums finished only after the sum over micro-batches and processes (``eopd.training.step_metrics``):
#: a ratio such as ``fkl_high_entropy`` is reported as its numerator and denominator under this prefix.
RAW = "raw/"

def term_masks(cfg: ObjectiveConfig, batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """``(rkl_positions, fkl_positions)``, bool ``[...]``: both ``batch.mask`` unless ``cfg.official_alignment``,
    where the forward-KL term sits on ``batch.fkl_mask`` (required then)."""
    mask = batch.mask.bool()
    if not cfg.official_alignment:
        return mask, mask
    fkl_mask = require_field(batch.fkl_mask, "fkl_mask (official_alignment: the batch laid out with one more "
                             "position per row, fkl_mask = alignment.fkl_mask_of(mask))", cfg)
    return mask, fkl_mask.bool()


def teacher_entropy_of(cfg: ObjectiveConfig, batch: TokenBatch) -> Tensor:
    """The teacher entropy ``H_t``: given, or computed from full teacher logits."""
    if batch.teacher_entropy is not None:
        return D.upcast(batch.teacher_entropy)
    if batch.teacher_logits is not None:
        return D.entropy(batch.teacher_logits, cfg.temperature)
    raise ValueError("the objective needs teacher_entropy (or teacher_logits) in the TokenBatch")


def prepare_weights(
    cfg: ObjectiveConfig,
    batch: TokenBatch,
    *,
    tau: float | None = None,
    generator: torch.Generator | None = None,
) -> TokenWeights:
    """Decide each position's RKL/FKL weights from the teacher entropy (whole batch at once).

    Args:
        cfg: The objective.
        batch: Needs ``mask`` and the teacher entropy (or logits).
        tau: Threshold override (the trainer passes the adaptive tau here); default ``cfg.tau``.
        generator: Randomness for ``placement="random"`` (required then).

    Returns:
        ``TokenWeights`` shaped like ``batch.mask``. With ``official_alignment`` the gate of each token is moved
        to the position after it (``alignment.shift_gate``), so ``w_fkl`` lives on ``batch.fkl_mask``.
    """
    mask = batch.mask.bool()
    tau = cfg.tau if tau is None else tau
    if cfg.divergence is not None:
        ones = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
        return TokenWeights(ones, torch.zeros_like(ones), torch.zeros_like(ones), tau)
    h = teacher_entropy_of(cfg, batch)
    gate = entropy_weight(h, cfg.schedule, tau, cfg.width, cfg.h_low, cfg.h_high)
    # where, not gate * mask: a NaN entropy at a masked position must not survive as NaN * 0.
    gate = torch.where(mask, gate, torch.zeros_like(gate))
    if cfg.placement == "all":
        gate = torch.ones_like(gate)
    elif cfg.placement == "random":
        gate = _random_gate_like(gate, mask, generator)
    gate = torch.where(mask, gate, torch.zeros_like(gate))
    if cfg.official_alignment:
        gate = shift_gate(gate, term_masks(cfg, batch)[1])
    if cfg.weighting == "additive":
        w_fkl = cfg.alpha * gate
        w_rkl = torch.ones_like(gate)
    else:
        w_fkl = cfg.lam * gate
        w_rkl = 1.0 - w_fkl
    if cfg.fkl == "none":
        w_fkl = torch.zeros_like(w_fkl)
    if cfg.rkl == "none":
        w_rkl = torch.zeros_like(w_rkl)
    return TokenWeights(w_rkl, w_fkl, gate, float(tau))


def _random_gate_like(gate: Tensor, mask: Tensor, generator: torch.Generator | None) -> Tensor:
    """A 0/1 gate on as many randomly chosen valid tokens as ``gate`` selects (rounded total weight)."""
    if generator is None:
        raise ValueError("placement='random' needs a torch.Generator (pass generator=...)")
    count = int(round(float((gate * mask).sum())))
    valid_idx = mask.flatten().nonzero().squeeze(1)
    perm = torch.randperm(valid_idx.numel(), generator=generator, device=generator.device)
    chosen = valid_idx[perm[:count].to(valid_idx.device)]
    out = torch.zeros(mask.numel(), dtype=gate.dtype, device=gate.device)
    out[chosen] = 1.0
    return out.view_as(gate)


def _single_divergence(cfg: ObjectiveConfig, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    t = cfg.temperature
    match cfg.divergence:
        case "jsd":
            return D.generalized_jsd(student_logits, teacher_logits, cfg.beta, t)
        case "skew_fkl":
            return D.skew_forward_kl(student_logits, teacher_logits, cfg.skew_alpha, t)
        case "skew_rkl":
            return D.skew_reverse_kl(student_logits, teacher_logits, cfg.skew_alpha, t)
        case "akl":
            return D.adaptive_kl(student_logits, teacher_logits, cfg.akl_mu, t)
        case "todi":
            return D.todi(student_logits, teacher_logits, cfg.todi_beta, t)
        case _:
            return D.total_variation(student_logits, teacher_logits, t)


def require_field(value: Tensor | None, what: str, cfg: ObjectiveConfig) -> Tensor:
    """``value``, or a ValueError saying that objective ``cfg`` needs the TokenBatch field ``what``."""
    if value is None:
        raise ValueError(f"objective {cfg.name!r} needs {what} in the TokenBatch")
    return value


def token_losses(
    cfg: ObjectiveConfig, student_logits: Tensor, batch: TokenBatch, weights: TokenWeights
) -> dict[str, Tensor]:
    """Per-position loss and its parts for any set of positions (a full batch or one chunk).

    Args:
        cfg: The objective.
        student_logits: ``[..., V]`` student logits (gradient flows through ``"loss"`` only).
        batch: Per-position inputs with leading shape ``[...]``.
        weights: From ``prepare_weights`` (same leading shape).

    Returns:
        ``"loss"``: ``[...]`` per-token loss, exactly 0 at masked positions (NaN-free);
        ``"rkl"``, ``"fkl"``: the unweighted terms (detached, 0 where not computed; without an FKL term,
        ``"fkl"`` is the top-k forward KL as a diagnostic when the batch has the teacher's top-k);
        ``"student_entropy"``: ``[...]`` (detached); except for single divergences, ``"loss_rkl"`` and
        ``"loss_fkl"``: ``[...]`` the weighted terms ``w_R RKL`` and ``w_F FKL`` with their gradient (their sum
        is ``"loss"``; read by ``logit_grad_parts``).
    """
    mask, fkl_positions = term_masks(cfg, batch)
    live = mask | fkl_positions
    t = cfg.temperature
    logq = D.log_probs(student_logits, t)
    zeros = torch.zeros(mask.shape, dtype=logq.dtype, device=logq.device)
    with torch.no_grad():
        q = logq.exp()
        student_entropy = -(q * logq.masked_fill(q == 0, 0.0)).sum(-1)

    # Masked positions may hold anything (-inf rows, -inf * 0 = NaN log-probs, garbage): make them harmless
    # zeros so that no inf/NaN is formed there, since a NaN in a discarded branch still poisons the gradient.
    batch = dataclasses.replace(
        batch,
        **{
            name: torch.where(live.view(live.shape + (1,) * (value.dim() - live.dim())), value, 0.0)
            for name in ("logp_old", "teacher_logp", "teacher_topk_logprobs", "teacher_logits")
            if (value := getattr(batch, name)) is not None
        },
    )
    if cfg.divergence is not None:
        teacher_logits = require_field(batch.teacher_logits, "teacher_logits", cfg)
        loss = torch.where(mask, _single_divergence(cfg, student_logits, teacher_logits), zeros)
        parts = {"loss": loss, "rkl": zeros, "fkl": zeros}
        logq_tok = logq.gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1)
    else:
        logq_tok = logq.gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1)
        ids = batch.teacher_topk_ids
        # read only by the top-k FKL and by the diagnostic FKL of objectives without one
        logq_topk = logq.gather(-1, ids) if ids is not None and cfg.fkl in ("topk", "none") else None
        exact = cfg.rkl == "exact" or cfg.fkl == "exact"  # teacher log-probs once for both exact terms
        logp_T = D.log_probs(require_field(batch.teacher_logits, "teacher_logits", cfg), t) if exact else None
        rkl = D.kl_from_log_probs(logq, logp_T) if cfg.rkl == "exact" else _sampled_rkl(cfg, logq_tok, batch, zeros)
        if cfg.fkl == "exact":
            fkl = D.kl_from_log_probs(logp_T, logq)
        elif cfg.fkl == "topk_tail":
            topk_lp = require_field(batch.teacher_topk_logprobs, "teacher_topk_logprobs", cfg)
            fkl = D.topk_forward_kl_with_tail(student_logits, require_field(ids, "teacher_topk_ids", cfg), topk_lp, t)
        else:
            fkl = _sampled_fkl(cfg, logq_tok, logq_topk, batch, zeros)
        parts = _assemble(cfg, rkl, fkl, logq_topk, batch, weights)
    parts["student_entropy"] = torch.where(mask, student_entropy, zeros)
    parts["logq"] = torch.where(mask, logq_tok.detach(), zeros)
    return parts


def sparse_token_losses(
    cfg: ObjectiveConfig, logq_tok: Tensor, logq_topk: Tensor | None, batch: TokenBatch, weights: TokenWeights,
    logq_tail: Tensor | None = None, logq_tok_fkl: Tensor | None = None,
) -> dict[str, Tensor]:
    """``token_losses`` from the student's log-probs at the ids a sparse objective reads, not full logits.

    Sparse objectives (``rkl in {ppo, none}``, ``fkl in {topk, topk_tail, importance, none}``) see the student
    only at the sampled token, the teacher's top-k ids and (``topk_tail``) the student's mass outside them,
    ``q_tail = 1 - sum_k q``, which is what lets the fused path skip full logits. It shares every term with
    ``token_losses`` (the same helpers), so the two cannot drift apart; ``topk_tail`` is checked against the
    plain path's independent ``divergences.topk_forward_kl_with_tail`` instead.

    Args:
        cfg: A sparse objective.
        logq_tok: ``[...]`` student log-prob of the sampled token (carries gradient).
        logq_topk: ``[..., K]`` student log-probs at the teacher's top-k ids (``fkl in {topk, topk_tail}``,
            or the diagnostic FKL of ``fkl == "none"``), else ``None``.
        batch: The positions' inputs.
        weights: From ``prepare_weights``.
        logq_tail: ``[...]`` ``log q_tail`` (``fkl == "topk_tail"`` only), an input of its own rather than
            ``log(1 - sum exp(logq_topk))``: that difference cancels in float32 (``-inf`` once
            ``q_tail < 6e-8``), so the caller computes it from the logits outside the top-k (a log-sum-exp,
            exact) and maps its gradient back to the logits (``fused._tail_logsumexp``, ``fused._tail_gradient``).
        logq_tok_fkl: ``[...]`` the sampled token's log-prob as the forward-KL term reads it (``importance``);
            default ``logq_tok``. The fused path passes a copy that is a leaf of its own, so that one backward
            gives each term's gradient apart (their sum is what a shared leaf would accumulate).

    Returns:
        ``"loss"``, ``"loss_rkl"``, ``"loss_fkl"`` (with gradient), ``"rkl"``, ``"fkl"`` (detached), all
        ``[...]`` and 0 where masked.
    """
    zeros = torch.zeros(batch.mask.shape, dtype=logq_tok.dtype, device=logq_tok.device)
    rkl = _sampled_rkl(cfg, logq_tok, batch, zeros)
    fkl = _sampled_fkl(cfg, logq_tok if logq_tok_fkl is None else logq_tok_fkl, logq_topk, batch, zeros, logq_tail)
    return _assemble(cfg, rkl, fkl, logq_topk, batch, weights)


def _sampled_rkl(cfg: ObjectiveConfig, logq_tok: Tensor, batch: TokenBatch, zeros: Tensor) -> Tensor:
    """The PPO-clipped reverse KL on sampled tokens (``rkl == "ppo"``), else zeros."""
    if cfg.rkl != "ppo":
        return zeros
    logp_old = require_field(batch.logp_old, "logp_old", cfg)
    adv = sampled_rkl_advantage(require_field(batch.teacher_logp, "teacher_logp", cfg), logp_old)
    return ppo_clipped_surrogate(logq_tok, logp_old, adv, cfg.clip_eps)


def _sampled_fkl(
    cfg: ObjectiveConfig, logq_tok: Tensor, logq_topk: Tensor | None, batch: TokenBatch, zeros: Tensor,
    logq_tail: Tensor | None = None,
) -> Tensor:
    """The forward KL from sampled tokens (``importance``) or the teacher's top-k (``topk``, ``topk_tail``)."""
    if cfg.fkl == "importance":
        return importance_weighted_fkl(
            logq_tok,
            require_field(batch.logp_old, "logp_old", cfg),
            require_field(batch.teacher_logp, "teacher_logp", cfg),
            cfg.is_max_weight,
        )
    if cfg.fkl == "topk":
        topk_lp = require_field(batch.teacher_topk_logprobs, "teacher_topk_logprobs", cfg)
        return D.topk_kl_from_student_logprobs(require_field(logq_topk, "teacher_topk_ids", cfg), topk_lp)
    if cfg.fkl == "topk_tail":
        topk_lp = require_field(batch.teacher_topk_logprobs, "teacher_topk_logprobs", cfg)
        if logq_tail is None:
            raise ValueError(f"objective {cfg.name!r} (fkl='topk_tail') on the sparse path needs logq_tail")
        return _topk_tail_kl(require_field(logq_topk, "teacher_topk_ids", cfg), logq_tail, topk_lp)
    return zeros


def _topk_tail_kl(logq_topk: Tensor, logq_tail: Tensor, teacher_topk_logprobs: Tensor) -> Tensor:
    """KL on K + 1 outcomes (top-k ids, one tail bucket) from the student's sparse log-probs; ``[...]``.

    ``sum_k p(v_k) log(p(v_k) / q(v_k)) + p_tail log(p_tail / q_tail)``, ``p_tail = 1 - sum_k p``: the value of
    ``divergences.topk_forward_kl_with_tail``. Where the student's tail is empty (``logq_tail = -inf``: k = V,
    or only ``-inf`` rows left) ``p_tail``, known only to rounding, is taken as 0, as there.

    Args:
        logq_topk: ``[..., K]`` student log-probs at the teacher's top-k ids.
        logq_tail: ``[...]`` student log-mass outside them.
        teacher_topk_logprobs: ``[..., K]`` teacher log-probs of its top-k ids.
    """
    logp_K = D.upcast(teacher_topk_logprobs)
    tail_empty = torch.isneginf(logq_tail).unsqueeze(-1)
    logp_tail = D.log1mexp(torch.logsumexp(logp_K, dim=-1, keepdim=True)).masked_fill(tail_empty, float("-inf"))
    logq = torch.cat([D.upcast(logq_topk), D.upcast(logq_tail).unsqueeze(-1)], -1)
    return D.kl_from_log_probs(torch.cat([logp_K, logp_tail], -1), logq)


def _assemble(
    cfg: ObjectiveConfig, rkl: Tensor, fkl: Tensor, logq_topk: Tensor | None, batch: TokenBatch,
    weights: TokenWeights,
) -> dict[str, Tensor]:
    """``w_R * RKL + w_F * FKL``, each on its positions (``term_masks``), plus the detached terms (the diagnostic
    top-k FKL when ``fkl="none"``)."""
    mask, fkl_positions = term_masks(cfg, batch)
    zeros = torch.zeros_like(rkl)
    # the two weighted terms on their own, with gradient: what the per-term gradient diagnostics differentiate
    loss_rkl = torch.where(mask, weights.w_rkl * rkl, zeros)
    loss_fkl = torch.where(fkl_positions, weights.w_fkl * fkl, zeros)
    loss = loss_rkl + loss_fkl
    if cfg.fkl == "none" and logq_topk is not None and batch.teacher_topk_logprobs is not None:
        with torch.no_grad():  # diagnostic only: the top-k forward KL an objective without FKL leaves behind
            fkl = D.topk_kl_from_student_logprobs(logq_topk, batch.teacher_topk_logprobs)
    return {"loss": loss, "rkl": torch.where(mask, rkl.detach(), zeros),
            "fkl": torch.where(fkl_positions, fkl.detach(), zeros), "loss_rkl": loss_rkl, "loss_fkl": loss_fkl}


def summarize(
    cfg: ObjectiveConfig, parts: dict[str, Tensor], batch: TokenBatch, weights: TokenWeights
) -> dict[str, float]:
    """Diagnostics as means over valid tokens (0 when there is none).

    Keys: ``loss``, ``loss_rkl`` and ``loss_fkl`` (the weighted parts per valid token), ``rkl`` and ``fkl``
    (unweighted terms), ``gated_share``, ``tau``, ``student_entropy``, ``teacher_entropy`` (when known),
    ``rkl_estimate`` (sampled k1 estimate of KL(q_old || p_T), when sampled log-probs are given),
    ``fkl_high_entropy`` (the FKL term averaged over gated tokens: its denominator is not the valid tokens, so
    it also comes as its two sums ``raw/fkl_high_entropy/sum`` and ``/gated``, from which a step made of
    several calls and processes finishes it: ``eopd.training.step_metrics``) and, for objectives that read
    ``logp_old``, the PPO ratio statistics of ``ratio_metrics``. With ``official_alignment`` the forward-KL
    keys (``loss_fkl``, ``fkl``, ``gated_share``, ``fkl_high_entropy``) sum over ``fkl_mask``, the positions the
    term is evaluated at, still per real token.
    """
    with torch.no_grad():
        mask, fkl_positions = term_masks(cfg, batch)
        n = int(mask.sum())
        denom = max(n, 1)

        def mean(x: Tensor, where: Tensor = mask) -> float:
            return float(torch.where(where, D.upcast(x), 0.0).sum() / denom)

        out = {
            "loss": float(parts["loss"].detach().sum() / denom),
            "loss_rkl": mean(weights.w_rkl * parts["rkl"]),
            "loss_fkl": mean(weights.w_fkl * parts["fkl"], fkl_positions),
            "rkl": mean(parts["rkl"]),
            "fkl": mean(parts["fkl"], fkl_positions),
            "gated_share": mean(weights.gate, fkl_positions),
            "tau": weights.tau,
            "student_entropy": mean(parts["student_entropy"]),
            "num_valid": float(n),
        }
        if batch.teacher_entropy is not None or batch.teacher_logits is not None:
            out["teacher_entropy"] = mean(teacher_entropy_of(cfg, batch))
        if batch.logp_old is not None and batch.teacher_logp is not None:
            out["rkl_estimate"] = mean(batch.logp_old - batch.teacher_logp)
        if "logq" in parts and batch.logp_old is not None and cfg.needs_logp_old:
            out.update(ratio_metrics(parts["logq"], batch.logp_old, mask, cfg.clip_eps))
        gated_sum = float(torch.where(fkl_positions, D.upcast(parts["fkl"] * weights.gate), 0.0).sum())
        gated = float(torch.where(fkl_positions, D.upcast(weights.gate), 0.0).sum())
        out["fkl_high_entropy"] = gated_sum / gated if gated > 0 else 0.0
        out.update({f"{RAW}fkl_high_entropy/sum": gated_sum, f"{RAW}fkl_high_entropy/gated": gated})
    return out


def ratio_metrics(logq: Tensor, logp_old: Tensor, mask: Tensor, clip_eps: float) -> dict[str, float]:
    """PPO ratio ``r = q(y) / q_old(y)`` over valid tokens: mean, min, max and the share with ``|r - 1| > eps``.

    ``_min``/``_max`` keys are extremes, merged across micro-batches and processes by min/max, not averaged.
    """
    n = int(mask.sum())
    if n == 0:
        return {}
    ratio = torch.exp(D.upcast(logq) - D.upcast(logp_old))[mask]
    return {"ppo/ratio_mean": float(ratio.mean()), "ppo/ratio_min": float(ratio.min()),
            "ppo/ratio_max": float(ratio.max()), "ppo/clip_frac": float(((ratio - 1).abs() > clip_eps).float().mean())}


def objective(
    cfg: ObjectiveConfig,
    student_logits: Tensor,
    batch: TokenBatch,
    *,
    tau: float | None = None,
    generator: torch.Generator | None = None,
    normalizer: float | int | None = None,
    weights: TokenWeights | None = None,
    diagnostics: bool = False,
) -> ObjectiveOutput:
    """The composed objective on full student logits.

    Args:
        cfg: Objective config (``ObjectiveConfig.preset(name)``).
        student_logits: ``[..., V]``.
        batch: Per-position inputs with leading shape ``[...]``.
        tau: Threshold override (adaptive tau).
        generator: For ``placement="random"``.
        normalizer: Divide the token sum by this (the global count of valid tokens across gradient
            accumulation and processes); default the local valid count. 0 valid tokens gives loss 0.
        weights: Precomputed weights (skips ``prepare_weights``), e.g. decided once per rollout.
        diagnostics: Also return the per-term logit-gradient parts (``logit_grad_parts``, two extra
            backward passes through the loss, none through the model) in ``token_parts``; single-divergence
            presets have no RKL/FKL split and get none.

    Returns:
        ``ObjectiveOutput``.
    """
    if weights is None:
        weights = prepare_weights(cfg, batch, tau=tau, generator=generator)
    parts = token_losses(cfg, student_logits, batch, weights)
    if diagnostics and has_term_split(cfg):
        parts.update(_diagnostic_parts(cfg, student_logits, batch, weights, parts))
    loss_sum = parts["loss"].sum()
    num_valid = int(batch.mask.bool().sum())
    denom = normalizer if normalizer is not None else num_valid
    loss = loss_sum / max(float(denom), 1.0)
    token_parts = {k: v.detach() for k, v in parts.items() if k not in ("loss_rkl", "loss_fkl")}
    return ObjectiveOutput(loss, loss_sum, num_valid, summarize(cfg, parts, batch, weights), token_parts)


#: Per-position logit-gradient diagnostics: ``||G^R||^2``, ``||G^F||^2`` and ``<G^R, G^F>``.
DIAG_KEYS = ("grad_rkl_sq", "grad_fkl_sq", "grad_dot")


def has_term_split(cfg: ObjectiveConfig) -> bool:
    """Whether the loss is ``w_R RKL + w_F FKL`` (every preset but the single divergences)."""
    return cfg.divergence is None


def term_gradient(term: Tensor, logits: Tensor) -> Tensor:
    """``d term.sum() / d logits`` by autograd, keeping the graph (zeros when ``term`` has no gradient)."""
    if not term.requires_grad:
        return torch.zeros_like(logits, dtype=torch.float32)
    (grad,) = torch.autograd.grad(term.sum(), logits, retain_graph=True, allow_unused=True)
    return torch.zeros_like(logits, dtype=torch.float32) if grad is None else D.upcast(grad)


def _diagnostic_parts(
    cfg: ObjectiveConfig, logits: Tensor, batch: TokenBatch, weights: TokenWeights, parts: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``logit_grad_parts`` on ``parts``' own graph, or on a leaf copy when the logits carry no gradient."""
    if logits.requires_grad:
        return logit_grad_parts(parts, logits)
    leaf = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        return logit_grad_parts(token_losses(cfg, leaf, batch, weights), leaf)


def logit_grad_parts(parts: dict[str, Tensor], logits: Tensor) -> dict[str, Tensor]:
    """Per-position squared norms and dot product of the two weighted terms' gradients wrt the logits.

    With ``G^R_t = d (w_R RKL_t) / d logits_t`` and ``G^F_t = d (w_F FKL_t) / d logits_t`` (raw logits, so the
    ``1 / T`` of ``z = logits / T`` is included; no ``1 / N`` normaliser): ``grad_rkl_sq = ||G^R_t||^2``,
    ``grad_fkl_sq = ||G^F_t||^2``, ``grad_dot = <G^R_t, G^F_t>``. Positions are independent rows of the
    logits, so one backward of each term's sum gives every position's gradient exactly.

    Args:
        parts: From ``token_losses``: ``"loss_rkl"`` and ``"loss_fkl"`` ``[...]`` with their graphs.
        logits: ``[..., V]`` the student logits the terms were computed from (any tensor of the graph).

    Returns:
        ``DIAG_KEYS`` -> ``[...]`` float32, detached, 0 at masked positions.
    """
    g_rkl = term_gradient(parts["loss_rkl"], logits)
    g_fkl = term_gradient(parts["loss_fkl"], logits)
    return {"grad_rkl_sq": (g_rkl * g_rkl).sum(-1), "grad_fkl_sq": (g_fkl * g_fkl).sum(-1),
            "grad_dot": (g_rkl * g_fkl).sum(-1)}


def adaptive_tau_from_batch(cfg: ObjectiveConfig, teacher_entropy: Tensor, mask: Tensor) -> float:
    """The unsmoothed adaptive threshold of one batch (``cfg.adaptive_share`` must be set)."""
    if cfg.adaptive_share is None:
        raise ValueError("adaptive_share is not set on this objective")
    return float(entropy_quantile(teacher_entropy, mask, cfg.adaptive_share))
