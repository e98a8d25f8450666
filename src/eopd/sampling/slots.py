"""The KV cache of the sampling engine: fixed slots that rows enter and leave, columns shared by all rows.

Why not transformers' ``DynamicCache``: it concatenates every layer's whole cache at every token (a copy of
the cache per step: on a GPU at long context, more memory traffic than the attention itself), it cannot
drop a finished row or take in a new one without rebuilding every layer, and its shape changes every step,
so no compiled step can use it. ``SlotCache`` allocates each layer's keys and values once, ``[S, H, C, D]``
(``S`` slots = rows at once, ``C`` columns), and hands the model views of them:

- Columns are shared: every live row writes its next token at the same column ``c`` (``column``). A row's
  prompt is placed so that it ends at ``c`` when it joins (left-padding alignment), so each row occupies a
  contiguous run of columns ``[start_S[s], c)``; everything left of its start is masked.
- Rows are packed: live rows sit in slots ``[0, n)``; when rows finish, the live rows past ``n`` move into
  the holes (``move``), so a step computes ``n`` rows, not ``S``.
- When ``c`` reaches ``C`` the live columns are shifted left (``shift_left``) over the columns no live row
  uses, or, while the columns are fewer than the budget can need, the buffers grow (``grow``, doubling): the
  cache starts at the size a 256-token budget needs and follows the longest live rows, not the budget.

The model writes through ``update`` (transformers calls it once per layer per forward); what it writes and
what it reads back is set by ``window`` before each eager forward, or by ``static_step`` for the compiled
step, which writes column ``c`` (a 0-d tensor) of all ``S`` slots and reads all ``C`` columns.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from eopd.sampling.limits import kv_memory_error

Tensor = torch.Tensor


def capacity(prompt_width: int, max_new_tokens: int, *, multiple: int = 1) -> int:
    """Columns ``C`` for rows of at most ``prompt_width`` prompt tokens and ``max_new_tokens`` new ones.

    A live row spans at most ``prompt_width + max_new_tokens - 1`` columns; the slack beyond it (an eighth,
    at least 16 columns) bounds how often the live columns are shifted left (at most once per slack tokens,
    each shift moving the live rows' columns once: amortised, a few columns per row per step).
    ``multiple`` rounds it up (the compiled step reuses one graph per shape).
    """
    span = prompt_width + max_new_tokens
    need = span + max(16, span // 8)
    return -(-need // multiple) * multiple


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, ``[S, H, C, D]``, allocated once (``SlotCache.update`` writes them)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise NotImplementedError("SlotLayer is allocated by SlotCache")

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("SlotCache.update writes its layers")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        return 0  # positions and masks are always passed explicitly

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


class SlotCache(Cache):
    """``S`` slots x ``C`` columns of keys and values per layer, allocated at the first write.

    Attributes:
        slots: ``S``.
        columns: ``C``.
        column: ``c``, where the next decode token of every live row is written.
    """

    def __init__(self, slots: int, columns: int) -> None:
        super().__init__(layers=[])
        self.slots, self.columns, self.column = slots, columns, 0
        self._rows, self._write, self._read_from = (0, 0), (0, 0), 0
        self._static_column_1: Tensor | None = None

    def window(self, rows: tuple[int, int], write: tuple[int, int], read_from: int) -> None:
        """What the next eager forward writes and reads: slots ``rows`` write their new keys at columns
        ``write`` and attend over columns ``[read_from, write[1])``."""
        self._rows, self._write, self._read_from, self._static_column_1 = rows, write, read_from, None

    def static_step(self, column_1: Tensor) -> None:
        """The next forward is the compiled step: all slots write column ``column_1`` (``[1]``) and read all."""
        self._static_column_1 = column_1

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Write this layer's new keys/values (``[rows, H, q, D]``) where ``window``/``static_step`` says and
        return the keys/values the attention reads (views of the buffers, no copy)."""
        if layer_idx == len(self.layers):
            self.layers.append(self._allocate(key_states, value_states))
        layer = self.layers[layer_idx]
        if self._static_column_1 is not None:
            layer.keys.index_copy_(2, self._static_column_1, key_states)
            layer.values.index_copy_(2, self._static_column_1, value_states)
            return layer.keys, layer.values
        (r0, r1), (w0, w1) = self._rows, self._write
        layer.keys[r0:r1, :, w0:w1] = key_states
        layer.values[r0:r1, :, w0:w1] = value_states
        return layer.keys[r0:r1, :, self._read_from : w1], layer.values[r0:r1, :, self._read_from : w1]

    def _allocate(self, key_states: Tensor, value_states: Tensor) -> SlotLayer:
        """A layer's buffers, shaped after its first write (heads, head dims, dtype and device are the model's)."""
        keys = self._zeros(key_states, self.columns)
        values = self._zeros(value_states, self.columns)
        if keys.is_cuda:  # fixed addresses for CUDA graphs (as transformers' StaticCache does)
            torch._dynamo.mark_static_address(keys)
            torch._dynamo.mark_static_address(values)
        return SlotLayer(keys, values)

    def _zeros(self, like: Tensor, columns: int) -> Tensor:
        """``[S, heads, columns, head_dim]`` zeros like ``like``; one line (``SamplingMemoryError``) when the device
        cannot hold them."""
        shape = (self.slots, like.shape[1], columns, like.shape[-1])
        try:
            return torch.zeros(shape, dtype=like.dtype, device=like.device)
        except torch.OutOfMemoryError as err:
            layer_bytes = 2 * like.element_size() * self.slots * like.shape[1] * columns * like.shape[-1]
            raise kv_memory_error(self.slots, columns, layer_bytes, len(self.layers), err) from None

    def grow(self, columns: int, rows: int, live: tuple[int, int]) -> None:
        """Reallocate every layer with ``columns`` columns, keeping columns ``live`` of slots ``[0, rows)``."""
        a, b = live
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = self._zeros(old, columns)
                new[:rows, :, a:b] = old[:rows, :, a:b]
                setattr(layer, name, new)
        self.columns = columns

    def move(self, src_N: Tensor, dst_N: Tensor, columns: tuple[int, int]) -> None:
        """Copy slots ``src_N`` into slots ``dst_N`` over ``columns`` (packing live rows into ``[0, n)``)."""
        a, b = columns
        for layer in self.layers:
            layer.keys[dst_N, :, a:b] = layer.keys[src_N, :, a:b]
            layer.values[dst_N, :, a:b] = layer.values[src_N, :, a:b]

    def shift_left(self, rows: int, columns: tuple[int, int], by: int) -> None:
        """Move columns ``[a, b)`` of slots ``[0, rows)`` to ``[a - by, b - by)``; ``column`` moves with them."""
        a, b = columns
        for layer in self.layers:
            layer.keys[:rows, :, a - by : b - by] = layer.keys[:rows, :, a:b].clone()
            layer.values[:rows, :, a - by : b - by] = layer.values[:rows, :, a:b].clone()
        self.column -= by
