"""The character-level tokenizer: round trips, specials, save/load through AutoTokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eopd.models.char_tokenizer import DEFAULT_ALPHABET, alphabet_of, build_char_tokenizer


def test_round_trip_one_token_per_character() -> None:
    tok = build_char_tokenizer()
    text = "7+3+5+2=7+3=10,10+5=15,15+2=17;17"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert len(set(tok.encode(DEFAULT_ALPHABET, add_special_tokens=False))) == len(DEFAULT_ALPHABET)


def test_specials_are_distinct_and_not_added_to_prompts() -> None:
    tok = build_char_tokenizer()
    assert len(tok) == 3 + len(DEFAULT_ALPHABET)
    assert len({tok.pad_token_id, tok.eos_token_id, tok.unk_token_id}) == 3
    assert tok.encode("1+2=") == tok.encode("1+2=", add_special_tokens=False)
    ids = [*tok.encode("12", add_special_tokens=False), tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "12"
    assert tok.encode("1x", add_special_tokens=False)[1] == tok.unk_token_id


def test_save_and_load_with_auto_tokenizer(tmp_path: Path) -> None:
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "9+9+9+9=9+9=18,18+9=27,27+9=36;36"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text


def test_custom_alphabet_and_errors() -> None:
    alphabet = alphabet_of(["a*b", "c-d"])
    assert alphabet == "*-abcd"
    tok = build_char_tokenizer(alphabet)
    assert tok.decode(tok.encode("a*b-c", add_special_tokens=False)) == "a*b-c"
    with pytest.raises(ValueError, match="repeats"):
        build_char_tokenizer("0120")
    with pytest.raises(ValueError, match="empty"):
        build_char_tokenizer("")
    with pytest.raises(ValueError, match="whitespace"):
        build_char_tokenizer("0 1")
