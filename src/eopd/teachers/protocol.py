"""The wire format of a served teacher: vLLM's OpenAI-compatible completions API, as both of our sides speak it.

Why this file exists: the client (``served_teacher.py``) and our server (``teacher_server.py``) must agree on
one shape, and that shape is vLLM's, so that ``vllm serve MODEL --max-logprobs 20`` is a teacher with no code
of ours on its machine. Everything about the JSON lives here: the request, the validation of a response
against its request (anything that does not match is rejected, never trained on), the parse into per-row
lists, and the one position entry our server writes. Shapes and where they were looked up: docs/served_teacher.md.

One request scores several sequences (``prompt`` is a list of token-id lists)::

    POST {url}/completions  {"model": M, "prompt": [[ids...], ...], "prompt_logprobs": k, "max_tokens": 1,
                             "temperature": 1.0, "n": 1}
    -> {"choices": [{"index": i, "prompt_logprobs": [null, {"<id>": {"logprob": lp, "rank": r,
                     "decoded_token": s}, ...}, ...], ...}, ...]}

Position ``j >= 1`` of ``prompt_logprobs`` holds the distribution that predicts token ``j`` given tokens
``< j``: its top-k ids (ranks ``1..k``) and, when it is not among them, token ``j`` itself (``k`` or ``k + 1``
entries; vLLM ranks that one above ``k``, our server ``null``). Our
server adds one field beside it, ``prompt_entropies`` (``ENTROPY_FIELD``): the exact full-vocabulary
entropy of the same distributions (``null`` first), which vLLM does not send.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

#: Our server's one extension field of a choice: the exact entropy (nats) at every prompt position.
ENTROPY_FIELD = "prompt_entropies"
#: vLLM clamps ``-inf`` log-probs to this in responses (``clamp_prompt_logprobs``).
VLLM_NEG_INF = -9999.0
#: A log-prob above this is not a log-prob (rounding can make a near-certain token's slightly positive).
MAX_LOGPROB = 1e-3


class ResponseMismatchError(ValueError):
    """A response that does not match its request; the message says what (it is retried, then fails)."""


@dataclass
class RowScores:
    """One sequence's teacher scores at its last ``T`` positions (the completion), plain Python lists.

    Attributes:
        logp_T: Log-prob of each completion token.
        topk_ids_TK: The top-``k`` ids per position, most likely first.
        topk_logprobs_TK: Their log-probs.
        entropy_T: Exact full-vocabulary entropies (our server's extension), or None when not sent.
    """

    logp_T: list[float]
    topk_ids_TK: list[list[int]]
    topk_logprobs_TK: list[list[float]]
    entropy_T: list[float] | None


def completion_request(model: str, prompts: list[list[int]], k: int) -> dict[str, Any]:
    """The body of one scoring request: ``prompts`` as token ids, top-``k`` log-probs at every position.

    ``max_tokens`` is 1, the least vLLM accepts without ``echo`` (its ``SamplingParams`` rejects 0); the one
    generated token is ignored. Temperature 1: the log-probs are the model's own (vLLM's default
    ``logprobs_mode=raw_logprobs`` ignores the sampling temperature anyway).
    """
    return {"model": model, "prompt": prompts, "prompt_logprobs": k, "max_tokens": 1, "temperature": 1.0,
            "n": 1, "stream": False}


def parse_completion_response(body: Any, prompts: list[list[int]], completion_lengths: list[int], k: int,
                              vocab_size: int) -> list[RowScores]:
    """Validate a completions response against its request and parse the completion positions of each row.

    Anything the server could send goes through here, so the only exception a response can raise is
    ``ResponseMismatchError`` (fuzzed in tests/test_teacher_client.py): the client retries it and, when it
    persists, stops with ``TeacherUnavailableError`` (the trainer's checkpoint-and-stop).

    Args:
        body: The decoded JSON.
        prompts: The sequences sent (prompt + completion ids), in request order.
        completion_lengths: How many trailing positions of each sequence are the completion (``>= 0``, and
            fewer than the sequence's length: the first token has no distribution).
        k: ``prompt_logprobs`` asked for; ``min(k, vocab_size)`` top entries are required at each position.
        vocab_size: Ids must be in ``[0, vocab_size)``.

    Raises:
        ResponseMismatchError: wrong number of choices or positions, choice indices that are not 0..n-1,
            echoed ids that differ, a sampled token missing, entries ranked 1..k that are not exactly the
            top k, ids out of range, values that are not log-probs.
    """
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != len(prompts):
        got = len(choices) if isinstance(choices, list) else "no"
        raise ResponseMismatchError(f"{got} choices for {len(prompts)} prompts")
    return [parse_choice(c, ids, n, min(k, vocab_size), vocab_size)
            for c, ids, n in zip(in_index_order(choices), prompts, completion_lengths, strict=True)]


def in_index_order(choices: list[Any]) -> list[dict[str, Any]]:
    """The choices ordered by their ``index``, which must be the ints ``0..n-1`` once each (a choice that is
    not an object, or an index of another type, bool included, is a mismatch, not a ``TypeError``)."""
    ordered: list[dict[str, Any] | None] = [None] * len(choices)
    for choice in choices:
        index = choice.get("index") if isinstance(choice, dict) else None
        if not _is_int(index) or not 0 <= index < len(choices) or ordered[index] is not None:
            raise ResponseMismatchError(f"choice indices are not 0..{len(choices) - 1} (got {index!r})")
        ordered[index] = choice
    return ordered  # type: ignore[return-value]  # every slot filled: n distinct indices in [0, n)


def parse_choice(choice: dict[str, Any], ids: list[int], completion_length: int, k: int,
                 vocab_size: int) -> RowScores:
    """One choice's completion positions (see ``parse_completion_response``); ``k`` is already ``<= V``."""
    positions = choice.get("prompt_logprobs")
    if not isinstance(positions, list) or len(positions) != len(ids):
        got = len(positions) if isinstance(positions, list) else "no"
        raise ResponseMismatchError(f"{got} prompt_logprobs positions for a {len(ids)}-token sequence")
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and echoed != list(ids):
        raise ResponseMismatchError("the server scored other token ids than the ones sent (prompt_token_ids differ)")
    if not 0 <= completion_length < len(ids):
        raise ValueError(f"completion length {completion_length} must be in [0, {len(ids)})")
    start = len(ids) - completion_length
    logp_T, ids_TK, lps_TK = [], [], []
    for j in range(start, len(ids)):
        logp, top_ids, top_lps = parse_position(positions[j], ids[j], k, vocab_size, j)
        logp_T.append(logp)
        ids_TK.append(top_ids)
        lps_TK.append(top_lps)
    return RowScores(logp_T, ids_TK, lps_TK, parse_entropies(choice.get(ENTROPY_FIELD), len(ids), start))


def parse_position(entry: Any, token: int, k: int, vocab_size: int, j: int) -> tuple[float, list[int], list[float]]:
    """``(log p(token), top-k ids, top-k log-probs)`` of one position's ``{id: {"logprob", "rank"}}`` entry.

    The top k are the entries ranked ``1..k``, each rank once: vLLM gives every entry a rank (a sampled token
    outside the top-k gets its true vocabulary rank, older V1 versions ``k + 1``: either way above ``k``) and
    our server gives such a token ``rank: null``. Any other entry is a mismatch; so is a position that holds
    only ``k - 1`` of the top k beside the sampled token, which the log-probs alone cannot tell from a whole
    top k. The top k are returned most likely first. ``-9999.0`` (vLLM's ``-inf``) stays as it is.
    """
    if not isinstance(entry, dict):
        raise ResponseMismatchError(f"position {j}: expected a {{token id: logprob}} mapping, "
                                    f"got {type(entry).__name__}")
    items = [(_token_id(key, vocab_size, j), _logprob(value, j), _rank(value, j)) for key, value in entry.items()]
    if not k <= len(items) <= k + 1:
        raise ResponseMismatchError(f"position {j}: {len(items)} entries where the top {k} (and the sampled token) "
                                    "were asked")
    ranked: dict[int, tuple[int, float]] = {}
    sampled = None
    for tid, lp, rank in items:
        if tid == token:
            sampled = lp
        if rank is not None and rank <= k:
            if rank in ranked:
                raise ResponseMismatchError(f"position {j}: rank {rank} twice (ids {ranked[rank][0]} and {tid})")
            ranked[rank] = (tid, lp)
        elif tid != token:
            raise ResponseMismatchError(f"position {j}: id {tid} is outside the top {k} (rank {rank}) and is not "
                                        f"the sampled token {token}")
    if sampled is None:
        raise ResponseMismatchError(f"position {j}: the sampled token {token} is missing")
    if len(ranked) != k:
        raise ResponseMismatchError(f"position {j}: ranks 1..{k} expected once each (the top {k}), got ranks "
                                    f"{sorted(ranked)}")
    top = sorted(ranked.values(), key=lambda item: -item[1])
    return sampled, [tid for tid, _ in top], [lp for _, lp in top]


def _is_int(value: Any) -> bool:
    """A JSON integer (``bool`` is an ``int`` subclass in Python, not one here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_or_inf(value: Any) -> bool:
    """A JSON number Python can hold as a float: not NaN, not an integer beyond float range."""
    if _is_int(value):
        return abs(value) < 2**1023
    return isinstance(value, float) and not math.isnan(value)


def _token_id(key: Any, vocab_size: int, j: int) -> int:
    """The id of an entry's key, written as vLLM writes it (``str(id)``: ``"05"``, ``" 5"`` or ``"+5"`` would
    make two keys of one id)."""
    tid = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None
    if tid is None or key != str(tid):
        raise ResponseMismatchError(f"position {j}: {key!r} is not a token id")
    if not tid < vocab_size:
        raise ResponseMismatchError(f"position {j}: token id {tid} is outside the vocabulary [0, {vocab_size})")
    return tid


def _logprob(value: Any, j: int) -> float:
    lp = value.get("logprob") if isinstance(value, dict) else None
    if not _is_finite_or_inf(lp) or lp > MAX_LOGPROB:
        raise ResponseMismatchError(f"position {j}: {value!r} is not a {{'logprob': float <= 0}} entry")
    return float(lp)


def _rank(value: dict[str, Any], j: int) -> int | None:
    """An entry's ``rank``: None (absent or ``null``) or an int ``>= 1``."""
    rank = value.get("rank")
    if rank is not None and (not _is_int(rank) or rank < 1):
        raise ResponseMismatchError(f"position {j}: rank {rank!r} is not an integer >= 1 (or null)")
    return rank


def parse_entropies(values: Any, length: int, start: int) -> list[float] | None:
    """The extension's entropies at positions ``start..length-1``, or None when the field is absent."""
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != length:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ResponseMismatchError(f"{ENTROPY_FIELD} has {got} positions for a {length}-token sequence")
    out = values[start:]
    if not all(_is_finite_or_inf(h) and 0 <= h < math.inf for h in out):
        raise ResponseMismatchError(f"{ENTROPY_FIELD} holds a value that is not an entropy (finite, >= 0)")
    return [float(h) for h in out]


def position_entry(token: int, logp: float, top_ids: list[int], top_logprobs: list[float]) -> dict[str, Any]:
    """One position as vLLM writes it: the sampled (prompt) token first, then the top-k with ranks 1..k.

    A sampled token inside the top-k is overwritten by its top-k entry (as in vLLM's dict). Outside it, our
    server gives ``rank: null`` (its exact rank would need another pass over the vocabulary) and never a
    ``decoded_token`` (``null``, as vLLM does without a tokenizer; nothing here reads it).
    """
    entry = {str(token): {"logprob": logp, "rank": None, "decoded_token": None}}
    for rank, (tid, lp) in enumerate(zip(top_ids, top_logprobs, strict=True), start=1):
        entry[str(tid)] = {"logprob": lp, "rank": rank, "decoded_token": None}
    return entry


def model_ids(body: Any) -> list[str]:
    """The model names of a ``GET /v1/models`` response (``{"object": "list", "data": [{"id": ...}]}``)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise ResponseMismatchError("GET /v1/models did not return {'data': [{'id': ...}, ...]}")
    return [m["id"] for m in data]


def tokenize_request(model: str, text: str) -> dict[str, Any]:
    """The body of ``POST /tokenize`` (vLLM's ``TokenizeCompletionRequest``), without special tokens."""
    return {"model": model, "prompt": text, "add_special_tokens": False}


def tokenize_ids(body: Any) -> list[int]:
    """The ids of a ``POST /tokenize`` response (``{"count": n, "max_model_len": m, "tokens": [...]}``)."""
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ResponseMismatchError("POST /tokenize did not return {'tokens': [ids...]}")
    return tokens


def error_message(raw: bytes) -> str:
    """The message of an error body: vLLM's ``{"error": {"message": ...}}``, older ``{"message": ...}``, its
    401 ``{"error": "Unauthorized"}``, or the text (also for JSON nested too deep to parse or print)."""
    as_text = " ".join(raw[:200].decode("utf-8", "replace").split()) or "(empty body)"
    try:
        body = json.loads(raw)
        if isinstance(body, dict):
            inner = body.get("error")
            message = inner.get("message") if isinstance(inner, dict) else body.get("message", inner)
            if message:
                return " ".join(str(message).split())[:300]
        return str(body)[:200]
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return as_text


def error_body(message: str, status: int) -> dict[str, Any]:
    """An error response as current vLLM writes it."""
    return {"error": {"message": message, "type": "BadRequestError" if status < 500 else "InternalServerError",
                      "param": None, "code": status}}
