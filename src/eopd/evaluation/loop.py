"""The one evaluation loop: sample, grade, name paths, measure entropy per token role, aggregate, write files.

``evaluate_problems(model, tokenizer, problems, task, ...)`` serves ``eopd eval`` (math benchmarks), the
trainer's periodic evaluation and ``eopd.world.build.measure`` (the arithmetic world), so a teacher's figure and a
student's figure always measure the same thing. It samples ``n`` completions per problem through a backend
(``eval_backends``), grades each with the task, records its reasoning path (``task.path_key``: only for
correct, faithful solutions) and its entropy per token role (``task.token_roles``), and aggregates per
benchmark (``problem.meta["benchmark"]``) and across benchmarks. ``task=None`` is math grading (last boxed
answer, math-verify). Metric definitions: ``docs/metrics.md``; protocol and file format:
``docs/evaluation.md``. The records, their metrics and the files live in ``eopd.evaluation.results``; comparing
two runs in ``eopd.evaluation.comparison``, the command line in ``eopd.commands.eval``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from eopd import __version__
from eopd.evaluation.backends import Generation, GenerationBackend, make_backend, sampling_block
from eopd.evaluation.results import (
    CompletionRecord,
    EvalResult,
    ProblemRecord,
    result_from_records,
)
from eopd.prompting import resolve_chat_template
from eopd.tasks.base import Problem
from eopd.tasks.grading import extract_boxed, grade

DEFAULT_MAX_NEW_TOKENS = 4096


# --------------------------------------------------------------------------------------------------------
# what a task supplies
# --------------------------------------------------------------------------------------------------------


class GradingTask(Protocol):
    """What the evaluation needs from a task: ``grade``. Optional methods, used when present:

    - ``answer_of(completion) -> str | None``: the stated final answer (default: the last ``\\boxed{}``);
    - ``path_key(completion, problem) -> str | None``: the reasoning path of a faithful solution; a task
      with it reports the path metrics;
    - ``reference_path(problem) -> str``: one path of interest (arithmetic: the terms as written);
    - ``token_roles(tokenizer, token_ids) -> list[str]``: the role of each completion token, for the
      per-role entropy.

    Every ``eopd.tasks.base.Task`` is one.
    """

    def grade(self, completion: str, answer: str) -> bool:
        """Whether a completion's final answer equals the gold answer."""
        ...


@dataclass(frozen=True)
class MathGrading:
    """``task=None``: the last ``\\boxed{}`` answer graded by math-verify, no paths, no token roles.

    Attributes:
        timeout_s: math-verify seconds per step (one pathological answer is graded wrong, not hung on).
    """

    timeout_s: int = 5

    def grade(self, completion: str, answer: str) -> bool:
        """Math-verify equivalence of the completion's last boxed answer and the gold answer."""
        return grade(completion, answer, timeout_s=self.timeout_s)

    def answer_of(self, completion: str) -> str | None:
        """The content of the last ``\\boxed{}`` (None when there is none or it never closes)."""
        return extract_boxed(completion)


# --------------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------------


def names_paths(task: GradingTask) -> bool:
    """Whether the task can name reasoning paths (it has ``path_key``)."""
    return callable(getattr(task, "path_key", None))


def grade_problem(problem: Problem, generations: Sequence[Generation], task: GradingTask) -> ProblemRecord:
    """Grade a problem's generations into a record: verdict, stated answer and, for correct samples of a task
    that names paths, the path."""
    answer_of = getattr(task, "answer_of", extract_boxed)
    path_key = getattr(task, "path_key", None) if names_paths(task) else None
    reference = getattr(task, "reference_path", None)
    completions = []
    for g in generations:
        correct = bool(task.grade(g.text, problem.answer))
        completions.append(
            CompletionRecord(
                text=g.text,
                answer=answer_of(g.text),
                correct=correct,
                num_tokens=g.num_tokens,
                finished=g.finished,
                mean_entropy=g.mean_entropy,
                path=path_key(g.text, problem) if correct and path_key is not None else None,
                role_entropy=g.role_entropy,
            )
        )
    ref = reference(problem) if path_key is not None and callable(reference) else None
    return ProblemRecord(problem.id, benchmark_of(problem), problem.prompt, problem.answer, completions, ref)


def benchmark_of(problem: Problem) -> str:
    """The benchmark a problem is aggregated under (``meta["benchmark"]``; ``"all"`` when it names none)."""
    return str(problem.meta.get("benchmark", "all"))


def evaluate_problems(
    model: torch.nn.Module | str | None,
    tokenizer: Any,
    problems: Sequence[Problem],
    task: GradingTask | None = None,
    *,
    n: int = 8,
    temperature: float = 1.0,
    top_p: float = 0.8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    seed: int = 0,
    use_chat_template: bool | str = "auto",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    backend: str | GenerationBackend = "hf",
    indices: Sequence[int] | None = None,
) -> EvalResult:
    """Sample ``n`` completions per problem, grade them, name their paths and aggregate per benchmark.

    With the HF backend a problem's samples are a function of the seed (``generator``) and its index, not of
    the other problems evaluated beside it (``eval_backends.HFBackend``), so a share of the problems
    (``evaluate_across_processes``) gets exactly the samples of a run over all of them.

    Args:
        model: The causal LM (HF backend), its path / Hub id (vLLM backend), or None with a ready backend.
        tokenizer: Its tokenizer (prompt formatting, decoding, token roles).
        problems: Problems; ``meta["benchmark"]`` groups them (missing: one group ``"all"``).
        task: Grading and, optionally, answers, paths, a reference path and token roles (``GradingTask``);
            None: ``MathGrading()``.
        n: Samples per problem.
        temperature: Sampling temperature (> 0; paper: 1.0); entropies are of the scaled distribution.
        top_p: Nucleus mass in (0, 1] (paper: 0.8).
        max_new_tokens: Completion budget.
        batch_size: Sequences per sampling call (HF backend).
        generator: Randomness for the HF backend, on the model's device (default: seeded with ``seed``); one
            seed is drawn from it, the root of every sampling block's generator.
        seed: Seed when no generator is given, and the vLLM engine seed.
        use_chat_template: True, False or ``"auto"`` (when the tokenizer has one).
        chat_template_kwargs: Extra chat-template arguments (``{"enable_thinking": False}``).
        backend: ``"hf"``, ``"vllm"`` or a ready ``GenerationBackend``.
        indices: Each problem's index in the whole evaluation when these are a share of it (default: their
            positions).

    Returns:
        An ``EvalResult`` whose ``config`` records the protocol.

    Raises:
        ValueError: no problems, ``n < 1``, ``temperature <= 0`` or ``top_p`` outside (0, 1].
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    task = MathGrading() if task is None else task
    chat = resolve_chat_template(tokenizer, use_chat_template)
    if isinstance(backend, str):
        backend = make_backend(
            backend,
            model,
            tokenizer,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            generator=generator,
            seed=seed,
            use_chat_template=chat,
            chat_template_kwargs=chat_template_kwargs,
        )
    roles = getattr(task, "token_roles", None)
    token_roles = functools.partial(roles, tokenizer) if callable(roles) else None
    located = {} if indices is None else {"indices": indices}  # backends that take no indices get none
    generations = backend.generate([p.prompt for p in problems], n, token_roles=token_roles, **located)
    records = [grade_problem(p, g, task) for p, g in zip(problems, generations, strict=True)]
    config = {
        "task": getattr(task, "name", "math"),
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "chat_template": chat,
        "chat_template_kwargs": dict(chat_template_kwargs or {}),
        "backend": backend.name,
        "entropy": backend.entropy_kind,
        "seed": seed,
        "eopd_version": __version__,
    }
    return result_from_records(records, with_paths=names_paths(task), config=config)


def evaluate_across_processes(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: Sequence[Problem],
    task: GradingTask | None = None,
    *,
    rank: int,
    world: int,
    gather: Callable[[list[Any]], list[Any]],
    n: int = 8,
    batch_size: int = 64,
    **kwargs: Any,
) -> list[ProblemRecord]:
    """``evaluate_problems``' graded records of ``problems``, the work shared by ``world`` processes.

    Process ``rank`` samples the HF backend's sampling blocks ``rank, rank + world, ...`` (whole blocks, so
    every problem is sampled in the very batch, with the very generator, of a one-process evaluation); the
    records are gathered and put back in problem order: every process returns what one process evaluating
    all the problems returns, whatever the number of processes.

    Args:
        model, tokenizer, problems, task, n, batch_size, kwargs: As ``evaluate_problems`` (HF backend).
        rank: This process's index; world: the number of processes (1: no collective).
        gather: Every process's list, concatenated in rank order (``accelerate.utils.gather_object``).

    Returns:
        One ``ProblemRecord`` per problem, in the order of ``problems``.
    """
    block = sampling_block(batch_size, n)
    mine = [i for i in range(len(problems)) if (i // block) % world == rank]
    records: list[tuple[int, ProblemRecord]] = []
    if mine:
        result = evaluate_problems(model, tokenizer, [problems[i] for i in mine], task, n=n, batch_size=batch_size,
                                   indices=mine, **kwargs)
        records = list(zip(mine, records_in_order(result, [problems[i] for i in mine]), strict=True))
    if world > 1:
        records = gather(records)
    return [r for _, r in sorted(records, key=lambda x: x[0])]


def records_in_order(result: EvalResult, problems: Sequence[Problem]) -> list[ProblemRecord]:
    """The records of ``result`` (grouped by benchmark) back in the order of the ``problems`` it graded."""
    queues = {name: iter(b.problems) for name, b in result.benchmarks.items()}
    return [next(queues[benchmark_of(p)]) for p in problems]
