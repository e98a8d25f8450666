"""The one evaluation loop: sample, grade, name paths, measure entropy per token role, aggregate, write files.

``evaluate_problems(model, tokenizer, problems, task, ...)`` serves ``eopd eval`` (math benchmarks), the
trainer's periodic evaluation and ``eopd.world.build.measure`` (the arithmetic world), so a teacher's figure and a
student's figure always measure the same thing. It samples ``n`` completions per problem through a backend
(``eval_backends``), grades each with the task, records its reasoning path (``task.path_key``: only for
correct, faithful solutions) and its entropy per token role (``task.token_roles``), and aggregates per
benchmark (``problem.meta["benchmark"]``) and across benchmarks. ``task=None`` is math grading (last boxed
answer, math-verify). Metric definitions: ``docs/metrics.md``; protocol and file format:
``docs/evaluation.md``. Comparing two runs lives in ``eopd.evaluation.comparison``, the command line in
``eopd.commands.eval``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from eopd import __version__
from eopd.evaluation.backends import Generation, GenerationBackend, RoleEntropy, make_backend, sampling_block
from eopd.prompting import resolve_chat_template
from eopd.tasks.base import Problem
from eopd.tasks.benchmarks import PAPER_BENCHMARKS
from eopd.tasks.grading import extract_boxed, grade

RESULTS_FORMAT = "eopd-eval/1"
DEFAULT_MAX_NEW_TOKENS = 4096


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): P(at least one of k of the n samples, drawn without replacement,
    is correct) given ``c`` correct samples, ``1 - C(n-c, k) / C(n, k)`` in a stable product form.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


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
# records
# --------------------------------------------------------------------------------------------------------


@dataclass
class CompletionRecord:
    """One graded sample.

    Attributes:
        text: The completion.
        answer: Its stated final answer (None: none stated).
        correct: The task's verdict.
        num_tokens: Tokens generated, EOS included.
        finished: Ended with EOS (False: hit the token budget).
        mean_entropy: Mean next-token entropy (nats) over its tokens, None when the backend gave none.
        path: Its reasoning path (``task.path_key``), None unless graded correct and a faithful solution.
        role_entropy: ``{role: {"sum": nats, "tokens": count}}`` when the task names token roles, else None.
    """

    text: str
    answer: str | None
    correct: bool
    num_tokens: int
    finished: bool
    mean_entropy: float | None
    path: str | None = None
    role_entropy: RoleEntropy | None = None


@dataclass
class ProblemRecord:
    """One problem's prompt, gold answer, reference path (None: the task names none) and graded samples."""

    id: str
    benchmark: str
    prompt: str
    gold: str
    completions: list[CompletionRecord]
    reference_path: str | None = None

    @property
    def num_correct(self) -> int:
        return sum(c.correct for c in self.completions)

    def distinct_answers(self) -> int:
        """Distinct extracted final answers (whitespace ignored; samples without an answer not counted)."""
        return len({"".join(c.answer.split()) for c in self.completions if c.answer is not None})

    def distinct_paths(self) -> int:
        """Distinct non-None paths among the samples (only correct, faithful samples have one)."""
        return len({c.path for c in self.completions if c.path is not None})


@dataclass
class BenchmarkResult:
    """Per-problem records and aggregate metrics of one benchmark."""

    name: str
    problems: list[ProblemRecord]
    metrics: dict[str, float]


@dataclass
class EvalResult:
    """A whole evaluation: per-benchmark results, cross-benchmark means and the run's configuration."""

    benchmarks: dict[str, BenchmarkResult]
    summary: dict[str, dict[str, float]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """The headline numbers: the cross-benchmark means (``avg@n``, ``pass@k``, ...), plus
        ``"<benchmark>/<metric>"`` entries when there are several benchmarks."""
        out = dict(self.summary["mean"])
        if len(self.benchmarks) > 1:
            out.update({f"{b}/{k}": v for b, r in self.benchmarks.items() for k, v in r.metrics.items()})
        return out

    def flat_metrics(self) -> dict[str, float]:
        """``{"math500/avg@8": ..., "mean/pass@8": ...}`` for logging."""
        out = {f"{b}/{k}": v for b, r in self.benchmarks.items() for k, v in r.metrics.items()}
        out.update({f"{s}/{k}": v for s, m in self.summary.items() for k, v in m.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` document."""
        return {
            "format": RESULTS_FORMAT,
            "config": self.config,
            "summary": self.summary,
            "benchmarks": {
                name: {
                    "metrics": r.metrics,
                    "problems": [{**asdict(p), "num_correct": p.num_correct} for p in r.problems],
                }
                for name, r in self.benchmarks.items()
            },
        }


# --------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------


def path_metrics(problems: Sequence[ProblemRecord]) -> dict[str, float]:
    """The path metrics of a benchmark (definitions: ``docs/metrics.md``, "Paths").

    Returns:
        ``faithful@1``: mean over problems of the share of samples that have a path (correct and faithful);
        ``distinct_correct_paths``: mean over problems of the number of distinct paths; and, when every
        problem names a reference path, ``reference_path_share``: pathed samples on the reference path
        divided by all pathed samples, pooled over the benchmark (0 when none has a path). To merge
        benchmarks or processes exactly, weight it by ``num_problems * faithful@1``.
    """
    n = len(problems[0].completions)
    out = {
        "faithful@1": float(np.mean([sum(c.path is not None for c in p.completions) / n for p in problems])),
        "distinct_correct_paths": float(np.mean([p.distinct_paths() for p in problems])),
    }
    if all(p.reference_path is not None for p in problems):
        pathed = [(c.path, p.reference_path) for p in problems for c in p.completions if c.path is not None]
        out["reference_path_share"] = sum(q == ref for q, ref in pathed) / len(pathed) if pathed else 0.0
    return out


def role_entropy_metrics(samples: Sequence[CompletionRecord]) -> dict[str, float]:
    """Per token role seen: ``entropy/<role>`` (token-weighted mean nats over the role's tokens) and
    ``tokens/<role>`` (the role's tokens per sample). Samples without role data are left out; to merge
    benchmarks or processes exactly, weight ``entropy/<role>`` by ``num_problems * tokens/<role>``."""
    with_roles = [c.role_entropy for c in samples if c.role_entropy is not None]
    out: dict[str, float] = {}
    for role in sorted({r for stats in with_roles for r in stats}):
        total = sum(stats[role]["sum"] for stats in with_roles if role in stats)
        tokens = sum(stats[role]["tokens"] for stats in with_roles if role in stats)
        out[f"entropy/{role}"] = total / tokens if tokens else 0.0
        out[f"tokens/{role}"] = tokens / len(with_roles)
    return out


def benchmark_metrics(problems: Sequence[ProblemRecord], *, with_paths: bool = False) -> dict[str, float]:
    """Aggregates over a benchmark's problems (every problem must have the same number of samples ``n``).

    Returns ``avg@n`` (mean accuracy over all samples), ``pass@k`` for ``k = 1..n`` (mean unbiased
    estimate), ``distinct_answers`` (mean per problem), ``mean_length`` (tokens per sample),
    ``mean_entropy`` (token-weighted; absent when the backend gave none), ``answer_rate`` (samples with an
    extracted answer, e.g. a box), ``truncation_rate`` (samples that hit the token budget), ``num_problems``;
    with ``with_paths`` the ``path_metrics``; and ``role_entropy_metrics`` when samples carry role data.
    Every metric but ``mean_entropy``, ``reference_path_share`` and ``entropy/<role>`` is a mean over
    problems, so ``num_problems`` weights it when merging.
    """
    if not problems:
        raise ValueError("no problems to aggregate")
    n = len(problems[0].completions)
    if n == 0 or any(len(p.completions) != n for p in problems):
        raise ValueError("every problem needs the same number (>= 1) of completions")
    samples = [c for p in problems for c in p.completions]
    metrics: dict[str, float] = {"num_problems": float(len(problems))}
    metrics[f"avg@{n}"] = float(np.mean([p.num_correct / n for p in problems]))
    for k in range(1, n + 1):
        metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, p.num_correct, k) for p in problems]))
    metrics["distinct_answers"] = float(np.mean([p.distinct_answers() for p in problems]))
    metrics["mean_length"] = float(np.mean([c.num_tokens for c in samples]))
    if all(c.mean_entropy is not None for c in samples):
        tokens = sum(c.num_tokens for c in samples)
        weighted = sum(c.mean_entropy * c.num_tokens for c in samples)  # type: ignore[operator]
        metrics["mean_entropy"] = weighted / tokens if tokens else 0.0
    metrics["answer_rate"] = float(np.mean([c.answer is not None for c in samples]))
    metrics["truncation_rate"] = float(np.mean([not c.finished for c in samples]))
    if with_paths:
        metrics.update(path_metrics(problems))
    metrics.update(role_entropy_metrics(samples))
    return metrics


def summarise(benchmarks: dict[str, BenchmarkResult]) -> dict[str, dict[str, float]]:
    """Unweighted means over benchmarks (``mean``) and over the paper's six when all are present."""

    def mean_of(names: Sequence[str]) -> dict[str, float]:
        keys = [k for k in benchmarks[names[0]].metrics if all(k in benchmarks[b].metrics for b in names)]
        out = {k: float(np.mean([benchmarks[b].metrics[k] for b in names])) for k in keys}
        out["num_problems"] = float(sum(benchmarks[b].metrics["num_problems"] for b in names))
        return out

    summary = {"mean": mean_of(list(benchmarks))}
    if set(PAPER_BENCHMARKS) <= set(benchmarks) and len(benchmarks) > len(PAPER_BENCHMARKS):
        summary["mean_paper6"] = mean_of(list(PAPER_BENCHMARKS))
    return summary


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


def result_from_records(
    records: Sequence[ProblemRecord], *, with_paths: bool, config: dict[str, Any] | None = None
) -> EvalResult:
    """Group graded problems by benchmark and aggregate them (also used on records gathered from several
    processes, so a distributed evaluation gives exactly the single-process metrics)."""
    grouped: dict[str, list[ProblemRecord]] = {}
    for r in records:
        grouped.setdefault(r.benchmark, []).append(r)
    benchmarks = {b: BenchmarkResult(b, rs, benchmark_metrics(rs, with_paths=with_paths)) for b, rs in grouped.items()}
    return EvalResult(benchmarks, summarise(benchmarks), dict(config or {}))


# --------------------------------------------------------------------------------------------------------
# output files
# --------------------------------------------------------------------------------------------------------


def format_percent(value: float | None) -> str:
    """``0.413 -> "41.3"``; ``None -> "-"``."""
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(summary: dict[str, dict[str, float]], metrics: dict[str, dict[str, float]], n: int) -> str:
    """The results table: one row per benchmark then the means; accuracies in percent."""
    ks = sorted({1, n} | ({k for k in (4, 8, 16) if k < n}))
    paths = any("distinct_correct_paths" in m for m in metrics.values())
    head = ["benchmark", "problems", f"Avg@{n}", *(f"Pass@{k}" for k in ks), "distinct", *(["paths"] * paths),
            "length", "entropy"]
    rows = [head, ["---"] * len(head)]
    for name, m in [*metrics.items(), *summary.items()]:
        entropy = f"{m['mean_entropy']:.3f}" if "mean_entropy" in m else "-"
        path_cell = [f"{m['distinct_correct_paths']:.2f}" if "distinct_correct_paths" in m else "-"] * paths
        rows.append(
            [
                f"**{name}**" if name in summary else name,
                str(int(m["num_problems"])),
                format_percent(m.get(f"avg@{n}")),
                *(format_percent(m.get(f"pass@{k}")) for k in ks),
                f"{m['distinct_answers']:.2f}",
                *path_cell,
                f"{m['mean_length']:.0f}",
                entropy,
            ]
        )
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def write_results(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` (every completion, answer, verdict, path) and ``results.md`` (the table).

    Returns:
        The two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    n = int(result.config.get("n", 1))
    table = markdown_table(result.summary, {b: r.metrics for b, r in result.benchmarks.items()}, n)
    settings = ", ".join(f"{k}={v}" for k, v in result.config.items() if k != "prompt_suffix")
    md_path.write_text(f"# Evaluation\n\n{settings}\n\n{table}", encoding="utf-8")
    return json_path, md_path
