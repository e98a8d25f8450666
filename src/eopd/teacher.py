"""Teacher scoring: what the objective needs from the teacher at every completion position.

One no-grad forward per micro-batch of rollout rows. By default only per-position summaries are kept —
the sampled token's log-prob, the full-vocabulary entropy and the top-k ids/log-probs — computed chunk by
chunk from the final hidden states so no ``[B, T, V]`` tensor outlives one chunk. Full logits are returned
only for the exact full-vocabulary baselines that need them.

``Teacher`` is a small protocol so a served teacher (vLLM, an HTTP endpoint returning top-k log-probs) can
replace ``HFTeacher`` later without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from eopd.losses import divergences as D
from eopd.rollout import Rollout, position_ids_from_mask

Tensor = torch.Tensor


@dataclass
class TeacherScores:
    """Per completion position ``[B, T]`` (``K`` = top-k, ``V`` = aligned vocabulary), float32.

    Attributes:
        logp_BT: Teacher log-prob of the sampled token.
        entropy_BT: Teacher full-vocabulary entropy (nats).
        topk_ids_BTK: Teacher top-k ids (None when not requested).
        topk_logprobs_BTK: Their log-probs.
        logits_BTV: Full teacher logits (only for exact baselines).
    """

    logp_BT: Tensor
    entropy_BT: Tensor
    topk_ids_BTK: Tensor | None = None
    topk_logprobs_BTK: Tensor | None = None
    logits_BTV: Tensor | None = None

    def select(self, rows: Tensor | slice) -> TeacherScores:
        """The scores of some rollout rows."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return TeacherScores(pick(self.logp_BT), pick(self.entropy_BT), pick(self.topk_ids_BTK),
                             pick(self.topk_logprobs_BTK), pick(self.logits_BTV))


class Teacher(Protocol):
    """Anything that scores a rollout."""

    def score(self, rollout: Rollout, *, top_k: int, want_logits: bool) -> TeacherScores:
        """Scores of every completion position of ``rollout``."""
        ...


def completion_hidden_states(model: torch.nn.Module, rollout: Rollout) -> Tensor:
    """Final (normed) hidden states that predict each completion token, ``[B, T, H]``.

    Calls the model itself (so DDP/FSDP wrappers see the forward) with ``logits_to_keep=1``: the lm_head is
    applied to one position only, and the loss applies it chunk by chunk.
    """
    seq, attn = rollout.sequences_BL, rollout.attention_mask_BL
    out = model(input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    P = rollout.prompt_len
    return out.hidden_states[-1][:, P - 1 : -1]


def completion_logits(model: torch.nn.Module, rollout: Rollout, vocab_size: int) -> Tensor:
    """Full logits predicting each completion token, sliced to the aligned vocabulary, ``[B, T, V]``."""
    seq, attn = rollout.sequences_BL, rollout.attention_mask_BL
    out = model(input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False)
    P = rollout.prompt_len
    return out.logits[:, P - 1 : -1, :vocab_size]


def summarize_logits(
    logits_NV: Tensor, tokens_N: Tensor, top_k: int, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sampled log-prob ``[N]``, entropy ``[N]``, top-k ids ``[N, K]``, top-k log-probs ``[N, K]``)."""
    logp_NV = D.log_probs(logits_NV, temperature)
    p_NV = logp_NV.exp()
    entropy_N = -(p_NV * logp_NV.masked_fill(p_NV == 0, 0.0)).sum(-1)
    top_lp_NK, top_ids_NK = logp_NV.topk(top_k, dim=-1)
    return logp_NV.gather(-1, tokens_N[:, None]).squeeze(1), entropy_N, top_ids_NK, top_lp_NK


@torch.no_grad()
def score_hidden_chunked(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    tokens_N: Tensor,
    *,
    top_k: int,
    temperature: float,
    chunk_size: int = 1024,
    bias_V: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Teacher summaries from hidden states, ``chunk_size`` positions at a time (peak ``chunk x V``).

    Args:
        hidden_NH: Final hidden states of the positions to score.
        weight_VH: lm_head weight, already sliced to the aligned vocabulary.
        tokens_N: Sampled tokens.
        top_k: How many top ids to keep.
        temperature: Divides the logits.
        chunk_size: Positions per chunk.
        bias_V: lm_head bias if any.
    """
    outs = []
    for s in range(0, hidden_NH.shape[0], chunk_size):
        logits = hidden_NH[s : s + chunk_size] @ weight_VH.T
        if bias_V is not None:
            logits = logits + bias_V
        outs.append(summarize_logits(logits, tokens_N[s : s + chunk_size], top_k, temperature))
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))  # type: ignore[return-value]


class HFTeacher:
    """A Hugging Face causal LM as teacher.

    Args:
        model: The teacher (eval mode, no grad).
        vocab_size: Aligned vocabulary (the tokenizer's); padded lm_head rows are dropped.
        temperature: Same as sampling.
        micro_batch_size: Rollout rows per forward.
        chunk_size: Positions per lm_head chunk.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, temperature: float, micro_batch_size: int = 8,
                 chunk_size: int = 1024) -> None:
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.chunk_size = chunk_size

    @torch.no_grad()
    def score(self, rollout: Rollout, *, top_k: int, want_logits: bool) -> TeacherScores:
        """Score every completion position (masked positions get harmless values)."""
        parts: list[TeacherScores] = []
        B = rollout.completion_ids_BT.shape[0]
        for s in range(0, B, self.micro_batch_size):
            parts.append(self._score_rows(rollout.select(slice(s, s + self.micro_batch_size)), top_k, want_logits))
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        return TeacherScores(*(cat([getattr(p, f) for p in parts]) for f in TeacherScores.__dataclass_fields__))

    def _score_rows(self, rollout: Rollout, top_k: int, want_logits: bool) -> TeacherScores:
        tokens_BT = rollout.completion_ids_BT
        b, t = tokens_BT.shape
        if want_logits:
            logits_BTV = completion_logits(self.model, rollout, self.vocab_size).float()
            lp, ent, ids, tlp = summarize_logits(logits_BTV.reshape(b * t, -1), tokens_BT.reshape(-1), top_k,
                                                 self.temperature)
        else:
            logits_BTV = None
            hidden_NH = completion_hidden_states(self.model, rollout).reshape(b * t, -1)
            head = self.model.get_output_embeddings()
            bias = None if head.bias is None else head.bias[: self.vocab_size]
            lp, ent, ids, tlp = score_hidden_chunked(
                hidden_NH, head.weight[: self.vocab_size], tokens_BT.reshape(-1), top_k=top_k,
                temperature=self.temperature, chunk_size=self.chunk_size, bias_V=bias)
        return TeacherScores(lp.view(b, t).float(), ent.view(b, t).float(), ids.view(b, t, -1),
                             tlp.view(b, t, -1).float(), logits_BTV)
