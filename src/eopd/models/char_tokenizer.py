"""A character-level tokenizer for the embedded tasks, built with ``tokenizers`` and saved like any HF one.

Why character level: the embedded arithmetic world writes digits, ``+ = , ;`` and nothing else, so one
token per character keeps the vocabulary tiny (17 ids by default), makes every token's role (an
order-choice digit, a sum digit, a separator) readable straight off the completion text, and lets the
trained models be ordinary Hugging Face folders (``tokenizer.json`` + ``tokenizer_config.json`` next to
``config.json`` / ``model.safetensors``) that ``AutoTokenizer.from_pretrained`` reloads without any
``eopd`` code.

Special tokens: ``<pad>`` (id 0) is separate from ``<eos>`` (id 1) so padding can never be mistaken for
an end of completion; ``<unk>`` (id 2) receives any character outside the alphabet. No BOS is added: a
prompt's ids are exactly its characters' ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
DEFAULT_ALPHABET = "0123456789+=,;"


def alphabet_of(texts: Iterable[str]) -> str:
    """The sorted set of characters used by ``texts`` (to build a tokenizer for any task's traces)."""
    return "".join(sorted(set("".join(texts))))


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` over ``alphabet`` with pad/eos/unk specials.

    Args:
        alphabet: The characters that get their own id, in id order after the specials (ids 3, 4, ...).
            Duplicates are an error so the id assignment is unambiguous.

    Returns:
        A fast tokenizer; ``len(tok) == 3 + len(alphabet)``. ``tok.decode(tok.encode(s)) == s`` for any
        ``s`` over the alphabet. Save it with ``save_pretrained`` and reload with
        ``AutoTokenizer.from_pretrained``.

    Raises:
        ValueError: the alphabet is empty, repeats a character, or contains whitespace (a character
            tokenizer must round-trip exactly; whitespace would be ambiguous in decoding).
    """
    if not alphabet:
        raise ValueError("alphabet is empty; pass the characters the task's prompts and completions use")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"alphabet repeats {''.join(repeated)!r}; list each character once")
    if any(c.isspace() for c in alphabet):
        raise ValueError("alphabet contains whitespace; the character tokenizer only supports visible characters")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(alphabet)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # every single character is its own pre-token, so WordLevel maps it straight to its id
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
