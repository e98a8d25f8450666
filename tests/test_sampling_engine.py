"""The sampling engine (issue 19): finished rows leave, freed slots are refilled at once, the cache shifts and
grows, the compiled step and the fallback loop draw what the eager engine draws, and bad input is one line."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import eopd.sampling.compiled as compiled
import eopd.sampling.engine as engine
import eopd.sampling.rollout as rollout_module
from eopd.errors import UserError
from eopd.models.loading import build_tiny_qwen3
from eopd.sampling.limits import SamplingInputError, SamplingMemoryError
from eopd.sampling.rollout import position_ids_from_mask, sample
from eopd.sampling.slots import SlotCache

EOS, PAD = 1, 0
PROMPTS = [[3, 4, 5], [6, 2], [7, 8], [2, 9, 10, 11], [12, 13], [5, 5, 5, 5, 5]]


class FixedEos(torch.nn.Module):
    """The lm_head with EOS at a constant probability ``p`` (temperature 1): geometric completion lengths."""

    def __init__(self, head: torch.nn.Module, p: float) -> None:
        super().__init__()
        self.head, self.offset = head, math.log(p / (1 - p))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        others = logits.float().clone()
        others[..., EOS] = float("-inf")
        logits = logits.clone()
        logits[..., EOS] = (torch.logsumexp(others, -1) + self.offset).to(logits.dtype)
        return logits


def eos_model(p: float = 0.2, **config: object) -> torch.nn.Module:
    """A tiny random Qwen3 whose rows end with probability ``p`` per token (so their lengths differ a lot)."""
    model = build_tiny_qwen3(vocab_size=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=3,
                             initializer_range=0.2, tie_word_embeddings=False, **config).eval()
    model.lm_head = FixedEos(model.lm_head, p)
    return model


def run(model: torch.nn.Module, seed: int = 0, n: int = 2, T: int = 24, **kw: object):
    return sample(model, PROMPTS, n=n, max_new_tokens=T, eos_token_ids=[EOS], pad_token_id=PAD,
                  generator=torch.Generator().manual_seed(seed), **kw)


def record_forwards(model: torch.nn.Module) -> list[tuple[int, int]]:
    """``(rows, tokens per row)`` of every forward of ``model`` from now on."""
    calls: list[tuple[int, int]] = []
    model.register_forward_pre_hook(lambda m, args, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    return calls


def assert_same_samples(a, b) -> None:
    assert torch.equal(a.completion_ids_BT, b.completion_ids_BT)
    assert torch.equal(a.completion_mask_BT, b.completion_mask_BT) and torch.equal(a.sequences_BL, b.sequences_BL)
    torch.testing.assert_close(a.logp_old_BT, b.logp_old_BT, atol=1e-5, rtol=1e-5)


def test_finished_rows_leave_the_batch():
    """With every row at once, each decode step computes only the rows that have not ended: the rows summed
    over decode forwards are each row's length minus its first token (drawn from the prefill)."""
    model = eos_model()
    calls = record_forwards(model)
    r = run(model)
    lengths = r.lengths_B().long().tolist()
    assert len(set(lengths)) > 3  # long-tailed, not degenerate
    decode_rows = sum(rows for rows, width in calls[1:])
    assert calls[0][0] == len(lengths) and all(width == 1 for _, width in calls[1:])
    assert decode_rows == sum(L - 1 for L in lengths), (decode_rows, lengths)


def test_a_freed_slot_is_refilled_at_once():
    """With more rows than slots, every decode step runs full slots until the last waiting row has joined, each
    row is prefilled once, and compute still follows the live rows; the samples are those of one pass."""
    model = eos_model()
    whole = run(model)
    calls = record_forwards(model)
    r = run(model, max_batch_size=3)
    assert_same_samples(r, whole)
    prefills = [i for i, (rows, width) in enumerate(calls) if width > 1]  # every prompt has >= 2 tokens
    assert sum(calls[i][0] for i in prefills) == len(PROMPTS) * 2 and len(prefills) > 4
    assert all(rows == 3 for rows, width in calls[: prefills[-1]] if width == 1)
    decode_rows = sum(rows for rows, width in calls if width == 1)
    assert decode_rows == sum(L - 1 for L in r.lengths_B().long().tolist())


@pytest.mark.parametrize("size", [1, 2, 5])
def test_samples_do_not_depend_on_slots_with_top_p_and_a_vocabulary_cut(size: int):
    """Top-p sampling, padded lm_head rows cut, rows leaving and refilled: the same tokens and log-probs for a
    seed whatever the slots, no padded row ever drawn."""
    model = eos_model(p=0.1)
    kw = dict(top_p=0.8, temperature=0.9, vocab_size=13, n=3, T=16)
    whole = run(model, **kw)
    assert_same_samples(run(model, max_batch_size=size, **kw), whole)
    assert int(whole.completion_ids_BT.max()) < 13 and len({tuple(x) for x in whole.completion_ids_BT.tolist()}) > 5


def test_the_cache_shifts_and_grows_without_changing_the_samples(monkeypatch):
    """Many rows through two slots run the write column past the cache's columns: it grows (from a small start)
    and then shifts the live columns left, and the samples stay those of one pass."""
    model = eos_model(p=0.06)
    whole = run(model, n=4, T=30)
    events: list[str] = []
    for name in ("grow", "shift_left"):
        original = getattr(SlotCache, name)
        monkeypatch.setattr(SlotCache, name, lambda self, *a, _o=original, _n=name: (events.append(_n), _o(self, *a)))
    monkeypatch.setattr(engine, "GROW_FROM", 4)
    assert_same_samples(run(model, n=4, T=30, max_batch_size=2), whole)
    assert "grow" in events and "shift_left" in events, events


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_fallback_loop_draws_what_the_engine_draws(monkeypatch, attention: str):
    """A model the slots cannot hold samples in transformers' own cache, groups of rows that leave as they end:
    the very tokens and log-probs the engine gives (its boolean mask for sdpa, its additive one for eager
    attention)."""
    model = eos_model(attn_implementation=attention)
    assert model.config._attn_implementation == attention
    slots = run(model, max_batch_size=4)
    monkeypatch.setattr(rollout_module, "slots_serve", lambda m: False)
    calls = record_forwards(model)
    grouped = run(model, max_batch_size=4)
    assert_same_samples(grouped, slots)
    decode_rows = sum(rows for rows, width in calls if width == 1)
    assert decode_rows == sum(L - 1 for L in grouped.lengths_B().long().tolist())  # rows leave their group


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    """A compiler that fails: one warning line, the eager samples, and no second attempt on the next call."""
    def broken_compile(fn, **kw):
        def fails(*a, **k):
            raise RuntimeError("inductor: no C++ compiler found\nlong details")
        return fails

    model = eos_model()
    eager = run(model, max_batch_size=3)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="eopd.sampling.compiled"):
        first = run(model, max_batch_size=3, compile=True)
        second = run(model, max_batch_size=3, compile=True)
    assert_same_samples(first, eager)
    assert_same_samples(second, eager)
    warnings = [r for r in caplog.records if r.name == "eopd.sampling.compiled"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert "RuntimeError" in warnings[0].getMessage() and "eagerly" in warnings[0].getMessage()


@pytest.mark.slow
def test_the_compiled_step_draws_what_the_eager_step_draws():
    """``compile=True`` (static slots, dead slots masked, packed grouped-query attention) gives the eager
    samples, and a second call reuses the compiled step and its cache."""
    model = eos_model()
    eager = run(model, max_batch_size=3)
    first = run(model, max_batch_size=3, compile=True)
    step = compiled._STEPS[model]
    second = run(model, seed=0, max_batch_size=3, compile=True)
    assert_same_samples(first, eager)
    assert_same_samples(second, eager)
    assert compiled._STEPS[model] is step and model not in compiled._FAILED


@pytest.mark.parametrize(("kw", "names"), [
    ({"max_batch_size": 0}, "rollout.max_batch_size"),
    ({"T": 0}, "rollout.max_new_tokens"),
    ({"temperature": 0.0}, "rollout.temperature"),
])
def test_arguments_that_cannot_work_are_one_line(kw: dict, names: str):
    with pytest.raises(SamplingInputError) as err:
        run(eos_model(), **kw)
    assert isinstance(err.value, UserError) and names in str(err.value) and "\n" not in str(err.value)


def test_a_prompt_longer_than_the_context_is_one_line():
    model = eos_model(max_position_embeddings=16)
    with pytest.raises(SamplingInputError, match=r"prompt 1 has 16 tokens.*context is 16") as err:
        sample(model, [[3, 4], [5] * 16], max_new_tokens=4, eos_token_ids=[EOS], pad_token_id=PAD,
               generator=torch.Generator().manual_seed(0))
    assert "\n" not in str(err.value)


def test_a_kv_cache_the_device_cannot_hold_is_one_line(monkeypatch):
    real_zeros = torch.zeros

    def zeros(*shape, **kw):
        if len(shape) == 1 and isinstance(shape[0], tuple) and len(shape[0]) == 4:  # the cache's [S, H, C, D] buffers
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_zeros(*shape, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(SamplingMemoryError, match=r"12 rows x \d+ positions.*rollout.max_batch_size") as err:
        run(eos_model())
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_a_sliding_window_model_samples_in_its_own_cache():
    """Sliding-window layers are not what the slots model: such a model samples in the fallback loop, and its
    log-probs are those of a full forward with its window (which full attention over the slots would miss)."""
    model = eos_model(p=0.02, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert not engine.slots_serve(model) and engine.slots_serve(eos_model())
    r = run(model, max_batch_size=4, T=12)
    with torch.no_grad():
        logits = model(input_ids=r.sequences_BL, attention_mask=r.attention_mask_BL,
                       position_ids=position_ids_from_mask(r.attention_mask_BL), use_cache=False).logits
    want = torch.log_softmax(logits[:, r.prompt_len - 1 : -1].float(), -1).gather(-1, r.completion_ids_BT[..., None])
    torch.testing.assert_close(want.squeeze(-1) * r.completion_mask_BT, r.logp_old_BT, atol=1e-5, rtol=1e-5)
    assert int(r.lengths_B().max()) > 6  # longer than the window
