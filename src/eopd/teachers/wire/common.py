"""What both wire formats share: the parsed row, the checks of one log-prob, the endpoints beside scoring.

Why this file exists: vLLM's completions answer and SGLang's ``/generate`` answer hold the same numbers in
other shapes. Once parsed, both are ``RowScores``; the rules a number must satisfy to be trained on are the same
for both and live here: a log-prob is a number ``<= 0`` (a positive one is a logit: a server started with
``--logprobs-mode raw_logits``), a top-k is a sub-distribution (its log-sum-exp ``<= 0``), and an id at or above
the tokenizer's vocabulary (a padded row of the model's lm_head, Qwen3's 151,669..151,935) is probability mass
the student cannot put anywhere: it leaves the top-k and counts as tail mass. So do the other endpoints both
servers answer alike (``GET /v1/models``, ``POST /tokenize``) and the error bodies.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

#: vLLM clamps ``-inf`` log-probs to this in responses (``clamp_prompt_logprobs``); SGLang's orjson writes
#: ``-inf`` as ``null``, which is read as this too.
VLLM_NEG_INF = -9999.0
#: A log-prob above this is not a log-prob (rounding can make a near-certain token's slightly positive).
MAX_LOGPROB = 1e-3
#: Where ``--logprobs-mode`` is explained, in the errors that name it.
LOGPROBS_MODE_ADVICE = ("the server sends logits, not log-probs: it was started with --logprobs-mode raw_logits "
                        "or processed_logits (vLLM); restart it with the default --logprobs-mode raw_logprobs")


class ResponseMismatchError(ValueError):
    """A response that does not match its request; the message says what (it is retried, then fails)."""


class NotLogprobsError(ResponseMismatchError):
    """Values that cannot be log-probs (positive, or a top-k summing above 1): logits from a server started with
    ``--logprobs-mode raw_logits``/``processed_logits``. At start it stops the run at once (retrying cannot fix
    a server's mode)."""


class NoPromptLogprobsError(ResponseMismatchError):
    """A 200 answer without the prompt log-probs asked for: the server ignores the field (SGLang's OpenAI
    endpoint, older servers). At start it stops the run at once with the supported APIs."""


@dataclass
class RowScores:
    """One sequence's teacher scores at its last ``T`` positions (the completion), plain Python lists.

    Attributes:
        logp_T: Log-prob of each completion token.
        topk_ids_TK: The top-``k`` ids per position, most likely first, all below the tokenizer's vocabulary
            (padded ids dropped; the freed slots repeat the last id at log-prob ``-inf``).
        topk_logprobs_TK: Their log-probs.
        entropy_T: Exact full-vocabulary entropies (our server's extension), or None when not sent.
    """

    logp_T: list[float]
    topk_ids_TK: list[list[int]]
    topk_logprobs_TK: list[list[float]]
    entropy_T: list[float] | None


def is_int(value: Any) -> bool:
    """A JSON integer (``bool`` is an ``int`` subclass in Python, not one here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A JSON number Python can hold as a float: not NaN, not an integer beyond float range."""
    if is_int(value):
        return abs(value) < 2**1023
    return isinstance(value, float) and not math.isnan(value)


def logprob(value: Any, where: str) -> float:
    """A log-prob as sent: a number ``<= MAX_LOGPROB`` (``null``: ``-inf``, as SGLang's orjson writes it).

    Raises:
        NotLogprobsError: a positive number (a logit).
        ResponseMismatchError: anything else that is not a number.
    """
    if value is None:
        return VLLM_NEG_INF
    if not is_number(value):
        raise ResponseMismatchError(f"{where}: {value!r} is not a log-prob")
    if value > MAX_LOGPROB:
        raise NotLogprobsError(f"{where}: log-prob {value!r} is positive; {LOGPROBS_MODE_ADVICE}")
    return float(value)


def real_topk(top: list[tuple[int, float]], k: int, vocab_size: int, fallback_id: int,
              where: str) -> tuple[list[int], list[float]]:
    """The top-``k`` of one position over the tokenizer's vocabulary, most likely first.

    ``top`` holds the server's ``k`` entries ``(id, log-prob)``. Ids at or above ``vocab_size`` are the model's
    padded lm_head rows (vLLM and SGLang take the top-k over every row): their mass is the tail's, so they leave
    the top-k, and each freed slot repeats the last kept id (``fallback_id`` when none is kept) at ``-inf``.

    Raises:
        NotLogprobsError: the ``k`` log-probs sum above 1 (log-sum-exp above ``MAX_LOGPROB``): logits.
    """
    finite = [lp for _, lp in top if lp > VLLM_NEG_INF]
    if finite and max(finite) + math.log(sum(math.exp(lp - max(finite)) for lp in finite)) > MAX_LOGPROB:
        raise NotLogprobsError(f"{where}: the top {len(top)} log-probs sum above 1; {LOGPROBS_MODE_ADVICE}")
    kept = sorted(((tid, lp) for tid, lp in top if tid < vocab_size), key=lambda item: -item[1])
    ids, lps = [tid for tid, _ in kept], [lp for _, lp in kept]
    while len(ids) < k:
        ids.append(ids[-1] if ids else fallback_id)
        lps.append(float("-inf"))
    return ids, lps


def check_entropies(values: Any, length: int, start: int, field: str) -> list[float] | None:
    """An exact-entropy extension at positions ``start..length-1``, or None when the field is absent."""
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != length:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ResponseMismatchError(f"{field} has {got} positions for a {length}-position answer")
    out = values[start:]
    if not all(is_number(h) and 0 <= h < math.inf for h in out):
        raise ResponseMismatchError(f"{field} holds a value that is not an entropy (finite, >= 0)")
    return [float(h) for h in out]


@dataclass(frozen=True)
class ModelCard:
    """One entry of ``GET /v1/models``: the name requests use, who serves it, its context length (None when not
    listed)."""

    id: str
    owned_by: str | None
    max_model_len: int | None


def model_cards(body: Any) -> list[ModelCard]:
    """The cards of a ``GET /v1/models`` answer (``{"object": "list", "data": [{"id", "owned_by",
    "max_model_len", ...}]}``: vLLM's and SGLang's ``ModelCard``)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise ResponseMismatchError("GET /v1/models did not return {'data': [{'id': ...}, ...]}")
    cards = []
    for m in data:
        length = m.get("max_model_len")
        owner = m.get("owned_by")
        cards.append(ModelCard(m["id"], owner if isinstance(owner, str) else None,
                               length if is_int(length) and length > 0 else None))
    return cards


def model_ids(body: Any) -> list[str]:
    """The model names of a ``GET /v1/models`` response."""
    return [card.id for card in model_cards(body)]


def tokenize_request(model: str, text: str) -> dict[str, Any]:
    """The body of ``POST /tokenize`` (vLLM's ``TokenizeCompletionRequest``, SGLang's ``TokenizeRequest``),
    without special tokens."""
    return {"model": model, "prompt": text, "add_special_tokens": False}


def tokenize_ids(body: Any) -> list[int]:
    """The ids of a ``POST /tokenize`` response (``{"count": n, "max_model_len": m, "tokens": [...]}``)."""
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
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
