"""Models: loading Hugging Face causal LMs and tokenizers, and building the tiny ones this project trains here.

- ``loading``         ``load_causal_lm`` / ``load_tokenizer`` (safetensors only), devices, dtypes, vocab alignment,
                      tiny random Qwen3 builders
- ``char_tokenizer``  one id per character (the arithmetic worlds)
- ``math_tokenizer``  a Qwen3-style byte-level BPE trained here (the paper rehearsal)
"""

from eopd.models.char_tokenizer import DEFAULT_ALPHABET, build_char_tokenizer
from eopd.models.loading import (
    DamagedFileError,
    ModelLoadError,
    aligned_vocab_size,
    build_tiny_checkpoint,
    build_tiny_qwen3,
    build_tiny_tokenizer,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "DEFAULT_ALPHABET", "DamagedFileError", "ModelLoadError", "aligned_vocab_size", "build_char_tokenizer",
    "build_tiny_checkpoint", "build_tiny_qwen3", "build_tiny_tokenizer", "load_causal_lm", "load_tokenizer",
    "resolve_device", "resolve_dtype",
]
