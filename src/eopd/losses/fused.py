"""The fused lm_head + distillation loss: every objective without ever materialising ``[N, V]`` logits.

Plain path: ``logits_NV = hidden_NH @ W_VH.T``, then ``objective``; autograd keeps ``logits_NV`` and
several ``[N, V]`` intermediates alive until backward (2.5 GB each at N = 4096, V = 151,936, float32).

Fused path (``fused_objective``): a custom ``torch.autograd.Function`` walks the positions chunk by chunk
and, *in the forward pass*, computes each chunk's loss and its gradient with respect to the chunk's logits,
then immediately folds that gradient into the gradients of the hidden states and the lm_head weight::

    logits_CV     = h_CH @ W.T (+ b)            matmul 1
    G_CV          = d loss / d logits_CV        (elementwise, reused [C, V] buffers)
    grad_h[C]     = G_CV @ W                    matmul 2
    grad_W       += G_CV.T @ h_CH               matmul 3  (accumulated in place)

``backward`` only scales the stored gradients by the incoming scalar. Three lm_head matmuls in total, the
same as autograd on the plain path (recomputing logits in backward would cost four), and the peak extra
memory is ``O(chunk * V)`` plus the ``[V, H]`` weight gradient every path produces.

Two per-chunk kernels produce ``G_CV``:

- *sparse* (``opd``, ``eopd``, ``fkl_all``, ``fkl_random`` and any ``rkl in {ppo, none}``,
  ``fkl in {topk, topk_tail, importance, none}``): the loss depends on the student only through its
  log-probs at ``1 + K`` ids per position (sampled token, teacher top-k), so with ``g`` the loss gradient at
  those ids, ``G = (scatter(g) - softmax(z) * sum(g)) / T``. One ``[C, V]`` buffer: the logits are read once
  for max / log-sum-exp / entropy (an online softmax over cache-sized column blocks) and rewritten once into
  ``G`` (``exp``, row scale and shift on each block while it is in cache), then the ``1 + K`` sparse
  entries are set and added (``_sparse_gradient``). ``topk_tail`` also reads ``log q_tail``, the student's
  log-mass outside the top-k: one more read of the logits computes it exactly, and its gradient gets its
  own row scale outside the top-k (``_tail_gradient``) instead of cancelling against the top-k entries.
  With ``diagnostics`` each weighted term's logit-gradient norm and their dot product follow in closed form
  from its gradient at the ids and ``sum q^2`` over the other ids, summed inside the same pass
  (``sparse_grad_stats``); the generic kernel differentiates each term by autograd instead.
- *generic* (exact KLs, JSD, skew KLs, AKL, ToDi, TVD): ``objectives.token_losses`` on
  the chunk's logits under autograd, with the teacher's chunk of logits recomputed from its hidden states
  (or gathered from precomputed teacher logits). Several ``[C, V]`` temporaries, so smaller chunks.

Soft-capped logits (Gemma 2's ``final_logit_softcapping``; ``softcap=`` / ``teacher_softcap=``): each chunk's
logits are ``scoring.head_transform_`` of the lm_head output, the loss and ``G`` are those of the capped logits
(so the diagnostics too, as on the plain path), and ``G`` is multiplied by the cap's slope ``1 - tanh^2`` before
matmuls 2 and 3 (sparse: inside the same pass that writes ``G``; generic: after the chunk's autograd).

Positions with ``mask == 0`` are dropped before any matmul (their loss and gradient are exactly 0); with
``official_alignment`` the positions of ``fkl_mask`` are kept too (each row's position after its last token).
The plain path (``reference_objective``) stays for reference and tests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from eopd.losses import divergences as D
from eopd.losses.objectives import (
    DIAG_KEYS,
    has_term_split,
    logit_grad_parts,
    objective,
    prepare_weights,
    require_field,
    sparse_token_losses,
    summarize,
    term_masks,
    token_losses,
)
from eopd.losses.scoring import (
    balanced_chunk,
    default_chunk_size,
    float_buffer_needed,
    head_transform_,
    scaled_float_logits,
    scaled_softmax_,
    score_chunked,
    scratch_buffer,
    softcap_slope_,
    softmax_stats,
    used_weight,
)
from eopd.losses.spec import ObjectiveConfig, ObjectiveOutput, TokenBatch, TokenWeights

Tensor = torch.Tensor

SPARSE_RKL = ("ppo", "none")
SPARSE_FKL = ("topk", "topk_tail", "importance", "none")
#: Float32 ``[chunk, V]`` tensors alive at once, used to size the default chunk.
SPARSE_BUFFERS, GENERIC_BUFFERS = 1, 4
PART_KEYS = ("loss", "rkl", "fkl", "student_entropy", "logq")
#: The weighted terms ``token_losses`` returns with their graphs (differentiated, never kept).
TERM_KEYS = ("loss_rkl", "loss_fkl")


def is_sparse(cfg: ObjectiveConfig) -> bool:
    """Whether the student enters the loss only through log-probs at the sampled token and teacher top-k."""
    return cfg.divergence is None and cfg.rkl in SPARSE_RKL and cfg.fkl in SPARSE_FKL


def fused_chunk_size(
    cfg: ObjectiveConfig, vocab_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> int:
    """Default positions per chunk for ``cfg`` (``scoring.CHUNK_BYTES`` of ``[chunk, V]`` buffers per device)."""
    buffers = SPARSE_BUFFERS if is_sparse(cfg) else GENERIC_BUFFERS
    return default_chunk_size(vocab_size, buffers + (1 if float_buffer_needed(dtype) else 0), device)


@dataclass
class FusedOutput(ObjectiveOutput):
    """``ObjectiveOutput`` whose ``token_parts`` are flat ``[N]`` (detached, 0 at masked positions):
    ``PART_KEYS`` and, with ``diagnostics=True``, ``DIAG_KEYS``."""


@dataclass
class _Plan:
    """Non-differentiable inputs of one fused call.

    ``batch``, ``weights`` and ``teacher_hidden`` hold the rows that carry a term only (the valid ones, and with
    ``official_alignment`` each row's position after its last token); precomputed ``[N, V]`` ``teacher_logits``
    stay whole and are gathered per chunk through ``row_index`` (kept row -> position; ``None`` when every
    position is kept). ``parts`` and ``teacher_entropy`` are filled by the forward.
    ``softcap`` / ``teacher_softcap``: the models' final-logit soft-caps (``scoring.head_transform_``) or ``None``.
    """

    cfg: ObjectiveConfig
    batch: TokenBatch
    weights: TokenWeights
    vocab_size: int | None
    chunk: int
    denom: float
    teacher_hidden: Tensor | None = None
    teacher_weight: Tensor | None = None
    teacher_bias: Tensor | None = None
    teacher_logits: Tensor | None = None
    row_index: Tensor | None = None
    parts: dict[str, Tensor] = field(default_factory=dict)
    teacher_entropy: Tensor | None = None
    diagnostics: bool = False
    softcap: float | None = None
    teacher_softcap: float | None = None

    @property
    def slope_scale(self) -> float | None:
        """``temperature / softcap``: the soft-cap's slope at ``z = capped / T`` is ``1 - (z * this)^2``."""
        return None if self.softcap is None else self.cfg.temperature / self.softcap

    @property
    def part_keys(self) -> tuple[str, ...]:
        """The per-position parts every chunk returns."""
        return PART_KEYS + (DIAG_KEYS if self.diagnostics else ())


@dataclass
class _Buffers:
    """Per-call ``[chunk, V]`` buffers reused by every chunk."""

    logits: Tensor
    float: Tensor | None
    tmp: Tensor | None
    teacher: Tensor | None


def _uses_topk(cfg: ObjectiveConfig, batch: TokenBatch) -> bool:
    """Whether the sparse loss reads the teacher's top-k: the top-k FKLs, or the diagnostic FKL of ``fkl="none"``."""
    if cfg.fkl in ("topk", "topk_tail"):
        return True
    has_topk = batch.teacher_topk_ids is not None and batch.teacher_topk_logprobs is not None
    return cfg.fkl == "none" and has_topk


def _sparse_ids(cfg: ObjectiveConfig, batch: TokenBatch) -> Tensor:
    """``[N, 1 + K]`` the ids the sparse loss reads: the sampled token, then the teacher's top-k (if used)."""
    tokens = batch.tokens.reshape(-1, 1)
    if not _uses_topk(cfg, batch):
        return tokens
    return torch.cat([tokens, require_field(batch.teacher_topk_ids, "teacher_topk_ids", cfg).to(tokens.dtype)], dim=1)


def _grad_wrt(loss_C: Tensor, leaf: Tensor, scale: float) -> Tensor:
    """``d (scale * loss_C.sum()) / d leaf`` (zeros when the loss does not depend on ``leaf``)."""
    return _grads_wrt(loss_C, (leaf,), scale)[0]


def _grads_wrt(
    loss_C: Tensor, leaves: tuple[Tensor, ...], scale: float, retain: bool = False
) -> tuple[Tensor, ...]:
    """``d (scale * loss_C.sum()) / d leaf`` for each leaf (zeros where the loss does not depend on it);
    ``retain`` keeps the graph for a later call."""
    if not loss_C.requires_grad:
        return tuple(torch.zeros_like(leaf) for leaf in leaves)
    grads = torch.autograd.grad(loss_C, leaves, grad_outputs=torch.full_like(loss_C, scale), allow_unused=True,
                                retain_graph=retain)
    return tuple(torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True))


def _tail_logsumexp(z_CV: Tensor, topk_ids_CK: Tensor, tmp_CB: Tensor) -> Tensor:
    """``logsumexp`` of each row of ``z`` over the ids NOT in ``topk_ids``, ``[C]`` (``-inf`` if none is left).

    Exact where ``log(1 - sum_k softmax(z)_k)`` cancels. The top-k entries of ``z`` are set to ``-inf`` for
    one online pass over cache-sized column blocks (as ``scoring.softmax_stats``, with a shift that stays
    finite while a row has seen only ``-inf``) and restored afterwards, so ``z`` is unchanged on return.

    Args:
        z_CV: ``[C, V]`` scaled float logits (finite).
        topk_ids_CK: ``[C, K]`` ids to leave out (duplicates allowed).
        tmp_CB: ``[>= C, B]`` scratch buffer of ``z``'s dtype.
    """
    c, v = z_CV.shape
    z_topk_CK = z_CV.gather(1, topk_ids_CK)
    z_CV.scatter_(1, topk_ids_CK, float("-inf"))
    row_max = torch.full((c,), float("-inf"), dtype=z_CV.dtype, device=z_CV.device)
    sum_exp = torch.zeros_like(row_max)
    width = tmp_CB.shape[1]
    for start in range(0, v, width):
        z_blk = z_CV[:, start : start + width]
        new_max = torch.maximum(row_max, z_blk.amax(dim=-1))
        shift = new_max.masked_fill(torch.isneginf(new_max), 0.0)
        sum_exp.mul_((row_max - shift).exp_())
        sum_exp.add_(torch.sub(z_blk, shift.unsqueeze(-1), out=tmp_CB[:c, : z_blk.shape[1]]).exp_().sum(dim=-1))
        row_max = new_max
    z_CV.scatter_(1, topk_ids_CK, z_topk_CK)
    return row_max.masked_fill(torch.isneginf(row_max), 0.0) + sum_exp.log()


def _tail_gradient(
    z_CV: Tensor, ids_CK: Tensor, z_ids_CK: Tensor, lse_C: Tensor, lse_rest_C: Tensor, g_CK: Tensor,
    g_tail_C: Tensor, temperature: float, slope_scale: float | None = None, tmp_CB: Tensor | None = None,
) -> Tensor:
    """``d loss / d logits`` of a sparse chunk whose loss also reads ``log q_tail``; overwrites ``z``, ``[C, V]``.

    With ``q = softmax(z)``, ``K`` the teacher's top-k ids (``ids[:, 1:]``), ``r_v = q_v / q_tail`` for
    ``v`` outside ``K``, ``g`` the loss gradient at ``log q(ids)`` and ``g_tail`` at ``log q_tail``::

        d log q_j / d z_v    = 1[v = id_j] - q_v
        d log q_tail / d z_v = 1[v not in K] r_v - q_v
        G_v = T^-1 (q_v a + 1[v not in K] g_tail r_v + sum_j g_j 1[v = id_j]),   a = -(sum_j g_j + g_tail)

    Outside ``K`` that is ``q_v c``, ``c = a + g_tail / q_tail``, written in one pass with the scale folded
    into the exponent (``c`` in float64: ``1 / q_tail`` overflows float32 for a tail below ``e^-88``; gaps
    beyond 709 nats would overflow float64). The ``K`` entries are then SET to ``q_v a`` and the sparse
    ``g`` added, so the large ``g_tail / q_tail`` never cancels against ``-g_tail / q_tail`` there, which in
    float32 would cost a relative error of ``6e-8 / q_tail`` on the top-k entries.

    Args:
        z_CV: ``[C, V]`` scaled float logits (overwritten by the gradient).
        ids_CK: ``[C, 1 + K]`` the sampled token, then the teacher's top-k.
        z_ids_CK: ``[C, 1 + K]`` ``z`` at those ids.
        lse_C: ``[C]`` ``logsumexp(z)``.
        lse_rest_C: ``[C]`` ``logsumexp`` over the ids outside ``K`` (``_tail_logsumexp``).
        g_CK: ``[C, 1 + K]`` loss gradient at ``log q(ids)``.
        g_tail_C: ``[C]`` loss gradient at ``log q_tail`` (``<= 0``).
        temperature: ``T``.
        slope_scale: ``T / softcap`` for soft-capped logits: every entry gets the cap's slope (``softcap_slope_``).
        tmp_CB: ``[>= C, B]`` scratch block (with ``slope_scale``).
    """
    a_C = -(g_CK.sum(1) + g_tail_C)
    has_tail_C = ~torch.isneginf(lse_rest_C) & (g_tail_C != 0)
    inv_tail_C = (lse_C.double() - lse_rest_C.double().masked_fill(~has_tail_C, 0.0)).exp()
    c_C = a_C.double() + torch.where(has_tail_C, g_tail_C.double() * inv_tail_C, 0.0)
    # q_v c / T = sign(c) exp(z_v - (lse + log T - log|c|)); c = 0 gives shift +inf, i.e. exactly 0
    shift_C = (lse_C.double() + math.log(temperature) - c_C.abs().log()).to(z_CV.dtype)
    grad_CV = scaled_softmax_(z_CV, shift_C, c_C.sign().to(z_CV.dtype), slope_scale=slope_scale, tmp_CB=tmp_CB)
    set_CK = (z_ids_CK[:, 1:] - lse_C.unsqueeze(1)).exp() * (a_C / temperature).unsqueeze(1)
    add_CK = g_CK / temperature
    if slope_scale is not None:
        slope_CK = softcap_slope_(z_ids_CK, slope_scale)
        set_CK, add_CK = set_CK * slope_CK[:, 1:], add_CK * slope_CK
    grad_CV.scatter_(1, ids_CK[:, 1:], set_CK)
    return grad_CV.scatter_add_(1, ids_CK, add_CK)


def _sparse_chunk(
    plan: _Plan, h_CH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, rows: slice, ids_NK: Tensor,
    bufs: _Buffers, need_grad: bool,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """One chunk of a sparse objective: ``(d loss / d logits or None, parts)``; the gradient overwrites ``z``."""
    cfg, t = plan.cfg, plan.cfg.temperature
    batch_c = plan.batch.map(lambda x: x[rows])
    weights_c = plan.weights.map(lambda x: x[rows])
    ids_CK = ids_NK[rows]
    assert bufs.tmp is not None
    z_CV = scaled_float_logits(h_CH, weight_VH, bias_V, t, bufs.logits, bufs.float, plan.softcap)
    z_ids_CK = z_CV.gather(1, ids_CK)
    stats = softmax_stats(z_CV, bufs.tmp)
    lse_rest_C = _tail_logsumexp(z_CV, ids_CK[:, 1:], bufs.tmp) if cfg.fkl == "topk_tail" else None
    scale = 1.0 / plan.denom if need_grad else 1.0
    with torch.enable_grad():
        # log q at the read ids, once for the reverse-KL term and once (same values, a leaf of its own) for the
        # forward-KL term: one backward gives each term's gradient, and their sum is exactly what autograd
        # accumulates on a shared leaf (two addends commute), so the diagnostics cost no backward of their own
        logq_CK = (z_ids_CK - stats.lse.unsqueeze(1)).requires_grad_(True)
        logq_f_CK = logq_CK.detach().clone().requires_grad_(True)
        logq_tail_C = None if lse_rest_C is None else (lse_rest_C - stats.lse).requires_grad_(True)
        parts = sparse_token_losses(cfg, logq_CK[:, 0], logq_f_CK[:, 1:] if ids_CK.shape[1] > 1 else None, batch_c,
                                    weights_c, logq_tail_C, logq_tok_fkl=logq_f_CK[:, 0])
        leaves = (logq_CK, logq_f_CK) if logq_tail_C is None else (logq_CK, logq_f_CK, logq_tail_C)
        g_terms = _grads_wrt(parts["loss"], leaves, scale) if need_grad or plan.diagnostics else ()
    # diagnostics: sum_{v not read} q_v^2, inside the gradient's own pass over z when there is one
    in_pass = plan.diagnostics and need_grad and logq_tail_C is None
    rest_C = _rest_sum_sq(z_CV, ids_CK, stats.lse if lse_rest_C is None else _tail_shift(stats.lse, lse_rest_C),
                          bufs.tmp) if plan.diagnostics and not in_pass else None
    grad_CV = None
    if need_grad and logq_tail_C is not None:
        grad_CV = _tail_gradient(z_CV, ids_CK, z_ids_CK, stats.lse, lse_rest_C, g_terms[0] + g_terms[1], g_terms[2], t,
                                 plan.slope_scale, bufs.tmp)
    elif need_grad:
        # d loss / d z = scatter(g) - softmax(z) * sum(g), softmax(z) = exp(z - m) / S; d z / d logits = 1 / T.
        g_CK = g_terms[0] + g_terms[1]
        coef_C = g_CK.sum(1).div_(stats.sum_exp).neg_().div_(t)
        sum_sq_C = torch.zeros_like(coef_C) if in_pass else None
        grad_CV = _sparse_gradient(z_CV, ids_CK, z_ids_CK, stats.row_max, coef_C, g_CK.div_(t), sum_sq_C,
                                   plan.slope_scale, bufs.tmp)
        if sum_sq_C is not None:  # sum_{v not read} exp(2 (z_v - m)) -> sum q_v^2 (q = exp(z - m) / S)
            rest_C = sum_sq_C.double() / stats.sum_exp.double().square()
    mask_C = batch_c.mask.bool()
    parts = {k: v.detach() for k, v in parts.items() if k not in TERM_KEYS}
    parts["student_entropy"] = torch.where(mask_C, stats.entropy, 0.0)
    parts["logq"] = torch.where(mask_C, logq_CK[:, 0].detach(), 0.0)
    if not plan.diagnostics:
        return grad_CV, parts
    assert rest_C is not None
    g_rkl, g_fkl, *g_tail = (g / scale for g in g_terms)  # unnormalised
    log_tail_C = None if lse_rest_C is None else lse_rest_C - stats.lse
    diag = sparse_grad_stats(ids_CK, logq_CK.detach(), g_rkl, g_fkl, next(iter(g_tail), None), log_tail_C, rest_C, t)
    return grad_CV, {**parts, **diag}


def _sparse_gradient(
    z_CV: Tensor, ids_CK: Tensor, z_ids_CK: Tensor, row_max_C: Tensor, coef_C: Tensor, g_CK: Tensor,
    sum_sq_C: Tensor | None = None, slope_scale: float | None = None, tmp_CB: Tensor | None = None,
) -> Tensor:
    """``coef * exp(z - m) + scatter(g)``, overwriting ``z``, ``[C, V]``.

    The dense pass skips the read ids (set to ``-inf`` first; their dense value is then set from the saved
    ``z_ids``, the sparse ``g`` added after), so that with ``sum_sq_C`` the same pass also accumulates
    ``sum_{v not in ids} exp(2 (z_v - m))`` while each block is in cache, at no extra ``exp``. The same path
    runs with or without it: the diagnostics never change the gradient.

    Args:
        z_CV: ``[C, V]`` scaled float logits (overwritten).
        ids_CK: ``[C, P]`` the read ids; ``z_ids_CK``: ``z`` there, saved before.
        row_max_C: ``[C]`` ``m``; ``coef_C``: ``[C]`` the dense row scale; ``g_CK``: ``[C, P]`` the sparse part.
        sum_sq_C: ``[C]`` accumulator for the diagnostics, or ``None``.
        slope_scale: ``T / softcap`` for soft-capped logits: every entry gets the cap's slope (``softcap_slope_``;
            0 at the ``-inf`` placeholders, whose value is set afterwards); ``tmp_CB``: its scratch block.
    """
    z_CV.scatter_(1, ids_CK, float("-inf"))
    grad_CV = scaled_softmax_(z_CV, row_max_C, coef_C, sum_sq_C=sum_sq_C, slope_scale=slope_scale, tmp_CB=tmp_CB)
    dense_CK = (z_ids_CK - row_max_C.unsqueeze(1)).exp_().mul_(coef_C.unsqueeze(1))
    if slope_scale is not None:
        slope_CK = softcap_slope_(z_ids_CK, slope_scale)
        dense_CK, g_CK = dense_CK.mul_(slope_CK), g_CK * slope_CK
    grad_CV.scatter_(1, ids_CK, dense_CK)
    return grad_CV.scatter_add_(1, ids_CK, g_CK)


def _tail_shift(lse_C: Tensor, lse_rest_C: Tensor) -> Tensor:
    """The shift of ``_rest_sum_sq`` with a tail: ``lse_rest`` (sums in units of ``q_tail``), ``lse`` if empty."""
    return torch.where(torch.isneginf(lse_rest_C), lse_C, lse_rest_C)


def _rest_sum_sq(z_CV: Tensor, ids_CK: Tensor, shift_C: Tensor, tmp_CB: Tensor) -> Tensor:
    """``sum_{v not in ids} exp(2 (z_v - shift))`` per row, ``[C]``, in one read of ``z`` (unchanged on return).

    The read ids are set to ``-inf`` for the pass and restored after (as ``_tail_logsumexp``), so the sum
    over the rest is formed directly: subtracting the ids' squares from a full-row sum would cancel when
    the row's mass sits on them (a confident student), exactly where the norms are smallest. Used where the
    gradient has no pass of its own to share (``topk_tail``, no gradient wanted).

    Args:
        z_CV: ``[C, V]`` scaled float logits.
        ids_CK: ``[C, P]`` ids to leave out (duplicates allowed).
        shift_C: ``[C]`` at least every ``z_v`` left in (so no term exceeds 1).
        tmp_CB: ``[>= C, B]`` scratch buffer of ``z``'s dtype.
    """
    c, v = z_CV.shape
    z_ids_CK = z_CV.gather(1, ids_CK)
    z_CV.scatter_(1, ids_CK, float("-inf"))
    total_C = torch.zeros(c, dtype=z_CV.dtype, device=z_CV.device)
    shift_C1 = shift_C.unsqueeze(-1)
    width = tmp_CB.shape[1]
    for start in range(0, v, width):
        z_blk = z_CV[:, start : start + width]
        e_blk = torch.sub(z_blk, shift_C1, out=tmp_CB[:c, : z_blk.shape[1]]).exp_()
        total_C.add_(torch.linalg.vecdot(e_blk, e_blk))
    z_CV.scatter_(1, ids_CK, z_ids_CK)
    return total_C


def sparse_grad_stats(
    ids_CK: Tensor, logq_CK: Tensor, g_rkl_CK: Tensor, g_fkl_CK: Tensor, g_tail_C: Tensor | None,
    log_tail_C: Tensor | None, rest_C: Tensor, temperature: float,
) -> dict[str, Tensor]:
    """``||G^R||^2``, ``||G^F||^2``, ``<G^R, G^F>`` per row in closed form, no ``[C, V]`` tensor per term.

    A sparse term's gradient wrt the logits, from its gradient ``g`` at ``log q(ids)`` (and ``g_tail`` at
    ``log q_tail``), is ``G_v = T^-1 (q_v a + 1[v not in K] g_tail r_v + s_v)`` with ``a = -(sum g + g_tail)``,
    ``s_v = sum_j g_j 1[v = id_j]``, ``r_v = q_v / q_tail`` (``_tail_gradient``; without a tail ``g_tail = 0``).
    Off the read ids ``U`` that is ``q_v c``, ``c = a + g_tail / q_tail``, so with ``rest = sum_{v not in U}
    (q_v / s)^2`` (``s = q_tail`` with a tail, else 1) and ``mu = c s``::

        T^2 <G^X, G^Y> = mu_X mu_Y rest + sum_{u in U} (T G^X_u)(T G^Y_u)

    the second sum over the distinct read ids (the sampled token may repeat a top-k id; ``_distinct_slots``).
    Float64 inside, ``[2, C, P]`` small tensors only (both terms at once).

    Args:
        ids_CK: ``[C, P]`` read ids (sampled token first, then the teacher's top-k ``K``).
        logq_CK: ``[C, P]`` ``log q`` at those ids.
        g_rkl_CK: ``[C, P]`` gradient of ``w_R RKL`` at ``log q(ids)`` (no ``1 / N`` normaliser).
        g_fkl_CK: ``[C, P]`` the same for ``w_F FKL``.
        g_tail_C: ``[C]`` gradient of ``w_F FKL`` at ``log q_tail`` (``topk_tail``: only the forward KL reads
            the tail), else ``None``.
        log_tail_C: ``[C]`` ``log q_tail`` (``-inf`` when empty; ``topk_tail``), else ``None``.
        rest_C: ``[C]`` ``rest`` above (``_rest_sum_sq`` with shift ``lse``, or ``lse_rest`` with a tail).
        temperature: ``T``.

    Returns:
        ``DIAG_KEYS`` -> ``[C]`` float32.
    """
    f64 = torch.float64
    slot_CP = _distinct_slots(ids_CK)
    logq = logq_CK.to(f64)
    g_2CP = torch.stack([g_rkl_CK, g_fkl_CK]).to(f64)
    g_tail_2C = torch.zeros_like(g_2CP[:, :, 0])
    if g_tail_C is not None:
        g_tail_2C[1] = g_tail_C
    a_2C = -(g_2CP.sum(2) + g_tail_2C)
    q_SP = torch.zeros_like(logq).scatter_(1, slot_CP, logq.exp())  # by distinct id; 0 in unused slots
    s_2SP = torch.zeros_like(g_2CP).scatter_add_(2, slot_CP.expand_as(g_2CP), g_2CP)
    at_ids_2SP = q_SP * a_2C.unsqueeze(2) + s_2SP  # T G at the distinct read ids
    mu_2C = a_2C
    if log_tail_C is not None:
        log_tail = log_tail_C.to(f64).unsqueeze(1)
        # a slot is in the top-k K when any of its positions is one of 1..P-1 (only the sampled token can be outside)
        in_k_SP = torch.zeros_like(logq).scatter_add_(1, slot_CP[:, 1:], torch.ones_like(logq[:, 1:])) > 0
        r_CP = torch.where(torch.isneginf(log_tail), 0.0, (logq - log_tail).exp())
        r_SP = torch.zeros_like(logq).scatter_(1, slot_CP, r_CP).masked_fill_(in_k_SP, 0.0)
        at_ids_2SP = at_ids_2SP + r_SP * g_tail_2C.unsqueeze(2)
        mu_2C = a_2C * log_tail_C.to(f64).exp() + g_tail_2C
    x_3SP = torch.stack([at_ids_2SP[0], at_ids_2SP[1], at_ids_2SP[0]])
    y_3SP = torch.stack([at_ids_2SP[0], at_ids_2SP[1], at_ids_2SP[1]])
    mu_x_3C, mu_y_3C = mu_2C[[0, 1, 0]], mu_2C[[0, 1, 1]]
    out_3C = ((mu_x_3C * mu_y_3C * rest_C.to(f64) + (x_3SP * y_3SP).sum(2)) / temperature**2).float()
    return dict(zip(DIAG_KEYS, out_3C.unbind(0), strict=True))


def _distinct_slots(ids_CK: Tensor) -> Tensor:
    """``[C, P]`` each read position's slot among its row's distinct ids (equal ids share one), in ``[0, P)``.

    From a sort of each row: a new slot starts wherever the sorted id changes (cheap for P = 1 + K; no
    ``[C, P, P]`` comparison).
    """
    sorted_CP, perm_CP = ids_CK.sort(dim=1)
    new_CP = torch.ones_like(sorted_CP, dtype=torch.bool)
    new_CP[:, 1:] = sorted_CP[:, 1:] != sorted_CP[:, :-1]
    return torch.empty_like(perm_CP).scatter_(1, perm_CP, new_CP.cumsum(1) - 1)


def _teacher_chunk(plan: _Plan, batch_c: TokenBatch, rows: slice, bufs: _Buffers) -> TokenBatch:
    """``batch_c`` with the chunk's full teacher logits: gathered from precomputed ones or recomputed (no grad)."""
    if plan.teacher_logits is not None:
        full = plan.teacher_logits
        logits = full[rows] if plan.row_index is None else full.index_select(0, plan.row_index[rows])
        return dataclasses.replace(batch_c, teacher_logits=logits)
    if plan.teacher_hidden is None:
        return batch_c
    assert plan.teacher_weight is not None and bufs.teacher is not None
    th = plan.teacher_hidden[rows]
    out = bufs.teacher[: th.shape[0]]
    if plan.teacher_bias is None:
        logits = torch.mm(th, plan.teacher_weight.T, out=out)
    else:
        logits = torch.addmm(plan.teacher_bias, th, plan.teacher_weight.T, out=out)
    if plan.teacher_softcap is not None:  # the cap in float32 (a copy only for a low-precision teacher)
        logits = head_transform_(D.upcast(logits), plan.teacher_softcap)
    return dataclasses.replace(batch_c, teacher_logits=logits)


def _generic_chunk(
    plan: _Plan, h_CH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, rows: slice, bufs: _Buffers,
    need_grad: bool,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """One chunk of any objective through ``token_losses`` under autograd: ``(d loss / d logits or None, parts)``."""
    cfg = plan.cfg
    batch_c = _teacher_chunk(plan, plan.batch.map(lambda x: x[rows]), rows, bufs)
    weights_c = plan.weights.map(lambda x: x[rows])
    logits_buf = bufs.logits[: h_CH.shape[0]]
    if bias_V is None:
        logits = torch.mm(h_CH, weight_VH.T, out=logits_buf)
    else:
        logits = torch.addmm(bias_V, h_CH, weight_VH.T, out=logits_buf)
    # the leaf is the model's logits (capped): the loss and diagnostics are theirs; the cap's slope follows
    leaf = head_transform_(D.upcast(logits), plan.softcap).detach().requires_grad_(True)
    with torch.enable_grad():
        parts = token_losses(cfg, leaf, batch_c, weights_c)
        # two more backward passes through the loss (two [C, V] gradients alive at once), before the loss's own
        diag = logit_grad_parts(parts, leaf) if plan.diagnostics else {}
        grad_CV = _grad_wrt(parts["loss"], leaf, 1.0 / plan.denom) if need_grad else None
    if grad_CV is not None and plan.softcap is not None:
        grad_CV.mul_(softcap_slope_(leaf.detach(), 1.0 / plan.softcap))
    if plan.teacher_entropy is not None and batch_c.teacher_logits is not None:
        with torch.no_grad():
            plan.teacher_entropy[rows] = D.entropy(batch_c.teacher_logits, cfg.temperature)
    return grad_CV, {**{k: v.detach() for k, v in parts.items() if k not in TERM_KEYS}, **diag}


def _make_buffers(plan: _Plan, hidden_NH: Tensor, v: int, sparse: bool) -> _Buffers:
    """The call's reused buffers: logits (matmul dtype), a float32 copy in low precision, scratch, teacher."""
    c0 = max(1, min(plan.chunk, hidden_NH.shape[0]))
    logits = hidden_NH.new_empty(c0, v)
    if not sparse:
        teacher = None if plan.teacher_hidden is None else plan.teacher_hidden.new_empty(c0, v)
        return _Buffers(logits, None, None, teacher)
    low = float_buffer_needed(hidden_NH.dtype)
    float_buf = torch.empty(c0, v, device=hidden_NH.device) if low else None
    tmp = scratch_buffer(c0, v, torch.float32 if low else hidden_NH.dtype, hidden_NH.device)
    return _Buffers(logits, float_buf, tmp, None)


def _weight_grad_buffer(shape: torch.Size, v: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``[V_rows, H]`` weight gradient: padded rows zeroed; used rows written by the first chunk (or zeroed)."""
    grad = torch.empty(shape, dtype=dtype, device=device)
    grad[v:].zero_()
    if n == 0:
        grad[:v].zero_()
    return grad


class _FusedLinearObjective(torch.autograd.Function):
    """Loss and gradients of ``objective(hidden @ W.T + b)`` computed chunk by chunk in forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden_NH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, plan: _Plan
    ) -> tuple[Tensor, Tensor]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        weight, bias = used_weight(weight_VH.to(hidden_NH.dtype),
                                   None if bias_V is None else bias_V.to(hidden_NH.dtype), plan.vocab_size)
        n, v = hidden_NH.shape[0], weight.shape[0]
        sparse = is_sparse(plan.cfg)
        bufs = _make_buffers(plan, hidden_NH, v, sparse)
        ids_NK = _sparse_ids(plan.cfg, plan.batch) if sparse else None
        grad_h = hidden_NH.new_empty(hidden_NH.shape) if need_h else None
        grad_w_full = _weight_grad_buffer(weight_VH.shape, v, n, hidden_NH.dtype, weight.device) if need_w else None
        acc_dtype = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
        grad_b_full = torch.zeros(weight_VH.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden_NH.device)
        chunks: dict[str, list[Tensor]] = {k: [] for k in plan.part_keys}
        need_grad = need_h or need_w or need_b
        for start in range(0, n, plan.chunk):
            rows = slice(start, min(start + plan.chunk, n))
            h_CH = hidden_NH[rows]
            if sparse:
                grad_CV, parts = _sparse_chunk(plan, h_CH, weight, bias, rows, ids_NK, bufs, need_grad)
            else:
                grad_CV, parts = _generic_chunk(plan, h_CH, weight, bias, rows, bufs, need_grad)
            loss_sum += parts["loss"].sum()
            for k in plan.part_keys:
                chunks[k].append(parts[k])
            if grad_CV is None:
                continue
            if need_b:
                grad_b_full[:v] += grad_CV.sum(0)
            g_mm = grad_CV if grad_CV.dtype == hidden_NH.dtype else bufs.logits[: h_CH.shape[0]].copy_(grad_CV)
            if need_h:
                torch.mm(g_mm, weight, out=grad_h[rows])
            if need_w:
                # the first chunk writes (beta=0: no zero-fill pass over [V, H]), later ones accumulate
                grad_w = grad_w_full[:v]
                torch.addmm(grad_w, g_mm.T, h_CH, beta=0.0 if rows.start == 0 else 1.0, out=grad_w)
        plan.parts = {k: torch.cat(chunks[k]) if chunks[k] else loss_sum.new_zeros(0) for k in plan.part_keys}
        ctx.grads = (
            grad_h,
            None if grad_w_full is None else grad_w_full.to(weight_VH.dtype),
            None if grad_b_full is None else grad_b_full.to(bias_V.dtype),
        )
        ctx.denom = plan.denom
        return loss_sum / plan.denom, loss_sum

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, grad_loss_sum: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("fused_objective's gradients were already consumed: backward it only once")
        # Hand the stored gradients over without keeping a reference, so that AccumulateGrad can adopt the
        # [V, H] weight gradient instead of cloning it (a reference held here would double its memory).
        grads, ctx.grads = ctx.grads, None
        scale = grad_loss + grad_loss_sum * ctx.denom
        if not bool(scale == 1.0):
            grads = tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads)
        return (*grads, None)


def _flatten(batch: TokenBatch, lead: int) -> TokenBatch:
    """Flatten the leading position dims of every field to ``[N, ...]``."""
    return batch.map(lambda x: x.reshape(-1, *x.shape[lead:]))


def _fill_teacher_entropy(
    cfg: ObjectiveConfig, batch: TokenBatch, teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
    teacher_bias: Tensor | None, vocab_size: int | None, chunk: int, teacher_softcap: float | None = None,
) -> TokenBatch:
    """Teacher entropy for ``prepare_weights`` without an ``[N, V]`` tensor (only when it is needed)."""
    if cfg.divergence is not None or batch.teacher_entropy is not None:
        return batch
    if batch.teacher_logits is not None:
        ent_N = _chunked_entropy(batch.teacher_logits, cfg.temperature, chunk)
        return dataclasses.replace(batch, teacher_entropy=ent_N)
    if teacher_hidden is None or teacher_weight is None:
        return batch  # prepare_weights raises its own error
    scores = score_chunked(teacher_hidden, teacher_weight, temperature=cfg.temperature, chunk_size=chunk,
                           vocab_size=vocab_size, bias=teacher_bias, softcap=teacher_softcap)
    return dataclasses.replace(batch, teacher_entropy=scores.entropy)


@torch.no_grad()
def _chunked_entropy(logits_NV: Tensor, temperature: float, chunk: int) -> Tensor:
    """``divergences.entropy`` of ``[N, V]`` logits, a chunk of rows at a time (bounded temporaries)."""
    parts = [D.entropy(logits_NV[s : s + chunk], temperature) for s in range(0, logits_NV.shape[0], chunk)]
    return torch.cat(parts) if parts else logits_NV.new_zeros(0, dtype=torch.float32)


def _check_shapes(hidden: Tensor, weight: Tensor, batch: TokenBatch, teacher_hidden: Tensor | None,
                  teacher_weight: Tensor | None) -> None:
    if hidden.shape[:-1] != batch.mask.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [..., H] with [...] = mask {tuple(batch.mask.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head weight {tuple(weight.shape)} must be [V, H] with H = {hidden.shape[-1]}")
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("pass teacher_hidden and teacher_weight together")
    if teacher_hidden is not None and teacher_hidden.shape[:-1] != batch.mask.shape:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must be [..., H_T] like the mask")


def _teacher_weight_rows(
    weight: Tensor, teacher_weight: Tensor | None, teacher_bias: Tensor | None, vocab_size: int | None
) -> tuple[Tensor | None, Tensor | None]:
    """The teacher lm_head restricted to the shared vocabulary (first ``vocab_size`` rows)."""
    if teacher_weight is None:
        return None, None
    if vocab_size is None and teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher lm_head has {teacher_weight.shape[0]} rows, student {weight.shape[0]}: "
                         "pass vocab_size (the tokenizer's vocabulary) to align them")
    v = vocab_size or weight.shape[0]
    return used_weight(teacher_weight, teacher_bias, v)


def fused_objective(
    cfg: ObjectiveConfig,
    hidden: Tensor,
    lm_head_weight: Tensor,
    batch: TokenBatch,
    *,
    weights: TokenWeights | None = None,
    tau: float | None = None,
    generator: torch.Generator | None = None,
    normalizer: float | int | None = None,
    lm_head_bias: Tensor | None = None,
    vocab_size: int | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
    diagnostics: bool = False,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> FusedOutput:
    """``objective(cfg, cap(hidden @ W.T + b), batch)`` with the lm_head fused in and no ``[N, V]`` tensor.

    Same loss, gradients (wrt ``hidden``, ``lm_head_weight`` and ``lm_head_bias``) and metrics as
    ``reference_objective`` to float32 rounding, for every preset. Tied embeddings work as is: pass the
    shared weight; autograd adds this gradient to the embedding's.

    Args:
        cfg: The objective (``ObjectiveConfig.preset(name)``).
        hidden: ``[..., H]`` student final hidden states (after the final norm), carrying gradient.
        lm_head_weight: ``[V_rows, H]`` student lm_head weight (may be the tied embedding).
        batch: Per-position inputs with leading shape ``[...]``; teacher fields as ``cfg`` needs them
            (sparse presets: ``teacher_logp``, ``teacher_entropy``, top-k; see ``scoring.score_chunked``).
        weights: Precomputed ``TokenWeights`` (skips ``prepare_weights``).
        tau: Threshold override (adaptive tau) for ``prepare_weights``.
        generator: For ``placement="random"``.
        normalizer: Divide the token sum by this (global valid count); default the local valid count.
        lm_head_bias: ``[V_rows]`` or ``None``.
        vocab_size: Use only the first ``vocab_size`` lm_head rows (padded vocabularies; also the teacher's).
        teacher_hidden: ``[..., H_T]`` teacher final hidden states, for presets that need full teacher
            logits (``cfg.needs_teacher_logits``) when ``batch.teacher_logits`` is not given; the teacher's
            logits are then recomputed one chunk at a time without gradient.
        teacher_weight: ``[V_T_rows, H_T]`` teacher lm_head weight.
        teacher_bias: ``[V_T_rows]`` or ``None``.
        chunk_size: Positions per chunk (at most: chunks are balanced to equal sizes); default
            ``fused_chunk_size(cfg, V, dtype, device)`` (CPU: 165 rows at V = 151,936 for sparse presets).
        diagnostics: Also return each weighted term's logit-gradient parts (``DIAG_KEYS``) in ``token_parts``:
            sparse presets in closed form (one more read of each chunk's logits), the others by two more
            backward passes through the chunk's loss (two more ``[chunk, V]`` tensors at the peak). The
            training gradients are bit-identical either way. Single divergences have no split and get none.
        softcap: The student's final-logit soft-cap (``scoring.head_transform_``; Gemma 2), or ``None``: the
            loss, metrics and diagnostics are those of the capped logits, the gradients reach the raw lm_head.
        teacher_softcap: The teacher's, for the logits recomputed from ``teacher_hidden``.

    Returns:
        ``FusedOutput`` (``loss``, ``loss_sum`` carry gradient; ``metrics`` as ``summarize``).
    """
    _check_shapes(hidden, lm_head_weight, batch, teacher_hidden, teacher_weight)
    lead = batch.mask.dim()
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    batch_N = _flatten(batch, lead)
    teacher_NH = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    v = vocab_size or lm_head_weight.shape[0]
    t_weight, t_bias = _teacher_weight_rows(lm_head_weight, teacher_weight, teacher_bias, vocab_size)
    chunk = chunk_size or fused_chunk_size(cfg, v, hidden.dtype, hidden.device)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    if weights is None:
        batch_N = _fill_teacher_entropy(cfg, batch_N, teacher_NH, t_weight, t_bias, None, chunk, teacher_softcap)
        weights_N = prepare_weights(cfg, batch_N, tau=tau, generator=generator)
    else:
        weights_N = weights.map(lambda x: x.reshape(-1))
    if cfg.needs_teacher_logits and batch_N.teacher_logits is None and teacher_NH is None:
        raise ValueError(f"objective {cfg.name!r} needs teacher_logits or teacher_hidden + teacher_weight")

    mask_N, fkl_N = term_masks(cfg, batch_N)
    live_N = mask_N | fkl_N  # the positions that carry a term (mask_N but with official_alignment)
    num_valid = int(mask_N.sum())
    denom = max(float(normalizer if normalizer is not None else num_valid), 1.0)
    idx = live_N.nonzero().squeeze(1)
    num_rows = idx.numel()
    all_valid = num_rows == live_N.numel()

    def rows(x: Tensor) -> Tensor:
        return x if all_valid else x.index_select(0, idx)

    teacher_logits = batch_N.teacher_logits
    plan = _Plan(
        cfg, dataclasses.replace(batch_N, teacher_logits=None).map(rows), weights_N.map(rows), vocab_size,
        balanced_chunk(num_rows, chunk),
        denom, teacher_hidden=None if teacher_NH is None or teacher_logits is not None else rows(teacher_NH),
        teacher_weight=t_weight, teacher_bias=t_bias, teacher_logits=teacher_logits,
        row_index=None if all_valid else idx, diagnostics=diagnostics and has_term_split(cfg),
        softcap=softcap, teacher_softcap=teacher_softcap,
    )
    if batch_N.teacher_entropy is None and (teacher_logits is not None or plan.teacher_hidden is not None):
        plan.teacher_entropy = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    loss, loss_sum = _FusedLinearObjective.apply(rows(hidden_NH), lm_head_weight, lm_head_bias, plan)

    parts_N = {k: torch.zeros(mask_N.shape, dtype=p.dtype, device=p.device).index_copy_(0, idx, p)
               for k, p in plan.parts.items()}
    metrics = summarize(cfg, parts_N, _metrics_batch(batch_N, plan, idx), weights_N)
    return FusedOutput(loss, loss_sum, num_valid, metrics, parts_N)


def _metrics_batch(batch_N: TokenBatch, plan: _Plan, idx: Tensor) -> TokenBatch:
    """``batch_N`` without ``[N, V]`` teacher logits, carrying the teacher entropy when known (for ``summarize``)."""
    if plan.teacher_entropy is not None:
        ent_N = torch.zeros(batch_N.mask.shape, dtype=plan.teacher_entropy.dtype, device=idx.device)
        batch_N = dataclasses.replace(batch_N, teacher_entropy=ent_N.index_copy_(0, idx, plan.teacher_entropy))
    return dataclasses.replace(batch_N, teacher_logits=None)


def reference_objective(
    cfg: ObjectiveConfig,
    hidden: Tensor,
    lm_head_weight: Tensor,
    batch: TokenBatch,
    *,
    weights: TokenWeights | None = None,
    tau: float | None = None,
    generator: torch.Generator | None = None,
    normalizer: float | int | None = None,
    lm_head_bias: Tensor | None = None,
    vocab_size: int | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    diagnostics: bool = False,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> ObjectiveOutput:
    """The plain path with ``fused_objective``'s signature: full ``[..., V]`` logits, then ``objective``."""
    weight, bias = used_weight(lm_head_weight, lm_head_bias, vocab_size)
    logits = head_transform_(F.linear(hidden, weight, bias), softcap, inplace=False)
    if teacher_hidden is not None and teacher_weight is not None and batch.teacher_logits is None:
        t_weight, t_bias = _teacher_weight_rows(lm_head_weight, teacher_weight, teacher_bias, vocab_size)
        with torch.no_grad():
            t_logits = head_transform_(F.linear(teacher_hidden, t_weight, t_bias), teacher_softcap)
            batch = dataclasses.replace(batch, teacher_logits=t_logits)
    return objective(cfg, logits, batch, tau=tau, generator=generator, normalizer=normalizer, weights=weights,
                     diagnostics=diagnostics)
