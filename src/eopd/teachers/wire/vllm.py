"""vLLM's completions API with ``prompt_logprobs``, as the client sends it and ``eopd serve-teacher`` answers it.

Why this file exists: ``vllm serve MODEL --max-logprobs 20`` is a teacher with no code of ours on its machine, so
its shapes (read in the vLLM 0.34.0 wheel; docs/served_teacher.md) are the contract: the request, the validation
of an answer against its request (anything that does not match is rejected, never trained on), the parse into
``RowScores`` and the one position entry our server writes. One request scores several sequences::

    POST {url}/completions  {"model": M, "prompt": [[ids...], ...], "prompt_logprobs": k, "max_tokens": 1,
                             "temperature": 1.0, "n": 1, "return_token_ids": true}
    -> {"choices": [{"index": i, "prompt_token_ids": [ids...],
                     "prompt_logprobs": [null, {"<id>": {"logprob": lp, "rank": r, "decoded_token": s}, ...}, ...],
                     ...}, ...]}

Position ``j >= 1`` of ``prompt_logprobs`` holds the distribution that predicts token ``j`` given tokens
``< j``: its top-k ids (ranks ``1..k``) and, when it is not among them, token ``j`` itself (``k`` or ``k + 1``
entries; vLLM ranks that one above ``k``, our server ``null``). Every prompt position is answered, the prompt's
too: ``k + 1`` entries a position (SGLang's ``logprob_start_len`` asks for the completion only, ``sglang.py``).
Our server adds one field beside it, ``prompt_entropies`` (``ENTROPY_FIELD``): the exact full-vocabulary entropy
of the same distributions (``null`` first), which vLLM does not send.
"""

from __future__ import annotations

from typing import Any

from eopd.teachers.wire.common import (
    NoPromptLogprobsError,
    ResponseMismatchError,
    RowScores,
    check_entropies,
    is_int,
    is_number,
    logprob,
    real_topk,
)

#: Our server's one extension field of a choice: the exact entropy (nats) at every prompt position.
ENTROPY_FIELD = "prompt_entropies"


def endpoint(url: str) -> str:
    """Where a scoring request goes: ``{url}/completions`` (``url`` ends in ``/v1``)."""
    return f"{url}/completions"


def completion_request(model: str, prompts: list[list[int]], completion_lengths: list[int], k: int) -> dict[str, Any]:
    """The body of one scoring request: ``prompts`` as token ids, top-``k`` log-probs at every position.

    ``max_tokens`` is 1, the least vLLM accepts without ``echo`` (its ``SamplingParams`` rejects 0); the one
    generated token is ignored. Temperature 1: the log-probs are the model's own (vLLM's default
    ``logprobs_mode=raw_logprobs`` ignores the sampling temperature anyway). ``return_token_ids`` makes vLLM
    echo the ids it scored (``prompt_token_ids``), which the parse checks against the ids sent.
    ``completion_lengths`` is not sent: vLLM scores every position.
    """
    return {"model": model, "prompt": prompts, "prompt_logprobs": k, "max_tokens": 1, "temperature": 1.0,
            "n": 1, "stream": False, "return_token_ids": True}


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
        vocab_size: The tokenizer's vocabulary; top-k ids at or above it (padded rows) count as tail mass.

    Raises:
        NoPromptLogprobsError: no choice holds prompt log-probs (a server that ignores the field).
        NotLogprobsError: values that are logits (``--logprobs-mode raw_logits``).
        ResponseMismatchError: wrong number of choices or positions, choice indices that are not 0..n-1,
            echoed ids that differ, a sampled token missing, entries ranked 1..k that are not exactly the
            top k, ids that are not ids, values that are not log-probs.
    """
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != len(prompts):
        got = len(choices) if isinstance(choices, list) else "no"
        raise ResponseMismatchError(f"{got} choices for {len(prompts)} prompts")
    ordered = in_index_order(choices)
    if ordered and all(c.get("prompt_logprobs") is None for c in ordered):
        raise NoPromptLogprobsError("the answer has no prompt_logprobs: the server ignores the field")
    return [parse_choice(c, ids, n, min(k, vocab_size), vocab_size)
            for c, ids, n in zip(ordered, prompts, completion_lengths, strict=True)]


def in_index_order(choices: list[Any]) -> list[dict[str, Any]]:
    """The choices ordered by their ``index``, which must be the ints ``0..n-1`` once each (a choice that is
    not an object, or an index of another type, bool included, is a mismatch, not a ``TypeError``)."""
    ordered: list[dict[str, Any] | None] = [None] * len(choices)
    for choice in choices:
        index = choice.get("index") if isinstance(choice, dict) else None
        if not is_int(index) or not 0 <= index < len(choices) or ordered[index] is not None:
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
    return RowScores(logp_T, ids_TK, lps_TK, check_entropies(choice.get(ENTROPY_FIELD), len(ids), start,
                                                             ENTROPY_FIELD))


def parse_position(entry: Any, token: int, k: int, vocab_size: int, j: int) -> tuple[float, list[int], list[float]]:
    """``(log p(token), top-k ids, top-k log-probs)`` of one position's ``{id: {"logprob", "rank"}}`` entry.

    The top k are the entries ranked ``1..k``, each rank once: vLLM gives every entry a rank (a sampled token
    outside the top-k gets its true vocabulary rank, older V1 versions ``k + 1``: either way above ``k``) and
    our server gives such a token ``rank: null``. Any other entry is a mismatch; so is a position that holds
    only ``k - 1`` of the top k beside the sampled token, which the log-probs alone cannot tell from a whole
    top k. Top-k ids at or above ``vocab_size`` (vLLM's top-k runs over the lm_head's padded rows) leave the
    top-k as tail mass (``real_topk``). ``-9999.0`` (vLLM's ``-inf``) stays as it is.
    """
    where = f"position {j}"
    if not isinstance(entry, dict):
        raise ResponseMismatchError(f"{where}: expected a {{token id: logprob}} mapping, got {type(entry).__name__}")
    items = [(_token_id(key, j), _entry_logprob(value, where), _rank(value, j)) for key, value in entry.items()]
    if not k <= len(items) <= k + 1:
        raise ResponseMismatchError(f"{where}: {len(items)} entries where the top {k} (and the sampled token) "
                                    "were asked")
    ranked: dict[int, tuple[int, float]] = {}
    sampled = None
    for tid, lp, rank in items:
        if tid == token:
            sampled = lp
        if rank is not None and rank <= k:
            if rank in ranked:
                raise ResponseMismatchError(f"{where}: rank {rank} twice (ids {ranked[rank][0]} and {tid})")
            ranked[rank] = (tid, lp)
        elif tid != token:
            raise ResponseMismatchError(f"{where}: id {tid} is outside the top {k} (rank {rank}) and is not "
                                        f"the sampled token {token}")
    if sampled is None:
        raise ResponseMismatchError(f"{where}: the sampled token {token} is missing")
    if len(ranked) != k:
        raise ResponseMismatchError(f"{where}: ranks 1..{k} expected once each (the top {k}), got ranks "
                                    f"{sorted(ranked)}")
    top_ids, top_lps = real_topk(list(ranked.values()), k, vocab_size, token, where)
    return sampled, top_ids, top_lps


def _token_id(key: Any, j: int) -> int:
    """The id of an entry's key, written as vLLM writes it (``str(id)``: ``"05"``, ``" 5"`` or ``"+5"`` would
    make two keys of one id)."""
    tid = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None
    if tid is None or key != str(tid):
        raise ResponseMismatchError(f"position {j}: {key!r} is not a token id")
    return tid


def _entry_logprob(value: Any, where: str) -> float:
    """An entry's ``logprob``: a number ``<= 0`` (a positive one is a logit: ``NotLogprobsError``)."""
    lp = value.get("logprob") if isinstance(value, dict) else None
    if not is_number(lp):
        raise ResponseMismatchError(f"{where}: {value!r} is not a {{'logprob': float <= 0}} entry")
    return logprob(lp, where)


def _rank(value: dict[str, Any], j: int) -> int | None:
    """An entry's ``rank``: None (absent or ``null``) or an int ``>= 1``."""
    rank = value.get("rank")
    if rank is not None and (not is_int(rank) or rank < 1):
        raise ResponseMismatchError(f"position {j}: rank {rank!r} is not an integer >= 1 (or null)")
    return rank


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
