"""The public EOPD code's one-position offset of the forward-KL term (``loss.official_alignment``).

Why this file exists: the paper's equation gives response token ``t`` both terms at the distribution that
predicts it, gated by the teacher's entropy ``H_t`` there. The public code's actor pipeline (the fork carrying
the paper's code, ckjsuperhh/CacheEOPD at 756951d, ``verl/workers/actor/dp_actor.py``) slices the log-probs
and the entropy ``[:, -R-1:-1]`` (the positions that predict the ``R`` response tokens) but the teacher's and
the student's top-k tensors ``[:, -R:]``: token ``t`` is gated on ``H_t`` yet takes the top-k forward KL of
the distribution that predicts token ``t + 1``, and the last token the one after the response (the position
whose input is the last response token). ``official_alignment`` reproduces that pipeline, not the equation.

Formulation, per row laid out with one more position than it has tokens (``[..., T + 1]``, ``mask`` 1 on its
``L`` tokens): the loss at position ``p`` is ``mask_p * w_R * RKL_p + fkl_mask_p * alpha * g(H_{p-1}) * FKL_p``,
where ``fkl_mask`` is ``mask`` shifted right by one (positions ``1..L``: the distribution after each token),
and the normaliser stays the count of real tokens. Every position keeps its own distribution; only the
forward-KL weight moves one position later, so the fused path needs nothing but the extra position's row.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def shift_right(x: Tensor) -> Tensor:
    """``x`` moved one position later along the last dim, 0 at position 0: ``out[..., p] = x[..., p - 1]``.

    Args:
        x: ``[..., T]`` per-position values.

    Returns:
        ``[..., T]``, same dtype.
    """
    return torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1]], dim=-1)


def fkl_mask_of(mask: Tensor) -> Tensor:
    """The positions that take the forward-KL term under ``official_alignment``: ``mask`` shifted right by one.

    Args:
        mask: ``[..., T + 1]`` 1 on each row's tokens (a prefix), with room for the position after the last.

    Returns:
        ``[..., T + 1]`` float32, 1 on positions ``1..L`` of a row of ``L`` tokens.
    """
    return shift_right(mask.float())


def loss_positions(mask: Tensor) -> Tensor:
    """Every position that carries a term under ``official_alignment``: each row's tokens and the one after.

    Args:
        mask: ``[..., T + 1]`` as for ``fkl_mask_of``.

    Returns:
        ``[..., T + 1]`` bool.
    """
    return mask.bool() | shift_right(mask.bool())


def shift_gate(gate: Tensor, fkl_mask: Tensor) -> Tensor:
    """Each token's gate moved to the position whose forward KL it takes (``p`` gets the gate of token ``p - 1``).

    Works on the ``[..., T + 1]`` layout and on a row-major flattening of it, whole or restricted to
    ``loss_positions``: a position of ``fkl_mask`` is never a row's first, so the position before it in the
    flat order is its own row's previous token.

    Args:
        gate: ``[...]`` the gate of each token (0 off the tokens).
        fkl_mask: ``[...]`` from ``fkl_mask_of``, laid out like ``gate``.

    Returns:
        ``[...]`` the gate as placed, 0 off ``fkl_mask``.
    """
    return torch.where(fkl_mask.bool(), shift_right(gate), torch.zeros_like(gate))
