"""Whether a teacher tokenizes like the run: the probe text and the one-line account of where two differ.

Why this file exists: distillation compares the teacher's and the student's distributions id by id, so every
teacher (served or in-process, one or several) must share the run's tokenizer; cross-tokenizer distillation is
another problem. A served teacher is asked to tokenize the probe (``POST /tokenize``), an in-process teacher's own
tokenizer is run on it: the same check either way, checked at start.
"""

from __future__ import annotations

from typing import Any

#: The fixed part of the tokenizer probe (the rest is decoded from ids spread over the vocabulary).
PROBE_PREFIX = "The teacher and the student share one tokenizer: 12+34=46; x_{n+1} = 2^n. "


def probe_text(tokenizer: Any, vocab_size: int, count: int = 64) -> str:
    """A fixed text plus ``count`` non-special ids spread over the whole vocabulary, decoded: two tokenizers
    that agree on it agree on ordinary text and on ids from every part of the vocabulary."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    step = max(1, vocab_size // count)
    ids = [i for i in range(0, vocab_size, step) if i not in special]
    return PROBE_PREFIX + tokenizer.decode(ids, skip_special_tokens=True)


def local_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids without special tokens (what ``POST /tokenize`` with ``add_special_tokens: false`` gives)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def difference(theirs: list[int], ours: list[int], who: str) -> str | None:
    """None when the two encodings of the probe agree, else where they first differ, e.g. ``"token 3: server 17,
    local 20; 40 vs 41 tokens"`` (``who`` names the first side)."""
    if theirs == ours:
        return None
    i = next((j for j, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs), len(ours)))
    at = lambda ids: ids[i] if i < len(ids) else "end"  # noqa: E731
    return f"token {i}: {who} {at(theirs)}, local {at(ours)}; {len(theirs)} vs {len(ours)} tokens"
