"""Wire formats: the JSON a served teacher speaks, one module per server family, both parsed to ``RowScores``.

- ``common``  the parsed row, the checks every log-prob passes, ``/v1/models`` and ``/tokenize``, error bodies
- ``vllm``    vLLM's ``POST /v1/completions`` with ``prompt_logprobs`` (also ``eopd serve-teacher``'s default)
- ``sglang``  SGLang's native ``POST /generate`` with ``logprob_start_len`` (``eopd serve-teacher --api sglang``)

``FORMATS[name]`` is what the client needs of one: where a request goes, its body, and the parse.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eopd.teachers.wire import sglang, vllm
from eopd.teachers.wire.common import (
    ModelCard,
    NoPromptLogprobsError,
    NotLogprobsError,
    ResponseMismatchError,
    RowScores,
    model_cards,
    tokenize_ids,
    tokenize_request,
)


@dataclass(frozen=True)
class WireFormat:
    """One server family's scoring request.

    Attributes:
        name: ``vllm`` or ``sglang`` (``teacher.api``).
        endpoint: Base URL (``.../v1``) -> the URL a scoring request is POSTed to.
        request: ``(model, sequences, completion lengths, k)`` -> the request body.
        parse: ``(body, sequences, completion lengths, k, vocab size)`` -> one ``RowScores`` per sequence.
        entropy_field: The field our server adds with exact entropies.
    """

    name: str
    endpoint: Callable[[str], str]
    request: Callable[[str, list[list[int]], list[int], int], dict[str, Any]]
    parse: Callable[[Any, list[list[int]], list[int], int, int], list[RowScores]]
    entropy_field: str


FORMATS = {
    "vllm": WireFormat("vllm", vllm.endpoint, vllm.completion_request, vllm.parse_completion_response,
                       vllm.ENTROPY_FIELD),
    "sglang": WireFormat("sglang", sglang.endpoint, sglang.generate_request, sglang.parse_generate_response,
                         sglang.ENTROPY_FIELD),
}
#: ``teacher.api`` values: a family, or ``auto`` (read from ``GET /v1/models``'s ``owned_by`` at connect).
APIS = ("auto", *FORMATS)

__all__ = [
    "APIS", "FORMATS", "ModelCard", "NoPromptLogprobsError", "NotLogprobsError", "ResponseMismatchError",
    "RowScores", "WireFormat", "model_cards", "sglang", "tokenize_ids", "tokenize_request", "vllm",
]
