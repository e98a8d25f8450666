"""Model forwards over a rollout's sequences: hidden states, logits and entropy at the completion positions.

One home for "run a causal LM over prompt + completion and look at the positions that predict completion
tokens", shared by the learner (student loss), the teacher and the evaluation. Completion token ``t`` is
predicted by the model's output at sequence column ``P - 1 + t`` (``P`` = left-padded prompt width).
The chunked paths compute logits from the final hidden states with the model's own head transform
(``eopd.sampling.head.output_head``: the lm_head and Gemma 2's soft-cap), checked at start by ``eopd.sampling.head``.
"""

from __future__ import annotations

import torch

from eopd.losses.scoring import score_chunked
from eopd.sampling.head import output_head
from eopd.sampling.rollout import Rollout, position_ids_from_mask

Tensor = torch.Tensor


def _decoder_body(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack without the lm_head (``model.model`` of a ``*ForCausalLM``), or None when wrapped."""
    get = getattr(model, "get_decoder", None)
    if get is None:
        return None
    try:
        body = get()
    except (AttributeError, NotImplementedError):
        return None
    return None if body is None or body is model else body


def completion_hidden_states(model: torch.nn.Module, rollout: Rollout) -> Tensor:
    """Final (normed) hidden states that predict each completion token, ``[B, T, H]``.

    A plain Hugging Face model runs its decoder body only (no lm_head, and only the last layer's states
    are kept: ``output_hidden_states`` would hold every layer's until the call returns). A wrapped model
    (DDP) is called itself, so the wrapper sees the forward, with ``logits_to_keep=1``.
    """
    seq, attn = rollout.sequences_BL, rollout.attention_mask_BL
    P = rollout.prompt_len
    body = _decoder_body(model)
    if body is not None:
        out = body(input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False)
        return out.last_hidden_state[:, P - 1 : -1]
    out = model(input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1][:, P - 1 : -1]


def completion_logits(model: torch.nn.Module, rollout: Rollout, vocab_size: int) -> Tensor:
    """Full logits predicting each completion token, sliced to the aligned vocabulary, ``[B, T, V]``."""
    seq, attn = rollout.sequences_BL, rollout.attention_mask_BL
    out = model(input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False)
    P = rollout.prompt_len
    return out.logits[:, P - 1 : -1, :vocab_size]


def _rows_entropy_BT(
    model: torch.nn.Module, rollout: Rollout, temperature: float, vocab_size: int, max_chunk_elements: int
) -> Tensor:
    """``completion_entropy_BT`` for one group of rows (unmasked)."""
    head = output_head(model)
    hidden_BTH = completion_hidden_states(model, rollout)
    chunk = max(1, max_chunk_elements // min(vocab_size, head.weight.shape[0]))
    return score_chunked(hidden_BTH, head.weight, temperature=temperature, chunk_size=chunk,
                         vocab_size=vocab_size, bias=head.bias, softcap=head.softcap).entropy


@torch.no_grad()
def completion_entropy_BT(
    model: torch.nn.Module,
    rollout: Rollout,
    *,
    temperature: float,
    vocab_size: int,
    rows_per_forward: int = 8,
    max_chunk_elements: int = 1 << 26,
) -> Tensor:
    """The model's entropy (nats) at each completion position of a rollout, 0 where masked, ``[B, T]`` float32.

    Rows go through the model ``rows_per_forward`` at a time and the lm_head through the shared chunked
    scorer, at most ``max_chunk_elements`` logits at once, so a long rollout over a 150k-token vocabulary
    never materialises ``[B, T, V]``.

    Args:
        model: A causal LM (usually the one that sampled the rollout).
        rollout: Its samples.
        temperature: The entropy is of the temperature-scaled distribution.
        vocab_size: Tokenizer vocabulary; padded lm_head rows are excluded.
        rows_per_forward: Rows per forward pass.
        max_chunk_elements: Upper bound on logits held at once.
    """
    B = rollout.sequences_BL.shape[0]
    parts = [_rows_entropy_BT(model, rollout.select(slice(r, r + rows_per_forward)), temperature, vocab_size,
                              max_chunk_elements) for r in range(0, B, rows_per_forward)]
    return torch.cat(parts, dim=0).float() * rollout.completion_mask_BT
