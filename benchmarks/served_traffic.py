"""Bytes a served teacher sends back per scored token: vLLM's prompt log-probs against SGLang's ``/generate``.

Why this exists: vLLM's completions API answers ``prompt_logprobs`` for every prompt position, the prompt's own
included, each with ``k + 1`` entries (the top-k and the sampled token, ``{"logprob", "rank", "decoded_token"}``),
while only the completion positions are trained on. SGLang's ``logprob_start_len`` asks for the completion
positions only, as ``(logprob, id, text)`` tuples. This script builds the answers both servers would send for one
sequence (a tiny random Qwen3 at Qwen3's 151,936-row vocabulary scores it; the JSON is written as each server
writes it: Starlette's ``JSONResponse`` for vLLM, compact, and orjson's compact form for SGLang, here
``json.dumps(separators=(",", ":"))``) and counts the bytes, per completion token:

- ``vllm``: every position, ``k + 1`` entries, the sampled token's true rank, ``decoded_token`` a 4-character
  text (an assumption: vLLM detokenizes every entry; Qwen3's tokens are a few characters; ``null`` in ``vllm,
  no text``, as our server writes it);
- ``sglang, start offset``: positions from ``logprob_start_len = P - 1`` (``teacher.api=sglang``);
- ``sglang, no offset``: every position, to separate the offset's saving from the format's.

Usage::

    python benchmarks/served_traffic.py        # ~30 s on 2 CPU cores

Prints a markdown table and, last, ``summary: bytes_per_completion_token vllm=<b> sglang=<b> ... saving=<x>``
for the largest shape (prompt 256 + completion 4,096, k = 20).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from qwen3_shapes import QWEN3_ROWS

from eopd.losses.scoring import score_chunked
from eopd.models.loading import build_tiny_qwen3
from eopd.sampling import completion_hidden_states, output_head
from eopd.teachers.server import rollout_of
from eopd.teachers.wire import sglang

DECODED = "abcd"  # the assumed decoded_token text of every vLLM entry (4 characters)
SHAPES = ((256, 512), (256, 1024), (256, 4096))


@torch.no_grad()
def scores(model: torch.nn.Module, ids: list[int], k: int) -> dict[str, Any]:
    """Log-prob, true rank and top-k of every position ``1..L-1`` of ``ids`` (``[L - 1]`` lists)."""
    rollout = rollout_of([ids], 0, torch.device("cpu"))
    head = output_head(model)
    hidden = completion_hidden_states(model, rollout)
    s = score_chunked(hidden, head.weight, rollout.completion_ids_BT, top_k=k, temperature=1.0,
                      vocab_size=QWEN3_ROWS, bias=head.bias, softcap=head.softcap)
    ranks = []
    for start in range(0, hidden.shape[1], 512):  # the sampled token's rank: logits at least as large as its own
        logits = hidden[0, start:start + 512].float() @ head.weight.float().T
        own = logits.gather(-1, rollout.completion_ids_BT[0, start:start + 512, None])
        ranks += (logits >= own).sum(-1).tolist()
    return {"logp": s.logp[0].tolist(), "rank": ranks, "top_ids": s.topk_ids[0].tolist(),
            "top_lps": s.topk_logprobs[0].float().tolist()}


def vllm_body(ids: list[int], sc: dict[str, Any], text: str | None) -> dict[str, Any]:
    """vLLM's ``CompletionResponse`` with ``prompt_logprobs=k`` and ``return_token_ids`` (one choice)."""
    positions: list[Any] = [None]
    for j, token in enumerate(ids[1:]):
        entry = {str(token): {"logprob": sc["logp"][j], "rank": sc["rank"][j], "decoded_token": text}}
        for r, (tid, lp) in enumerate(zip(sc["top_ids"][j], sc["top_lps"][j], strict=True), start=1):
            entry[str(tid)] = {"logprob": lp, "rank": r, "decoded_token": text}
        positions.append(entry)
    choice = {"index": 0, "text": "!", "logprobs": None, "finish_reason": "length", "stop_reason": None,
              "token_ids": None, "prompt_logprobs": positions, "prompt_token_ids": ids}
    return {"id": "cmpl-0123456789abcdef", "object": "text_completion", "created": 1767225600,
            "model": "Qwen/Qwen3-8B", "choices": [choice],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}


def sglang_body(ids: list[int], sc: dict[str, Any], start: int) -> list[dict[str, Any]]:
    """SGLang's ``/generate`` answer from ``logprob_start_len = start`` (``wire.sglang.generate_output``)."""
    rows = slice(start, len(ids) - 1)
    return [sglang.generate_output(ids, start, sc["logp"][rows], sc["top_ids"][rows], sc["top_lps"][rows], None)]


def size(body: Any) -> int:
    return len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_tiny_qwen3(QWEN3_ROWS, hidden_size=32, num_layers=1, max_position_embeddings=8192, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    print("| prompt | completion | k | answer | bytes | bytes per completion token | MB per request |")
    print("|---|---|---|---|---|---|---|")
    last: dict[str, float] = {}
    for prompt, completion in SHAPES:
        ids = torch.randint(0, 151_669, (prompt + completion,), generator=g).tolist()
        sc = scores(model, ids, args.k)
        answers = {"vllm": size(vllm_body(ids, sc, DECODED)), "vllm, no text": size(vllm_body(ids, sc, None)),
                   "sglang, start offset": size(sglang_body(ids, sc, prompt - 1)),
                   "sglang, no offset": size(sglang_body(ids, sc, 0))}
        for name, n in answers.items():
            print(f"| {prompt} | {completion} | {args.k} | {name} | {n:,} | {n / completion:,.0f} | {n / 2**20:.2f} |")
        last = {name: n / completion for name, n in answers.items()}
    print(f"summary: bytes_per_completion_token vllm={last['vllm']:.0f} vllm_no_text={last['vllm, no text']:.0f} "
          f"sglang={last['sglang, start offset']:.0f} sglang_no_offset={last['sglang, no offset']:.0f} "
          f"saving={last['vllm'] / last['sglang, start offset']:.2f}x (prompt {SHAPES[-1][0]}, completion "
          f"{SHAPES[-1][1]}, k {args.k})")


if __name__ == "__main__":
    main()
