"""What ``sample`` refuses, in one line each, before any forward (so nothing is lost), and the KV memory limit.

Why its own file: the engine, its cache and the entry point all meet the same limits (a batch that cannot
hold one row, a budget of no tokens, a prompt longer than the model's context, a cache the device cannot hold);
each is a ``UserError`` the command line prints as one line naming what to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eopd.errors import UserError


class SamplingInputError(UserError, ValueError):
    """A ``sample`` argument that cannot work (budget, batch size, prompt length, uniforms): one line says which."""


class SamplingMemoryError(UserError, MemoryError):
    """The sampler's KV cache does not fit on the device: one line says how big it is and what to lower."""


def check_sampling_input(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids: Sequence[int],
    max_batch_size: int | None,
) -> None:
    """Raise ``SamplingInputError`` naming the first argument ``sample`` cannot work with (before any forward,
    so nothing is lost)."""
    if temperature <= 0:
        raise SamplingInputError(f"temperature must be > 0, got {temperature} (rollout.temperature)")
    if not eos_token_ids:
        raise SamplingInputError("eos_token_ids must name at least one token: the tokenizer has no EOS")
    if max_batch_size is not None and max_batch_size < 1:
        raise SamplingInputError(f"rollout.max_batch_size must be >= 1 (or unset), got {max_batch_size}: "
                                 "a batch must hold at least one row")
    if max_new_tokens < 1:
        raise SamplingInputError(f"the token budget (rollout.max_new_tokens / eval max_new_tokens) must be >= 1, "
                                 f"got {max_new_tokens}: a row must have room for one completion token")
    if n < 1:
        raise SamplingInputError(f"n (completions per prompt) must be >= 1, got {n}")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise SamplingInputError("every prompt must have at least one token (an empty prompt or no prompts given)")
    config = getattr(model, "config", None)
    context = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None) if config else None
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    if isinstance(context, int) and len(prompt_ids[longest]) >= context:
        raise SamplingInputError(
            f"prompt {longest} has {len(prompt_ids[longest])} tokens, and the model's context is {context} "
            "positions (config.max_position_embeddings): no room for a completion; shorten or drop that prompt")


def kv_memory_error(
    slots: int, columns: int, layer_bytes: int, layers_held: int, err: Exception
) -> SamplingMemoryError:
    """The one-line refusal of a KV cache of ``slots`` x ``columns`` whose next layer (``layer_bytes`` of keys and
    values) could not be allocated with ``layers_held`` layers already held."""
    return SamplingMemoryError(
        f"the sampler's KV cache of {slots} rows x {columns} positions does not fit on the device "
        f"({type(err).__name__} at layer {layers_held + 1}, {layer_bytes / 2**30:.2f} GiB a layer): lower "
        "rollout.max_batch_size (rows at once) or the token budget (rollout.max_new_tokens)")
