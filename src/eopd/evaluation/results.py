"""What an evaluation produces: the graded records, their metrics (Avg@k, unbiased pass@k, paths, entropy per
token role) and the results files.

Why apart from the loop (``eopd.evaluation.loop``): the records and their aggregation are pure data, shared by
the loop, by the trainer (records gathered from several processes aggregate to exactly the single-process
metrics, ``result_from_records``) and by ``eopd.evaluation.comparison`` (which reads the files back). Metric
definitions: ``docs/metrics.md``; the file format: ``docs/evaluation.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eopd.evaluation.backends import RoleEntropy
from eopd.tasks.benchmarks import PAPER_BENCHMARKS

RESULTS_FORMAT = "eopd-eval/1"


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
