"""A Qwen3-style tokenizer trained here on math text, so the paper's recipe can be rehearsed with no model hub.

The paper distils Qwen3 models; a rehearsal of its recipe on a CPU needs tiny models whose tokenizer behaves
like Qwen3's where the training path can tell: a byte-level BPE (any text encodes, digits one by one), the
ChatML specials at the end of the vocabulary, no BOS, ``<|im_end|>`` ending an assistant turn beside
``<|endoftext|>`` (also the pad token), ``<think>`` / ``</think>`` as ordinary added tokens, and a chat template
with Qwen3's thinking switch: ``enable_thinking=False`` opens the assistant turn with an empty think block.
The vocabulary is trained with ``tokenizers`` on the problems of a math benchmark read through
``eopd.tasks`` (a few hundred merges, well under a second), and the result is an ordinary Hugging Face
tokenizer folder that ``AutoTokenizer.from_pretrained`` reloads without any ``eopd`` code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from eopd.config import MIN_VOCAB_SIZE  # bytes + specials + one merge, checked where the config is

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (END_OF_TEXT, IM_START, IM_END)
THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")
BYTE_ALPHABET_SIZE = 256

USER_HEADER = f"{IM_START}user\n"
ASSISTANT_HEADER = f"{IM_START}assistant\n"
EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"
NON_THINKING_OPENER = ASSISTANT_HEADER + EMPTY_THINK_BLOCK

# Qwen2/Qwen3's pre-tokenisation: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's template (Qwen/Qwen3-8B tokenizer_config.json) without tools and tool calls: a leading system turn,
# user turns, assistant turns (reasoning kept only after the last user turn, as Qwen3 does), and the
# generation prompt with the thinking switch.
CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_query_index = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'
                + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def train_math_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A Qwen3-style byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``.

    Args:
        texts: Training text (math problems).
        vocab_size: Ids in all, specials included; the BPE part (256 bytes + merges) comes first and the
            specials and think tokens last, as in Qwen3. Fewer when the text runs out of pairs to merge.

    Returns:
        The tokenizer: eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS, the Qwen3-style chat template.

    Raises:
        ValueError: ``vocab_size`` leaves no room for a single merge.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes, 5 specials, one merge), "
                         f"got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(THINK_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[], show_progress=False)
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=END_OF_TEXT, chat_template=CHAT_TEMPLATE,
        padding_side="right", model_max_length=32_768, clean_up_tokenization_spaces=False)


def build_math_tokenizer(sources: Sequence[str], vocab_size: int) -> Any:
    """``train_math_bpe`` on the prompts of math sources read by ``eopd.tasks.benchmarks.load_benchmark``
    (benchmark names such as ``math500``, ``.jsonl`` files, ``hf:`` datasets; their test split).

    Raises:
        DataError: a source is missing or malformed.
    """
    from eopd.tasks.benchmarks import load_benchmark

    texts = [p.prompt for source in sources for p in load_benchmark(source)]
    return train_math_bpe(texts, vocab_size)


def generation_eos_ids(tokenizer: Any) -> list[int]:
    """What a model built for ``tokenizer`` lists as ``generation_config.eos_token_id``: the tokenizer's EOS,
    then ``<|endoftext|>`` when the tokenizer has it beside (Qwen3's ``[<|im_end|>, <|endoftext|>]``)."""
    ids = [int(tokenizer.eos_token_id)]
    end_of_text = tokenizer.get_vocab().get(END_OF_TEXT)
    if end_of_text is not None and end_of_text not in ids:
        ids.append(int(end_of_text))
    return ids
