"""The teacher as a service (issue 12): ``eopd serve-teacher`` in a real separate process, ``teacher.url`` runs.

Every server here is ``python -m eopd serve-teacher`` on 127.0.0.1 with a port the OS picks (``--port 0``,
read back from its first line), started on the tiny models of ``conftest.tiny_models``. Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from eopd.config import ConfigError, load_config
from eopd.losses import gate_undecided
from eopd.models.loading import build_tiny_checkpoint, load_causal_lm, load_tokenizer
from eopd.sampling.rollout import Rollout, sample
from eopd.teachers.in_process import HFTeacher
from eopd.teachers.scores import TeacherMismatchError, TeacherUnavailableError
from eopd.teachers.served import ServedTeacher
from eopd.teachers.transport import API_KEY_ENV
from eopd.teachers.wire.common import ResponseMismatchError, error_message, model_ids, tokenize_ids
from eopd.teachers.wire.vllm import parse_completion_response
from eopd.tracking import read_metrics
from eopd.training.checkpoint import latest_checkpoint
from eopd.training.collect import with_position_after, with_room_after
from eopd.training.components import build_components
from eopd.training.trainer import train

from .conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
# a small, quick run: 16 sequences per step, four requests of 4 (micro-batches) per step
SMALL = ("max_steps=3", "rollout.prompts_per_step=4", "rollout.max_new_tokens=12", "optim.minibatch_size=8",
         "optim.micro_batch_size=4", "save_every=0", "num_threads=1", "tensorboard=false")
FAST_FAIL = ("teacher.retries=1", "teacher.backoff_s=0.05", "teacher.timeout_s=20")
LOSS_KEYS = ("loss", "rkl_estimate", "fkl", "gated_share", "teacher_entropy")


class Server:
    """``python -m eopd serve-teacher MODEL --port 0 ...`` as a child process; ``wait()`` reads its URL."""

    def __init__(self, model: Path, *args: str, port: int = 0, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "eopd", "serve-teacher", str(model), "--port", str(port), "--num-threads", "1",
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env or ENV)
        self.url = ""

    def wait(self, timeout_s: float = 90) -> Server:
        """Until the server prints where it listens (bounded); then ``url`` is set."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if "serving" in line:
                self.url = line.split(" on ")[1].split()[0]
                return self
        self.stop()
        raise AssertionError("serve-teacher did not start")

    def kill(self) -> None:
        """SIGKILL: the server dies mid-run without answering."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def servers(tiny_models) -> Iterator[dict[str, Server]]:
    """The module's servers, started at once (their start-up is mostly imports):

    - ``exact``: our server with exact entropies; prompt_logprobs above 12 refused (like vLLM's --max-logprobs);
    - ``vllm_like``: ``--no-entropy``, answering like vLLM (top-k only); the kill test kills it;
    - ``sglang``: ``--api sglang``, answering in SGLang's shapes (``/generate``) with exact entropies.
    """
    started = {"exact": Server(tiny_models["teacher"], "--top-k-max", "12"),
               "vllm_like": Server(tiny_models["teacher"], "--no-entropy"),
               "sglang": Server(tiny_models["teacher"], "--api", "sglang")}
    try:
        yield {name: s.wait() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    """The exact-entropy server."""
    return servers["exact"]


def served_cfg(tiny_models, out: Path, url: str | None, *overrides: str):
    base = [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
            f"output_dir={out}", *SMALL]
    return load_config(TINY, [*base, *([f"teacher.url={url}"] if url else []), *overrides])


def losses(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: r[k] for k in LOSS_KEYS} for r in rows]


def assert_same_losses(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    # The server scores each sequence right-padded from its first token, the in-process teacher left-padded in
    # the trainer's micro-batches: the same math on other shapes, so float32 sums round differently (scores
    # differ by ~4e-6, measured). Those differences pass through the updates into later steps' samples and
    # losses; 1e-4 relative covers that with margin, while a position off by one or a wrong top-k changes the
    # losses at the 1e-1 level.
    assert len(a) == len(b)
    for ra, rb in zip(losses(a), losses(b), strict=True):
        for k in LOSS_KEYS:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (k, ra[k], rb[k])


def rollout_of(tiny_models) -> tuple[Any, Rollout, torch.nn.Module]:
    tok = load_tokenizer(tiny_models["student"])
    student, teacher = load_causal_lm(tiny_models["student"]), load_causal_lm(tiny_models["teacher"])
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("1+2+3+4=", "12+3=", "9+9+9=")]
    rollout = sample(student, prompts, n=3, max_new_tokens=10, eos_token_ids=[tok.eos_token_id],
                     pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), vocab_size=len(tok))
    return tok, rollout, teacher


# -- (e) the request/response parsing against vLLM's own shapes ---------------------------------------------

# Written from vLLM's CompletionResponseChoice (vllm/entrypoints/openai/completion/protocol.py):
# prompt_logprobs is list[dict[int, Logprob] | None] (None first; JSON object keys are strings), Logprob is
# {logprob, rank, decoded_token} (vllm/logprobs.py), each position holds the prompt token (with its vocabulary
# rank) and the top-k with ranks 1..k (vllm/v1/engine/logprobs.py, append_logprobs_for_next_position), -inf is
# written as -9999.0 (clamp_prompt_logprobs). Two prompts, prompt_logprobs=2, a 10-token vocabulary.
VLLM_RESPONSE = """{
  "id": "cmpl-8f1c", "object": "text_completion", "created": 1735689600, "model": "Qwen/Qwen3-8B",
  "choices": [
    {"index": 1, "text": "!", "logprobs": null, "finish_reason": "length", "stop_reason": null,
     "prompt_logprobs": [null,
       {"7": {"logprob": -0.25, "rank": 1, "decoded_token": "+"},
        "3": {"logprob": -1.75, "rank": 2, "decoded_token": "3"}}],
     "prompt_token_ids": null},
    {"index": 0, "text": " the", "logprobs": null, "finish_reason": "length", "stop_reason": null,
     "prompt_logprobs": [null,
       {"4": {"logprob": -3.5, "rank": 5, "decoded_token": "1"},
        "2": {"logprob": -0.5, "rank": 1, "decoded_token": "="},
        "9": {"logprob": -1.5, "rank": 2, "decoded_token": ";"}},
       {"5": {"logprob": -0.125, "rank": 1, "decoded_token": "2"},
        "8": {"logprob": -9999.0, "rank": 2, "decoded_token": ","}},
       {"1": {"logprob": -2.0, "rank": 2, "decoded_token": "<eos>"},
        "6": {"logprob": -0.75, "rank": 1, "decoded_token": "3"}}]}
  ],
  "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}
}"""


def test_parse_a_vllm_response_payload():
    body = json.loads(VLLM_RESPONSE)
    rows = parse_completion_response(body, [[0, 4, 5, 1], [2, 7]], [3, 1], k=2, vocab_size=10)
    a, b = rows
    assert a.logp_T == [-3.5, -0.125, -2.0]  # the sampled token outside its top-2, at the top, second
    assert a.topk_ids_TK == [[2, 9], [5, 8], [6, 1]]
    assert a.topk_logprobs_TK == [[-0.5, -1.5], [-0.125, -9999.0], [-0.75, -2.0]]
    assert a.entropy_T is None  # vLLM sends no entropies: the client uses the top-k gate
    assert (b.logp_T, b.topk_ids_TK) == ([-0.25], [[7, 3]])
    assert model_ids(json.loads('{"object": "list", "data": [{"id": "Qwen/Qwen3-8B", "object": "model", '
                                '"owned_by": "vllm", "root": "Qwen/Qwen3-8B", "max_model_len": 40960}]}')) == [
        "Qwen/Qwen3-8B"]
    tokenized = '{"count": 3, "max_model_len": 40960, "tokens": [785, 3974, 13], "token_strs": null}'
    assert tokenize_ids(json.loads(tokenized)) == [785, 3974, 13]
    new, old = b'{"error": {"message": "Requested prompt logprobs of 21, which is greater than max allowed: 20", ' \
               b'"type": "BadRequestError", "param": "prompt_logprobs", "code": 400}}', \
               b'{"object": "error", "message": "bad", "type": "BadRequestError", "param": null, "code": 400}'
    assert error_message(new).startswith("Requested prompt logprobs of 21") and error_message(old) == "bad"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["prompt_logprobs"].pop(), "3 prompt_logprobs positions for a 4-token sequence"),
    (lambda c: c["prompt_logprobs"][2].update({"0": c["prompt_logprobs"][2].pop("5")}), "sampled token 5 is missing"),
    (lambda c: [c["prompt_logprobs"][1].pop(i) for i in ("2", "9")], "position 1: 1 entries where the top 2"),
    # an unranked extra entry (ids at or above the vocabulary are padded rows, tail mass, only as ranked top-k)
    (lambda c: c["prompt_logprobs"][3].update({"10": {"logprob": -5.0}}), "id 10 is outside the top 2"),
    (lambda c: c["prompt_logprobs"][3]["6"].update(logprob=float("nan")), "is not a {'logprob': float <= 0}"),
    (lambda c: c.update(prompt_token_ids=[0, 4, 5, 2]), "other token ids than the ones sent"),
    (lambda c: c.update(prompt_entropies=[None, 0.1, 0.2]), "prompt_entropies has 3 positions"),
])
def test_a_response_that_does_not_match_its_request_is_rejected(edit, message):
    body = json.loads(VLLM_RESPONSE)
    edit(body["choices"][1])
    with pytest.raises(ResponseMismatchError, match=message.replace("{", r"\{").replace("(", r"\(")):
        parse_completion_response(body, [[0, 4, 5, 1], [2, 7]], [3, 1], k=2, vocab_size=10)
    with pytest.raises(ResponseMismatchError, match="1 choices for 2 prompts"):
        parse_completion_response({"choices": body["choices"][:1]}, [[0, 4, 5, 1], [2, 7]], [3, 1], 2, 10)


# -- (a) exact-entropy mode ---------------------------------------------------------------------------------


def test_exact_mode_scores_and_trains_like_the_in_process_teacher(tiny_models, server, tmp_path):
    tok, rollout, teacher = rollout_of(tiny_models)
    V = len(tok)
    served = ServedTeacher([server.url], vocab_size=V, entropy="exact", rows_per_request=4).connect(tok, top_k=5)
    assert served.exact
    a = HFTeacher(teacher, V, 1.0, micro_batch_size=9).score(rollout, top_k=5, want_logits=False)
    b = served.score(rollout, top_k=5, want_logits=False)
    m = rollout.completion_mask_BT.bool()
    assert torch.equal(a.topk_ids_BTK[m], b.topk_ids_BTK[m])
    for f in ("logp_BT", "entropy_BT", "topk_logprobs_BTK"):
        assert torch.allclose(getattr(a, f)[m], getattr(b, f)[m], atol=2e-5), f
    assert b.tokens_per_s > 0 and b.entropy_lower_BT is None

    in_process = train(served_cfg(tiny_models, tmp_path / "local", None))
    via_server = train(served_cfg(tiny_models, tmp_path / "served", server.url, "teacher.entropy=exact"))
    assert_same_losses(in_process, via_server)
    rows = read_metrics(tmp_path / "served" / "metrics.jsonl")
    assert all(r["teacher/tokens_per_s"] > 0 and "teacher/undecided_share" not in r for r in rows)


# -- (b) top-k-only mode ------------------------------------------------------------------------------------


def test_topk_mode_trains_logs_the_undecided_share_and_matches_in_process_topk(tiny_models, server, tmp_path):
    tok, rollout, teacher = rollout_of(tiny_models)
    V, tau = len(tok), 1.4  # tau near the tiny teacher's median entropy: many tokens near the threshold
    exact = HFTeacher(teacher, V, 1.0).score(rollout, top_k=3, want_logits=False)
    est = ServedTeacher([server.url], vocab_size=V, entropy="topk", top_logprobs=3).connect(tok, top_k=3).score(
        rollout, top_k=3, want_logits=False)
    m = rollout.completion_mask_BT.bool()
    decided = ~gate_undecided(est.entropy_lower_BT, est.entropy_upper_BT, tau) & m
    assert torch.equal((est.entropy_BT >= tau)[decided], (exact.entropy_BT >= tau)[decided])
    inside_BT = (est.entropy_lower_BT <= exact.entropy_BT + 1e-5) & (exact.entropy_BT <= est.entropy_upper_BT + 1e-5)
    assert bool(inside_BT[m].all())

    topk = ("teacher.entropy=topk", "teacher.top_logprobs=3", "loss.top_k=3", f"loss.tau={tau}")
    in_process = train(served_cfg(tiny_models, tmp_path / "local", None, *topk))
    via_server = train(served_cfg(tiny_models, tmp_path / "served", server.url, *topk))
    assert_same_losses(in_process, via_server)
    shares = [r["teacher/undecided_share"] for r in read_metrics(tmp_path / "served" / "metrics.jsonl")]
    assert len(shares) == 3 and all(0 <= s <= 1 for s in shares) and max(shares) > 0
    assert shares == pytest.approx([r["teacher/undecided_share"] for r in in_process], abs=0.02)


# -- (c) the server dies mid-run ----------------------------------------------------------------------------


def train_until_the_server_dies(cmd: list[str], out: Path, server: Server, first_words: str) -> int:
    """Run ``cmd`` (an ``eopd train`` of ``max_steps=500``) until it has logged two steps, SIGKILL ``server`` and
    check that the run stopped as a dead teacher must stop it: exit 2, no traceback, one line on stderr that begins
    with ``first_words``, and a checkpoint of the last complete step written by the failure (``save_every=0``).
    Returns that step."""
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(read_metrics(out / "metrics.jsonl")) < 2 and run.poll() is None:
            time.sleep(0.1)
        server.kill()
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 2, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert stderr.strip().count("\n") == 0 and stderr.startswith(first_words), stderr
    done = len(read_metrics(out / "metrics.jsonl"))
    assert 2 <= done < 500 and f"teacher unavailable: checkpoint saved at step {done};" in stdout
    assert latest_checkpoint(out).name == f"step_{done:06d}"
    return done


def test_killed_server_stops_the_run_with_one_line_and_resume_finishes(tiny_models, servers, tmp_path):
    first = servers["vllm_like"]  # answers like vLLM: the run uses the top-k gate
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eopd", "train", TINY, f"models.teacher={tiny_models['teacher']}",
           f"models.student={tiny_models['student']}", f"output_dir={out}", f"teacher.url={first.url}",
           *SMALL, *FAST_FAIL, "max_steps=500"]
    done = train_until_the_server_dies(cmd, out, first, "eopd train: teacher server unavailable: ")

    port = int(first.url.split(":")[2].split("/")[0])
    restarted = Server(tiny_models["teacher"], "--no-entropy", port=port).wait()  # back on the same address
    try:
        history = train(served_cfg(tiny_models, out, first.url, *FAST_FAIL, "resume=true", f"max_steps={done + 2}"))
    finally:
        restarted.stop()
    assert [h["step"] for h in history] == [done + 1, done + 2]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, done + 3))
    assert (out / "final").is_dir() and "teacher/undecided_share" in history[0]


# -- (d) mismatches: a bad answer is rejected, never trained on; another tokenizer stops at start --------------


def corrupt_completions(monkeypatch, edit, times: int) -> list[int]:
    """Let the first ``times`` completions answers through ``edit``; returns a call counter."""
    import eopd.teachers.served as st

    real, calls = st.request_json, []

    def fake(url: str, payload: dict[str, Any] | None, timeout_s: float) -> Any:
        body = real(url, payload, timeout_s)
        if url.endswith("/completions"):
            calls.append(1)
            if len(calls) <= times:
                edit(body)
        return body

    monkeypatch.setattr(st, "request_json", fake)
    return calls


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda b: b["choices"][0]["prompt_logprobs"].pop(), "prompt_logprobs positions for a"),
    (lambda b: b["choices"].pop(), "choices for 4 prompts"),
    (lambda b: [p.pop(k) for p in b["choices"][1]["prompt_logprobs"][1:] for k in list(p)[-2:]],
     "entries where the top 5"),
    (lambda b: next(iter(b["choices"][2]["prompt_logprobs"][-1].values())).update(logprob=3.0), "--logprobs-mode"),
    (lambda b: b["choices"][3].pop("prompt_entropies"), "no prompt_entropies in the answer"),
])
def test_mismatching_responses_are_retried_then_refused(tiny_models, server, monkeypatch, edit, reason):
    tok, rollout, _ = rollout_of(tiny_models)
    served = ServedTeacher([server.url], vocab_size=len(tok), retries=1, backoff_s=0.0, rows_per_request=4,
                           max_in_flight=1).connect(tok, top_k=5)
    clean = served.score(rollout, top_k=5, want_logits=False)
    calls = corrupt_completions(monkeypatch, edit, times=1)  # first answer bad, the retry good: same scores
    again = served.score(rollout, top_k=5, want_logits=False)
    assert len(calls) == 4 and torch.equal(clean.logp_BT, again.logp_BT)  # 3 requests + 1 retry
    corrupt_completions(monkeypatch, edit, times=10**6)
    with pytest.raises(TeacherUnavailableError, match="response rejected") as err:
        served.score(rollout, top_k=5, want_logits=False)
    assert reason in str(err.value) and "failed 2 time(s)" in str(err.value) and "\n" not in str(err.value)


def test_another_tokenizer_or_a_refused_request_stops_at_start_in_one_line(tiny_models, servers, tmp_path):
    # the run's tokenizer: the same 17 characters in another order (the server keeps the teacher's)
    other = build_tiny_checkpoint(tmp_path / "reversed", alphabet="9876543210+=,;", hidden_size=32, num_layers=1)
    server = servers["exact"]
    with pytest.raises(TeacherMismatchError) as err:
        build_components(served_cfg(tiny_models, tmp_path / "run", server.url, f"models.tokenizer={other}"))
    assert "tokenizes a probe text differently from the local tokenizer" in str(err.value)
    assert "\n" not in str(err.value)
    tok = load_tokenizer(tiny_models["student"])
    with pytest.raises(TeacherUnavailableError, match="Requested prompt logprobs of 16, which is greater than max "
                                                      "allowed: 12") as err:
        ServedTeacher([server.url], vocab_size=len(tok), entropy="topk", top_logprobs=16).connect(tok, top_k=4)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.temperature=0.7"], "rollout.temperature: must be 1 with a served teacher"),
    (["objective=fkl"], "reads the teacher's full distribution"),
    (["teacher.url=localhost:8000/v1"], "teacher.url: must be http(s)://host:port/v1 URLs"),
    (["teacher.entropy=maybe"], "teacher.entropy: must be auto, exact or topk"),
    (["teacher.api=openai"], "teacher.api: must be auto, vllm or sglang"),
])
def test_served_teacher_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["teacher.url=http://127.0.0.1:9/v1", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


# -- (f) the API key and the request limits (issue 24) -------------------------------------------------------------

ENV_KEY, FLAG_KEY = "key-from-the-environment", "key-from-the-flag"


@pytest.fixture(scope="module")
def guarded(tiny_models) -> Iterator[Server]:
    """A server with a key in EOPD_TEACHER_API_KEY and another in --api-key (which wins, as in vLLM), a 1 MiB
    body cap and a 64-position cap on a request's padded size."""
    env = {**ENV, API_KEY_ENV: ENV_KEY}
    server = Server(tiny_models["teacher"], "--api-key", FLAG_KEY, "--max-request-mb", "1", "--max-batch-tokens",
                    "64", env=env)
    try:
        yield server.wait()
    finally:
        server.stop()


def call(url: str, method: str, path: str, body: bytes | None = None, key: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One raw HTTP exchange with the server at ``url`` (its ``/v1`` base); returns (status, decoded JSON)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_every_endpoint_but_health_wants_the_key(guarded, tiny_models, monkeypatch):
    completion = json.dumps({"model": str(tiny_models["teacher"]), "prompt": [[3, 4, 5]], "prompt_logprobs": 2,
                             "max_tokens": 1}).encode()
    tokenize = json.dumps({"prompt": "1+2=", "add_special_tokens": False}).encode()
    requests = [("GET", "/v1/models", None), ("POST", "/v1/completions", completion), ("POST", "/tokenize", tokenize)]
    for method, path, body in requests:
        for key in (None, "wrong", ENV_KEY, FLAG_KEY[:-1]):  # none, wrong, the env's (the flag wins), a prefix
            assert call(guarded.url, method, path, body, key) == (401, {"error": "Unauthorized"}), (path, key)
        status, answer = call(guarded.url, method, path, body, FLAG_KEY)
        assert status == 200 and "error" not in answer, (path, answer)
    padded = b" " * 900_000 + completion  # a body still being sent when the 401 goes out: read, not a broken pipe
    assert call(guarded.url, "POST", "/v1/completions", padded) == (401, {"error": "Unauthorized"})
    status, _ = call(guarded.url, "GET", "/v1/models", headers={"Authorization": f"Basic {FLAG_KEY}"})
    assert status == 401  # a bearer token, not another scheme
    assert call(guarded.url, "GET", "/health") == (200, {})  # open, as vLLM's (a load balancer's health check)

    tok = load_tokenizer(tiny_models["student"])
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(TeacherUnavailableError) as err:  # no key: one line, not retried, naming the variable
        ServedTeacher([guarded.url], vocab_size=len(tok), retries=3, backoff_s=5.0).connect(tok, top_k=2)
    assert "HTTP 401: Unauthorized" in str(err.value) and f"set {API_KEY_ENV}" in str(err.value)
    assert "\n" not in str(err.value)
    monkeypatch.setenv(API_KEY_ENV, "wrong")
    with pytest.raises(TeacherUnavailableError, match=f"the key in {API_KEY_ENV} is not the one"):
        ServedTeacher([guarded.url], vocab_size=len(tok), retries=3, backoff_s=5.0).connect(tok, top_k=2)
    monkeypatch.setenv(API_KEY_ENV, FLAG_KEY)
    served = ServedTeacher([guarded.url], vocab_size=len(tok), rows_per_request=1).connect(tok, top_k=2)
    _, rollout, teacher = rollout_of(tiny_models)  # the right key: scores equal to the in-process teacher's
    m = rollout.completion_mask_BT.bool()
    local = HFTeacher(teacher, len(tok), 1.0).score(rollout, top_k=2, want_logits=False)
    assert torch.allclose(served.score(rollout, top_k=2, want_logits=False).logp_BT[m], local.logp_BT[m], atol=2e-5)


def test_a_server_beyond_loopback_needs_a_key(tiny_models):
    env = {k: v for k, v in ENV.items() if k != API_KEY_ENV}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "eopd", "serve-teacher", str(tiny_models["teacher"]), "--port", "0",
                           "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "serving" not in done.stdout
    err = done.stderr.strip()
    assert err.count("\n") == 0 and "0.0.0.0" in err and API_KEY_ENV in err and "--allow-no-auth" in err, err
    assert time.monotonic() - start < 60  # refused before the model loads


def test_request_limits_are_answered_not_allocated(guarded):
    key = {"Authorization": f"Bearer {FLAG_KEY}"}
    # a Content-Length of 10 GB with no body: refused at once (the old server tried to read it all)
    parts = urllib.parse.urlsplit(guarded.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.putrequest("POST", "/v1/completions")
        for name, value in {**key, "Content-Length": str(10**10), "Content-Type": "application/json"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and "--max-request-mb" in json.loads(response.read())["error"]["message"]
    finally:
        conn.close()
    big = json.dumps({"prompt": [[3] * 40] * 30000, "prompt_logprobs": 2}).encode()  # ~3.6 MB > 1 MiB
    assert call(guarded.url, "POST", "/v1/completions", big, FLAG_KEY)[0] == 413
    status, answer = call(guarded.url, "POST", "/v1/completions", b"1", FLAG_KEY, headers={"Content-Length": "-1"})
    assert status == 400 and "Content-Length" in answer["error"]["message"]
    deep = b"[" * 200_000 + b"]" * 200_000  # nested beyond the JSON parser's stack: the client's fault, 400
    status, answer = call(guarded.url, "POST", "/v1/completions", deep, FLAG_KEY)
    assert status == 400, answer
    # 20 prompts of 1 token beside one of 4: 21 x 4 = 84 padded positions > 64
    padded = json.dumps({"prompt": [[3]] * 20 + [[3, 4, 5, 6]], "prompt_logprobs": 2}).encode()
    status, answer = call(guarded.url, "POST", "/v1/completions", padded, FLAG_KEY)
    assert status == 400 and "--max-batch-tokens 64" in answer["error"]["message"], answer
    fits = json.dumps({"prompt": [[3]] * 12 + [[3, 4, 5, 6]], "prompt_logprobs": 2}).encode()  # 52 positions
    assert call(guarded.url, "POST", "/v1/completions", fits, FLAG_KEY)[0] == 200


# -- (g) SGLang as a served teacher (issue 20) ---------------------------------------------------------------------

# Written from SGLang 0.5.23 (managers/tokenizer_manager.py detokenize_logprob_tokens / add_logprob_to_meta_info,
# scheduler_components/logprob_result_processor.py): one answer per input, in order; input_token_logprobs are
# (logprob, id, text) from logprob_start_len on, the first with a null log-prob; input_top_logprobs null first, then
# k tuples; text null without return_text_in_logprobs; -inf written as null by orjson. Two sequences, k = 2, a
# 10-id tokenizer, the model's lm_head 12 rows (ids 10 and 11 padded), start offsets 0 and 1.
SGLANG_RESPONSE = """[
  {"text": "7", "output_ids": [7], "prompt_token_ids": [0, 4, 5, 1],
   "meta_info": {"id": "a1", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 4,
                 "completion_tokens": 1, "cached_tokens": 0,
                 "input_token_logprobs": [[null, 0, null], [-3.5, 4, null], [-0.125, 5, null], [-2.0, 1, null]],
                 "input_top_logprobs": [null,
                                        [[-0.5, 2, null], [-1.5, 9, null]],
                                        [[-0.125, 5, null], [-3.0, 11, null]],
                                        [[-0.75, 6, null], [-2.0, 1, null]]],
                 "output_token_logprobs": [[-0.3, 7, null]],
                 "output_top_logprobs": [[[-0.3, 7, null], [-2.1, 3, null]]]}},
  {"text": "", "output_ids": [3], "prompt_token_ids": [2, 7, 3],
   "meta_info": {"id": "a2", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 3,
                 "completion_tokens": 1, "cached_tokens": 0,
                 "input_token_logprobs": [[null, 7, null], [-0.25, 3, null]],
                 "input_top_logprobs": [null, [[-0.25, 3, null], [null, 8, null]]],
                 "output_token_logprobs": [[-1.0, 3, null]],
                 "output_top_logprobs": [[[-1.0, 3, null], [-1.2, 4, null]]]}}
]"""


def test_parse_an_sglang_generate_payload():
    from eopd.teachers.wire.sglang import generate_request, parse_generate_response

    seqs, lengths = [[0, 4, 5, 1], [2, 7, 3]], [3, 1]
    request = generate_request("m", seqs, lengths, 2)
    assert request["logprob_start_len"] == [0, 1] and request["top_logprobs_num"] == 2
    assert request["return_logprob"] is True and request["sampling_params"]["max_new_tokens"] == 1
    a, b = parse_generate_response(json.loads(SGLANG_RESPONSE), seqs, lengths, k=2, vocab_size=10)
    assert a.logp_T == [-3.5, -0.125, -2.0]
    assert a.topk_ids_TK == [[2, 9], [5, 5], [6, 1]]  # the padded id 11 left the top-2: its slot repeats id 5
    assert a.topk_logprobs_TK[1] == [-0.125, float("-inf")] and a.entropy_T is None
    assert (b.logp_T, b.topk_ids_TK, b.topk_logprobs_TK) == ([-0.25], [[3, 8]], [[-0.25, -9999.0]])  # null: -inf
    body = json.loads(SGLANG_RESPONSE)
    body[0]["meta_info"]["input_token_logprobs"][2][1] = 6
    with pytest.raises(ResponseMismatchError, match="scored id 6 where 5 was sent"):
        parse_generate_response(body, seqs, lengths, k=2, vocab_size=10)
    body = json.loads(SGLANG_RESPONSE)
    body[1]["meta_info"]["input_top_logprobs"].pop()
    with pytest.raises(ResponseMismatchError, match="1 input_top_logprobs entries for logprob_start_len 1"):
        parse_generate_response(body, seqs, lengths, k=2, vocab_size=10)


def test_sglang_server_scores_like_the_in_process_teacher_and_trains_alike(tiny_models, servers, tmp_path,
                                                                           monkeypatch):
    """``eopd serve-teacher --api sglang`` answers SGLang's /generate: ``teacher.api=auto`` finds it by its
    ``owned_by``, asks for the completion positions only (``logprob_start_len``) and gets the in-process scores;
    the answers are smaller than vLLM's completions answers for the same rows (no prompt positions)."""
    import eopd.teachers.served as st

    tok, rollout, teacher = rollout_of(tiny_models)
    V = len(tok)
    sizes: dict[str, int] = {}
    real = st.request_json

    def measured(url: str, payload: dict[str, Any] | None, timeout_s: float) -> Any:
        body = real(url, payload, timeout_s)
        if payload is not None and "/tokenize" not in url:
            sizes[url.rsplit("/", 1)[1]] = sizes.get(url.rsplit("/", 1)[1], 0) + len(json.dumps(body))
        return body

    monkeypatch.setattr(st, "request_json", measured)
    served = ServedTeacher([servers["sglang"].url], vocab_size=V, entropy="exact", rows_per_request=9).connect(
        tok, top_k=5)
    assert served.formats[servers["sglang"].url].name == "sglang" and served.exact
    local = HFTeacher(teacher, V, 1.0, micro_batch_size=9).score(rollout, top_k=5, want_logits=False)
    sizes.clear()
    got = served.score(rollout, top_k=5, want_logits=False)
    m = rollout.completion_mask_BT.bool()
    assert torch.equal(local.topk_ids_BTK[m], got.topk_ids_BTK[m])
    for f in ("logp_BT", "entropy_BT", "topk_logprobs_BTK"):
        assert torch.allclose(getattr(local, f)[m], getattr(got, f)[m], atol=2e-5), f
    vllm_shaped = ServedTeacher([servers["exact"].url], vocab_size=V, entropy="exact", rows_per_request=9).connect(
        tok, top_k=5)
    vllm_shaped.score(rollout, top_k=5, want_logits=False)
    assert 0 < sizes["generate"] < sizes["completions"]  # the prompt positions are not sent back

    in_process = train(served_cfg(tiny_models, tmp_path / "local", None, "max_steps=2"))
    via_sglang = train(served_cfg(tiny_models, tmp_path / "sglang", servers["sglang"].url, "max_steps=2",
                                  "teacher.api=sglang", "teacher.entropy=exact"))
    assert_same_losses(in_process, via_sglang)


@pytest.mark.parametrize(("name", "api"), [("exact", "vllm"), ("sglang", "sglang")])
def test_official_alignment_through_a_server_scores_the_position_after_and_trains_alike(tiny_models, servers,
                                                                                       tmp_path, name, api):
    """``loss.official_alignment`` reads the teacher's top-k at each row's position after its last token. A served
    teacher gets it without a new request shape: the row is sent with one more token (the pad column
    ``with_room_after`` adds), whose prompt log-prob entry is the distribution after the last real token. Its
    scores there equal the in-process teacher's, and training through the server equals training in process."""
    tok, rollout, teacher = rollout_of(tiny_models)
    V = len(tok)
    scored = with_position_after(with_room_after(rollout, tok.pad_token_id))
    after_BT = scored.completion_mask_BT.bool() & ~with_room_after(rollout, tok.pad_token_id).completion_mask_BT.bool()
    assert int(after_BT.sum()) == rollout.completion_ids_BT.shape[0]  # one position after each row
    served = ServedTeacher([servers[name].url], vocab_size=V, api=api, entropy="exact").connect(tok, top_k=5)
    local = HFTeacher(teacher, V, 1.0).score(scored, top_k=5, want_logits=False)
    got = served.score(scored, top_k=5, want_logits=False)
    assert torch.equal(local.topk_ids_BTK[after_BT], got.topk_ids_BTK[after_BT])
    assert torch.allclose(local.topk_logprobs_BTK[after_BT], got.topk_logprobs_BTK[after_BT], atol=2e-5)

    aligned = ("max_steps=2", "loss.official_alignment=true")
    in_process = train(served_cfg(tiny_models, tmp_path / "local", None, *aligned))
    via_server = train(served_cfg(tiny_models, tmp_path / "served", servers[name].url, *aligned, f"teacher.api={api}",
                                  "teacher.entropy=exact"))
    assert_same_losses(in_process, via_server)
    plain = train(served_cfg(tiny_models, tmp_path / "plain", servers[name].url, "max_steps=2", f"teacher.api={api}",
                             "teacher.entropy=exact"))
    assert plain[0]["fkl"] != pytest.approx(via_server[0]["fkl"], rel=1e-3)  # the switch moved the forward KL


def test_the_completions_api_of_an_sglang_server_stops_at_start_naming_the_apis(tiny_models, servers):
    """SGLang's /v1/completions answers 200 and ignores prompt_logprobs: ``teacher.api=vllm`` against it stops at
    start in one line that points to SGLang's /generate (``teacher.api=sglang``)."""
    tok = load_tokenizer(tiny_models["student"])
    with pytest.raises(TeacherMismatchError) as err:
        ServedTeacher([servers["sglang"].url], vocab_size=len(tok), api="vllm").connect(tok, top_k=4)
    message = str(err.value)
    assert "answered 200 without prompt log-probs" in message and "teacher.api=sglang" in message
    assert "\n" not in message


def test_a_row_beyond_the_servers_max_model_len_is_refused_in_one_line(tiny_models, tmp_path):
    """The server's context (``--max-model-len``, listed in GET /v1/models) bounds prompt + completion: a run whose
    rows reach it stops with one line naming the keys that bound the length, after checkpointing (nothing lost);
    a completion budget that leaves no room for any prompt stops at start."""
    server = Server(tiny_models["teacher"], "--no-entropy", "--max-model-len", "20").wait()
    try:
        out = tmp_path / "run"
        with pytest.raises(TeacherUnavailableError) as err:  # 8-token prompts + up to 12 new tokens
            train(served_cfg(tiny_models, out, server.url, *FAST_FAIL, "rollout.max_new_tokens=12"))
        with pytest.raises(TeacherMismatchError) as at_start:
            build_components(served_cfg(tiny_models, tmp_path / "b", server.url, "rollout.max_new_tokens=19"))
    finally:
        server.stop()
    message = str(err.value)
    assert "max_model_len - 1 = 19 tokens" in message and "rollout.max_new_tokens" in message, message
    assert "--max-model-len" in message and "\n" not in message
    assert latest_checkpoint(out) is not None  # the last complete step, as for any teacher failure
    assert "rollout.max_new_tokens (19)" in str(at_start.value) and "\n" not in str(at_start.value)


# -- (h) several teachers, one of them served: a server that dies checkpoints and stops as with one teacher ---------


def test_a_served_teacher_of_several_that_dies_checkpoints_and_resume_finishes(tiny_models, tmp_path):
    served = Server(tiny_models["teacher"], "--no-entropy").wait()
    port = int(served.url.split(":")[2].split("/")[0])
    out = tmp_path / "run"
    multi = [f"teachers.local.model={tiny_models['teacher']}", f"teachers.remote.url={served.url}",
             "teachers.remote.tau=1.2", "routing.by=hash", "models.teacher=", "models.build_teacher=null"]
    cmd = [sys.executable, "-m", "eopd", "train", TINY, f"models.student={tiny_models['student']}",
           f"output_dir={out}", *SMALL, *FAST_FAIL, *multi, "max_steps=500"]
    try:
        done = train_until_the_server_dies(cmd, out, served,
                                           "eopd train: teachers.remote: teacher server unavailable: ")
    finally:
        served.stop()

    restarted = Server(tiny_models["teacher"], "--no-entropy", port=port).wait()
    try:
        cfg = load_config(TINY, [f"models.student={tiny_models['student']}", f"output_dir={out}", *SMALL,
                                 *FAST_FAIL, *multi, "resume=true", f"max_steps={done + 2}"])
        history = train(cfg)
    finally:
        restarted.stop()
    assert [h["step"] for h in history] == [done + 1, done + 2]
    assert history[0]["teacher/remote/share"] > 0 and "teacher/remote/loss" in history[0]
    assert (out / "final").is_dir()
