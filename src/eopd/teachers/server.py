"""Our teacher server: a Hugging Face causal LM behind vLLM's completions API or SGLang's ``/generate``.

Why this file exists: to serve a teacher from a machine (or GPU) of its own without vLLM or SGLang, and to give the
gate what they cannot: the exact full-vocabulary entropy at every position, in one extra field (``prompt_entropies``
beside vLLM's ``prompt_logprobs``, ``input_token_entropies`` in SGLang's ``meta_info``; ``send_entropy=False``
leaves it out, to act like them). The scoring is ``HFTeacher`` (``score_chunked``: float32 logits chunk by chunk,
never ``[N, V]``) at temperature 1, like their log-probs. ``api`` says whose shapes it answers in (``wire.vllm``,
``wire.sglang``), so the client's both paths run against a real process.

Endpoints (stdlib ``ThreadingHTTPServer``; requests are parsed and answered concurrently, scored one at a
time under a lock so a GPU is never shared by two forwards)::

    GET  /health          200
    GET  /v1/models       {"object": "list", "data": [{"id": NAME, "owned_by": "eopd" | "sglang", "max_model_len"}]}
    POST /tokenize        {"prompt": text, "add_special_tokens": bool} -> {"count", "max_model_len", "tokens"}
    POST /v1/completions  api=vllm: token-id prompts with prompt_logprobs=k (``wire.vllm``), ids echoed with
                          return_token_ids; api=sglang: prompt_logprobs ignored, as SGLang's OpenAI endpoint does
    POST /generate        api=sglang: input_ids with return_logprob, logprob_start_len, top_logprobs_num
                          (``wire.sglang``)

It scores prompts only: no token is generated (a choice's ``text`` is empty, ``completion_tokens`` 0).

What a request can cost is bounded: with an API key every endpoint but ``/health`` answers 401 (vLLM's body,
``{"error": "Unauthorized"}``) to a request without ``Authorization: Bearer KEY``, compared in constant time;
a body above ``max_body_bytes`` is refused with 413 without being kept; a request whose padded size (prompts x
longest prompt) exceeds ``max_batch_tokens`` with 400 before anything is allocated; a connection idle for
``Handler.timeout`` seconds is closed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from eopd.sampling import Rollout
from eopd.teachers.in_process import HFTeacher
from eopd.teachers.scores import TeacherScores
from eopd.teachers.wire import sglang, vllm
from eopd.teachers.wire.common import error_body

#: vLLM's answer to a missing or wrong key (``AuthenticationMiddleware``, vllm/entrypoints/serve/middleware/).
UNAUTHORIZED_BODY = {"error": "Unauthorized"}
#: Paths open without the key: a load balancer's health check (vLLM leaves ``/health`` open too).
OPEN_PATHS = frozenset({"/health"})
#: The default cap of a request body (64 MiB; a micro-batch of 8 sequences of 32k tokens is ~2 MiB).
MAX_BODY_BYTES = 64 << 20


class BadRequestError(ValueError):
    """A request the server cannot answer (HTTP 400); the message goes back to the client."""


def rollout_of(prompts: list[list[int]], pad_id: int, device: torch.device) -> Rollout:
    """The sequences as a rollout whose "prompt" is each first token: completion position ``t`` scores token
    ``t + 1`` from tokens ``0..t``, i.e. the prompt positions ``1..n-1`` of ``prompt_logprobs``."""
    T = max(len(p) for p in prompts) - 1
    seq_BL = torch.full((len(prompts), T + 1), pad_id, dtype=torch.long)
    attn_BL = torch.zeros_like(seq_BL)
    for b, ids in enumerate(prompts):
        seq_BL[b, : len(ids)] = torch.tensor(ids)
        attn_BL[b, : len(ids)] = 1
    seq_BL, attn_BL = seq_BL.to(device), attn_BL.to(device)
    mask_BT = attn_BL[:, 1:].float()
    return Rollout(sequences_BL=seq_BL, attention_mask_BL=attn_BL, prompt_len=1, completion_ids_BT=seq_BL[:, 1:],
                   completion_mask_BT=mask_BT, logp_old_BT=torch.zeros_like(mask_BT),
                   prompt_index_B=torch.arange(len(prompts), device=device))


class TeacherService:
    """What the endpoints do, without HTTP (so it can be tested and reused).

    Args:
        model: The teacher (eval mode).
        tokenizer: Its tokenizer; ``len(tokenizer)`` is the vocabulary ids are checked against.
        name: The model name ``/v1/models`` lists and requests must use.
        top_k_max: Largest ``prompt_logprobs`` accepted (vLLM's ``--max-logprobs``).
        send_entropy: Add the exact entropies (``prompt_entropies``) to each choice.
        micro_batch_size: Sequences per forward.
        max_model_len: Longest sequence accepted.
        max_batch_tokens: Largest request in padded positions, prompts x longest prompt (the scores of a
            request are ``[prompts, longest, k]`` tensors: many short prompts beside one long one would
            allocate far more than their tokens); None: the larger of ``2**21`` and 8 full-length sequences.
        api: ``vllm`` (completions with ``prompt_logprobs``) or ``sglang`` (``/generate``; the completions
            endpoint then ignores ``prompt_logprobs``, as SGLang's does).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, name: str, top_k_max: int = 20,
                 send_entropy: bool = True, micro_batch_size: int = 8, max_model_len: int | None = None,
                 max_batch_tokens: int | None = None, api: str = "vllm") -> None:
        if api not in ("vllm", "sglang"):
            raise ValueError(f"api must be vllm or sglang, got {api!r}")
        self.api = api
        self.vocab_size = len(tokenizer)
        self.tokenizer = tokenizer
        self.name = name
        self.top_k_max = top_k_max
        self.send_entropy = send_entropy
        self.max_model_len = max_model_len or int(getattr(model.config, "max_position_embeddings", 1 << 20))
        self.max_batch_tokens = max_batch_tokens or max(1 << 21, 8 * self.max_model_len)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.teacher = HFTeacher(model, self.vocab_size, temperature=1.0, micro_batch_size=micro_batch_size)
        self.lock = threading.Lock()
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``."""
        owner = "sglang" if self.api == "sglang" else "eopd"
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": owner, "root": self.name,
                "parent": None, "max_model_len": self.max_model_len, "permission": []}
        return {"object": "list", "data": [card]}

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /tokenize`` (text prompts; vLLM's ``TokenizeCompletionRequest``)."""
        self._check_model(body)
        text = body.get("prompt")
        if not isinstance(text, str):
            raise BadRequestError("prompt must be a string")
        ids = self.tokenizer(text, add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": None}

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/completions``: prompt log-probs (and entropies) of token-id prompts; nothing generated.

        With ``return_token_ids`` each choice echoes the ids it scored (``prompt_token_ids``), as vLLM's does. With
        ``api=sglang`` ``prompt_logprobs`` is ignored, as SGLang's OpenAI endpoint ignores it.
        """
        self._check_model(body)
        prompts = self._prompts(body.get("prompt"))
        k = self._top_k(body.get("prompt_logprobs")) if self.api == "vllm" else None
        if body.get("stream") or body.get("n", 1) != 1 or body.get("echo"):
            raise BadRequestError("this server supports n=1 without stream or echo only")
        scores = self._score(prompts, k) if k is not None and max(map(len, prompts)) > 1 else None
        choices = [self._choice(i, ids, scores, k) for i, ids in enumerate(prompts)]
        if body.get("return_token_ids"):
            for choice, ids in zip(choices, prompts, strict=True):
                choice["prompt_token_ids"] = list(ids)
        tokens = sum(map(len, prompts))
        return {"id": f"cmpl-eopd-{time.monotonic_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}}

    def generate(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """``POST /generate`` (``api=sglang``): the input log-probs of token-id sequences from each one's
        ``logprob_start_len``, with ``top_logprobs_num`` top entries, in SGLang's shapes (``wire.sglang``)."""
        prompts = self._prompts(body.get("input_ids"))
        if not body.get("return_logprob") or body.get("stream"):
            raise BadRequestError("this server answers return_logprob=true without stream only")
        k = self._top_k(body.get("top_logprobs_num", 0)) or 0
        if k < 1:
            raise BadRequestError("top_logprobs_num must be >= 1")
        starts = body.get("logprob_start_len")
        starts = starts if isinstance(starts, list) else [starts] * len(prompts)
        if len(starts) != len(prompts) or not all(isinstance(s, int) and not isinstance(s, bool) and
                                                  0 <= s < len(p) for s, p in zip(starts, prompts, strict=True)):
            raise BadRequestError("logprob_start_len must be, for each input, an int in [0, its length)")
        scores = self._score(prompts, k) if max(map(len, prompts)) > 1 else None
        outputs = []
        for i, (ids, start) in enumerate(zip(prompts, starts, strict=True)):
            n = len(ids) - 1 - start  # positions start + 1 .. L - 1, scored by rows start .. L - 2
            rows = slice(start, start + n)
            logp = [] if scores is None else scores.logp_BT[i, rows].tolist()
            top_ids = [] if scores is None else scores.topk_ids_BTK[i, rows, :k].tolist()
            top_lps = [] if scores is None else scores.topk_logprobs_BTK[i, rows, :k].tolist()
            entropies = None if not self.send_entropy or scores is None else scores.entropy_BT[i, rows].tolist()
            if self.send_entropy and scores is None:
                entropies = []
            outputs.append(sglang.generate_output(ids, start, logp, top_ids, top_lps, entropies))
        return outputs

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model not in (None, self.name):
            raise BadRequestError(f"The model `{model}` does not exist; this server serves `{self.name}`")

    def _prompts(self, prompt: Any) -> list[list[int]]:
        """Token-id prompts (one list or a list of lists), each non-empty, ids in range, within the length."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        ok = isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)
        if not ok or not all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p):
            raise BadRequestError("prompt must be token ids: a non-empty list of ints or a list of such lists")
        for p in prompt:
            if not all(0 <= t < self.vocab_size for t in p):
                raise BadRequestError(f"Token id out of vocabulary [0, {self.vocab_size})")
            if len(p) > self.max_model_len:
                raise BadRequestError(f"This model's maximum context length is {self.max_model_len} tokens; the "
                                      f"prompt has {len(p)}")
        padded = len(prompt) * max(map(len, prompt))
        if padded > self.max_batch_tokens:
            raise BadRequestError(f"{len(prompt)} prompts padded to {max(map(len, prompt))} tokens are {padded} "
                                  f"positions, above this server's --max-batch-tokens {self.max_batch_tokens}; "
                                  "send fewer sequences per request (optim.micro_batch_size)")
        return prompt

    def _top_k(self, k: Any) -> int | None:
        """``prompt_logprobs``: None (not asked), an int ``<= top_k_max``, or -1 (the whole vocabulary)."""
        if k is None:
            return None
        if isinstance(k, bool) or not isinstance(k, int) or k < -1:
            raise BadRequestError("`prompt_logprobs` must be a positive value or -1.")
        k = self.vocab_size if k == -1 else k
        if k > self.top_k_max:
            raise BadRequestError(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                  f"{self.top_k_max}")
        return min(k, self.vocab_size)

    def _score(self, prompts: list[list[int]], k: int) -> TeacherScores:
        rollout = rollout_of(prompts, self.pad_id, self.device)
        with self.lock, torch.no_grad():
            return self.teacher.score(rollout, top_k=max(k, 1), want_logits=False)

    def _choice(self, index: int, ids: list[int], scores: TeacherScores | None, k: int | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "text": "", "logprobs": None, "finish_reason": "length",
                                  "stop_reason": None, "prompt_logprobs": None}
        if k is None:
            return choice
        n = len(ids) - 1
        if scores is None or n == 0:
            choice["prompt_logprobs"] = [None]
            if self.send_entropy:
                choice[vllm.ENTROPY_FIELD] = [None]
            return choice
        logp = scores.logp_BT[index, :n].tolist()
        top_ids = scores.topk_ids_BTK[index, :n, :k].tolist()
        top_lps = scores.topk_logprobs_BTK[index, :n, :k].tolist()
        choice["prompt_logprobs"] = [None] + [vllm.position_entry(ids[t + 1], logp[t], top_ids[t], top_lps[t])
                                              for t in range(n)]
        if self.send_entropy:
            choice[vllm.ENTROPY_FIELD] = [None, *scores.entropy_BT[index, :n].tolist()]
        return choice


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the server's ``TeacherService``; every answer is JSON."""

    server: TeacherHTTPServer
    protocol_version = "HTTP/1.1"
    #: Seconds a connection may sit idle (or a client take per read): a client that connects and says nothing
    #: must not hold a thread for ever.
    timeout = 60

    def do_GET(self) -> None:
        """``/health`` and ``/v1/models``."""
        if not self._authorized():
            return
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/v1/models":
            self._send(200, self.server.service.models())
        else:
            self._send(404, error_body(f"no route GET {self.path}", 404))

    def do_POST(self) -> None:
        """``/v1/completions`` and ``/tokenize`` (and ``/generate`` with ``api=sglang``)."""
        if not self._authorized():
            return
        service = self.server.service
        routes: dict[str, Any] = {"/v1/completions": service.complete, "/tokenize": service.tokenize}
        if service.api == "sglang":
            routes["/generate"] = service.generate
        if self.path not in routes:
            self._refuse(404, error_body(f"no route POST {self.path}", 404), drain_up_to=self.server.max_body_bytes)
            return
        raw = self._read_body()
        if raw is None:
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise BadRequestError("the request body must be a JSON object")
            self._send(200, routes[self.path](body))
        except (BadRequestError, ValueError, RecursionError) as err:  # RecursionError: JSON nested too deep
            self._send(400, error_body(str(err) or type(err).__name__, 400))
        except Exception as err:  # a fault of ours (e.g. out of memory): 500, which the client retries
            traceback.print_exc()
            self._send(500, error_body(f"{type(err).__name__}: {err}", 500))

    def _authorized(self) -> bool:
        """Whether the request may go on; answers 401 (and closes the connection: its body is not read) when not.

        Compares SHA-256 digests with ``hmac.compare_digest``, as vLLM does, so the time taken says nothing about
        the key, its length included.
        """
        expected = self.server.api_key_digest
        if expected is None or self.path in OPEN_PATHS:
            return True
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        if scheme.lower() == "bearer" and hmac.compare_digest(given, expected):
            return True
        self._refuse(401, UNAUTHORIZED_BODY, drain_up_to=self.server.max_body_bytes)
        return False

    def _content_length(self) -> int:
        """The declared body size; -1 when it is not a byte count."""
        text = self.headers.get("Content-Length", "0")
        return int(text) if text.isascii() and text.isdigit() else -1

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 400 (no usable Content-Length) or 413 (above the cap)."""
        length, cap = self._content_length(), self.server.max_body_bytes
        if length < 0:
            text = self.headers.get("Content-Length")
            self._refuse(400, error_body(f"Content-Length {text!r} is not a byte count", 400), drain_up_to=0)
            return None
        if length > cap:
            self._refuse(413, error_body(f"the request body is {length} bytes, above this server's --max-request-mb "
                                         f"({cap >> 20} MiB); send fewer sequences per request "
                                         "(optim.micro_batch_size)", 413), drain_up_to=4 * cap)
            return None
        return self.rfile.read(length)

    def _refuse(self, status: int, body: dict[str, Any], *, drain_up_to: int) -> None:
        """Answer without using the request body, then close the connection.

        A body of at most ``drain_up_to`` bytes is read and dropped first, in 1 MiB pieces: a client still
        sending when the server closes gets a broken pipe (or a reset) instead of this answer, and would retry
        a request that cannot succeed. A larger one is not read at all (closing is cheaper than reading it).
        """
        length = self._content_length()
        if 0 < length <= drain_up_to:
            while length > 0 and (piece := self.rfile.read(min(length, 1 << 20))):
                length -= len(piece)
        self._send(status, body, close=True)

    def _send(self, status: int, body: Any, *, close: bool = False) -> None:
        """The JSON answer; ``close`` ends the connection after it (a request whose body was not read)."""
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet unless the server was started verbose."""
        if self.server.verbose:
            super().log_message(format, *args)


class TeacherHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that holds the service (threads are daemons: Ctrl-C never waits on a client).

    Args:
        address: ``(host, port)``; port 0 takes a free one (``server_address`` says which).
        service: What the endpoints do.
        verbose: Log every request.
        api_key: The key every endpoint but ``/health`` requires as ``Authorization: Bearer KEY``; None: open.
        max_body_bytes: Largest request body read (413 above it).
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: TeacherService, verbose: bool = False, *,
                 api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__(address, Handler)
        self.service = service
        self.verbose = verbose
        self.api_key_digest = None if api_key is None else hashlib.sha256(api_key.encode("utf-8")).digest()
        self.max_body_bytes = max_body_bytes
