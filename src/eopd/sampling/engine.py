"""The sampling loop: continuous batching over fixed slots, finished rows leave, waiting rows take their slot.

Why our own loop and not transformers' continuous batching (``generate_batch`` /
``init_continuous_batching``, transformers 5): its ``ContinuousBatchingManager`` samples with
``torch.multinomial`` on the global RNG (``model_runner._sample``), so a row's tokens depend on which rows
share its step and no seeded per-row stream can be given; its ``return_logprobs`` are the log of the
*processed* distribution (after temperature, top-p and every logits processor), not the full-vocabulary
log-prob at the sampling temperature that ``logp_old`` must be; it has no cut of padded lm_head rows; and it
switches the model's attention implementation to its paged kernels. Our contract (``rollout.sample``) needs
all four, so the refill is built here, on ``SlotCache``.

How a call runs (``Engine.run``): rows wait in a queue in row order. Whenever slots are free, the next
waiting rows are prefilled together (left-padded among themselves, written straight into the free slots so
that their prompts end at the shared column) and draw their first token; then one decode step runs every live
row. A row that draws EOS or reaches the budget leaves at once: its slot is refilled before the next step, so
the batch stays full until the queue is empty and compute follows the live rows. Every draw uses the row's
own uniform for that position (``draw.draw_tokens``), so which rows shared a step never changes a row's
tokens or log-probs beyond the last bits of float arithmetic.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from eopd.sampling.draw import draw_tokens
from eopd.sampling.padding import left_pad, position_ids_from_mask
from eopd.sampling.slots import SlotCache, capacity

Tensor = torch.Tensor

#: Attention implementations that take the 4D masks the engine builds (bool for sdpa, additive for eager).
MASKED_ATTENTION = ("sdpa", "eager")
#: An engine's own cache starts with the columns a budget of this many tokens needs, and doubles when full.
GROW_FROM = 256


def forward_params(model: torch.nn.Module) -> set[str]:
    """Named parameters of the forward that does the work (a ``PeftModel`` forwards ``**kwargs`` to its base)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return set(inspect.signature(getattr(base, "forward", base)).parameters)


def cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` in transformers >= 5.2x, ``past_key_values`` before (the same object either way)."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def slots_serve(model: torch.nn.Module) -> bool:
    """Whether ``SlotCache`` can hold this model's cache: every layer full attention (no sliding window, no
    linear/recurrent state) and an attention implementation that takes a 4D mask. Other models sample with
    ``grouped.sample_groups``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in MASKED_ATTENTION:
        return False
    if not getattr(config.get_text_config(decoder=True), "is_causal", True):
        return False
    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def attention_mask_4d(allowed_NQK: Tensor, model: torch.nn.Module, dtype: torch.dtype) -> Tensor:
    """``allowed_NQK`` (True: query may attend to key) as the ``[N, 1, Q, K]`` mask the model's attention takes:
    boolean for sdpa, additive (0 / the dtype's minimum) for eager attention."""
    mask = allowed_NQK[:, None]
    if model.config._attn_implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


class Engine:
    """One ``sample`` call's rows, run through ``slots`` slots (see the module docstring).

    Args:
        model: The causal LM (``slots_serve(model)``).
        prompts: Each row's prompt ids (rows in order; a prompt repeated ``n`` times is ``n`` rows).
        uniform_BT: Each row's uniform for each completion position, ``[B, T]`` (``T`` the budget).
        slots: Rows at once (``S``).
        temperature, top_p, vocab_size: As ``draw.draw_tokens``.
        eos_N: Ids that end a row.
        pad_token_id: Completion filler after a row's end.
        cache: The ``SlotCache`` to use (the compiled step's own); default a new one sized for these rows.
        step: The compiled decode step (``compiled.CompiledStep``: every slot's logits, or None when it failed)
            or None for eager decoding.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        uniform_BT: Tensor,
        *,
        slots: int,
        temperature: float,
        top_p: float,
        vocab_size: int | None,
        eos_N: Tensor,
        pad_token_id: int,
        cache: SlotCache | None = None,
        step: Callable[[Engine], Tensor | None] | None = None,
    ) -> None:
        self.model, self.prompts, self.uniform_BT = model, prompts, uniform_BT
        self.draw = {"temperature": temperature, "top_p": top_p, "vocab_size": vocab_size}
        self.eos_N, self.pad = eos_N, pad_token_id
        B, T = uniform_BT.shape
        self.T, self.device = T, uniform_BT.device
        self.dtype = next(model.parameters()).dtype
        width = max(len(p) for p in prompts)
        # the columns the budget can need; an own cache starts at what a 256-token budget needs and grows
        self.full = cache.columns if cache is not None else capacity(width, T)
        self.cache = cache if cache is not None else SlotCache(slots, capacity(width, min(T, GROW_FROM)))
        self.cache.column = width  # every waiting prompt fits left of the write column
        self.S, self.queue = self.cache.slots, deque(range(B))
        # the longest prompt among rows b.. (rows wait in order): room the write column keeps on its left
        self.width_from = [len(p) for p in prompts] + [0]
        for b in range(B - 1, -1, -1):
            self.width_from[b] = max(self.width_from[b], self.width_from[b + 1])
        self.step = step
        self.cache_kw = cache_keyword(model)
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}
        state = lambda: torch.zeros(self.S, dtype=torch.long, device=self.device)  # noqa: E731
        # per slot: its row, first valid column, position of its last token drawn, tokens drawn, that token
        self.row_S, self.start_S, self.pos_S, self.t_S, self.next_S = state(), state(), state(), state(), state()
        self.n, self.lo = 0, width  # live slots [0, n); lo: the first column a live row uses
        self.starts: list[int] = []  # start_S[:n] on the host (no device sync to find ``lo``)
        self.tokens_BT = torch.full((B, T), pad_token_id, dtype=torch.long, device=self.device)
        self.logp_BT = torch.zeros((B, T), dtype=torch.float32, device=self.device)
        self.lengths = [0] * B
        self.forwards: list[tuple[str, int, int]] = []  # (kind, rows, columns) per model forward

    def run(self) -> tuple[Tensor, Tensor, int]:
        """Sample every row; ``(tokens_BT, logp_BT, longest)`` with ``longest`` the longest row's length."""
        while self.queue or self.n:
            while self.queue and self.n < self.S:  # again if a joining row ended at its first token
                self._refill()
            if self.n:
                self._decode()
        return self.tokens_BT, self.logp_BT, max(self.lengths)

    def _forward(self, input_ids: Tensor, mask: Tensor, position_ids: Tensor, **extra: object) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **{self.cache_kw: self.cache}, **extra)
        return out.logits[:, -1]

    def _refill(self) -> None:
        """Prefill the next waiting rows into the free slots ``[n, n + k)`` and draw their first tokens."""
        k = min(self.S - self.n, len(self.queue))
        rows = [self.queue.popleft() for _ in range(k)]
        ids_KP, mask_KP = left_pad([self.prompts[r] for r in rows], self.pad)
        ids_KP, mask_KP = ids_KP.to(self.device), mask_KP.to(self.device)
        P, c, n = ids_KP.shape[1], self.cache.column, self.n
        # causal and not left padding; a padding query attends to itself (finite keys in its masked columns)
        q, key = torch.arange(P, device=self.device)[:, None], torch.arange(P, device=self.device)[None, :]
        allowed_KPP = ((key <= q) & mask_KP.bool()[:, None, :]) | (key == q)
        self.cache.window(rows=(n, n + k), write=(c - P, c), read_from=c - P)
        self.forwards.append(("prefill", k, P))
        logits_KV = self._forward(ids_KP, attention_mask_4d(allowed_KPP, self.model, self.dtype),
                                  position_ids_from_mask(mask_KP), **self.keep_last)
        rows_K = torch.tensor(rows, device=self.device)
        lens_K = mask_KP.sum(1)
        self.row_S[n : n + k], self.start_S[n : n + k], self.pos_S[n : n + k] = rows_K, c - lens_K, lens_K - 1
        self.t_S[n : n + k] = 0
        self.starts += [c - len(self.prompts[r]) for r in rows]
        self.n += k
        self.lo = min(self.lo, c - P)
        self._draw(logits_KV, n, n + k)

    def _decode(self) -> None:
        """One token for every live row."""
        if self.cache.column == self.cache.columns:
            self._make_room()
        c, n = self.cache.column, self.n
        logits_NV = self.step(self) if self.step is not None else None
        if logits_NV is not None:
            logits_NV = logits_NV[:n]
        else:  # eager (or the compiled step failed: it said so once, and this step is redone eagerly)
            self.step = None
            cols = torch.arange(self.lo, c + 1, device=self.device)
            allowed_N1K = (cols[None, :] >= self.start_S[:n, None])[:, None, :]
            self.cache.window(rows=(0, n), write=(c, c + 1), read_from=self.lo)
            self.forwards.append(("decode", n, c + 1 - self.lo))
            logits_NV = self._forward(self.next_S[:n, None], attention_mask_4d(allowed_N1K, self.model, self.dtype),
                                      self.pos_S[:n, None])
        self.cache.column = c + 1
        self._draw(logits_NV, 0, n)

    def _draw(self, logits_NV: Tensor, a: int, b: int) -> None:
        """Draw slots ``[a, b)``'s next tokens from their logits, record them and let finished rows leave."""
        row_N, t_N = self.row_S[a:b], self.t_S[a:b]
        tokens_N, logp_N = draw_tokens(logits_NV, self.uniform_BT[row_N, t_N], **self.draw)
        self.tokens_BT[row_N, t_N] = tokens_N
        self.logp_BT[row_N, t_N] = logp_N
        self.next_S[a:b] = tokens_N
        self.t_S[a:b] += 1
        self.pos_S[a:b] += 1
        done_N = torch.isin(tokens_N, self.eos_N) | (self.t_S[a:b] >= self.T)
        done = done_N.nonzero().squeeze(1).tolist()  # the one host sync of a step
        if done:
            self._leave([a + i for i in done])

    def _leave(self, finished: list[int]) -> None:
        """Finished slots leave: the live slots past the new ``n`` move into their places."""
        n, gone = self.n, set(finished)
        for r, t in torch.stack([self.row_S[finished], self.t_S[finished]], 1).tolist():
            self.lengths[r] = t
        live = n - len(gone)
        holes = [s for s in finished if s < live]
        movers = [s for s in range(live, n) if s not in gone]
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            self.cache.move(src, dst, (self.lo, self.cache.column))
            for x in (self.row_S, self.start_S, self.pos_S, self.t_S, self.next_S):
                x[dst] = x[src]
            for s, m in zip(holes, movers, strict=True):
                self.starts[s] = self.starts[m]
        self.starts = self.starts[:live]
        self.n = live
        self.lo = min(self.starts) if self.starts else self.cache.column

    def _make_room(self) -> None:
        """The write column reached the last column: grow the cache while it is smaller than the budget can need
        and shifting would free little, else shift the live columns left over the ones no live row uses
        (keeping room left of the write column for the longest waiting prompt)."""
        c, columns = self.cache.column, self.cache.columns
        by = min(self.lo, c - self.width_from[self.queue[0] if self.queue else -1])
        if columns < self.full and by < max(16, columns // 8):
            self.cache.grow(min(self.full, 2 * columns), self.n, (self.lo, c))
            self.forwards.append(("grow", self.n, self.cache.columns))
            return
        if by < 1:  # cannot happen: ``capacity`` leaves slack beyond the longest row
            raise RuntimeError(f"sampling engine: no column to free at {c} of {columns} (lo {self.lo})")
        self.cache.shift_left(self.n, (self.lo, c), by)
        self.start_S[: self.n] -= by
        self.starts = [s - by for s in self.starts]
        self.lo -= by
        self.forwards.append(("shift", self.n, c - self.lo))
