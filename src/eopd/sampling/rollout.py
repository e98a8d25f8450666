"""``sample``, the one entry point of sampling (the trainer, the teacher and evaluation call it), and ``Rollout``.

Why our own sampler instead of ``model.generate``: on-policy distillation needs (1) the sampler's own
log-probs at the sampled tokens (``logp_old``, the PPO reference), computed at exactly the temperature the
loss uses, (2) reproducibility from a ``torch.Generator`` the caller passes in (``generate`` draws from the
global RNG), and (3) a mask that ends at the first EOS whatever the pad id is. It samples from the model's own
logits (its forward, soft-cap included), so ``logp_old`` is the model's own log-prob; the learner's recompute
(``update.learner_logprobs``) reproduces it through ``eopd.sampling.head``'s head path.

Where the work happens: ``engine`` (continuous batching over ``slots``' KV cache: finished rows leave, waiting
rows take their slot), ``compiled`` (the optional compiled decode step), ``grouped`` (the loop for models the
slots cannot hold), ``draw`` (the per-row inverse-CDF draw every path shares). This file checks the input,
draws the uniforms, picks the path and assembles the ``Rollout``.

Conventions: prompts are left-padded to a common length ``P``; completions are right-padded to ``T``;
``sequences_BL = [prompt_BP | completion_BT]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eopd.sampling.compiled import compiled_step, warn_not_compiled
from eopd.sampling.draw import inverse_cdf_sample, top_p_filter
from eopd.sampling.engine import Engine, slots_serve
from eopd.sampling.grouped import sample_group
from eopd.sampling.limits import SamplingInputError, check_sampling_input
from eopd.sampling.padding import left_pad, position_ids_from_mask

__all__ = [
    "Rollout", "SamplingInputError", "check_sampling_input", "completion_mask_from_ids", "decode_completions",
    "inverse_cdf_sample", "left_pad", "position_ids_from_mask", "sample", "top_p_filter",
]

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
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    max_batch_size: int | None = None,
    compile: bool = False,
    uniform_BT: torch.Tensor | None = None,
) -> Rollout:
    """Sample ``n`` completions per prompt, at most ``max_batch_size`` rows at once, finished rows replaced at
    once by waiting ones (``engine``).

    Every row's uniforms (one per completion position) are drawn from ``generator`` before any forward (or
    given, ``uniform_BT``), and each row's token is the inverse-CDF draw of its own uniform
    (``draw.draw_tokens``), so the samples for a seed do not depend on ``max_batch_size``, on which rows
    shared a step, nor on ``compile`` (up to the last bits of float arithmetic, which move a token only when
    a uniform falls within ~1e-7 of a cumulative-probability boundary).

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
        generator: Source of the uniforms (``[B, T]``, drawn up front); may live on any device. Needed
            unless ``uniform_BT`` is given.
        vocab_size: Tokenizer vocabulary; logits past it (padded lm_head rows) are never sampled.
        max_batch_size: Rows decoded at once (None: all); bounds the KV cache.
        compile: Decode with the compiled step (``compiled``; falls back to eager with one warning line).
        uniform_BT: Each row's uniforms in [0, 1), ``[len(prompt_ids) * n, max_new_tokens]``, instead of
            drawing them from ``generator`` (evaluation gives each problem its own stream).

    Returns:
        A ``Rollout`` on the model's device, every row left-padded to the same prompt width ``P``.

    Raises:
        SamplingInputError: an argument that cannot work (one line, before any forward).
    """
    check_sampling_input(model, prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                         eos_token_ids=eos_token_ids, max_batch_size=max_batch_size)
    device = next(model.parameters()).device
    rows = [list(p) for p in prompt_ids for _ in range(n)]
    B, T = len(rows), max_new_tokens
    if uniform_BT is None:
        if generator is None:
            raise SamplingInputError("sample needs a generator (or uniform_BT)")
        uniform_BT = torch.rand((B, T), generator=generator, device=generator.device)
    elif tuple(uniform_BT.shape) != (B, T):
        raise SamplingInputError(f"uniform_BT must be [{B}, {T}] (rows x max_new_tokens), got "
                                 f"{list(uniform_BT.shape)}")
    uniform_BT = uniform_BT.to(device)
    eos_N = torch.tensor(list(eos_token_ids), device=device)
    size = min(max_batch_size or B, B)
    draw = {"temperature": temperature, "top_p": top_p, "vocab_size": vocab_size}
    ids_BP, mask_BP = (x.to(device) for x in left_pad(rows, pad_token_id))
    if slots_serve(model):
        step = compiled_step(model, size, ids_BP.shape[1], T) if compile else None
        engine = Engine(model, rows, uniform_BT, slots=size, eos_N=eos_N, pad_token_id=pad_token_id,
                        cache=step.cache if step else None, step=step, **draw)
        tokens_BT, logp_BT, longest = engine.run()
    else:
        if compile:
            warn_not_compiled(model)
        tokens_BT = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
        logp_BT = torch.zeros((B, T), dtype=torch.float32, device=device)
        longest = 0
        for s in range(0, B, size):
            g = slice(s, s + size)
            tokens, logp = sample_group(model, ids_BP[g], mask_BP[g], uniform_BT[g], eos_N=eos_N,
                                        pad_token_id=pad_token_id, **draw)
            tokens_BT[g, : tokens.shape[1]], logp_BT[g, : logp.shape[1]] = tokens, logp
            longest = max(longest, tokens.shape[1])
    completion_BT = tokens_BT[:, :longest]
    cmask_BT = completion_mask_from_ids(completion_BT, list(eos_token_ids))
    return Rollout(
        sequences_BL=torch.cat([ids_BP, completion_BT], dim=1),
        attention_mask_BL=torch.cat([mask_BP, cmask_BT.long()], dim=1),
        prompt_len=ids_BP.shape[1],
        completion_ids_BT=completion_BT,
        completion_mask_BT=cmask_BT,
        logp_old_BT=logp_BT[:, :longest] * cmask_BT,
        prompt_index_B=torch.arange(len(prompt_ids), device=device).repeat_interleave(n),
    )


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Decode each row's valid completion tokens (EOS excluded via skip_special_tokens)."""
    out = []
    for ids_T, m_T in zip(rollout.completion_ids_BT.tolist(), rollout.completion_mask_BT.tolist(), strict=True):
        valid = [t for t, m in zip(ids_T, m_T, strict=True) if m > 0]
        out.append(tokenizer.decode(valid, skip_special_tokens=True))
    return out
