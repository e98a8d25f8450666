"""Prompt text -> token ids, and the ids that end a completion: one rule for training, evaluation and SFT.

The rule for special tokens: with a chat template, the template writes every special token itself, so its
text is tokenised with ``add_special_tokens=False``; without one, the tokenizer adds what it always adds
(e.g. a BOS), exactly as the model saw text in pre-training. Every caller (the distiller, ``eopd eval``,
``eopd sft``, the teacher server) goes through ``encode_prompts``, so a BOS-adding tokenizer sees the same
prompt ids in training and in evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eopd.errors import UserError


class PromptFormatError(UserError, ValueError):
    """A prompt cannot be formatted as asked (e.g. a chat template was required and the tokenizer has none)."""


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat_template(tokenizer: Any, use_chat_template: bool | str) -> bool:
    """``"auto"`` -> whether the tokenizer has a chat template; True without one is an error.

    Raises:
        PromptFormatError: a template was required and the tokenizer has none.
    """
    if use_chat_template == "auto":
        return has_chat_template(tokenizer)
    if use_chat_template and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise PromptFormatError(
            f"a chat template was required but {name!r} has none; turn the chat template off "
            "(data.chat_template=false / --chat-template off) or use a tokenizer that carries one"
        )
    return bool(use_chat_template)


def encode_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    chat_template: bool,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Token ids of each prompt text, as one user turn through the chat template when asked.

    Args:
        tokenizer: A Hugging Face tokenizer.
        texts: Prompt texts (before any template).
        chat_template: Wrap each text as ``[{"role": "user", "content": text}]`` with the generation prompt.
        template_kwargs: Extra keyword arguments of the template, e.g. ``{"enable_thinking": False}`` for
            Qwen3's non-thinking mode.

    Returns:
        One list of ids per text (no padding).

    Raises:
        PromptFormatError: ``chat_template`` is set and the tokenizer has none, or a text encodes to nothing.
    """
    if chat_template:
        resolve_chat_template(tokenizer, True)
        kwargs = dict(template_kwargs or {})
        formatted = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                   add_generation_prompt=True, **kwargs) for t in texts]
        ids = tokenizer(formatted, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(list(texts))["input_ids"] if texts else []
    out = [list(x) for x in ids]
    for text, x in zip(texts, out, strict=True):
        if not x:
            raise PromptFormatError(f"prompt {text[:60]!r} encodes to no tokens; every prompt needs at least one")
    return out


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's generation-config EOS ids.

    Chat models often end a turn with another token than the tokenizer's EOS (Qwen's ``<|im_end|>`` beside
    ``<|endoftext|>``), which ``generation_config.eos_token_id`` lists.

    Raises:
        ValueError: neither names an EOS token (completions could never end).
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    for e in extra if isinstance(extra, list | tuple) else [extra]:
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config names an EOS token; "
                         "completions could never end")
    return ids
