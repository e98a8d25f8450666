"""What every teacher returns: ``TeacherScores``, the ``Teacher`` protocol and the one error a teacher raises.

Why this file exists: the in-process teacher (``in_process.HFTeacher``), the served one (``served.ServedTeacher``)
and several teachers routed per prompt (``routed.TeacherSet``) all hand the trainer the same per-position
summaries: the sampled token's log-prob, the entropy the gate reads and the top-k, plus full logits or hidden
states for the exact baselines (in-process only). The helpers that every teacher shares live here too: the
top-k-only scores of a served teacher (``topk_only_scores``: the documented entropy estimate), joining and
padding scores of row blocks, and the per-token diagnostics summed for the step's metrics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from eopd.errors import UserError
from eopd.losses.topk_entropy import gate_undecided, topk_entropy_bounds, topk_entropy_estimate
from eopd.sampling import OutputHead, Rollout

Tensor = torch.Tensor

#: ``teacher.entropy`` modes: ``exact`` (full-vocabulary entropy), ``topk`` (estimate from the top-k alone),
#: ``auto`` (exact when the teacher can give it: in-process always, served when the server sends it).
ENTROPY_MODES = ("auto", "exact", "topk")
#: Served log-probs at or below this are zero probabilities (vLLM writes ``-inf`` as ``-9999.0``).
LOGPROB_FLOOR = -9999.0


@dataclass
class TeacherScores:
    """Per completion position ``[B, T]`` (``K`` = top-k, ``V`` = aligned vocabulary), float32.

    Attributes:
        logp_BT: Teacher log-prob of the sampled token.
        entropy_BT: Teacher full-vocabulary entropy (nats).
        topk_ids_BTK: Teacher top-k ids (None when not requested).
        topk_logprobs_BTK: Their log-probs.
        logits_BTV: Full teacher logits (exact baselines on the plain path).
        hidden_BTH: Teacher final hidden states (exact baselines on the fused path), in the model's dtype.
        head: The teacher's lm_head ``OutputHead(weight [V_rows, H], bias [V_rows] or None, softcap)`` that
            goes with ``hidden_BTH`` (references to the model's parameters, not copies; its soft-cap too, so
            the loss recomputes the teacher's own logits).
        entropy_lower_BT: When ``entropy_BT`` is a top-k estimate: the smallest entropy any distribution
            with this top-k can have (None when ``entropy_BT`` is exact).
        entropy_upper_BT: The largest (None when exact).
        tokens_per_s: A served teacher's throughput on this call: positions scored by the service (prompt
            and completion) per second of request wall time (None in-process).
    """

    logp_BT: Tensor
    entropy_BT: Tensor
    topk_ids_BTK: Tensor | None = None
    topk_logprobs_BTK: Tensor | None = None
    logits_BTV: Tensor | None = None
    hidden_BTH: Tensor | None = None
    head: OutputHead | None = None
    entropy_lower_BT: Tensor | None = None
    entropy_upper_BT: Tensor | None = None
    tokens_per_s: float | None = None

    def select(self, rows: Tensor | slice | tuple[slice, slice]) -> TeacherScores:
        """The scores of some rollout rows (or, with a ``(rows, positions)`` pair, of some of their positions)."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return TeacherScores(**{f: pick(getattr(self, f)) for f in ROW_FIELDS}, head=self.head,
                             tokens_per_s=self.tokens_per_s)


#: The ``TeacherScores`` fields that are tensors with rows leading (everything but ``head`` and the rate).
ROW_FIELDS = tuple(f for f in TeacherScores.__dataclass_fields__ if f not in ("head", "tokens_per_s"))


def concat_scores(parts: list[TeacherScores]) -> TeacherScores:
    """Scores of consecutive row blocks joined along the rows (the head and the rate are the first part's)."""
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return TeacherScores(**{f: cat([getattr(p, f) for p in parts]) for f in ROW_FIELDS}, head=parts[0].head,
                         tokens_per_s=parts[0].tokens_per_s)


def padded_scores(scores: TeacherScores, width: int) -> TeacherScores:
    """``scores`` of a trimmed rollout padded back to ``width`` completion positions (zeros past the end)."""
    def pad(x: Tensor | None) -> Tensor | None:
        if x is None or x.shape[1] == width:
            return x
        return torch.cat([x, x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))], dim=1)

    return dataclasses.replace(scores, **{f: pad(getattr(scores, f)) for f in ROW_FIELDS})


def topk_only_scores(logp_BT: Tensor, topk_ids_BTK: Tensor, topk_logprobs_BTK: Tensor, *, top_k: int,
                     vocab_size: int) -> TeacherScores:
    """Scores of a teacher known only through its top-k: the entropy is the documented top-k estimate.

    The gate then reads ``topk_entropy_estimate`` (rule ``DEFAULT_RULE``), which never leaves
    ``[entropy_lower_BT, entropy_upper_BT]``, so it agrees with the exact gate on every token the bounds
    decide. Entries at or below ``LOGPROB_FLOOR`` count as padding for the bounds (zero probability).

    Args:
        logp_BT: ``[B, T]`` log-prob of the sampled token.
        topk_ids_BTK: ``[B, T, K]`` top ids, most likely first (``K >= top_k``; more sharpens the estimate).
        topk_logprobs_BTK: ``[B, T, K]`` their log-probs (full-vocabulary normalisation, temperature 1 when served).
        top_k: How many of the top ids the objective gets.
        vocab_size: ``V``, the tokenizer's vocabulary.
    """
    lp_BTK = topk_logprobs_BTK.float()
    for_bounds_BTK = lp_BTK.masked_fill(lp_BTK <= LOGPROB_FLOOR, float("-inf"))
    lower_BT, upper_BT = topk_entropy_bounds(for_bounds_BTK, vocab_size)
    entropy_BT = topk_entropy_estimate(for_bounds_BTK, vocab_size)
    return TeacherScores(logp_BT.float(), entropy_BT, topk_ids_BTK[..., :top_k], lp_BTK[..., :top_k],
                         entropy_lower_BT=lower_BT, entropy_upper_BT=upper_BT)


def teacher_token_sums(scores: TeacherScores, mask_BT: Tensor, tau: float) -> dict[str, float]:
    """Per-token teacher diagnostics summed over valid tokens (the trainer divides by the token count).

    ``teacher/undecided_share``: tokens whose top-k entropy interval contains ``tau`` (only there can the
    top-k gate differ from the exact one; only when the entropy is a top-k estimate).
    ``teacher/tokens_per_s``: the served teacher's throughput, weighted by this process's tokens (so the
    logged value is the throughput itself on one process and the token-weighted mean over several).
    """
    valid_BT = mask_BT.bool()
    sums: dict[str, float] = {}
    if scores.entropy_lower_BT is not None and scores.entropy_upper_BT is not None:
        undecided_BT = gate_undecided(scores.entropy_lower_BT, scores.entropy_upper_BT, tau) & valid_BT
        sums["teacher/undecided_share"] = float(undecided_BT.sum())
    if scores.tokens_per_s is not None:
        sums["teacher/tokens_per_s"] = scores.tokens_per_s * float(valid_BT.sum())
    return sums


class TeacherUnavailableError(UserError):
    """The teacher could not score a rollout (a server that stays down, a response that does not match the
    request); nothing is trained on partial scores, and the trainer checkpoints the last complete step."""


class TeacherMismatchError(UserError):
    """A teacher is not the one the run needs (another tokenizer, model or API, a server that sends logits);
    found at start, before any step."""


class Teacher(Protocol):
    """Anything that scores a rollout."""

    def score(self, rollout: Rollout, *, top_k: int, want_logits: bool, want_hidden: bool = False) -> TeacherScores:
        """Scores of every completion position of ``rollout`` (full logits / hidden states when asked)."""
        ...


def widened_topk(scores: TeacherScores, k: int) -> TeacherScores:
    """``scores`` with its top-k padded to ``k`` entries per position (``[B, T, K]`` -> ``[B, T, k]``).

    Each added entry repeats the position's last id at log-prob ``-inf``: zero probability, so the top-k forward
    KL (renormalised over the top-k) gives it no weight and the tail bucket keeps the same ids. Several teachers
    with different ``top_k`` then share one ``[B, T, k]`` tensor, each row keeping its own teacher's top-k.
    """
    if scores.topk_ids_BTK is None or scores.topk_logprobs_BTK is None or scores.topk_ids_BTK.shape[-1] >= k:
        return scores
    ids_BTK, lps_BTK = scores.topk_ids_BTK, scores.topk_logprobs_BTK
    extra = k - ids_BTK.shape[-1]
    ids_BTk = torch.cat([ids_BTK, ids_BTK[..., -1:].expand(*ids_BTK.shape[:-1], extra)], dim=-1)
    lps_BTk = torch.cat([lps_BTK, lps_BTK.new_full((*lps_BTK.shape[:-1], extra), float("-inf"))], dim=-1)
    return dataclasses.replace(scores, topk_ids_BTK=ids_BTk, topk_logprobs_BTK=lps_BTk)
