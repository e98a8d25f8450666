"""Chunked, gradient-free scoring of positions from hidden states: what the teacher (or sampler) must provide.

EOPD needs from the teacher, per position, only its full-vocabulary entropy ``H_t``, its top-k ids and
log-probs and the log-prob of the sampled token. ``score_chunked`` computes these from the final hidden
states and the lm_head weight a chunk of positions at a time, so nothing of size ``[N, V]`` lives longer than
one chunk: the working set is one ``[chunk, V]`` buffer reused across chunks (plus its float32 copy when the
matmul runs in bf16/fp16) and a ``[chunk, 2048]`` scratch block.

Per chunk (``z = logits / temperature`` in float32, ``m = max z``, ``P = exp(z - m)``, ``S = sum P``; ``P``
is formed one block of columns at a time)::

    lse      = m + log S
    log p(y) = z_y - lse
    H        = lse - sum(P * z) / S        (= -sum p log p)

Logits are assumed finite (what a linear layer produces); rows of a padded lm_head beyond the tokenizer's
vocabulary are excluded with ``vocab_size`` instead of being masked with ``-inf``.

A model whose logits are not the plain lm_head output but a transform of it gets that transform here, in
``head_transform_``, the one helper every path (teacher scorer, fused loss, learner log-probs, reference)
calls: Gemma 2's final-logit soft-cap ``softcap * tanh(logits / softcap)``, applied to the float32 logits
before the temperature (``softcap=None``: plain logits). The package imports only torch, so the caller
passes the model's ``softcap`` in (``eopd.sampling.head.output_head`` reads it from the model's config).

The helpers (``scaled_float_logits``, ``softmax_stats``, ``scaled_softmax_``, ``balanced_chunk``,
``head_transform_``, ``softcap_slope_``) are shared with the fused student loss (``fused.py``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from eopd.losses import divergences as D
from eopd.losses.spec import TokenBatch

Tensor = torch.Tensor

#: Default working-set budget of one chunk's ``[chunk, V]`` buffers, in bytes, by device type. On a CPU the
#: lm_head matmuls reach full speed from ~128 rows (and the weight gradient, which every method returns, is
#: the larger term of the memory anyway); a GPU needs ~1k rows to be compute-bound rather than stream the weight.
CHUNK_BYTES = {"cpu": 96 * 2**20, "cuda": 1024 * 2**20}
MIN_CHUNK, MAX_CHUNK = 16, 8192


class TokenScores(NamedTuple):
    """Per-position scores of one model. Leading shape ``[...]`` is the positions' shape.

    Attributes:
        logp: ``[...]`` log-prob of the given token at the temperature (``None`` if no tokens were given).
        entropy: ``[...]`` full-vocabulary entropy in nats.
        topk_ids: ``[..., K]`` ids of the K most likely tokens, most likely first (``None`` if ``top_k == 0``).
        topk_logprobs: ``[..., K]`` their log-probs (``None`` if ``top_k == 0``).
    """

    logp: Tensor | None
    entropy: Tensor
    topk_ids: Tensor | None
    topk_logprobs: Tensor | None


def default_chunk_size(
    vocab_size: int, buffers: int = 1, device: torch.device | str = "cpu", budget_bytes: int | None = None
) -> int:
    """Positions per chunk so that ``buffers`` float32 ``[chunk, V]`` buffers fit in the budget.

    Args:
        vocab_size: V.
        buffers: Float32 ``[chunk, V]`` tensors alive at once.
        device: Picks the budget from ``CHUNK_BYTES`` (CPU: 96 MiB, 165 rows at V = 151,936; CUDA: 1 GiB).
        budget_bytes: Explicit budget (overrides the device's).

    Returns:
        Rows in ``[MIN_CHUNK, MAX_CHUNK]``.
    """
    kind = torch.device(device).type
    budget = budget_bytes if budget_bytes is not None else CHUNK_BYTES.get(kind, CHUNK_BYTES["cuda"])
    rows = budget // max(1, buffers * 4 * vocab_size)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, rows)))


def balanced_chunk(n: int, chunk: int) -> int:
    """The smallest chunk that covers ``n`` rows in as many chunks as ``chunk`` does (no tiny last chunk).

    Equal chunks keep every matmul the same shape (BLAS libraries pick kernels, and workspaces, by shape).
    """
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    if n <= 0:
        return chunk
    count = -(-n // chunk)
    return -(-n // count)


def used_weight(weight_VH: Tensor, bias_V: Tensor | None, vocab_size: int | None) -> tuple[Tensor, Tensor | None]:
    """The first ``vocab_size`` rows of an lm_head (a view: padded rows are never multiplied).

    Args:
        weight_VH: ``[V_rows, H]`` lm_head weight, ``V_rows >= vocab_size``.
        bias_V: ``[V_rows]`` or ``None``.
        vocab_size: Rows to use; ``None`` uses all.

    Returns:
        ``([V, H], [V] or None)`` views.
    """
    if weight_VH.dim() != 2:
        raise ValueError(f"lm_head weight must be [V, H], got shape {tuple(weight_VH.shape)}")
    if vocab_size is None:
        return weight_VH, bias_V
    if not 0 < vocab_size <= weight_VH.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {weight_VH.shape[0]}] (the lm_head's rows)")
    return weight_VH[:vocab_size], None if bias_V is None else bias_V[:vocab_size]


def chunk_logits(
    hidden_CH: Tensor,
    weight_VH: Tensor,
    bias_V: Tensor | None,
    out_CV: Tensor,
    *,
    scale: float = 1.0,
) -> Tensor:
    """``scale * (hidden @ weight.T + bias)`` written into a reused buffer (no allocation).

    Args:
        hidden_CH: ``[C, H]`` hidden states (matmul dtype).
        weight_VH: ``[V, H]`` lm_head weight (same dtype).
        bias_V: ``[V]`` or ``None``.
        out_CV: ``[>= C, V]`` buffer of the matmul dtype; its first C rows are written.
        scale: Folded into the matmul (``1 / temperature``); only used for float32 callers that want ``z``.

    Returns:
        ``out_CV[:C]``.
    """
    out = out_CV[: hidden_CH.shape[0]]
    if bias_V is None:
        # beta=0: the buffer's stale contents are ignored (NaN/inf not propagated).
        return torch.addmm(out, hidden_CH, weight_VH.T, beta=0.0, alpha=scale, out=out)
    return torch.addmm(bias_V, hidden_CH, weight_VH.T, beta=scale, alpha=scale, out=out)


def head_transform_(logits: Tensor, softcap: float | None, *, inplace: bool = True) -> Tensor:
    """The model's own transform of its lm_head output: ``softcap * tanh(logits / softcap)``, or ``logits``.

    Gemma 2's ``final_logit_softcapping`` (the same three operations in the same order as its forward, so a
    float32 model's logits are reproduced to the last bit). Every path that builds logits from hidden states
    calls this, before the temperature; ``eopd.sampling.head.check_output_head`` verifies at start that the result is
    the model's own logits.

    Args:
        logits: ``[..., V]`` lm_head output (float32 or float64 for the loss math).
        softcap: The cap (> 0), or ``None`` for no transform.
        inplace: Overwrite ``logits`` (a reused buffer); False under autograd (``tanh_`` saves its output).
    """
    if softcap is None:
        return logits
    if inplace:
        return logits.div_(softcap).tanh_().mul_(softcap)
    return torch.tanh(logits / softcap) * softcap


def softcap_slope_(capped: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """``d head_transform_(l) / d l = 1 - tanh(l / softcap)^2``, from the capped logits, ``[..., V]``.

    With ``t = scale * capped`` (``scale = 1 / softcap`` for capped logits, ``temperature / softcap`` for
    ``z = capped / temperature``) the slope is ``1 - t^2``. ``t^2`` is clamped at 1 (``|tanh| <= 1``), so a
    ``-inf`` placeholder gives slope 0, not ``-inf``. Written into ``out`` when given (a scratch block).
    """
    t = torch.mul(capped, scale, out=out) if out is not None else capped * scale
    return t.square_().clamp_max_(1.0).neg_().add_(1.0)


def scaled_float_logits(
    hidden_CH: Tensor,
    weight_VH: Tensor,
    bias_V: Tensor | None,
    temperature: float,
    logits_buf: Tensor,
    float_buf: Tensor | None,
    softcap: float | None = None,
) -> Tensor:
    """``z = head_transform(hidden @ weight.T + bias) / temperature`` in float32 (or float64), in reused buffers.

    The matmul runs in the hidden states' dtype; a low-precision result is upcast into ``float_buf``
    (the soft-cap and the temperature division then happen in float32, as in ``divergences.log_probs``).

    Args:
        hidden_CH: ``[C, H]``.
        weight_VH: ``[V, H]``.
        bias_V: ``[V]`` or ``None``.
        temperature: Divides the logits (> 0).
        logits_buf: ``[>= C, V]`` buffer of the matmul dtype.
        float_buf: ``[>= C, V]`` float32 buffer, required when the matmul dtype is not float32/float64.
        softcap: The model's final-logit soft-cap (``head_transform_``), or ``None``.

    Returns:
        ``[C, V]`` ``z`` (a view of one of the buffers).
    """
    c = hidden_CH.shape[0]
    if float_buf is None and softcap is None:
        return chunk_logits(hidden_CH, weight_VH, bias_V, logits_buf, scale=1.0 / temperature)
    logits = chunk_logits(hidden_CH, weight_VH, bias_V, logits_buf)
    z = head_transform_(logits if float_buf is None else float_buf[:c].copy_(logits), softcap)
    return z if temperature == 1.0 else z.div_(temperature)


class SoftmaxStats(NamedTuple):
    """Row statistics of ``softmax(z)`` for one chunk (all ``[C]``, float32 or float64).

    Attributes:
        lse: ``logsumexp(z)``.
        row_max: ``m = max z``.
        sum_exp: ``S = sum exp(z - m)``.
        entropy: ``H = lse - sum(exp(z - m) * z) / S`` (clamped at 0 against rounding).
    """

    lse: Tensor
    row_max: Tensor
    sum_exp: Tensor
    entropy: Tensor


def softmax_stats(z_CV: Tensor, tmp_CB: Tensor) -> SoftmaxStats:
    """Max, log-sum-exp and entropy of each row of ``z`` in one read of ``z``; ``z`` is unchanged.

    An online softmax over blocks of ``B`` columns: each block's exponentials are formed in the small
    (cache-resident) ``tmp_CB`` against a running row max, and the running sums are rescaled when the max
    grows. No second ``[C, V]`` tensor and no separate max pass.

    Args:
        z_CV: ``[C, V]`` scaled float logits (finite).
        tmp_CB: ``[>= C, B]`` scratch buffer of ``z``'s dtype.

    Returns:
        ``SoftmaxStats``.
    """
    c, v = z_CV.shape
    width = tmp_CB.shape[1]
    row_max = torch.full((c,), float("-inf"), dtype=z_CV.dtype, device=z_CV.device)
    sum_exp = torch.zeros_like(row_max)
    dot = torch.zeros_like(row_max)  # sum exp(z - row_max) * z
    for start in range(0, v, width):
        z_blk = z_CV[:, start : start + width]
        new_max = torch.maximum(row_max, z_blk.amax(dim=-1))
        rescale = (row_max - new_max).exp_()  # 0 on the first block (exp(-inf))
        p_blk = torch.sub(z_blk, new_max.unsqueeze(-1), out=tmp_CB[:c, : z_blk.shape[1]]).exp_()
        sum_exp.mul_(rescale).add_(p_blk.sum(dim=-1))
        dot.mul_(rescale).add_(p_blk.mul_(z_blk).sum(dim=-1))
        row_max = new_max
    lse = row_max + sum_exp.log()
    return SoftmaxStats(lse, row_max, sum_exp, (lse - dot / sum_exp).clamp_min_(0.0))


def scaled_softmax_(
    z_CV: Tensor, row_max_C: Tensor, scale_C: Tensor, width: int = 2048, sum_sq_C: Tensor | None = None,
    slope_scale: float | None = None, tmp_CB: Tensor | None = None,
) -> Tensor:
    """``z <- scale * exp(z - row_max)`` in place, a cache-sized block of columns at a time.

    The three elementwise steps run on a block while it is in cache, so ``z`` is read and written once.
    With ``slope_scale`` each entry is also multiplied by the soft-cap's chain-rule factor at ``z`` (read
    into ``tmp_CB`` before the block is overwritten): the gradient then reaches the raw lm_head output.

    Args:
        z_CV: ``[C, V]`` scaled float logits (overwritten).
        row_max_C: ``[C]`` the row max used by ``softmax_stats``.
        scale_C: ``[C]`` row scale (e.g. ``-sum(g) / (S * T)``).
        width: Columns per block (``tmp_CB``'s width when it is given).
        sum_sq_C: ``[C]`` accumulator: if given, ``sum_v exp(2 (z_v - row_max))`` is added to it (read from
            each block while it is in cache, before the scale; the result is unchanged).
        slope_scale: ``temperature / softcap`` for soft-capped logits (``softcap_slope_``), else ``None``.
        tmp_CB: ``[>= C, B]`` scratch block, required with ``slope_scale``.

    Returns:
        ``z_CV``.
    """
    m_C1, s_C1 = row_max_C.unsqueeze(-1), scale_C.unsqueeze(-1)
    c = z_CV.shape[0]
    if slope_scale is not None:
        assert tmp_CB is not None, "scaled_softmax_ needs tmp_CB for the soft-cap slope"
        width = tmp_CB.shape[1]
    for start in range(0, z_CV.shape[1], width):
        z_blk = z_CV[:, start : start + width]
        slope_blk = None
        if slope_scale is not None:
            slope_blk = softcap_slope_(z_blk, slope_scale, out=tmp_CB[:c, : z_blk.shape[1]])
        e_blk = z_blk.sub_(m_C1).exp_()
        if sum_sq_C is not None:
            sum_sq_C.add_(torch.linalg.vecdot(e_blk, e_blk))
        e_blk.mul_(s_C1)
        if slope_blk is not None:
            e_blk.mul_(slope_blk)
    return z_CV


def scratch_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device, width: int = 2048) -> Tensor:
    """The small ``[rows, min(width, V)]`` scratch buffer that ``softmax_stats`` needs."""
    return torch.empty(rows, min(width, vocab), dtype=dtype, device=device)


def float_buffer_needed(dtype: torch.dtype) -> bool:
    """Whether logits of this matmul dtype need a separate float32 buffer for the softmax math."""
    return dtype not in (torch.float32, torch.float64)


@torch.no_grad()
def score_chunked(
    hidden: Tensor,
    weight_VH: Tensor,
    tokens: Tensor | None = None,
    *,
    top_k: int = 0,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    bias: Tensor | None = None,
    float32_logits: bool = True,
    softcap: float | None = None,
) -> TokenScores:
    """Entropy, top-k and sampled-token log-probs of ``softmax(cap(hidden @ W.T + b) / T)``, chunk by chunk.

    Never holds more than one chunk of logits: one float32 ``[chunk, V]`` buffer and a small scratch block;
    the logits are computed in float32 from any input dtype (see the comment in the body).
    Equals ``score_from_logits(cap(hidden @ W[:V].T + b), ...)`` to float32 rounding.

    Args:
        hidden: ``[..., H]`` final hidden states (after the final norm), any float dtype.
        weight_VH: ``[V_rows, H]`` lm_head weight (cast to ``hidden``'s dtype if it differs).
        tokens: ``[...]`` ids whose log-prob to return (the sampled tokens); ``None`` skips it.
        top_k: Number of top ids to return (0: none).
        temperature: Divides the logits.
        chunk_size: Positions per chunk (at most; chunks are balanced); default ``default_chunk_size(V)``.
        vocab_size: Use only the first ``vocab_size`` rows of ``weight_VH`` (padded lm_heads).
        bias: ``[V_rows]`` lm_head bias or ``None``.
        float32_logits: Compute the logits in float32 from any input dtype (the teacher: its log-probs
            and entropy are then those of its exact logits). False computes them as the fused student
            loss does (matmul in the hidden states' dtype, softmax math in float32), so that a learner's
            recomputed log-probs equal the loss's own to the last bit.
        softcap: The model's final-logit soft-cap ``cap`` (``head_transform_``; Gemma 2), or ``None``.

    Returns:
        ``TokenScores`` with leading shape ``[...]`` (float32 values, int64 ids).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = hidden.shape[:-1]
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    tokens_N = None if tokens is None else tokens.reshape(-1)
    # Logits in float32 even for a bf16/fp16 model: a bf16 matmul output rounds logits of size ~30 by up to
    # ~0.1, which moves log-probs and entropies by as much. The used lm_head rows are upcast once per call
    # (Qwen3-8B: 2.5 GB, transient) and each chunk of hidden states as it is used.
    fdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    mm_dtype = fdt if float32_logits else hidden.dtype
    weight, bias_v = used_weight(weight_VH, bias, vocab_size)
    weight, bias_v = weight.to(mm_dtype), None if bias_v is None else bias_v.to(mm_dtype)
    n, v = hidden_NH.shape[0], weight.shape[0]
    if top_k > v:
        raise ValueError(f"top_k {top_k} exceeds the vocabulary size {v}")
    low = float_buffer_needed(mm_dtype)
    chunk = balanced_chunk(n, chunk_size or default_chunk_size(v, buffers=2 if low else 1, device=hidden.device))
    c0 = max(1, min(chunk, n))
    logits_buf = torch.empty(c0, v, dtype=mm_dtype, device=hidden.device)
    float_buf = torch.empty(c0, v, dtype=fdt, device=hidden.device) if low else None
    tmp = scratch_buffer(c0, v, fdt, hidden.device)
    logp = None if tokens_N is None else torch.empty(n, dtype=fdt, device=hidden.device)
    ent = torch.empty(n, dtype=fdt, device=hidden.device)
    ids = torch.empty(n, top_k, dtype=torch.long, device=hidden.device)
    topk_lp = torch.empty(n, top_k, dtype=fdt, device=hidden.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        z = scaled_float_logits(hidden_NH[start:end].to(mm_dtype), weight, bias_v, temperature, logits_buf, float_buf,
                                softcap)
        stats = softmax_stats(z, tmp)
        ent[start:end] = stats.entropy
        if top_k:
            torch.topk(z, top_k, dim=-1, out=(topk_lp[start:end], ids[start:end]))
            topk_lp[start:end] -= stats.lse.unsqueeze(-1)
        if logp is not None:
            logp[start:end] = z.gather(-1, tokens_N[start:end].unsqueeze(-1)).squeeze(-1) - stats.lse
    return TokenScores(
        None if logp is None else logp.view(lead),
        ent.view(lead),
        ids.view(*lead, top_k) if top_k else None,
        topk_lp.view(*lead, top_k) if top_k else None,
    )


@torch.no_grad()
def score_from_logits(
    logits: Tensor,
    tokens: Tensor | None = None,
    *,
    top_k: int = 0,
    temperature: float = 1.0,
) -> TokenScores:
    """Reference for ``score_chunked`` on full logits ``[..., V]`` (holds several ``[..., V]`` tensors)."""
    logq = D.log_probs(logits, temperature)
    logp = None if tokens is None else logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = D.entropy(logits, temperature)
    if not top_k:
        return TokenScores(logp, ent, None, None)
    values, ids = torch.topk(logq, top_k, dim=-1)
    return TokenScores(logp, ent, ids, values)


def with_teacher_scores(batch: TokenBatch, scores: TokenScores) -> TokenBatch:
    """``batch`` with the teacher fields (``teacher_logp``, entropy, top-k) filled from ``scores``."""
    changes = {"teacher_entropy": scores.entropy}
    if scores.logp is not None:
        changes["teacher_logp"] = scores.logp
    if scores.topk_ids is not None:
        changes["teacher_topk_ids"] = scores.topk_ids
        changes["teacher_topk_logprobs"] = scores.topk_logprobs
    return dataclasses.replace(batch, **changes)
