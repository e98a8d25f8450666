"""Micro-batches: which rollout rows go through one forward together, and at what padded width.

Why a token budget: math completions are long-tailed (most end in a few hundred tokens, a few run to the
budget), and a micro-batch is padded to its longest row. Fixed-size micro-batches of a shuffled minibatch put
one long row beside short ones and pad them all to it. ``optim.max_tokens_per_micro_batch`` instead sorts the
rows by length and cuts them into runs whose ``rows x (prompt width + completion width)`` stays within the
budget, choosing the cuts that compute the fewest positions (padding included, plus a fixed cost per forward),
so short rows travel together in wide micro-batches and long ones in narrow ones. Each micro-batch is
then trimmed to its own width (``Rollout.trimmed``). The loss is unchanged: every micro-batch's loss is divided
by the minibatch's global valid-token count (``eopd.training.update``), so how rows are grouped never changes the
gradient; only the order of the floating-point sums does.

The same grouping serves the teacher's scoring pass (``HFTeacher``) and the learner's forward passes.
"""

from __future__ import annotations

import torch

from eopd.sampling.rollout import Rollout

Tensor = torch.Tensor


def row_widths(rollout: Rollout) -> tuple[Tensor, Tensor]:
    """Each row's real prompt length and valid completion length, ``([B], [B])`` int64 on the CPU."""
    prompt_B = rollout.attention_mask_BL[:, : rollout.prompt_len].sum(1)
    completion_B = rollout.completion_mask_BT.sum(1)
    return prompt_B.long().cpu(), completion_B.long().cpu()


#: A forward's fixed cost in token positions (kernel launches, per-layer Python, the lm_head loop): the price
#: ``token_budget_groups`` puts on one more micro-batch when it trades micro-batches against padding.
FORWARD_COST_TOKENS = 64


def token_budget_groups(prompt_B: Tensor, completion_B: Tensor, max_tokens: int,
                        forward_cost: int = FORWARD_COST_TOKENS) -> list[Tensor]:
    """Row indices grouped so that each group's padded size ``rows x (max prompt + max completion)`` stays
    within ``max_tokens`` (a row larger than the budget alone forms a group), at the least padded positions
    plus ``forward_cost`` per group.

    Rows are sorted longest completion first (ties: longest prompt, then index) and cut into consecutive runs
    by dynamic programming over the cut points (``O(B^2)``, B is a minibatch): packing greedily up to the budget
    would pad short rows to the longest one's width; cutting at every row would pay a forward per row.

    Args:
        prompt_B: ``[B]`` real prompt lengths.
        completion_B: ``[B]`` valid completion lengths.
        max_tokens: Padded tokens allowed per group (> 0).
        forward_cost: Token positions one more group costs.

    Returns:
        Index tensors (int64, CPU) that partition ``range(B)``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(prompt_B)), key=lambda i: (-int(completion_B[i]), -int(prompt_B[i]), i))
    P = [int(prompt_B[i]) for i in order]
    T = [max(int(completion_B[i]), 1) for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of grouping the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width_p = 0
        for i in range(j - 1, -1, -1):  # group = sorted rows i..j-1; its completion width is T[i]
            width_p = max(width_p, P[i])
            size = (j - i) * (width_p + T[i])
            if size > max_tokens and i < j - 1:
                break  # wider groups only grow (T[i] rises as i falls)
            cost = best[i] + size + forward_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return [torch.tensor(g, dtype=torch.long) for g in reversed(groups)]


def micro_batches(rollout: Rollout, rows: Tensor, *, size: int, max_tokens: int | None) -> list[Tensor]:
    """Split ``rows`` (indices into ``rollout``) into micro-batches: by ``max_tokens`` padded tokens when set,
    else consecutive runs of ``size`` rows. Returned indices live on ``rows``' device."""
    if max_tokens is None:
        return [rows[i : i + size] for i in range(0, len(rows), size)]
    prompt_B, completion_B = row_widths(rollout.select(rows))
    local = token_budget_groups(prompt_B, completion_B, max_tokens)
    return [rows[g.to(rows.device)] for g in local]


def padded_tokens(rollout: Rollout, groups: list[Tensor]) -> int:
    """Positions a set of micro-batches computes once each is trimmed to its width: the sum of
    ``rows x (max prompt + max completion)`` (what ``padding share = 1 - valid / padded`` is measured on)."""
    prompt_B, completion_B = row_widths(rollout)
    return sum(len(g) * int(prompt_B[g.cpu()].max() + completion_B[g.cpu()].max().clamp(min=1)) for g in groups)
