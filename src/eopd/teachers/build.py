"""The run's teacher(s) built from its config: one in-process or served teacher, or several routed per prompt.

Why this file exists: ``training/components.py`` holds everything a run holds; how a teacher comes to be (a model
loaded and frozen, servers checked, several teachers each checked against the run's tokenizer, gate settings and
routing) belongs to the teachers. ``build_teachers`` returns what the trainer reads: the ``Teacher`` (or
``TeacherSet``), the in-process teacher model of a one-teacher run (None otherwise) and the vocabulary both sides
are compared on. A wrong teacher stops the run at start with one line naming it (``teachers.NAME: ...``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from eopd.config import TeacherSpec, TrainConfig
from eopd.errors import UserError
from eopd.losses import ObjectiveConfig
from eopd.models import ModelLoadError, aligned_vocab_size, load_causal_lm, load_tokenizer
from eopd.teachers.in_process import HFTeacher
from eopd.teachers.routed import TeacherSet
from eopd.teachers.routing import Router
from eopd.teachers.same_tokenizer import difference, local_ids, probe_text
from eopd.teachers.scores import Teacher, TeacherMismatchError
from eopd.teachers.served import ServedTeacher

#: ``(device, dtype)`` of an in-process teacher (``training.components.teacher_placement``), asked only when one
#: is loaded, so a served run never resolves ``models.teacher_device``.
Placement = Callable[[], tuple[torch.device, torch.dtype]]


def build_teachers(cfg: TrainConfig, student: torch.nn.Module, tokenizer: Any,
                   placement: Placement) -> tuple[Teacher | TeacherSet, torch.nn.Module | None, int]:
    """The run's teacher (a ``TeacherSet`` with ``teachers``), its local model (one in-process teacher only, else
    None) and the vocabulary both models are compared on.

    Served (``teacher.url``): the servers are checked now (model, context, API, tokenizer, one scoring request),
    so a wrong or unreachable teacher stops the run at start with one line; ``models.teacher`` is not loaded.
    In-process: loaded where ``placement`` says, frozen (``requires_grad=False``) and never given to the optimizer
    or to accelerate, so it holds its weights and nothing else; ``HFTeacher`` moves each rollout to it.
    """
    if cfg.teachers:
        return build_teacher_set(cfg, student, tokenizer, placement), None, aligned_vocab_size(student, student,
                                                                                               tokenizer)
    t = cfg.teacher
    if t.urls:
        vocab_size = aligned_vocab_size(student, student, tokenizer)
        served = _served(cfg, t.urls, model=t.model, api=t.api, entropy=t.entropy, top_logprobs=t.top_logprobs,
                         vocab_size=vocab_size, top_k=min(cfg.objective_config().top_k, vocab_size), name=None,
                         tokenizer=tokenizer)
        _say(served.describe())
        return served, None, vocab_size
    teacher_model = _load(cfg, cfg.models.teacher, placement)
    vocab_size = aligned_vocab_size(teacher_model, student, tokenizer)
    return _in_process(cfg, teacher_model, vocab_size, t.entropy, t.top_logprobs), teacher_model, vocab_size


def build_teacher_set(cfg: TrainConfig, student: torch.nn.Module, tokenizer: Any, placement: Placement) -> TeacherSet:
    """Every teacher of ``teachers`` (checked against the run's tokenizer), its gate and the routing rule.

    Raises:
        TeacherMismatchError, TeacherUnavailableError, ModelLoadError: prefixed ``teachers.NAME:``.
    """
    vocab_size = aligned_vocab_size(student, student, tokenizer)
    obj = cfg.objective_config()
    teachers, objectives, lines = [], [], []
    for name, spec in cfg.teachers.items():
        own = gate_of(obj, spec, vocab_size)
        try:
            teacher, line = _member(cfg, name, spec, own, student, tokenizer, vocab_size, placement)
        except UserError as err:
            raise type(err)(f"teachers.{name}: {err}") from None
        teachers.append(teacher)
        objectives.append(own)
        lines.append(line)
    r = cfg.routing
    router = Router(tuple(cfg.teachers), by=r.by, field=r.field, map=dict(r.map), default=r.default)
    teacher_set = TeacherSet(tuple(cfg.teachers), teachers, objectives, router, lines)
    _say(teacher_set.describe())
    return teacher_set


def gate_of(obj: ObjectiveConfig, spec: TeacherSpec, vocab_size: int) -> ObjectiveConfig:
    """The run's objective with a teacher's own ``tau`` and ``top_k`` (the run's where it sets none)."""
    top_k = min(spec.top_k if spec.top_k is not None else obj.top_k, vocab_size)
    return obj.replace(tau=obj.tau if spec.tau is None else spec.tau, top_k=top_k)


def _member(cfg: TrainConfig, name: str, spec: TeacherSpec, obj: ObjectiveConfig, student: torch.nn.Module,
            tokenizer: Any, vocab_size: int, placement: Placement) -> tuple[Teacher, str]:
    """One teacher of several and its line for the log."""
    t = cfg.teacher
    entropy = spec.entropy or t.entropy
    top_logprobs = spec.top_logprobs or t.top_logprobs
    gate = f"tau {obj.tau:g}, top-{obj.top_k}"
    if spec.url:
        served = _served(cfg, list(spec.url), model=spec.model, api=spec.api or t.api, entropy=entropy,
                         top_logprobs=top_logprobs, vocab_size=vocab_size, top_k=obj.top_k, name=f"teachers.{name}",
                         tokenizer=tokenizer)
        return served, f"{served.describe()}; {gate}"
    assert spec.model is not None  # TeacherSpec requires model or url
    check_same_tokenizer(spec.model, tokenizer, vocab_size, trust_remote_code=cfg.models.trust_remote_code)
    model = _load(cfg, spec.model, placement)
    if aligned_vocab_size(model, student, tokenizer) != vocab_size:
        raise TeacherMismatchError(f"{spec.model} does not share the run's vocabulary")
    return (_in_process(cfg, model, vocab_size, entropy, top_logprobs),
            f"teachers.{name}: {spec.model} in-process ({gate})")


def check_same_tokenizer(model: str, tokenizer: Any, vocab_size: int, *, trust_remote_code: bool) -> None:
    """An in-process teacher's own tokenizer (when its folder or Hub id has one) must tokenize the probe text as
    the run's does and have the same vocabulary size.

    Raises:
        TeacherMismatchError: it does not (one line; the caller prefixes the teacher's name).
    """
    try:
        own = load_tokenizer(model, trust_remote_code)
    except ModelLoadError:
        return  # no tokenizer of its own: the lm_head's rows are checked against the run's vocabulary
    text = probe_text(tokenizer, vocab_size)
    where = difference(local_ids(own, text), local_ids(tokenizer, text), "teacher")
    if where is None and len(own) != len(tokenizer):
        where = f"{len(own)} vs {len(tokenizer)} ids"
    if where is not None:
        raise TeacherMismatchError(
            f"{model}'s tokenizer differs from the run's ({where}): every teacher must share the student's "
            "tokenizer (models.tokenizer / models.student); cross-tokenizer distillation is not supported")


def _served(cfg: TrainConfig, urls: list[str], *, model: str | None, api: str, entropy: str, top_logprobs: int,
            vocab_size: int, top_k: int, name: str | None, tokenizer: Any) -> ServedTeacher:
    t = cfg.teacher
    served = ServedTeacher(urls, vocab_size=vocab_size, model=model, api=api, entropy=entropy,
                           top_logprobs=top_logprobs, timeout_s=t.timeout_s, retries=t.retries, backoff_s=t.backoff_s,
                           max_in_flight=t.max_in_flight, rows_per_request=cfg.optim.micro_batch_size, name=name)
    served.connect(tokenizer, top_k=top_k, check_tokenizer=t.check_tokenizer)
    longest = cfg.rollout.max_new_tokens + 1  # the shortest prompt is one token
    if served.max_model_len is not None and longest >= served.max_model_len:
        raise TeacherMismatchError(
            f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) leaves no room for a prompt within the teacher "
            f"server's context: it scores at most max_model_len - 1 = {served.max_model_len - 1} tokens; lower "
            "rollout.max_new_tokens or start the server with a longer context (vLLM --max-model-len, SGLang "
            "--context-length)")
    return served


def _load(cfg: TrainConfig, model: str, placement: Placement) -> torch.nn.Module:
    device, dtype = placement()
    teacher_model = load_causal_lm(model, device=device, dtype=dtype, trust_remote_code=cfg.models.trust_remote_code)
    return teacher_model.requires_grad_(False)


def _in_process(cfg: TrainConfig, model: torch.nn.Module, vocab_size: int, entropy: str,
                top_logprobs: int) -> HFTeacher:
    return HFTeacher(model, vocab_size, cfg.rollout.temperature, cfg.optim.micro_batch_size, cfg.chunk_size,
                     entropy=entropy, entropy_top_k=top_logprobs,
                     max_tokens_per_micro_batch=cfg.optim.max_tokens_per_micro_batch)


def _say(text: str) -> None:
    """Print on the main process only (``RANK`` 0 or unset)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)
