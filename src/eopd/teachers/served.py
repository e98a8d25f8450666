"""A teacher behind one or more OpenAI-compatible servers (vLLM, or ``eopd serve-teacher``) as a ``Teacher``.

Why this file exists: a large teacher belongs on other GPUs than the student's, served by an inference engine.
``ServedTeacher.score`` sends each micro-batch of completions (prompt + completion ids) as one completions
request with ``prompt_logprobs=k``, keeps ``max_in_flight`` requests in flight spread over the servers, and
turns the answers into ``TeacherScores``: the sampled token's log-prob and the top-k at every completion
position, plus the exact entropy when the server sends our extension (``prompt_entropies``), otherwise the
documented top-k estimate (``teacher.topk_only_scores``). The JSON itself lives in ``teacher_protocol``.

Faults: each request has a deadline over the whole exchange (connect, send, headers, body) and is retried
with exponential backoff on another server; a response that does not match its request is rejected and
retried like a failure; a 401 (a missing or wrong ``EOPD_TEACHER_API_KEY``) is not retried. Scores are
returned only when every request of the call succeeded (nothing is ever trained on partial scores); otherwise
``TeacherUnavailableError`` (one line), which the trainer turns into a checkpoint of the last complete step.
At start, ``connect`` checks each server: its model, that it tokenizes a probe text exactly as the local
tokenizer does, and one scoring request (which also tells whether it sends exact entropies).
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import math
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from eopd.errors import UserError
from eopd.sampling import Rollout
from eopd.teachers.protocol import (
    ENTROPY_FIELD,
    ResponseMismatchError,
    RowScores,
    completion_request,
    error_message,
    model_ids,
    parse_completion_response,
    tokenize_ids,
    tokenize_request,
)
from eopd.teachers.teacher import ENTROPY_MODES, ROW_FIELDS, TeacherScores, TeacherUnavailableError, topk_only_scores

Tensor = torch.Tensor
T = TypeVar("T")

#: Sent as ``Authorization: Bearer ...`` when set (``vllm serve --api-key``).
API_KEY_ENV = "EOPD_TEACHER_API_KEY"
#: HTTP statuses worth retrying (the server is busy or restarting); other 4xx are our request's fault.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Statuses that say the API key is missing or wrong (``vllm serve --api-key``, ``eopd serve-teacher --api-key``).
AUTH_STATUS = frozenset({401, 403})
#: The largest answer read (a guard against a server that sends without end): a 32k-token sequence with
#: top-20 log-probs is ~50 MB of JSON, so a micro-batch of 8 is ~0.4 GB.
MAX_RESPONSE_BYTES = 4 << 30
#: The fixed part of the tokenizer probe (the rest is decoded from ids spread over the vocabulary).
PROBE_PREFIX = "The teacher and the student share one tokenizer: 12+34=46; x_{n+1} = 2^n. "


class TeacherMismatchError(UserError):
    """The served teacher is not the one the run needs (another tokenizer, model or API); found at start."""


class HTTPStatusError(Exception):
    """A non-200 answer; ``retryable`` for statuses that say "try again"."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retryable = status in RETRYABLE_STATUS


def request_json(url: str, payload: dict[str, Any] | None, timeout_s: float) -> Any:
    """GET (``payload`` None) or POST JSON to ``url`` and decode the JSON answer, all within ``timeout_s``.

    Plain ``http.client`` (no proxy from the environment: a teacher is on the cluster's own network). The
    deadline covers the whole exchange: connecting, sending, the status line and headers and the body; every
    read and write may only use the time left (``DeadlineSocket``), so a server that trickles its answer a
    byte at a time fails at the deadline, not at the first read that waits longer than ``timeout_s``.

    Raises:
        OSError / http.client.HTTPException / TimeoutError: the server cannot be reached, hangs, or does not
            finish its answer within ``timeout_s``.
        HTTPStatusError: a non-200 status.
        ResponseMismatchError: the body is not JSON, or larger than ``MAX_RESPONSE_BYTES``.
    """
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout_s
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(parts.hostname or "", parts.port, timeout=timeout_s)
    headers = {"Content-Type": "application/json", "Accept": "application/json", **auth_header()}
    try:
        conn.connect()
        conn.sock = DeadlineSocket(conn.sock, deadline, timeout_s)
        body = None if payload is None else json.dumps(payload).encode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request("GET" if payload is None else "POST", path, body=body, headers=headers)
        response = conn.getresponse()
        try:
            raw = _read_body(response)
        finally:
            response.close()
    finally:
        conn.close()
    if response.status != 200:
        raise HTTPStatusError(response.status, error_message(raw))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser's stack
        raise ResponseMismatchError(f"the answer is not JSON ({type(err).__name__}: {str(err)[:100]})") from None


def api_key() -> str | None:
    """``EOPD_TEACHER_API_KEY`` without surrounding whitespace (a key read from a file keeps its newline), or None.

    Raises:
        TeacherMismatchError: the key holds a character an HTTP header cannot carry.
    """
    key = os.environ.get(API_KEY_ENV, "").strip()
    if key and not (key.isascii() and key.isprintable()):
        raise TeacherMismatchError(f"{API_KEY_ENV} holds a character an HTTP header cannot carry (a line break, a "
                                   "control or non-ASCII character); set it to the key alone")
    return key or None


def auth_header() -> dict[str, str]:
    """``{"Authorization": "Bearer KEY"}`` when ``EOPD_TEACHER_API_KEY`` is set (``vllm serve --api-key``)."""
    key = api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


class DeadlineSocket:
    """A connected socket whose every send and receive may only use the time left before ``deadline``.

    ``http.client`` reads the status line, the headers and the body through ``makefile("rb")`` and writes with
    ``sendall``; both are bounded here, so no phase of the exchange can outlast the deadline (a plain socket
    timeout bounds each read alone). Works for plain and TLS sockets alike (it wraps the connected socket).
    Like ``socket.makefile``, a reader keeps the socket open until it is closed too: on ``Connection: close``
    ``http.client`` closes the connection as soon as the headers are read and the response reads on.
    """

    def __init__(self, sock: socket.socket, deadline: float, timeout_s: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.readers = 0
        self.close_asked = False

    def arm(self) -> None:
        """Give the socket the time left, or fail now when none is left."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(self.expired())
        self.sock.settimeout(left)

    def expired(self) -> str:
        return f"no complete answer within teacher.timeout_s ({self.timeout_s:g} s)"

    def sendall(self, data: bytes) -> None:
        """``socket.sendall`` (its timeout bounds the whole send) within the time left."""
        self.arm()
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise TimeoutError(self.expired()) from None

    def recv_into(self, buffer: Any) -> int:
        """One read of at most ``len(buffer)`` bytes within the time left."""
        self.arm()
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            raise TimeoutError(self.expired()) from None

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        """What ``http.client.HTTPResponse`` reads: a buffered reader whose every raw read is bounded."""
        self.readers += 1
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        """Close the socket once no reader is open (see the class docstring)."""
        self.close_asked = True
        if self.readers == 0:
            self.sock.close()

    def reader_closed(self) -> None:
        self.readers -= 1
        if self.close_asked and self.readers == 0:
            self.sock.close()


class _DeadlineReader(io.RawIOBase):
    """The raw stream under ``DeadlineSocket.makefile``."""

    def __init__(self, owner: DeadlineSocket) -> None:
        super().__init__()
        self.owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self.owner.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self.owner.reader_closed()
        super().close()


def _read_body(response: http.client.HTTPResponse) -> bytes:
    """The whole body in pieces of at most 1 MiB (``read1``: never one allocation of a Content-Length the
    server made up), refused past ``MAX_RESPONSE_BYTES``; the deadline is the socket's (``DeadlineSocket``)."""
    chunks, size = [], 0
    while chunk := response.read1(1 << 20):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ResponseMismatchError(f"the answer is larger than {MAX_RESPONSE_BYTES >> 30} GiB")
        chunks.append(chunk)
    return b"".join(chunks)


def server_root(url: str) -> str:
    """``http://h:p/v1`` -> ``http://h:p`` (vLLM serves ``/tokenize`` beside ``/v1``, not under it)."""
    return url[: -len("/v1")] if url.endswith("/v1") else url


def probe_text(tokenizer: Any, vocab_size: int, count: int = 64) -> str:
    """A fixed text plus ``count`` non-special ids spread over the whole vocabulary, decoded: two tokenizers
    that agree on it agree on ordinary text and on ids from every part of the vocabulary."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    step = max(1, vocab_size // count)
    ids = [i for i in range(0, vocab_size, step) if i not in special]
    return PROBE_PREFIX + tokenizer.decode(ids, skip_special_tokens=True)


def row_sequences(rollout: Rollout) -> tuple[list[list[int]], list[int]]:
    """Each row's prompt (left padding dropped) + valid completion ids, and its valid completion length."""
    P = rollout.prompt_len
    lengths = [int(n) for n in rollout.completion_mask_BT.sum(dim=1).tolist()]
    seqs = []
    for b, length in enumerate(lengths):
        prompt = rollout.sequences_BL[b, :P][rollout.attention_mask_BL[b, :P].bool()]
        seqs.append(prompt.tolist() + rollout.completion_ids_BT[b, :length].tolist())
    return seqs, lengths


class ServedTeacher:
    """A ``Teacher`` that scores rollouts on OpenAI-compatible servers (see the module docstring).

    Args:
        urls: Base URLs ending in ``/v1``; requests are spread over them round-robin, a retry goes to the next.
        vocab_size: The tokenizer's vocabulary ``V`` (ids at or above it are rejected).
        model: Model name sent in requests; None: the first one the first server lists.
        entropy: ``auto`` (exact when every server sends it, else the top-k estimate), ``exact``, ``topk``.
        top_logprobs: Top-k asked for when the gate reads the top-k estimate (vLLM's default cap is 20).
        timeout_s: Deadline of one request (connect, send, answer).
        retries: Further attempts after a failed one (with backoff ``backoff_s * 2**attempt``).
        backoff_s: First wait between attempts.
        max_in_flight: Requests in flight at once.
        rows_per_request: Sequences per request (the trainer's micro-batch).
    """

    def __init__(self, urls: list[str], *, vocab_size: int, model: str | None = None, entropy: str = "auto",
                 top_logprobs: int = 20, timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0,
                 max_in_flight: int = 4, rows_per_request: int = 8) -> None:
        if not urls or entropy not in ENTROPY_MODES:
            raise ValueError(f"need at least one url and entropy in {ENTROPY_MODES}")
        self.urls = [u.rstrip("/") for u in urls]
        self.vocab_size = vocab_size
        self.model = model
        self.entropy = entropy
        self.exact = entropy != "topk"  # settled by connect()
        self.top_logprobs = top_logprobs
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_in_flight = max_in_flight
        self.rows_per_request = rows_per_request
        self._next_url = 0

    # -- start-up checks ---------------------------------------------------------------------------------
    def connect(self, tokenizer: Any, *, top_k: int, check_tokenizer: bool = True) -> ServedTeacher:
        """Check every server (model, tokenizer, one scoring request) and settle exact vs top-k entropy.

        Raises:
            TeacherUnavailableError: a server cannot be reached (after retries).
            TeacherMismatchError: another model or tokenizer, or ``entropy=exact`` from a server without it.
        """
        text = probe_text(tokenizer, self.vocab_size)
        probe = tokenizer(text, add_special_tokens=False)["input_ids"][:16]
        if len(probe) < 2:
            raise TeacherMismatchError("the tokenizer probe encodes to fewer than 2 tokens; cannot test scoring")
        sends_entropy = []
        for url in self.urls:
            self._check_model(url)
            if check_tokenizer:
                self._check_tokenizer(url, text, tokenizer(text, add_special_tokens=False)["input_ids"])
            sends_entropy.append(self._probe_scoring(url, probe, max(1, min(top_k, self.vocab_size))))
        if self.entropy == "exact" and not all(sends_entropy):
            url = self.urls[sends_entropy.index(False)]
            raise TeacherMismatchError(
                f"teacher.entropy=exact but {url} does not send the exact entropy ({ENTROPY_FIELD}; vLLM returns "
                "only its top-k): set teacher.entropy=auto for the top-k gate, or serve with eopd serve-teacher")
        self.exact = self.entropy != "topk" and all(sends_entropy)
        if not self.exact:  # the estimate asks for more log-probs: make sure every server gives them
            for url in self.urls:
                self._probe_scoring(url, probe, self.request_k(top_k))
        return self

    def describe(self) -> str:
        """One line for the log: where, which model, how the gate's entropy is obtained."""
        gate = "exact entropy" if self.exact else f"top-{self.top_logprobs} entropy estimate"
        return f"teacher: {self.model} on {', '.join(self.urls)} ({gate})"

    def _check_model(self, url: str) -> None:
        names = self._retrying(lambda u: model_ids(request_json(f"{u}/models", None, self.timeout_s)), [url],
                               "listing models")
        self.model = self.model or (names[0] if names else None)
        if self.model not in names:
            raise TeacherMismatchError(f"teacher server {url} serves {names}, not {self.model!r} (teacher.model)")

    def _check_tokenizer(self, url: str, text: str, local_ids: list[int]) -> None:
        what = "tokenizing a probe text (POST /tokenize; teacher.check_tokenizer=false skips this check)"
        served_ids = self._retrying(lambda u: tokenize_ids(request_json(
            f"{server_root(u)}/tokenize", tokenize_request(self.model or "", text), self.timeout_s)), [url], what)
        if served_ids != local_ids:
            i = next((j for j, (a, b) in enumerate(zip(served_ids, local_ids, strict=False)) if a != b),
                     min(len(served_ids), len(local_ids)))
            at = lambda ids: ids[i] if i < len(ids) else "end"  # noqa: E731
            raise TeacherMismatchError(
                f"teacher server {url} tokenizes a probe text differently from the local tokenizer (token {i}: "
                f"server {at(served_ids)}, local {at(local_ids)}; {len(served_ids)} vs {len(local_ids)} tokens): "
                "teacher and student must share one tokenizer (models.tokenizer / models.student)")

    def _probe_scoring(self, url: str, ids: list[int], k: int) -> bool:
        """One scoring request on a short sequence asking for ``k`` log-probs; whether it sends exact entropies."""
        rows = self._retrying(lambda u: self._post_scores(u, [ids], [len(ids) - 1], k, require_entropy=False),
                              [url], "a probe scoring request")
        return rows[0].entropy_T is not None

    # -- scoring -------------------------------------------------------------------------------------------
    def request_k(self, top_k: int) -> int:
        """``prompt_logprobs`` to ask for: the objective's top-k, or more when the gate reads the estimate."""
        k = top_k if self.exact else max(top_k, self.top_logprobs)
        return max(1, min(k, self.vocab_size))

    def score(self, rollout: Rollout, *, top_k: int, want_logits: bool, want_hidden: bool = False) -> TeacherScores:
        """Scores of every completion position (masked positions get harmless values).

        Raises:
            TeacherUnavailableError: a request failed for good, or full logits / hidden states were asked for.
        """
        if want_logits or want_hidden:
            raise TeacherUnavailableError("a served teacher returns top-k log-probs only; objectives that read the "
                                          "full teacher distribution need models.teacher in-process")
        seqs, lengths = row_sequences(rollout)
        k = self.request_k(top_k)
        t0 = time.perf_counter()
        rows = self._score_all(seqs, lengths, k)
        seconds = time.perf_counter() - t0
        scores = self._assemble(rows, rollout.completion_ids_BT.shape, k, top_k)
        scores = scores if rollout.completion_ids_BT.device.type == "cpu" else _to(scores, rollout)
        scores.tokens_per_s = sum(len(s) for s in seqs) / max(seconds, 1e-9)
        return scores

    def _score_all(self, seqs: list[list[int]], lengths: list[int], k: int) -> list[RowScores]:
        """All rows, ``rows_per_request`` per request, ``max_in_flight`` at once; all or nothing."""
        starts = list(range(0, len(seqs), self.rows_per_request))
        first = self._next_url
        self._next_url += len(starts)
        cancel = threading.Event()
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_in_flight, len(starts)))) as pool:
            futures: list[Future[list[RowScores]]] = []
            for i, s in enumerate(starts):
                part = slice(s, s + self.rows_per_request)
                order = [self.urls[(first + i + a) % len(self.urls)] for a in range(len(self.urls))]
                futures.append(pool.submit(self._retrying, lambda u, p=part: self._post_scores(
                    u, seqs[p], lengths[p], k, require_entropy=self.exact), order,
                    f"scoring {len(seqs[part])} completions", cancel))
            try:
                return [row for f in futures for row in f.result()]
            except BaseException:
                cancel.set()
                for f in futures:
                    f.cancel()
                raise

    def _post_scores(self, url: str, seqs: list[list[int]], lengths: list[int], k: int, *,
                     require_entropy: bool) -> list[RowScores]:
        body = request_json(f"{url}/completions", completion_request(self.model or "", seqs, k), self.timeout_s)
        rows = parse_completion_response(body, seqs, lengths, k, self.vocab_size)
        if require_entropy and any(r.entropy_T is None for r in rows):
            raise ResponseMismatchError(f"no {ENTROPY_FIELD} in the answer, though the server sent them at start")
        return rows

    def _retrying(self, call: Callable[[str], T], urls: list[str], what: str,
                  cancel: threading.Event | None = None) -> T:
        """``call(url)`` until it succeeds, ``1 + retries`` attempts over ``urls`` in turn, backoff between.

        Raises:
            TeacherUnavailableError: every attempt failed, the server refused the request itself (a 4xx
                that retrying cannot fix), or another request of the same call already failed (``cancel``).
        """
        cancel = cancel or threading.Event()
        t0, last = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            url = urls[attempt % len(urls)]
            try:
                return call(url)
            except HTTPStatusError as err:
                if err.status in AUTH_STATUS:
                    raise TeacherUnavailableError(f"teacher server {url} refused {what}: {err}; {_key_advice()}") \
                        from None
                if not err.retryable:
                    raise TeacherUnavailableError(f"teacher server {url} refused {what}: {err}") from None
                last = f"{url}: {err}"
            except ResponseMismatchError as err:
                last = f"{url}: response rejected: {err}"
            except (OSError, http.client.HTTPException) as err:
                last = f"{url}: {_reason(err)}"
            if attempt < self.retries and cancel.wait(self.backoff_s * 2**attempt):
                break
        raise TeacherUnavailableError(f"teacher server unavailable: {what} failed {attempt + 1} time(s) over "
                                      f"{time.monotonic() - t0:.1f} s; last: {last}")

    def _assemble(self, rows: list[RowScores], shape: torch.Size, k: int, top_k: int) -> TeacherScores:
        """``[B, T]`` tensors from the rows; masked positions: log-prob 0, a uniform top-k, entropy log k."""
        B, T = shape
        logp_BT = torch.zeros(B, T)
        ids_BTK = torch.arange(k).expand(B, T, k).clone()
        lps_BTK = torch.full((B, T, k), -math.log(k))
        entropy_BT = torch.full((B, T), math.log(k))
        for b, row in enumerate(rows):
            n = len(row.logp_T)
            if n:
                logp_BT[b, :n] = torch.tensor(row.logp_T)
                ids_BTK[b, :n] = torch.tensor(row.topk_ids_TK)
                lps_BTK[b, :n] = torch.tensor(row.topk_logprobs_TK)
                if self.exact and row.entropy_T is not None:
                    entropy_BT[b, :n] = torch.tensor(row.entropy_T)
        if self.exact:
            return TeacherScores(logp_BT, entropy_BT, ids_BTK[..., :top_k], lps_BTK[..., :top_k])
        return topk_only_scores(logp_BT, ids_BTK, lps_BTK, top_k=top_k, vocab_size=self.vocab_size)


def _to(scores: TeacherScores, rollout: Rollout) -> TeacherScores:
    """The scores on the rollout's device."""
    device = rollout.completion_ids_BT.device
    return dataclasses.replace(scores, **{f: getattr(scores, f).to(device) for f in ROW_FIELDS
                                          if getattr(scores, f) is not None})


def _key_advice() -> str:
    """What to do about a 401: the key is missing, or it is not the server's."""
    if api_key():
        return f"the key in {API_KEY_ENV} is not the one the server was started with (its --api-key)"
    return f"the server wants an API key: set {API_KEY_ENV} to the key it was started with (its --api-key)"


def _reason(err: BaseException) -> str:
    """A short cause: ``connection refused``, ``timed out``, ..."""
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError):
        return f"timed out ({err})" if str(err) not in ("", "timed out") else "timed out"
    return str(err) or type(err).__name__
