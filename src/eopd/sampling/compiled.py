"""The compiled decode step (``rollout.compile``): one token for every slot, static shapes, ``torch.compile``.

Why: an eager decode step launches every kernel of every layer from Python; on a GPU at small batch that
launch overhead, not the hardware, bounds the step. With static shapes (all ``S`` slots, all ``C`` columns of
the ``SlotCache``, the write column a 0-d tensor) the step compiles once and, on CUDA, runs as a CUDA graph
(``mode="reduce-overhead"``); on the CPU it is compiled with the default mode. Slots whose row has left are
still computed (static shapes) but attend to their own column only and their outputs are ignored.

The cache and the compiled function are kept per model (``compiled_step``) and reused while the slots match
and the columns suffice, so training compiles once, not once per step; the cache's memory stays allocated
between calls (CUDA graphs need fixed addresses).

If compilation or the compiled step fails, sampling falls back to the eager step with one warning line and
does not try again for that model (nothing is lost: the step is retried eagerly, and it rewrites the one
column a failed step may have written).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator

import torch
from transformers import AttentionInterface

from eopd.sampling.engine import Engine, cache_keyword
from eopd.sampling.slots import SlotCache, capacity

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

#: Columns are rounded up to this multiple so that calls with slightly different prompt widths share a graph.
COLUMN_MULTIPLE = 128

_STEPS: weakref.WeakKeyDictionary[torch.nn.Module, CompiledStep] = weakref.WeakKeyDictionary()
_FAILED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


#: The attention implementation the compiled step swaps in for its forward (registered below).
SLOT_ATTENTION = "eopd_slot_sdpa"


def slot_attention(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    scaling: float | None = None, dropout: float = 0.0, **kwargs: object,
) -> tuple[Tensor, None]:
    """Attention of one query token per slot with grouped-query heads packed, not repeated.

    Why: under ``torch.compile`` transformers' sdpa path expands every key/value head to the query heads
    (``repeat_kv``: a copy of the whole ``[S, H, C, D]`` cache per layer per step); with one query token, the
    query heads that share a key head are instead its queries (``[S, H_kv, H / H_kv, D]``), as transformers
    itself does in eager mode (``pack_gqa``, switched off when compiling).

    Args:
        query: ``[S, H, 1, D]``. key, value: ``[S, H_kv, C, D]``.
        attention_mask: ``[S, 1, 1, C]`` boolean (True: attend).

    Returns:
        ``([S, 1, H, D], None)``, the layout transformers' attention functions return.
    """
    S, H, Q, D = query.shape
    packed = query.reshape(S, key.shape[1], H // key.shape[1] * Q, D)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(S, H, Q, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)


@contextlib.contextmanager
def slot_attention_in(model: torch.nn.Module) -> Iterator[None]:
    """``model`` attends with ``slot_attention`` for the duration (its configured implementation restored)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = SLOT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def decode_logits(
    model: torch.nn.Module, cache: SlotCache, next_S1: Tensor, pos_S1: Tensor, start_S: Tensor, column_1: Tensor
) -> Tensor:
    """Logits ``[S, V]`` of every slot's next token, all ``C`` columns read (the function that is compiled;
    called inside ``slot_attention_in(model)``)."""
    cols_C = torch.arange(cache.columns, device=column_1.device)
    # a row's own columns; a slot whose row has left attends to the column it writes (finite, ignored)
    allowed_SC = ((cols_C[None, :] >= start_S[:, None]) | (cols_C == column_1)) & (cols_C <= column_1)
    out = model(input_ids=next_S1, attention_mask=allowed_SC[:, None, None, :], position_ids=pos_S1, use_cache=True,
                **{cache_keyword(model): cache})
    return out.logits[:, -1]


class CompiledStep:
    """The compiled one-token step of a model over its own ``SlotCache`` (kept across calls).

    Args:
        model: The causal LM (``engine.slots_serve``); held weakly (the registry is keyed by it).
        cache: The ``SlotCache`` the step reads and writes.
    """

    def __init__(self, model: torch.nn.Module, cache: SlotCache) -> None:
        self.model_ref, self.cache = weakref.ref(model), cache
        device = next(model.parameters()).device
        self.column_1 = torch.zeros(1, dtype=torch.long, device=device)
        self.compiled = torch.compile(decode_logits, mode="reduce-overhead" if device.type == "cuda" else None,
                                      dynamic=False)

    def __call__(self, engine: Engine) -> Tensor | None:
        """Every slot's next-token logits ``[S, V]`` for ``engine``'s current step, or None (after one warning
        line) when the compiled step fails: the caller then decodes eagerly."""
        model = self.model_ref()
        self.column_1.fill_(engine.cache.column)
        engine.cache.static_step(self.column_1)
        engine.forwards.append(("compiled", engine.S, engine.cache.columns))
        try:
            with slot_attention_in(model):
                return self.compiled(model, engine.cache, engine.next_S[:, None], engine.pos_S[:, None],
                                     engine.start_S, self.column_1)
        except Exception as err:
            _FAILED.add(model)
            _STEPS.pop(model, None)
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            logger.warning("rollout.compile: the compiled decode step failed (%s: %s); sampling eagerly from now "
                           "on (set rollout.compile: false to skip the attempt)", type(err).__name__, first)
            return None


def compiled_step(model: torch.nn.Module, slots: int, prompt_width: int, max_new_tokens: int) -> CompiledStep | None:
    """The model's compiled step for ``slots`` slots and rows of these sizes (reused when it fits), or None when
    compiling already failed for this model."""
    if model in _FAILED:
        return None
    need = capacity(prompt_width, max_new_tokens)
    step = _STEPS.get(model)
    if step is None or step.cache.slots != slots or step.cache.columns < need:
        step = CompiledStep(model, SlotCache(slots, capacity(prompt_width, max_new_tokens, multiple=COLUMN_MULTIPLE)))
        _STEPS[model] = step
    return step


def warn_not_compiled(model: torch.nn.Module) -> None:
    """One warning line (once per model) that a model the slots cannot hold samples eagerly."""
    if model in _FAILED:
        return
    _FAILED.add(model)
    logger.warning("rollout.compile: %s keeps its cache in transformers' own layout (sliding window, recurrent "
                   "state or an attention kernel without 4D masks), which the compiled step does not model; "
                   "sampling eagerly", type(model).__name__)
