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

from dataclasses import dataclass
from typing import Protocol

import torch

from eopd.errors import UserError
from eopd.forward import completion_hidden_states, completion_logits
from eopd.losses.scoring import score_chunked, score_from_logits
from eopd.rollout import Rollout

Tensor = torch.Tensor


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
        head: The teacher's lm_head ``(weight [V_rows, H], bias [V_rows] or None)`` that goes with
            ``hidden_BTH`` (references to the model's parameters, not copies).
    """

    logp_BT: Tensor
    entropy_BT: Tensor
    topk_ids_BTK: Tensor | None = None
    topk_logprobs_BTK: Tensor | None = None
    logits_BTV: Tensor | None = None
    hidden_BTH: Tensor | None = None
    head: tuple[Tensor, Tensor | None] | None = None

    def select(self, rows: Tensor | slice) -> TeacherScores:
        """The scores of some rollout rows."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return TeacherScores(pick(self.logp_BT), pick(self.entropy_BT), pick(self.topk_ids_BTK),
                             pick(self.topk_logprobs_BTK), pick(self.logits_BTV), pick(self.hidden_BTH), self.head)


def concat_scores(parts: list[TeacherScores]) -> TeacherScores:
    """Scores of consecutive row blocks joined along the rows (the head is shared)."""
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return TeacherScores(*(cat([getattr(p, f) for p in parts]) for f in TeacherScores.__dataclass_fields__
                           if f != "head"), head=parts[0].head)


class TeacherUnavailableError(UserError):
    """The teacher could not score a rollout (a server that stays down, a response that does not match the
    request); nothing is trained on partial scores, and the trainer checkpoints the last complete step."""


class Teacher(Protocol):
    """Anything that scores a rollout."""

    def score(self, rollout: Rollout, *, top_k: int, want_logits: bool, want_hidden: bool = False) -> TeacherScores:
        """Scores of every completion position of ``rollout`` (full logits / hidden states when asked)."""
        ...


class HFTeacher:
    """A Hugging Face causal LM as teacher.

    Args:
        model: The teacher (eval mode, no grad).
        vocab_size: Aligned vocabulary (the tokenizer's); padded lm_head rows are dropped.
        temperature: Same as sampling.
        micro_batch_size: Rollout rows per forward.
        chunk_size: Positions per lm_head chunk (None: the scorer's memory-budget default).
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, temperature: float, micro_batch_size: int = 8,
                 chunk_size: int | None = None) -> None:
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.chunk_size = chunk_size

    @torch.no_grad()
    def score(self, rollout: Rollout, *, top_k: int, want_logits: bool, want_hidden: bool = False) -> TeacherScores:
        """Score every completion position (masked positions get harmless values).

        Args:
            rollout: The student's samples.
            top_k: Teacher top-k to keep.
            want_logits: Also return full ``[B, T, V]`` logits (exact baselines, plain path).
            want_hidden: Also return the final hidden states and the lm_head (exact baselines, fused path).
        """
        B = rollout.completion_ids_BT.shape[0]
        return concat_scores([self._score_rows(rollout.select(slice(s, s + self.micro_batch_size)), top_k,
                                               want_logits, want_hidden)
                              for s in range(0, B, self.micro_batch_size)])

    def _score_rows(self, rollout: Rollout, top_k: int, want_logits: bool, want_hidden: bool) -> TeacherScores:
        tokens_BT = rollout.completion_ids_BT
        logits_BTV = hidden_BTH = head_wb = None
        if want_logits:
            logits_BTV = completion_logits(self.model, rollout, self.vocab_size).float()
            scores = score_from_logits(logits_BTV, tokens_BT, top_k=top_k, temperature=self.temperature)
        else:
            lm_head = self.model.get_output_embeddings()
            hidden = completion_hidden_states(self.model, rollout)
            scores = score_chunked(hidden, lm_head.weight, tokens_BT,
                                   top_k=top_k, temperature=self.temperature, chunk_size=self.chunk_size,
                                   vocab_size=self.vocab_size, bias=lm_head.bias)
            if want_hidden:
                hidden_BTH, head_wb = hidden.to(lm_head.weight.dtype), (lm_head.weight, lm_head.bias)
        return TeacherScores(scores.logp.float(), scores.entropy.float(), scores.topk_ids,
                             scores.topk_logprobs.float(), logits_BTV, hidden_BTH, head_wb)
