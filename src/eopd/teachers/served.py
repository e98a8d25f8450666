"""A teacher behind one or more servers (vLLM, SGLang, or ``eopd serve-teacher``) as a ``Teacher``.

Why this file exists: a large teacher belongs on other GPUs than the student's, served by an inference engine.
``ServedTeacher.score`` sends each micro-batch of completions (prompt + completion ids) as one scoring request in
the server's wire format (``wire.vllm``: completions with ``prompt_logprobs``; ``wire.sglang``: ``/generate``
with ``logprob_start_len``), keeps ``max_in_flight`` requests in flight spread over the servers, and turns the
answers into ``TeacherScores``: the sampled token's log-prob and the top-k at every completion position, plus the
exact entropy when the server sends our extension, otherwise the documented top-k estimate
(``scores.topk_only_scores``).

Faults: each request has a deadline over the whole exchange (``transport.request_json``) and is retried with
exponential backoff on another server; a response that does not match its request is rejected and retried like a
failure; a 401 (a missing or wrong ``EOPD_TEACHER_API_KEY``) is not retried. Scores are returned only when every
request of the call succeeded (nothing is ever trained on partial scores); otherwise ``TeacherUnavailableError``
(one line), which the trainer turns into a checkpoint of the last complete step. A rollout row longer than the
server's context allows is refused before it is sent, with the cause and the config keys that bound it.

At start, ``connect`` checks each server: its model and context length (``GET /v1/models``), its API (``auto``:
SGLang by its ``owned_by``, or when the completions API answers without prompt log-probs), that it tokenizes a
probe text exactly as the local tokenizer does, and one scoring request, which also tells whether it sends exact
entropies, whether its log-probs are log-probs (a server started with ``--logprobs-mode raw_logits`` sends
logits) and whether it answers prompt log-probs at all (SGLang's OpenAI endpoint ignores the field).
"""

from __future__ import annotations

import dataclasses
import http.client
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from eopd.sampling import Rollout
from eopd.teachers.same_tokenizer import difference, local_ids, probe_text
from eopd.teachers.scores import (
    ENTROPY_MODES,
    ROW_FIELDS,
    TeacherMismatchError,
    TeacherScores,
    TeacherUnavailableError,
    topk_only_scores,
)
from eopd.teachers.transport import API_KEY_ENV, AUTH_STATUS, HTTPStatusError, api_key, request_json, server_root
from eopd.teachers.wire import (
    APIS,
    FORMATS,
    ModelCard,
    NoPromptLogprobsError,
    NotLogprobsError,
    ResponseMismatchError,
    RowScores,
    WireFormat,
    model_cards,
    tokenize_ids,
    tokenize_request,
)

Tensor = torch.Tensor
T = TypeVar("T")

#: Where the supported APIs are listed, for the errors that send the user there.
SUPPORTED_APIS = ("vLLM's /v1/completions with prompt_logprobs (vllm serve, eopd serve-teacher) or SGLang's "
                  "/generate (python -m sglang.launch_server; teacher.api=sglang); docs/served_teacher.md")


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
    """A ``Teacher`` that scores rollouts on vLLM, SGLang or ``eopd serve-teacher`` servers (module docstring).

    Args:
        urls: Base URLs ending in ``/v1``; requests are spread over them round-robin, a retry goes to the next.
        vocab_size: The tokenizer's vocabulary ``V`` (top-k ids at or above it are padded rows: tail mass).
        model: Model name sent in requests; None: the first one the first server lists.
        api: ``auto`` (each server's, found at connect), ``vllm`` (completions) or ``sglang`` (``/generate``).
        entropy: ``auto`` (exact when every server sends it, else the top-k estimate), ``exact``, ``topk``.
        top_logprobs: Top-k asked for when the gate reads the top-k estimate (vLLM's default cap is 20).
        timeout_s: Deadline of one request (connect, send, answer).
        retries: Further attempts after a failed one (with backoff ``backoff_s * 2**attempt``).
        backoff_s: First wait between attempts.
        max_in_flight: Requests in flight at once.
        rows_per_request: Sequences per request (the trainer's micro-batch).
        name: What errors call this teacher (``teachers.NAME`` with several teachers); None: ``teacher``.
    """

    def __init__(self, urls: list[str], *, vocab_size: int, model: str | None = None, api: str = "auto",
                 entropy: str = "auto", top_logprobs: int = 20, timeout_s: float = 120.0, retries: int = 3,
                 backoff_s: float = 1.0, max_in_flight: int = 4, rows_per_request: int = 8,
                 name: str | None = None) -> None:
        if not urls or entropy not in ENTROPY_MODES or api not in APIS:
            raise ValueError(f"need at least one url, entropy in {ENTROPY_MODES} and api in {APIS}")
        self.urls = [u.rstrip("/") for u in urls]
        self.vocab_size = vocab_size
        self.model = model
        self.api = api
        self.formats: dict[str, WireFormat] = {u: FORMATS["vllm" if api == "auto" else api] for u in self.urls}
        self.entropy = entropy
        self.exact = entropy != "topk"  # settled by connect()
        self.top_logprobs = top_logprobs
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_in_flight = max_in_flight
        self.rows_per_request = rows_per_request
        self.name = name
        self.max_model_len: int | None = None  # the smallest of the servers' (GET /v1/models), set by connect()
        self._next_url = 0

    # -- start-up checks ---------------------------------------------------------------------------------
    def connect(self, tokenizer: Any, *, top_k: int, check_tokenizer: bool = True) -> ServedTeacher:
        """Check every server (model, context length, API, tokenizer, one scoring request) and settle exact vs
        top-k entropy.

        Raises:
            TeacherUnavailableError: a server cannot be reached (after retries).
            TeacherMismatchError: another model or tokenizer, a server that sends logits or no prompt log-probs,
                or ``entropy=exact`` from a server without exact entropies.
        """
        text = probe_text(tokenizer, self.vocab_size)
        probe = local_ids(tokenizer, text)[:16]
        if len(probe) < 2:
            raise TeacherMismatchError("the tokenizer probe encodes to fewer than 2 tokens; cannot test scoring")
        sends_entropy = []
        for url in self.urls:
            card = self._check_model(url)
            if card.max_model_len is not None:
                self.max_model_len = min(self.max_model_len or card.max_model_len, card.max_model_len)
                probe = probe[: max(2, self.max_model_len - 1)]  # what the server can score
            if self.api == "auto" and card.owned_by == "sglang":
                self.formats[url] = FORMATS["sglang"]
            if check_tokenizer:
                self._check_tokenizer(url, text, local_ids(tokenizer, text))
            sends_entropy.append(self._probe_scoring(url, probe, max(1, min(top_k, self.vocab_size))))
        if self.entropy == "exact" and not all(sends_entropy):
            url = self.urls[sends_entropy.index(False)]
            raise TeacherMismatchError(
                f"teacher.entropy=exact but {url} does not send the exact entropy (vLLM and SGLang return only "
                "their top-k): set teacher.entropy=auto for the top-k gate, or serve with eopd serve-teacher")
        self.exact = self.entropy != "topk" and all(sends_entropy)
        if not self.exact:  # the estimate asks for more log-probs: make sure every server gives them
            for url in self.urls:
                self._probe_scoring(url, probe, self.request_k(top_k))
        return self

    def describe(self) -> str:
        """One line for the log: where, which model and API, how the gate's entropy is obtained."""
        gate = "exact entropy" if self.exact else f"top-{self.top_logprobs} entropy estimate"
        apis = ", ".join(sorted({f.name for f in self.formats.values()}))
        limit = f", max_model_len {self.max_model_len}" if self.max_model_len else ""
        return f"{self.name or 'teacher'}: {self.model} on {', '.join(self.urls)} ({apis} API, {gate}{limit})"

    def _check_model(self, url: str) -> ModelCard:
        cards = self._retrying(lambda u: model_cards(request_json(f"{u}/models", None, self.timeout_s)), [url],
                               "listing models")
        names = [card.id for card in cards]
        self.model = self.model or (names[0] if names else None)
        if self.model not in names:
            raise TeacherMismatchError(f"teacher server {url} serves {names}, not {self.model!r} (teacher.model)")
        return cards[names.index(self.model)]

    def _check_tokenizer(self, url: str, text: str, ours: list[int]) -> None:
        what = "tokenizing a probe text (POST /tokenize; teacher.check_tokenizer=false skips this check)"
        theirs = self._retrying(lambda u: tokenize_ids(request_json(
            f"{server_root(u)}/tokenize", tokenize_request(self.model or "", text), self.timeout_s)), [url], what)
        if (where := difference(theirs, ours, "server")) is not None:
            raise TeacherMismatchError(
                f"teacher server {url} tokenizes a probe text differently from the local tokenizer ({where}): "
                "teacher and student must share one tokenizer (models.tokenizer / models.student)")

    def _probe_scoring(self, url: str, ids: list[int], k: int) -> bool:
        """One scoring request on a short sequence asking for ``k`` log-probs; whether it sends exact entropies.

        ``api=auto``: a completions answer without prompt log-probs is tried again as SGLang's ``/generate``.

        Raises:
            TeacherMismatchError: the server sends logits (``--logprobs-mode``), or no prompt log-probs.
        """
        try:
            rows = self._retrying(lambda u: self._post_scores(u, [ids], [len(ids) - 1], k, require_entropy=False),
                                  [url], "a probe scoring request", fatal=(NotLogprobsError, NoPromptLogprobsError))
        except NotLogprobsError as err:
            raise TeacherMismatchError(f"teacher server {url} ({self.formats[url].name} API): {err}") from None
        except NoPromptLogprobsError as err:
            if self.api == "auto" and self.formats[url].name == "vllm":
                self.formats[url] = FORMATS["sglang"]
                try:
                    return self._probe_scoring(url, ids, k)
                except (TeacherMismatchError, TeacherUnavailableError):
                    self.formats[url] = FORMATS["vllm"]
            raise TeacherMismatchError(
                f"teacher server {url} answered 200 without prompt log-probs ({self.formats[url].name} API: {err}); "
                f"a teacher must serve {SUPPORTED_APIS}") from None
        return rows[0].entropy_T is not None

    # -- scoring -------------------------------------------------------------------------------------------
    def request_k(self, top_k: int) -> int:
        """Top-k to ask for: the objective's top-k, or more when the gate reads the estimate."""
        k = top_k if self.exact else max(top_k, self.top_logprobs)
        return max(1, min(k, self.vocab_size))

    def score(self, rollout: Rollout, *, top_k: int, want_logits: bool, want_hidden: bool = False) -> TeacherScores:
        """Scores of every completion position (masked positions get harmless values).

        Raises:
            TeacherUnavailableError: a request failed for good, a row is longer than the servers' context, or full
                logits / hidden states were asked for.
        """
        if want_logits or want_hidden:
            raise TeacherUnavailableError("a served teacher returns top-k log-probs only; objectives that read the "
                                          "full teacher distribution need models.teacher in-process")
        seqs, lengths = row_sequences(rollout)
        self._check_lengths(seqs, lengths)
        k = self.request_k(top_k)
        t0 = time.perf_counter()
        rows = self._score_all(seqs, lengths, k)
        seconds = time.perf_counter() - t0
        scores = self._assemble(rows, rollout.completion_ids_BT.shape, k, top_k)
        scores = scores if rollout.completion_ids_BT.device.type == "cpu" else _to(scores, rollout)
        scores.tokens_per_s = sum(len(s) for s in seqs) / max(seconds, 1e-9)
        return scores

    def _check_lengths(self, seqs: list[list[int]], lengths: list[int]) -> None:
        """Refuse a row the servers cannot score: a server scores at most ``max_model_len - 1`` tokens, since it
        also generates one (vLLM answers a sequence of exactly ``max_model_len`` with "max_tokens must be at least
        1, got 0", SGLang with "Requested token count exceeds the model's maximum context length")."""
        if self.max_model_len is None:
            return
        longest = max(range(len(seqs)), key=lambda i: len(seqs[i]), default=None)
        if longest is None or len(seqs[longest]) < self.max_model_len:
            return
        n, c = len(seqs[longest]), lengths[longest]
        raise TeacherUnavailableError(
            f"{self.name or 'teacher'}: a rollout row of {n} tokens (prompt {n - c} + completion {c}) does not fit the "
            f"teacher server's context: it scores at most max_model_len - 1 = {self.max_model_len - 1} tokens (one "
            "is kept for the token it generates); bound prompt + completion with rollout.max_new_tokens and shorter "
            "prompts (data.path, data.limit), or start the server with a longer context (vLLM --max-model-len, "
            "SGLang --context-length)")

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
        fmt = self.formats[url]
        body = request_json(fmt.endpoint(url), fmt.request(self.model or "", seqs, lengths, k), self.timeout_s)
        rows = fmt.parse(body, seqs, lengths, k, self.vocab_size)
        if require_entropy and any(r.entropy_T is None for r in rows):
            raise ResponseMismatchError(f"no {fmt.entropy_field} in the answer, though the server sent them at start")
        return rows

    def _retrying(self, call: Callable[[str], T], urls: list[str], what: str,
                  cancel: threading.Event | None = None, fatal: tuple[type[Exception], ...] = ()) -> T:
        """``call(url)`` until it succeeds, ``1 + retries`` attempts over ``urls`` in turn, backoff between.

        Raises:
            TeacherUnavailableError: every attempt failed, the server refused the request itself (a 4xx
                that retrying cannot fix), or another request of the same call already failed (``cancel``).
            ``fatal``: at once, not retried (what a retry cannot change, e.g. a server that sends logits).
        """
        cancel = cancel or threading.Event()
        t0, last = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            url = urls[attempt % len(urls)]
            try:
                return call(url)
            except fatal:
                raise
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
