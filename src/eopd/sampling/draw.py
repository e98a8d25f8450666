"""The sampling math of one decoding step: logits -> (token, its log-prob), a function of each row alone.

Why its own file: every engine path (the eager loop, the compiled step, the fallback loop) must draw exactly
the same way, so that a seed gives the same tokens and ``logp_old`` whatever path and batch ran. A row's
token is the inverse-CDF draw of its own uniform from its own distribution, never ``torch.multinomial``
(whose draws depend on which rows share the call); its log-prob is taken at the sampling temperature over
the whole tokenizer vocabulary (``top_p`` only narrows what can be drawn).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def top_p_filter(logits_BV: Tensor, top_p: float) -> Tensor:
    """Set logits outside the smallest nucleus of mass >= top_p to -inf (always keeps the argmax)."""
    if top_p >= 1.0:
        return logits_BV
    sorted_logits, sorted_idx = torch.sort(logits_BV, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs
    remove_sorted = mass_before >= top_p
    remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
    return logits_BV.masked_fill(remove, float("-inf"))


def inverse_cdf_sample(probs_BV: Tensor, uniform_B: Tensor) -> Tensor:
    """Token ids drawn from ``probs_BV`` (rows need not be normalised) with the given uniforms in [0, 1).

    Why not ``torch.multinomial``: its draws depend on which rows share the call, so the same seed would give
    other samples when the batch is split (``rollout.max_batch_size``) or rows leave and join; here row b's
    token is a function of its own probabilities and ``uniform_B[b]`` alone. The cumulative sum is float64 (a
    float32 sum over 151,936 entries drifts by ~1e-5), and ``right=True`` never picks a zero-probability id.
    """
    cdf_BV = probs_BV.double().cumsum(-1)
    target_B1 = uniform_B.double()[:, None] * cdf_BV[:, -1:]
    return torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(1).clamp_max(probs_BV.shape[-1] - 1)


def draw_tokens(
    logits_NV: Tensor, uniform_N: Tensor, *, temperature: float, top_p: float, vocab_size: int | None
) -> tuple[Tensor, Tensor]:
    """Each row's next token and its log-prob.

    Args:
        logits_NV: The model's next-token logits (any float dtype), ``[N, V_rows]``.
        uniform_N: Each row's uniform in [0, 1) for this position.
        temperature: Sampling temperature; the log-prob is at this temperature.
        top_p: Nucleus mass for the draw only.
        vocab_size: Tokenizer vocabulary: lm_head rows past it (padding) are cut, never drawn, and not in the
            log-prob's normaliser. None: every row is a token.

    Returns:
        ``(tokens_N, logp_N)``: int64 ids ``< vocab_size`` and float32 log-probs over the full vocabulary.
    """
    logits_NV = logits_NV.float()
    if vocab_size is not None and logits_NV.shape[-1] > vocab_size:
        logits_NV = logits_NV[:, :vocab_size]
    logits_NV = logits_NV / temperature
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    probs_NV = logp_NV.exp() if top_p >= 1.0 else torch.softmax(top_p_filter(logits_NV, top_p), dim=-1)
    tokens_N = inverse_cdf_sample(probs_NV, uniform_N)
    return tokens_N, logp_NV.gather(-1, tokens_N[:, None]).squeeze(1)
