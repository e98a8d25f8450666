"""The served teacher's client against servers that misbehave on purpose (issue 17 items 9 and 10).

Every server here is a few lines of stdlib on 127.0.0.1 with a port the OS picks: one that trickles its answer a
byte at a time (the request deadline must hold over the whole answer), and one that answers with a valid body
or a malformed one (a malformed answer is a mismatch: rejected, retried, then ``TeacherUnavailableError``, the
trainer's checkpoint-and-stop; never a ``TypeError`` and never trained on). The parse itself is fuzzed: it
raises only ``ResponseMismatchError``.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eopd.models.char_tokenizer import build_char_tokenizer
from eopd.teachers.scores import TeacherMismatchError, TeacherUnavailableError
from eopd.teachers.served import ServedTeacher
from eopd.teachers.server import rollout_of
from eopd.teachers.transport import API_KEY_ENV, HTTPStatusError, request_json
from eopd.teachers.wire.common import ResponseMismatchError
from eopd.teachers.wire.vllm import parse_completion_response, position_entry

V = 17  # the character tokenizer's vocabulary: 3 specials + 14 characters
K = 3

# -- 17.9: the deadline holds over the whole answer --------------------------------------------------------------


@contextmanager
def trickling_server(at_once: bytes, trickled: bytes, every_s: float, piece: int = 1) -> Iterator[str]:
    """A loopback server that reads one request, sends ``at_once``, then ``trickled`` ``piece`` bytes every
    ``every_s`` and then holds the connection open without a word; yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    stop = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(4096)
            try:
                conn.sendall(at_once)
                for i in range(0, len(trickled), piece):
                    if stop.wait(every_s):
                        return
                    conn.sendall(trickled[i:i + piece])
                stop.wait(30)
            except OSError:  # the client gave up and closed: what we want
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n"  # 39 bytes: ~6 s at one byte per 0.15 s
BODY = b'{"object": "list", "x":1}'[:24]


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_trickling_server_fails_at_the_deadline_not_after_it(where: str) -> None:
    """One byte every 0.15 s never trips a per-read timeout of 1 s; the deadline of the whole answer must."""
    at_once, trickled = (b"", HEAD + BODY) if where == "headers" else (HEAD, BODY)
    timeout_s = 1.0
    with trickling_server(at_once, trickled, every_s=0.15) as url:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"teacher\.timeout_s"):
            request_json(f"{url}/models", None, timeout_s)
        elapsed = time.monotonic() - start
    assert timeout_s - 0.05 <= elapsed < timeout_s + 0.5, elapsed

    with trickling_server(at_once, trickled, every_s=0.15) as url:  # through the client: one line, "timed out"
        served = ServedTeacher([url], vocab_size=V, timeout_s=timeout_s, retries=0)
        start = time.monotonic()
        with pytest.raises(TeacherUnavailableError, match="timed out") as err:
            served.connect(build_char_tokenizer(), top_k=K, check_tokenizer=False)
        assert time.monotonic() - start < timeout_s + 0.5 and "\n" not in str(err.value)


def test_an_answer_that_closes_the_connection_is_read_whole() -> None:
    """``Connection: close`` hands the socket from the connection to the response: closing the connection must
    not cut the body short (it arrives in pieces, well after the headers)."""
    body = json.dumps({"object": "list", "data": [{"id": "m" * 100_000}]}).encode()
    head = f"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with trickling_server(head, body, every_s=0.02, piece=len(body) // 4 + 1) as url:
        assert request_json(f"{url}/models", None, 5.0)["data"][0]["id"] == "m" * 100_000


@pytest.mark.parametrize("status", [200, 500])
def test_json_nested_too_deep_is_a_mismatch_or_an_http_error_not_a_recursion_error(status: int) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    expected = ResponseMismatchError if status == 200 else HTTPStatusError
    with trickling_server(head + body, b"", every_s=0.0) as url, pytest.raises(expected, match=r"not JSON|HTTP 500"):
        request_json(f"{url}/models", None, 5.0)


def test_an_api_key_is_sent_without_its_line_break_and_refused_with_one_inside(monkeypatch) -> None:
    """A key read from a file keeps its newline; one with a break inside cannot be a header (http.client raised
    a ValueError, which no retry or checkpoint path catches)."""
    seen: list[str | None] = []
    with fake_server() as server:
        server.seen_keys = seen
        monkeypatch.setenv(API_KEY_ENV, "secret\n")
        client(server)
        assert seen and set(seen) == {"Bearer secret"}
        monkeypatch.setenv(API_KEY_ENV, "sec\nret")
        with pytest.raises(TeacherMismatchError, match=f"{API_KEY_ENV} holds a character") as err:
            client(server)
    assert "\n" not in str(err.value)


# -- 17.10: malformed answers are mismatches --------------------------------------------------------------------


def valid_body(request: dict[str, Any], sampled_rank: int | None) -> dict[str, Any]:
    """A correct answer to a completions request, on a made-up distribution: ids 0..K-1 are the top K (log-probs
    -1, -2, -3) and a sampled token outside them gets -20 with ``sampled_rank`` (None as our server writes it, a
    true rank > K as vLLM does)."""
    k = request["prompt_logprobs"]
    choices = []
    for i, ids in enumerate(request["prompt"]):
        positions: list[Any] = [None]
        for token in ids[1:]:
            entry = position_entry(token, -20.0 if token >= k else -1.0 - token, list(range(k)),
                                   [-1.0 - r for r in range(k)])
            if token >= k:
                entry[str(token)]["rank"] = sampled_rank
            positions.append(entry)
        choices.append({"index": i, "text": "", "logprobs": None, "finish_reason": "length",
                        "prompt_logprobs": positions, "prompt_token_ids": None})
    return {"id": "cmpl-x", "object": "text_completion", "model": "m", "choices": choices}


class FakeServer(ThreadingHTTPServer):
    """Lists model ``m`` and answers completions with ``valid_body``, passed through ``edit`` when set; ``answer``
    (request -> (status, body)) replaces that, ``card`` adds fields to the model's ``GET /v1/models`` entry. Any
    other POST path is a 404, as on vLLM (which has no ``/generate``)."""

    daemon_threads = True

    def __init__(self, sampled_rank: int | None = None) -> None:
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.sampled_rank = sampled_rank
        self.edit: Callable[[dict[str, Any]], None] | None = None
        self.answer: Callable[[dict[str, Any]], tuple[int, Any]] | None = None
        self.card: dict[str, Any] = {}
        self.completions = 0
        self.requests: list[dict[str, Any]] = []
        self.seen_keys: list[str | None] | None = None  # the Authorization headers, when a list

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class FakeHandler(BaseHTTPRequestHandler):
    server: FakeServer

    def do_GET(self) -> None:
        self._note_key()
        self._send({"object": "list", "data": [{"id": "m", "object": "model", **self.server.card}]})

    def do_POST(self) -> None:
        self._note_key()
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions":
            self._send({"error": {"message": "Not Found", "code": 404}}, status=404)
            return
        self.server.completions += 1
        self.server.requests.append(request)
        if self.server.answer is not None:
            status, answer = self.server.answer(request)
            self._send(answer, status=status)
            return
        body = valid_body(request, self.server.sampled_rank)
        if self.server.edit is not None:
            self.server.edit(body)
        self._send(body)

    def _note_key(self) -> None:
        if self.server.seen_keys is not None:
            self.server.seen_keys.append(self.headers.get("Authorization"))

    def _send(self, body: Any, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def fake_server(sampled_rank: int | None = None) -> Iterator[FakeServer]:
    server = FakeServer(sampled_rank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# two sequences, each holding tokens inside (0, 1, 2) and outside (5, 9, 12) the made-up top-3
PROMPTS = [[4, 0, 5, 1, 9], [3, 2, 12]]


def client(server: FakeServer) -> ServedTeacher:
    """A connected client asking for the top ``K`` (the fake server sends no entropies: the top-k gate)."""
    served = ServedTeacher([server.url], vocab_size=V, entropy="topk", top_logprobs=K, retries=1, backoff_s=0.0,
                           rows_per_request=2)
    return served.connect(build_char_tokenizer(), top_k=K, check_tokenizer=False)


@pytest.mark.parametrize("sampled_rank", [None, 57, K + 1])
def test_valid_answers_are_accepted_with_either_rank_of_the_sampled_token(sampled_rank: int | None) -> None:
    """Our server's ``rank: null``, vLLM's true rank and older vLLM's ``k + 1`` for a token outside the top-k."""
    with fake_server(sampled_rank) as server:
        scores = client(server).score(rollout_of(PROMPTS, 0, torch.device("cpu")), top_k=K, want_logits=False)
    assert scores.logp_BT[0].tolist() == [-1.0, -20.0, -2.0, -20.0]
    assert scores.topk_ids_BTK[0, :, :].tolist() == [[0, 1, 2]] * 4


def _position(body: dict[str, Any], choice: int, j: int) -> dict[str, Any]:
    return body["choices"][choice]["prompt_logprobs"][j]


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("mixed index types", lambda b: b["choices"][0].update(index="0"), "choice indices"),
    ("a bool index", lambda b: [c.update(index=bool(c["index"])) for c in b["choices"]], "choice indices"),
    ("k-1 of the top-k plus the sampled token",  # position 2 samples 5 (outside): drop the rank-3 entry
     lambda b: _position(b, 0, 2).pop("2"), "ranks 1..3"),
    ("the sampled token claims a top-k rank",  # 4 entries, the sampled one also "rank 3"
     lambda b: _position(b, 0, 2)["5"].update(rank=3), "rank 3 twice"),
    ("a rank that is not a number", lambda b: _position(b, 1, 1)["0"].update(rank="1"), "rank"),
    ("a top-k entry without its rank", lambda b: _position(b, 1, 1)["1"].pop("rank"), "outside the top 3 (rank None)"),
    ("an entry outside the top-k that is not the sampled token",
     lambda b: _position(b, 0, 1).update({"7": {"logprob": -9.0, "rank": 40}}), "not the sampled token"),
    ("a log-prob beyond float range", lambda b: _position(b, 0, 1)["0"].update(logprob=-(10**400)), "logprob"),
    ("echoed ids that are not a list", lambda b: b["choices"][1].update(prompt_token_ids=5), "prompt_token_ids"),
    ("a token id written twice", lambda b: _position(b, 0, 1).update({"00": {"logprob": -1.0, "rank": 1}}),
     "not a token id"),
]


@pytest.mark.parametrize(("what", "edit", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_answer_is_rejected_retried_then_refused(what: str, edit: Callable, reason: str) -> None:
    with fake_server(sampled_rank=None) as server:
        served = client(server)
        rollout = rollout_of(PROMPTS, 0, torch.device("cpu"))
        before = server.completions
        server.edit = edit
        with pytest.raises(TeacherUnavailableError, match="response rejected") as err:
            served.score(rollout, top_k=K, want_logits=False)
    assert server.completions - before == 2  # the first attempt and its one retry
    assert reason in str(err.value) and "failed 2 time(s)" in str(err.value) and "\n" not in str(err.value)


# -- the parse raises nothing but ResponseMismatchError ------------------------------------------------------


def _request_body() -> dict[str, Any]:
    return valid_body({"prompt": PROMPTS, "prompt_logprobs": K}, sampled_rank=None)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4) | st.sampled_from(["0", "1", "-1", "05"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4) | st.sampled_from(
        ["index", "rank", "logprob", "prompt_logprobs", "choices", "prompt_token_ids", "prompt_entropies", "0", "5"]),
        inner, max_size=4),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _replaced(body: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    body = copy.deepcopy(body)
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


def _parse(body: Any) -> None:
    with suppress(ResponseMismatchError):  # anything else fails the test
        parse_completion_response(body, PROMPTS, [len(p) - 1 for p in PROMPTS], K, V)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=JSON)
def test_parse_of_any_json_raises_only_a_mismatch(body: Any) -> None:
    _parse(body)
    _parse({"choices": body})
    _parse({"choices": [{"index": 0, "prompt_logprobs": body}, {"index": 1, "prompt_logprobs": body}]})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), value=JSON)
def test_parse_of_a_valid_answer_with_one_node_replaced_raises_only_a_mismatch(data: st.DataObject, value: Any) -> None:
    body = _request_body()
    path = data.draw(st.sampled_from(list(_paths(body))))
    _parse(_replaced(body, path, value))


# -- issue 20: what real vLLM servers do that the fakes above do not -------------------------------------------------
# Each fake below answers as vLLM 0.34.0 does in that case (read in its wheel); each test failed on the client before.


def _answer_with(edit_positions: Callable[[list[int], list[Any]], None]) -> Callable[[dict[str, Any]], tuple[int, Any]]:
    """An ``answer`` hook: ``valid_body``, then ``edit_positions(ids, prompt_logprobs)`` on every choice."""
    def answer(request: dict[str, Any]) -> tuple[int, Any]:
        body = valid_body(request, None)
        for choice, ids in zip(body["choices"], request["prompt"], strict=True):
            edit_positions(ids, choice["prompt_logprobs"])
        return 200, body
    return answer


def _as_logits(shift: float | None) -> Callable[[list[int], list[Any]], None]:
    """``--logprobs-mode raw_logits``: every value is a logit. ``shift``: log-prob + shift (positive logits);
    None: small negative logits (-0.1, -0.2, ...) whose top-k sums above 1 though every one is below 0."""
    def edit(ids: list[int], positions: list[Any]) -> None:
        for entry in positions[1:]:
            for n, value in enumerate(sorted(entry.values(), key=lambda v: -v["logprob"])):
                value["logprob"] = value["logprob"] + shift if shift is not None else -0.1 * (n + 1)
    return edit


@pytest.mark.parametrize("shift", [25.0, None], ids=["positive logits", "negative logits"])
def test_a_server_sending_logits_stops_at_connect_naming_logprobs_mode(shift: float | None) -> None:
    """vLLM ``--logprobs-mode raw_logits`` writes logits into the log-prob fields (``compute_topk_scores`` with
    ``logits_mode``). Positive ones were refused after retries as "not a log-prob"; negative ones were trained
    on. Either is a top-k that is not a sub-distribution: refused at the first probe, not retried."""
    with fake_server() as server:
        server.answer = _answer_with(_as_logits(shift))
        with pytest.raises(TeacherMismatchError) as err:
            client(server)
    assert "--logprobs-mode" in str(err.value) and "\n" not in str(err.value)
    assert server.completions == 1  # a retry cannot change the server's mode


def test_a_padded_lm_head_row_in_the_top_k_counts_as_tail_mass() -> None:
    """vLLM's top-k runs over the model's padded rows (Qwen3: ids 151,669..151,935 beyond its tokenizer). An id at
    or above the tokenizer's vocabulary failed the answer, then the run; it is tail mass: out of the top-k, whose
    freed slot repeats a kept id at log-prob -inf."""
    padded = V + 1

    def pad(ids: list[int], positions: list[Any]) -> None:
        for token, entry in zip(ids[1:], positions[1:], strict=True):
            if token != 1:  # the rank-2 id becomes a padded row
                entry[str(padded)] = entry.pop("1")

    with fake_server() as server:
        server.answer = _answer_with(pad)
        scores = client(server).score(rollout_of(PROMPTS, 0, torch.device("cpu")), top_k=K, want_logits=False)
    assert int(scores.topk_ids_BTK.max()) < V
    # row 0 samples [0, 5, 1, 9]: position 2 (token 1) keeps the real top-3, the others lose id 1 to the padded row
    assert scores.topk_ids_BTK[0].tolist() == [[0, 2, 2], [0, 2, 2], [0, 1, 2], [0, 2, 2]]
    assert scores.topk_logprobs_BTK[0, 0].tolist() == [-1.0, -3.0, float("-inf")]
    assert scores.logp_BT[0].tolist() == [-1.0, -20.0, -2.0, -20.0]  # the sampled tokens' own log-probs
    assert bool(torch.isfinite(scores.entropy_BT).all())
    # the estimate sees the padded mass as tail: above the entropy of the two kept ids alone
    assert float(scores.entropy_lower_BT[0, 0]) > 0


def test_a_row_longer_than_the_servers_context_is_refused_with_its_cause() -> None:
    """vLLM answers a sequence of exactly ``max_model_len`` tokens with "max_tokens must be at least 1, got 0" (it
    clamps ``max_tokens`` to the room left, ``get_max_tokens``). The client reads ``max_model_len`` from
    ``GET /v1/models`` at connect and refuses such a row before sending it, naming the cause and the keys."""
    max_len = 20

    def answer(request: dict[str, Any]) -> tuple[int, Any]:
        longest = max(map(len, request["prompt"]))
        if longest > max_len:
            return 400, {"error": {"message": f"Input length ({longest}) exceeds model's maximum context length "
                                              f"({max_len}).", "code": 400}}
        if longest == max_len:
            return 400, {"error": {"message": "max_tokens must be at least 1, got 0.", "code": 400}}
        return 200, valid_body(request, None)

    with fake_server() as server:
        server.card = {"max_model_len": max_len}
        server.answer = answer
        served = client(server)
        assert served.max_model_len == max_len
        fits = served.score(rollout_of([[4, 0, 5, 1, 9] * 3 + [4, 0, 5, 1]], 0, torch.device("cpu")), top_k=K,
                            want_logits=False)  # 19 tokens: max_model_len - 1
        assert fits.logp_BT.shape == (1, 18)
        sent = server.completions
        with pytest.raises(TeacherUnavailableError) as err:
            served.score(rollout_of([[4, 0, 5, 1, 9] * 4], 0, torch.device("cpu")), top_k=K, want_logits=False)
        assert server.completions == sent  # refused before it was sent
    message = str(err.value)
    assert "max_model_len" in message and "rollout.max_new_tokens" in message and "20 tokens" in message, message
    assert "\n" not in message


def test_the_ids_the_server_scored_are_checked_against_the_ids_sent() -> None:
    """``return_token_ids: true`` makes vLLM echo the prompt ids it scored (``prompt_token_ids``, only when asked):
    the check against the ids sent now runs against vLLM (it never did: the field was never asked for)."""
    def echo(shift: int) -> Callable[[dict[str, Any]], tuple[int, Any]]:
        def answer(request: dict[str, Any]) -> tuple[int, Any]:
            body = valid_body(request, None)
            if request.get("return_token_ids"):  # vLLM: prompt_token_ids only with return_token_ids
                for choice, ids in zip(body["choices"], request["prompt"], strict=True):
                    choice["prompt_token_ids"] = [ids[0] + shift, *ids[1:]]  # e.g. a server that re-tokenized
            return 200, body
        return answer

    with fake_server() as server:
        server.answer = echo(0)
        served = client(server)
        rollout = rollout_of(PROMPTS, 0, torch.device("cpu"))
        served.score(rollout, top_k=K, want_logits=False)  # a faithful echo passes
        assert server.requests and all(r["return_token_ids"] is True for r in server.requests)
        server.answer = echo(1)
        with pytest.raises(TeacherUnavailableError, match="prompt_token_ids differ"):
            served.score(rollout, top_k=K, want_logits=False)


@pytest.mark.parametrize("api", ["vllm", "auto"])
def test_a_server_answering_without_prompt_logprobs_stops_at_connect_naming_the_apis(api: str) -> None:
    """SGLang's OpenAI ``/v1/completions`` ignores ``prompt_logprobs`` (absent from its request, unknown fields
    ignored) and answers 200 without them: one line at start pointing to the supported APIs, not retried (it
    was rejected as a malformed answer after retries, with a message about positions). With ``api=auto`` the
    client tries SGLang's ``/generate`` first; this server has none (404)."""
    def no_prompt_logprobs(request: dict[str, Any]) -> tuple[int, Any]:
        body = valid_body(request, None)
        for choice in body["choices"]:
            del choice["prompt_logprobs"]
        return 200, body

    with fake_server() as server:
        server.answer = no_prompt_logprobs
        served = ServedTeacher([server.url], vocab_size=V, api=api, retries=1, backoff_s=0.0)
        with pytest.raises(TeacherMismatchError) as err:
            served.connect(build_char_tokenizer(), top_k=K, check_tokenizer=False)
    message = str(err.value)
    assert "without prompt log-probs" in message and "teacher.api=sglang" in message and "\n" not in message
    assert server.completions == 1


def _parse_sglang(body: Any) -> None:
    from eopd.teachers.wire.sglang import parse_generate_response

    with suppress(ResponseMismatchError):  # anything else fails the test
        parse_generate_response(body, PROMPTS, [len(p) - 1 for p in PROMPTS], K, V)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=JSON)
def test_sglang_parse_of_any_json_raises_only_a_mismatch(body: Any) -> None:
    _parse_sglang(body)
    _parse_sglang([{"meta_info": body}, {"meta_info": body}])
    _parse_sglang([{"meta_info": {"input_token_logprobs": body, "input_top_logprobs": body}}] * 2)
