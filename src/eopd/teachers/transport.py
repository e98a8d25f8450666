"""HTTP for a served teacher: one JSON exchange under one deadline, the API key, nothing else.

Why this file exists: the client (``served.py``) must never hang on a server and never follow a proxy from the
environment; everything about the socket is here. ``request_json`` sends one GET or POST with a deadline over
the whole exchange (connect, send, status line, headers, body: ``DeadlineSocket``), refuses answers above
``MAX_RESPONSE_BYTES`` and decodes the JSON. The key in ``EOPD_TEACHER_API_KEY`` is sent as
``Authorization: Bearer KEY`` (``vllm serve --api-key``, ``eopd serve-teacher``).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import time
import urllib.parse
from typing import Any

from eopd.teachers.scores import TeacherMismatchError
from eopd.teachers.wire.common import ResponseMismatchError, error_message

#: Sent as ``Authorization: Bearer ...`` when set (``vllm serve --api-key``).
API_KEY_ENV = "EOPD_TEACHER_API_KEY"
#: HTTP statuses worth retrying (the server is busy or restarting); other 4xx are our request's fault.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Statuses that say the API key is missing or wrong (``vllm serve --api-key``, ``eopd serve-teacher --api-key``).
AUTH_STATUS = frozenset({401, 403})
#: The largest answer read (a guard against a server that sends without end): a 32k-token sequence with
#: top-20 log-probs is ~50 MB of JSON, so a micro-batch of 8 is ~0.4 GB.
MAX_RESPONSE_BYTES = 4 << 30
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
