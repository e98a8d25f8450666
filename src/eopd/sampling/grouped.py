"""The sampling loop for models ``SlotCache`` cannot hold: groups of rows in transformers' own cache.

Why it exists: sliding-window layers (Gemma 2, Mistral), linear-attention or recurrent state, and attention
kernels that take no 4D mask (flash attention) keep their cache in layouts the engine's slots do not model.
Those models sample here, a group of ``max_batch_size`` rows at a time in a ``DynamicCache`` built for their
config; a row that ends leaves its group and its cache at once (``Cache.batch_select_indices``), but no waiting
row takes its place. Draws are the engine's (``draw.draw_tokens``, each row's own uniforms), so both loops give
the same tokens for a seed.
"""

from __future__ import annotations

import torch

from eopd.sampling.draw import draw_tokens
from eopd.sampling.engine import cache_keyword, forward_params
from eopd.sampling.padding import position_ids_from_mask

Tensor = torch.Tensor


def sample_group(
    model: torch.nn.Module,
    ids_BP: Tensor,
    mask_BP: Tensor,
    uniform_BT: Tensor,
    *,
    temperature: float,
    top_p: float,
    eos_N: Tensor,
    pad_token_id: int,
    vocab_size: int | None,
) -> tuple[Tensor, Tensor]:
    """Sample one group of left-padded rows; ``(tokens_BT, logp_BT)``, pad / 0 after each row's end, with ``T``
    the longest row's length."""
    B, T = uniform_BT.shape
    device = ids_BP.device
    kw: dict[str, object] = {cache_keyword(model): None}  # the model builds the cache its config needs
    keep = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}
    tokens_BT = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
    logp_BT = torch.zeros((B, T), dtype=torch.float32, device=device)
    live_N = torch.arange(B, device=device)  # the rows still in the group, in cache order
    attn_NL, input_ids, position_ids = mask_BP, ids_BP, position_ids_from_mask(mask_BP)
    longest = 0
    for t in range(T):
        out = model(input_ids=input_ids, attention_mask=attn_NL, position_ids=position_ids, use_cache=True,
                    **keep, **kw)
        kw = {cache_keyword(model): getattr(out, cache_keyword(model))}
        tokens_N, logp_N = draw_tokens(out.logits[:, -1], uniform_BT[live_N, t], temperature=temperature,
                                       top_p=top_p, vocab_size=vocab_size)
        tokens_BT[live_N, t], logp_BT[live_N, t] = tokens_N, logp_N
        longest = t + 1
        going_N = ~torch.isin(tokens_N, eos_N)
        if not bool(going_N.all()):
            if not bool(going_N.any()):
                break
            kept = going_N.nonzero().squeeze(1)
            next(iter(kw.values())).batch_select_indices(kept)
            live_N, tokens_N, attn_NL, position_ids = live_N[kept], tokens_N[kept], attn_NL[kept], position_ids[kept]
        input_ids = tokens_N[:, None]
        position_ids = position_ids[:, -1:] + 1
        attn_NL = torch.cat([attn_NL, torch.ones_like(attn_NL[:, :1])], dim=1)
    return tokens_BT[:, :longest], logp_BT[:, :longest]
