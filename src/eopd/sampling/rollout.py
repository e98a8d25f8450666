"""Student sampling: batched autoregressive generation with a KV cache and an explicit generator.

Why our own loop instead of ``model.generate``: on-policy distillation needs (1) the sampler's own
log-probs at the sampled tokens (``logp_old``, the PPO reference), computed at exactly the temperature the
loss uses, (2) reproducibility from a ``torch.Generator`` the caller passes in (``generate`` draws from the
global RNG), and (3) a mask that ends at the first EOS whatever the pad id is. It samples from the model's own
logits (its forward, soft-cap included), so ``logp_old`` is the model's own log-prob; the learner's recompute
(``update.learner_logprobs``) reproduces it through ``eopd.sampling.head``'s head path.

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

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in all of them: leading prompt columns no row
        uses and completion columns past the longest valid completion (at least one is kept). Positions come
        from the attention mask, so every valid position sees the same inputs."""
        P = self.prompt_len
        left = int(self.attention_mask_BL[:, :P].any(0).long().argmax())  # every prompt has a token
        T = max(int(self.completion_mask_BT.sum(1).max()), 1)
        return Rollout(
            sequences_BL=self.sequences_BL[:, left : P + T],
            attention_mask_BL=self.attention_mask_BL[:, left : P + T],
            prompt_len=P - left,
            completion_ids_BT=self.completion_ids_BT[:, :T],
            completion_mask_BT=self.completion_mask_BT[:, :T],
            logp_old_BT=self.logp_old_BT[:, :T],
            prompt_index_B=self.prompt_index_B,
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


def _forward_params(model: torch.nn.Module) -> set[str]:
    """Named parameters of the forward that does the work (a ``PeftModel`` forwards ``**kwargs`` to its base)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return set(inspect.signature(getattr(base, "forward", base)).parameters)


def _cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` in transformers >= 5.2x, ``past_key_values`` before (the same object either way)."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def inverse_cdf_sample(probs_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """Token ids drawn from ``probs_BV`` (rows need not be normalised) with the given uniforms in [0, 1).

    Why not ``torch.multinomial``: its draws depend on which rows share the call, so the same seed would give
    other samples when the batch is split (``rollout.max_batch_size``); here row b's token is a function of its
    own probabilities and ``uniform_B[b]`` alone. The cumulative sum is float64 (a float32 sum over 151,936
    entries drifts by ~1e-5), and ``right=True`` never picks a zero-probability id.
    """
    cdf_BV = probs_BV.double().cumsum(-1)
    target_B1 = uniform_B.double()[:, None] * cdf_BV[:, -1:]
    return torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(1).clamp_max(probs_BV.shape[-1] - 1)


def _sample_rows(
    model: torch.nn.Module,
    ids_BP: torch.Tensor,
    mask_BP: torch.Tensor,
    uniform_BT: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    eos: torch.Tensor,
    pad_token_id: int,
    vocab_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample completions of one group of rows; returns ``(tokens_BT, logp_BT)`` with ``T`` <= the budget (the
    loop stops when every row has ended)."""
    B = ids_BP.shape[0]
    cache_kw = _cache_keyword(model)
    # the prompt's prefill only needs the last position's logits (not [B, P, V])
    keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
    tokens: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    finished_B = torch.zeros(B, dtype=torch.bool, device=ids_BP.device)
    attn_BL, input_ids, position_ids, past = mask_BP, ids_BP, position_ids_from_mask(mask_BP), None
    for t in range(uniform_BT.shape[1]):
        out = model(input_ids=input_ids, attention_mask=attn_BL, position_ids=position_ids, use_cache=True,
                    **keep, **{cache_kw: past})
        past = getattr(out, cache_kw)
        logits_BV = out.logits[:, -1, :].float() / temperature
        if vocab_size is not None and logits_BV.shape[-1] > vocab_size:
            logits_BV[:, vocab_size:] = float("-inf")
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
        probs_BV = logp_BV.exp() if top_p >= 1.0 else torch.softmax(top_p_filter(logits_BV, top_p), dim=-1)
        next_B = inverse_cdf_sample(probs_BV, uniform_BT[:, t])
        next_B = torch.where(finished_B, torch.full_like(next_B, pad_token_id), next_B)
        tokens.append(next_B)
        logps.append(logp_BV.gather(-1, next_B[:, None]).squeeze(1))
        finished_B = finished_B | torch.isin(next_B, eos)
        if bool(finished_B.all()):
            break
        input_ids = next_B[:, None]
        position_ids = position_ids[:, -1:] + 1
        attn_BL = torch.cat([attn_BL, torch.ones((B, 1), dtype=attn_BL.dtype, device=attn_BL.device)], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def _pad_columns(x_BT: torch.Tensor, width: int, value: float) -> torch.Tensor:
    """``x_BT`` right-padded with ``value`` to ``width`` columns."""
    return torch.nn.functional.pad(x_BT, (0, width - x_BT.shape[1]), value=value)


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
    max_batch_size: int | None = None,
) -> Rollout:
    """Sample ``n`` completions per prompt with a KV cache, at most ``max_batch_size`` sequences at once.

    Every row's uniforms (one per completion position) are drawn from ``generator`` before any forward, and
    each row is sampled from them by inverse CDF (``inverse_cdf_sample``), so the samples for a seed do not
    depend on ``max_batch_size``: it only bounds the KV cache (rows x (prompt + completion) x layers).

    Args:
        model: A Hugging Face causal LM (called as ``model(input_ids, attention_mask, position_ids,
            cache, use_cache=True)``).
        prompt_ids: Token ids of each prompt (no padding).
        n: Completions per prompt; rows are grouped prompt-major (``prompt_index_B = [0]*n + [1]*n + ...``).
        max_new_tokens: ``T``, the completion budget.
        temperature: Sampling temperature (> 0); ``logp_old`` is computed at this same temperature.
        top_p: Nucleus mass for sampling only (``logp_old`` stays the full-vocabulary log-prob).
        eos_token_ids: Ids that end a completion.
        pad_token_id: Filler after the end (may equal an EOS id).
        generator: Source of randomness; must live on the model's device.
        vocab_size: Tokenizer vocabulary; logits past it (padded lm_head rows) are never sampled.
        max_batch_size: Rows per generation pass (None: all at once).

    Returns:
        A ``Rollout`` on the model's device; every group is left-padded to the same prompt width ``P``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not eos_token_ids:
        raise ValueError("eos_token_ids must name at least one token")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    device = next(model.parameters()).device
    ids_BP, mask_BP = left_pad([p for p in prompt_ids for _ in range(n)], pad_token_id)
    ids_BP, mask_BP = ids_BP.to(device), mask_BP.to(device)
    B, P = ids_BP.shape
    prompt_index_B = torch.arange(len(prompt_ids), device=device).repeat_interleave(n)
    eos = torch.tensor(list(eos_token_ids), device=device)
    uniform_BT = torch.rand((B, max_new_tokens), generator=generator, device=generator.device).to(device)
    size = max_batch_size or B
    parts = [_sample_rows(model, ids_BP[s : s + size], mask_BP[s : s + size], uniform_BT[s : s + size],
                          temperature=temperature, top_p=top_p, eos=eos, pad_token_id=pad_token_id,
                          vocab_size=vocab_size) for s in range(0, B, size)]
    T = max(tokens.shape[1] for tokens, _ in parts)
    completion_BT = torch.cat([_pad_columns(tokens, T, pad_token_id) for tokens, _ in parts])
    cmask_BT = completion_mask_from_ids(completion_BT, list(eos_token_ids))
    logp_old_BT = torch.cat([_pad_columns(logp, T, 0.0) for _, logp in parts]) * cmask_BT
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
