"""Student sampling: batched autoregressive generation with a KV cache and an explicit generator.

Why our own loop instead of ``model.generate``: on-policy distillation needs (1) the sampler's own
log-probs at the sampled tokens (``logp_old``, the PPO reference), computed at exactly the temperature the
loss uses, (2) reproducibility from a ``torch.Generator`` the caller passes in (``generate`` draws from the
global RNG), and (3) a mask that ends at the first EOS whatever the pad id is.

Conventions: prompts are left-padded to a common length ``P``; completions are right-padded to ``T``;
``sequences_BL = [prompt_BP | completion_BT]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """A batch of sampled completions.

    Attributes:
        sequences_BL: Prompt (left-padded) followed by completion (right-padded), ``[B, P + T]``.
        attention_mask_BL: 1 on real prompt tokens and valid completion tokens, ``[B, P + T]``.
        prompt_len: ``P``, the padded prompt length; completion position t sits at column ``P + t``.
        completion_ids_BT: Sampled tokens, pad after the end, ``[B, T]``.
        completion_mask_BT: 1 up to and including the first EOS, 0 after (float32), ``[B, T]``.
        logp_old_BT: Sampler log-prob of each sampled token at the sampling temperature over the full
            (untruncated) vocabulary, float32, 0 where masked, ``[B, T]``.
        prompt_index_B: Which input prompt each row belongs to (each prompt repeated ``n`` times).
    """

    sequences_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    prompt_len: int
    completion_ids_BT: torch.Tensor
    completion_mask_BT: torch.Tensor
    logp_old_BT: torch.Tensor
    prompt_index_B: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Number of valid completion tokens."""
        return int(self.completion_mask_BT.sum().item())

    def lengths_B(self) -> torch.Tensor:
        """Valid completion length per row."""
        return self.completion_mask_BT.sum(dim=1)

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        """A sub-batch (used to split a rollout into minibatches)."""
        return Rollout(
            sequences_BL=self.sequences_BL[rows],
            attention_mask_BL=self.attention_mask_BL[rows],
            prompt_len=self.prompt_len,
            completion_ids_BT=self.completion_ids_BT[rows],
            completion_mask_BT=self.completion_mask_BT[rows],
            logp_old_BT=self.logp_old_BT[rows],
            prompt_index_B=self.prompt_index_B[rows],
        )


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids_BP, attention_mask_BP)``."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt must have at least one token")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def position_ids_from_mask(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def top_p_filter(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the smallest nucleus of mass >= top_p to -inf (always keeps the argmax)."""
    if top_p >= 1.0:
        return logits_BV
    sorted_logits, sorted_idx = torch.sort(logits_BV, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs
    remove_sorted = mass_before >= top_p
    remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
    return logits_BV.masked_fill(remove, float("-inf"))


def completion_mask_from_ids(
    completion_ids_BT: torch.Tensor, eos_token_ids: Sequence[int], started_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it (pad id is never consulted).

    Args:
        completion_ids_BT: Completion tokens.
        eos_token_ids: Ids that end a completion.
        started_BT: Optional extra validity mask (e.g. an attention mask); positions where it is 0 are
            masked too.
    """
    is_eos = torch.zeros_like(completion_ids_BT, dtype=torch.bool)
    for e in eos_token_ids:
        is_eos |= completion_ids_BT == e
    # number of EOS strictly before t == 0  <=> t is at or before the first EOS
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).float()
    if started_BT is not None:
        mask = mask * started_BT.float()
    return mask


def _cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` in transformers >= 5.2x, ``past_key_values`` before (the same object either way)."""
    forward = getattr(model, "forward", model)
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    generator: torch.Generator,
    vocab_size: int | None = None,
) -> Rollout:
    """Sample ``n`` completions per prompt with a KV cache.

    Args:
        model: A Hugging Face causal LM (called as ``model(input_ids, attention_mask, position_ids,
            past_key_values, use_cache=True)``).
        prompt_ids: Token ids of each prompt (no padding).
        n: Completions per prompt; rows are grouped prompt-major (``prompt_index_B = [0]*n + [1]*n + ...``).
        max_new_tokens: ``T``, the completion budget.
        temperature: Sampling temperature (> 0); ``logp_old`` is computed at this same temperature.
        top_p: Nucleus mass for sampling only (``logp_old`` stays the full-vocabulary log-prob).
        eos_token_ids: Ids that end a completion.
        pad_token_id: Filler after the end (may equal an EOS id).
        generator: Source of randomness; must live on the model's device.
        vocab_size: Tokenizer vocabulary; logits past it (padded lm_head rows) are never sampled.

    Returns:
        A ``Rollout`` on the model's device.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not eos_token_ids:
        raise ValueError("eos_token_ids must name at least one token")
    device = next(model.parameters()).device
    ids_BP, mask_BP = left_pad([p for p in prompt_ids for _ in range(n)], pad_token_id)
    ids_BP, mask_BP = ids_BP.to(device), mask_BP.to(device)
    B, P = ids_BP.shape
    prompt_index_B = torch.arange(len(prompt_ids), device=device).repeat_interleave(n)
    eos = torch.tensor(list(eos_token_ids), device=device)

    tokens: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    finished_B = torch.zeros(B, dtype=torch.bool, device=device)
    attn_BL = mask_BP
    input_ids = ids_BP
    position_ids = position_ids_from_mask(mask_BP)
    cache_kw = _cache_keyword(model)
    past = None
    for _ in range(max_new_tokens):
        out = model(
            input_ids=input_ids,
            attention_mask=attn_BL,
            position_ids=position_ids,
            use_cache=True,
            **{cache_kw: past},
        )
        past = getattr(out, cache_kw)
        logits_BV = out.logits[:, -1, :].float() / temperature
        if vocab_size is not None and logits_BV.shape[-1] > vocab_size:
            logits_BV[:, vocab_size:] = float("-inf")
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
        probs = torch.softmax(top_p_filter(logits_BV, top_p), dim=-1)
        next_B = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        next_B = torch.where(finished_B, torch.full_like(next_B, pad_token_id), next_B)
        tokens.append(next_B)
        logps.append(logp_BV.gather(-1, next_B[:, None]).squeeze(1))
        finished_B = finished_B | torch.isin(next_B, eos)
        if bool(finished_B.all()):
            break
        input_ids = next_B[:, None]
        position_ids = position_ids[:, -1:] + 1
        attn_BL = torch.cat([attn_BL, torch.ones((B, 1), dtype=attn_BL.dtype, device=device)], dim=1)

    completion_BT = torch.stack(tokens, dim=1)
    cmask_BT = completion_mask_from_ids(completion_BT, list(eos_token_ids))
    logp_old_BT = torch.stack(logps, dim=1) * cmask_BT
    return Rollout(
        sequences_BL=torch.cat([ids_BP, completion_BT], dim=1),
        attention_mask_BL=torch.cat([mask_BP, cmask_BT.long()], dim=1),
        prompt_len=P,
        completion_ids_BT=completion_BT,
        completion_mask_BT=cmask_BT,
        logp_old_BT=logp_old_BT,
        prompt_index_B=prompt_index_B,
    )


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Decode each row's valid completion tokens (EOS excluded via skip_special_tokens)."""
    out = []
    for ids_T, m_T in zip(rollout.completion_ids_BT.tolist(), rollout.completion_mask_BT.tolist(), strict=True):
        valid = [t for t, m in zip(ids_T, m_T, strict=True) if m > 0]
        out.append(tokenizer.decode(valid, skip_special_tokens=True))
    return out
