"""Qwen3's shapes, as the benchmarks build random models of them (``config.json`` of the Hugging Face releases).

Why a file of its own: the device check, the sampler benchmark and the served-traffic benchmark all build models
of these shapes; one home keeps their numbers from drifting apart. Run as scripts, the benchmarks import it from
their own folder (``python benchmarks/NAME.py`` puts ``benchmarks/`` first on the path).
"""

from __future__ import annotations

from dataclasses import dataclass

#: lm_head rows of every Qwen3 (the embedding is padded past the tokenizer).
QWEN3_ROWS = 151_936
#: Tokens of Qwen3's tokenizer: the rows past it are padding, never sampled.
QWEN3_TOKENIZER = 151_669


@dataclass(frozen=True)
class Shape:
    """A Qwen3-style model's shape and its tokenizer's vocabulary (lm_head rows past ``vocab`` are padding)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rows: int
    vocab: int


QWEN3_0_6B = Shape(1024, 28, 16, 8, 128, 3072, QWEN3_ROWS, QWEN3_TOKENIZER)
QWEN3_1_7B = Shape(2048, 28, 16, 8, 128, 6144, QWEN3_ROWS, QWEN3_TOKENIZER)
