"""SGLang's native ``POST /generate`` with input log-probs, as the client sends it and ``eopd serve-teacher``
answers it.

Why this file exists: SGLang's OpenAI-compatible ``/v1/completions`` has no ``prompt_logprobs`` (SGLang 0.5.23:
the field is absent from its ``CompletionRequest`` and unknown fields are ignored), so SGLang scores a prompt
through its own endpoint. Its ``logprob_start_len`` also lets the client ask for the completion positions only,
which vLLM's completions API cannot (vLLM answers every prompt position). Shapes read in the SGLang 0.5.23 wheel
(``managers/io_struct.py`` ``GenerateReqInput``, ``managers/tokenizer_manager.py`` ``add_logprob_to_meta_info``,
``managers/scheduler_components/logprob_result_processor.py``)::

    POST {root}/generate  {"input_ids": [[ids...], ...], "sampling_params": {"max_new_tokens": 1,
                           "temperature": 1.0}, "return_logprob": true, "logprob_start_len": [s, ...],
                           "top_logprobs_num": k, "return_text_in_logprobs": false,
                           "return_prompt_token_ids": true}
    -> [{"text": ..., "output_ids": [...], "prompt_token_ids": [ids...],
         "meta_info": {"input_token_logprobs": [[null, id_s, null], [lp, id_s+1, null], ...],
                       "input_top_logprobs": [null, [[lp, id, null] x k], ...], ...}}, ...]

One answer per sequence, in request order. ``input_token_logprobs`` covers positions ``s..L-1`` as
``(logprob, id, text)`` tuples, the first with a ``null`` log-prob (its predicting position was not computed),
and ``input_top_logprobs`` the top-k of the same positions (``null`` first). The client sets ``s = L - T - 1`` for
a ``T``-token completion, so the answer holds ``T + 1`` entries instead of vLLM's ``L``. The top-k runs over the
model's padded rows (``logits[:, :config.vocab_size]``), and SGLang's orjson writes ``-inf`` as ``null``. Echoed
ids at or above the model's ``vocab_size - 1`` come back as 0 (SGLang clips "padded hash values"): the last id of
a vocabulary without padding rows is accepted as 0. Our server adds ``input_token_entropies`` beside them (exact
entropies, ``null`` first).
"""

from __future__ import annotations

from typing import Any

from eopd.teachers.wire.common import (
    NoPromptLogprobsError,
    ResponseMismatchError,
    RowScores,
    check_entropies,
    is_int,
    logprob,
    real_topk,
)

#: Our server's extension in ``meta_info``: the exact entropy (nats) at every answered position.
ENTROPY_FIELD = "input_token_entropies"


def endpoint(url: str) -> str:
    """Where a scoring request goes: ``/generate`` at the server root, beside ``/v1``."""
    return f"{url[: -len('/v1')] if url.endswith('/v1') else url}/generate"


def start_of(length: int, completion_length: int) -> int:
    """``logprob_start_len`` for a ``length``-token sequence whose last ``completion_length`` tokens are scored."""
    return length - completion_length - 1


def generate_request(model: str, prompts: list[list[int]], completion_lengths: list[int], k: int) -> dict[str, Any]:
    """The body of one scoring request: ``prompts`` as token ids, the top-``k`` at each completion position.

    ``max_new_tokens`` 1 as with vLLM (the one generated token is ignored); temperature 1 (SGLang's input
    log-probs are the raw ``log_softmax`` anyway). ``model`` is not part of ``/generate``: a server serves one.
    """
    return {"input_ids": prompts, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
            "return_logprob": True, "top_logprobs_num": k, "return_text_in_logprobs": False,
            "logprob_start_len": [start_of(len(ids), n) for ids, n in zip(prompts, completion_lengths, strict=True)],
            "return_prompt_token_ids": True, "stream": False}


def parse_generate_response(body: Any, prompts: list[list[int]], completion_lengths: list[int], k: int,
                            vocab_size: int) -> list[RowScores]:
    """Validate a ``/generate`` answer against its request and parse each row's completion positions.

    Args and errors as ``vllm.parse_completion_response`` (the same ``ResponseMismatchError`` family).
    """
    if not isinstance(body, list) or len(body) != len(prompts):
        got = len(body) if isinstance(body, list) else "no"
        raise ResponseMismatchError(f"{got} answers for {len(prompts)} sequences")
    metas = [out.get("meta_info") if isinstance(out, dict) else None for out in body]
    if not all(isinstance(m, dict) for m in metas):
        raise ResponseMismatchError("an answer without meta_info")
    if all(m.get("input_token_logprobs") is None for m in metas):  # type: ignore[union-attr]
        raise NoPromptLogprobsError("the answer has no input_token_logprobs: the server ignores return_logprob")
    return [parse_output(out, meta, ids, n, min(k, vocab_size), vocab_size)  # type: ignore[arg-type]
            for out, meta, ids, n in zip(body, metas, prompts, completion_lengths, strict=True)]


def parse_output(out: dict[str, Any], meta: dict[str, Any], ids: list[int], completion_length: int, k: int,
                 vocab_size: int) -> RowScores:
    """One sequence's answer: positions ``start..L-1``, the first without a log-prob."""
    if not 0 <= completion_length < len(ids):
        raise ValueError(f"completion length {completion_length} must be in [0, {len(ids)})")
    start = start_of(len(ids), completion_length)
    tokens, tops = meta.get("input_token_logprobs"), meta.get("input_top_logprobs")
    width = completion_length + 1
    for name, value in (("input_token_logprobs", tokens), ("input_top_logprobs", tops)):
        if not isinstance(value, list) or len(value) != width:
            got = len(value) if isinstance(value, list) else "no"
            raise ResponseMismatchError(f"{got} {name} entries for logprob_start_len {start} of a {len(ids)}-token "
                                        f"sequence ({width} expected)")
    echoed = out.get("prompt_token_ids")
    if echoed is not None and echoed != list(ids):
        raise ResponseMismatchError("the server scored other token ids than the ones sent (prompt_token_ids differ)")
    logp_T, ids_TK, lps_TK = [], [], []
    for i in range(width):
        j = start + i
        where = f"position {j}"
        lp = _token_entry(tokens[i], ids[j], vocab_size, where)  # type: ignore[index]
        if i == 0:
            continue  # its predicting position was not computed: null log-prob, no top-k
        top = _top_entries(tops[i], k, where)  # type: ignore[index]
        top_ids, top_lps = real_topk(top, k, vocab_size, ids[j], where)
        logp_T.append(lp)
        ids_TK.append(top_ids)
        lps_TK.append(top_lps)
    return RowScores(logp_T, ids_TK, lps_TK, check_entropies(meta.get(ENTROPY_FIELD), width, 1, ENTROPY_FIELD))


def _token_entry(entry: Any, token: int, vocab_size: int, where: str) -> float:
    """The log-prob of one ``(logprob, id, text)`` tuple whose id must be the one sent (see the module
    docstring for SGLang's 0 in place of the last id)."""
    if not isinstance(entry, list) or len(entry) != 3 or not is_int(entry[1]):
        raise ResponseMismatchError(f"{where}: {entry!r} is not a (logprob, id, text) entry")
    if entry[1] != token and not (entry[1] == 0 and token == vocab_size - 1):
        raise ResponseMismatchError(f"{where}: the answer scored id {entry[1]} where {token} was sent")
    return logprob(entry[0], where)


def _top_entries(entry: Any, k: int, where: str) -> list[tuple[int, float]]:
    """One position's top-k: ``k`` tuples ``(logprob, id, text)`` of distinct ids."""
    if not isinstance(entry, list) or len(entry) != k:
        got = len(entry) if isinstance(entry, list) else type(entry).__name__
        raise ResponseMismatchError(f"{where}: {got} top entries where the top {k} were asked")
    top = []
    for item in entry:
        if not isinstance(item, list) or len(item) != 3 or not is_int(item[1]) or item[1] < 0:
            raise ResponseMismatchError(f"{where}: {item!r} is not a (logprob, id, text) entry")
        top.append((item[1], logprob(item[0], where)))
    if len({tid for tid, _ in top}) != k:
        raise ResponseMismatchError(f"{where}: an id twice in the top {k}")
    return top


def generate_output(ids: list[int], start: int, logp: list[float], top_ids: list[list[int]],
                    top_logprobs: list[list[float]], entropies: list[float] | None) -> dict[str, Any]:
    """One sequence's answer as SGLang writes it (our server): positions ``start..L-1``.

    Args:
        ids: The sequence.
        start: ``logprob_start_len``.
        logp: ``[L - start - 1]`` log-probs of tokens ``start + 1..L-1``.
        top_ids: ``[L - start - 1][k]`` their positions' top-k ids; top_logprobs: their log-probs.
        entropies: The same positions' exact entropies, or None (answer like SGLang).
    """
    tokens = [[None, ids[start], None]] + [[lp, t, None] for lp, t in zip(logp, ids[start + 1:], strict=True)]
    tops: list[Any] = [None] + [[[lp, t, None] for t, lp in zip(row_ids, row_lps, strict=True)]
                                for row_ids, row_lps in zip(top_ids, top_logprobs, strict=True)]
    meta: dict[str, Any] = {"id": "", "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": len(ids),
                            "completion_tokens": 0, "cached_tokens": 0, "input_token_logprobs": tokens,
                            "output_token_logprobs": [], "input_top_logprobs": tops, "output_top_logprobs": []}
    if entropies is not None:
        meta[ENTROPY_FIELD] = [None, *entropies]
    return {"text": "", "output_ids": [], "meta_info": meta, "prompt_token_ids": list(ids)}
