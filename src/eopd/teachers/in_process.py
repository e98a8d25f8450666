"""The in-process teacher: a Hugging Face causal LM scoring rollouts in the trainer's own process.

Why this file exists: the default teacher (``models.teacher``) and the scorer behind ``eopd serve-teacher`` are
one class. One no-grad forward per micro-batch of rollout rows; by default only per-position summaries are kept
(the sampled token's log-prob, the full-vocabulary entropy and the top-k), computed chunk by chunk from the final
hidden states (``eopd.losses.scoring.score_chunked``) so no ``[B, T, V]`` tensor outlives one chunk. Full logits
are returned only for the exact full-vocabulary baselines that need them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from eopd.losses.scoring import score_chunked, score_from_logits
from eopd.sampling import (
    Rollout,
    check_output_head,
    completion_hidden_states,
    completion_logits,
    micro_batches,
    output_head,
)
from eopd.teachers.scores import ENTROPY_MODES, TeacherScores, concat_scores, padded_scores, topk_only_scores

Tensor = torch.Tensor


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
