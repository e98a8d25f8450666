"""``eopd eval``'s HF backend samples with the training engine, each problem from its own seeded stream: a
problem's completions are a function of the seed and its index alone (issue 19)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eopd.evaluation.backends import HFBackend
from eopd.models.char_tokenizer import build_char_tokenizer
from eopd.models.loading import build_tiny_qwen3
from eopd.tasks.arithmetic import ArithmeticConfig, ArithmeticTask


def test_a_problems_samples_depend_on_the_seed_and_its_index_alone() -> None:
    """The same completions for a problem whatever the batch size (so the blocks and the rows refilled beside
    it) and whatever other problems are evaluated with it, in any order."""
    tok = build_char_tokenizer()
    problems = ArithmeticTask(ArithmeticConfig(num_terms=3, test_size=10)).problems("test")[:6]
    model = build_tiny_qwen3(vocab_size=len(tok) + 3, seed=3, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, bos_token_id=None).eval()

    def completions(batch_size: int, indices: Sequence[int]) -> dict[int, list[tuple[str, int]]]:
        backend = HFBackend(model, tok, temperature=1.0, top_p=0.9, max_new_tokens=16, batch_size=batch_size,
                            generator=torch.Generator().manual_seed(0), use_chat_template=False)
        gens = backend.generate([problems[i].prompt for i in indices], n=3, indices=indices)
        return {i: [(g.text, g.num_tokens) for g in gs] for i, gs in zip(indices, gens, strict=True)}

    whole = completions(6, list(range(6)))  # 2 problems a block, 3 blocks
    assert completions(18, list(range(6))) == whole  # one block, 18 rows at once
    assert completions(3, [5, 1, 3]) == {i: whole[i] for i in (5, 1, 3)}  # a share, out of order, 3 rows at once
    assert len({text for texts in whole.values() for text, _ in texts}) > 6  # sampled, not one repeated text
