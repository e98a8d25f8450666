"""Teacher scoring: what the objective needs from the teacher at every completion position.

One no-grad forward per micro-batch of rollout rows. By default only per-position summaries are kept —
the sampled token's log-prob, the full-vocabulary entropy and the top-k ids/log-probs — computed chunk by
chunk from the final hidden states (``eopd.losses.scoring.score_chunked``) so no ``[B, T, V]`` tensor
outlives one chunk. Full logits are returned
only for the exact full-vocabulary baselines that need them.

``Teacher`` is a small protocol so a served teacher (vLLM, an HTTP endpoint returning top-k log-probs) can
replace ``HFTeacher`` later without touching the trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from eopd.errors import UserError
from eopd.losses.scoring import score_chunked, score_from_logits
from eopd.losses.topk_entropy import gate_undecided, topk_entropy_bounds, topk_entropy_estimate
from eopd.sampling import (
    OutputHead,
    Rollout,
    check_output_head,
    completion_hidden_states,
    completion_logits,
    micro_batches,
    output_head,
)

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


class Teacher(Protocol):
    """Anything that scores a rollout."""

    def score(self, rollout: Rollout, *, top_k: int, want_logits: bool, want_hidden: bool = False) -> TeacherScores:
        """Scores of every completion position of ``rollout`` (full logits / hidden states when asked)."""
        ...


def _moved(obj: Any, device: torch.device) -> Any:
    """A copy of dataclass ``obj`` with its tensor fields on ``device`` (the others as they are)."""
    return dataclasses.replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
                                       if isinstance(getattr(obj, f.name), Tensor)})


class HFTeacher:
    """A Hugging Face causal LM as teacher.

    Its logits are computed from its final hidden states with its own head transform (``eopd.sampling.head``), checked
    against its own forward when the teacher is built (``check_output_head``): a model whose logits eopd cannot
    reproduce stops there with one line, in-process (``eopd train``) and served (``eopd serve-teacher``) alike.

    The model may live on another device than the student (``models.teacher_device``): each rollout is
    moved to it and the scores come back on the rollout's device.

    Args:
        model: The teacher (eval mode, no grad).
        vocab_size: Aligned vocabulary (the tokenizer's); padded lm_head rows are dropped.
        temperature: Same as sampling.
        micro_batch_size: Rollout rows per forward.
        max_tokens_per_micro_batch: Instead, rows sorted by length and packed under this many padded tokens
            per forward (``eopd.sampling.microbatch``; the training config's ``optim.max_tokens_per_micro_batch``).
        chunk_size: Positions per lm_head chunk (None: the scorer's memory-budget default).
        entropy: ``exact`` (or ``auto``): the full-vocabulary entropy; ``topk``: only the top
            ``entropy_top_k`` are used, through ``topk_only_scores`` (the served teacher's gate, measured
            without a server).
        entropy_top_k: Top-k the estimate reads in ``topk`` mode (the served ``teacher.top_logprobs``).
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, temperature: float, micro_batch_size: int = 8,
                 chunk_size: int | None = None, entropy: str = "exact", entropy_top_k: int = 20,
                 max_tokens_per_micro_batch: int | None = None) -> None:
        if entropy not in ENTROPY_MODES:
            raise ValueError(f"entropy must be one of {ENTROPY_MODES}, got {entropy!r}")
        check_output_head(model)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.chunk_size = chunk_size
        self.topk_entropy = entropy == "topk"
        self.entropy_top_k = entropy_top_k

    @torch.no_grad()
    def score(self, rollout: Rollout, *, top_k: int, want_logits: bool, want_hidden: bool = False) -> TeacherScores:
        """Score every completion position (masked positions get harmless values).

        Args:
            rollout: The student's samples.
            top_k: Teacher top-k to keep.
            want_logits: Also return full ``[B, T, V]`` logits (exact baselines, plain path).
            want_hidden: Also return the final hidden states and the lm_head (exact baselines, fused path).
        """
        B, T = rollout.completion_ids_BT.shape
        home = rollout.completion_ids_BT.device  # the student's: the teacher may sit elsewhere
        # grouped and trimmed where the rollout lives; only each trimmed micro-batch travels to the teacher
        groups = micro_batches(rollout, torch.arange(B, device=home), size=self.micro_batch_size,
                               max_tokens=self.max_tokens_per_micro_batch)
        parts = []
        for g in groups:
            rows = rollout.select(g).trimmed()
            rows = rows if home == self.device else _moved(rows, self.device)
            parts.append(padded_scores(self._score_rows(rows, top_k, want_logits, want_hidden), T))
        scores = concat_scores(parts)
        order = torch.cat(groups)
        if not torch.equal(order, torch.arange(B, device=home)):
            scores = scores.select(torch.argsort(order).to(self.device))  # back to the rollout's row order
        if home == self.device:
            return scores
        head = None if scores.head is None else scores.head._replace(
            weight=scores.head.weight.to(home), bias=None if scores.head.bias is None else scores.head.bias.to(home))
        return dataclasses.replace(_moved(scores, home), head=head)

    def _score_rows(self, rollout: Rollout, top_k: int, want_logits: bool, want_hidden: bool) -> TeacherScores:
        tokens_BT = rollout.completion_ids_BT
        k = min(max(top_k, self.entropy_top_k), self.vocab_size) if self.topk_entropy else top_k
        logits_BTV = hidden_BTH = head_wb = None
        if want_logits:
            logits_BTV = completion_logits(self.model, rollout, self.vocab_size).float()
            scores = score_from_logits(logits_BTV, tokens_BT, top_k=k, temperature=self.temperature)
        else:
            head = output_head(self.model)
            hidden = completion_hidden_states(self.model, rollout)
            scores = score_chunked(hidden, head.weight, tokens_BT,
                                   top_k=k, temperature=self.temperature, chunk_size=self.chunk_size,
                                   vocab_size=self.vocab_size, bias=head.bias, softcap=head.softcap)
            if want_hidden:
                hidden_BTH, head_wb = hidden.to(head.weight.dtype), head
        if self.topk_entropy:
            out = topk_only_scores(scores.logp, scores.topk_ids, scores.topk_logprobs, top_k=top_k,
                                   vocab_size=self.vocab_size)
            return dataclasses.replace(out, logits_BTV=logits_BTV, hidden_BTH=hidden_BTH, head=head_wb)
        return TeacherScores(scores.logp.float(), scores.entropy.float(), scores.topk_ids,
                             scores.topk_logprobs.float(), logits_BTV, hidden_BTH, head_wb)
