"""Reports of comparisons across objectives and seeds: a markdown table (mean ± std) and PNG plots.

Inputs are plain records so any driver (the demo, a sweep script) can use them:

- ``RunResult(objective, seed, final: {metric: value}, curve: [{step, metric: value}, ...])``
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunResult:
    """One distillation run's evaluation.

    Attributes:
        objective: Preset name.
        seed: Seed of the run.
        final: Metrics of the final evaluation.
        curve: Periodic evaluations, each with a ``step`` key.
        seconds: Wall time of the run.
    """

    objective: str
    seed: int
    final: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs are dropped."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def grouped(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Results by objective, in first-seen order."""
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.objective, []).append(r)
    return out


def markdown_table(results: Sequence[RunResult], columns: Sequence[tuple[str, str, int]],
                   baseline: dict[str, float] | None = None, baseline_name: str = "base student") -> str:
    """A table with one row per objective: ``mean ± std`` over seeds of each column.

    Args:
        results: Runs.
        columns: ``(metric key, header, decimals)``.
        baseline: Optional metrics of a reference model (one row, no std).
        baseline_name: Its row label.
    """
    head = "| objective | seeds | " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|---|---|" + "---|" * len(columns)
    lines = [head, sep]
    if baseline is not None:
        cells = [cell(baseline.get(k, float("nan")), None, d) for k, _, d in columns]
        lines.append(f"| {baseline_name} | - | " + " | ".join(cells) + " |")
    for name, runs in grouped(results).items():
        cells = []
        for key, _, d in columns:
            m, s = mean_std([r.final.get(key, float("nan")) for r in runs])
            cells.append(cell(m, s if len(runs) > 1 else None, d))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.960).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass
class Paired:
    """``b - a`` over the seeds both objectives ran: mean difference, its 95% t interval, seeds, and wins."""

    mean: float
    low: float
    high: float
    seeds: int
    wins: int


def paired_difference(results: Sequence[RunResult], a: str, b: str, key: str) -> Paired | None:
    """Seed-paired difference of final ``key`` between objectives ``b`` and ``a``.

    Runs with the same seed share the base student's sampling streams and data order, so the per-seed
    difference removes the seed's own luck; the interval is ``mean ± t_{0.975, n-1} * sd / sqrt(n)`` (None with
    fewer than two shared seeds; an interval that excludes 0 is a difference these seeds resolve).
    """
    runs = grouped(results)
    va = {r.seed: r.final.get(key) for r in runs.get(a, [])}
    vb = {r.seed: r.final.get(key) for r in runs.get(b, [])}
    diffs = [vb[s] - va[s] for s in sorted(va.keys() & vb.keys())
             if va[s] is not None and vb[s] is not None and va[s] == va[s] and vb[s] == vb[s]]
    if len(diffs) < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = (T975[len(diffs) - 2] if len(diffs) - 1 <= len(T975) else 1.960) * sd / math.sqrt(len(diffs))
    return Paired(mean, mean - half, mean + half, len(diffs), sum(d > 0 for d in diffs))


def paired_table(results: Sequence[RunResult], reference: str, columns: Sequence[tuple[str, str, int]]) -> str:
    """Markdown: each other objective minus ``reference`` per seed, ``mean [95% CI] (wins/seeds)`` per metric."""
    lines = ["| objective - " + reference + " | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in grouped(results):
        if name == reference:
            continue
        cells = []
        for key, _, d in columns:
            p = paired_difference(results, reference, name, key)
            cells.append("-" if p is None else
                         f"{p.mean:+.{d}f} [{p.low:+.{d}f}, {p.high:+.{d}f}] ({p.wins}/{p.seeds})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(mean: float, std: float | None, decimals: int) -> str:
    """``mean ± std``, just ``mean`` for one run, ``-`` for a metric that was not measured (NaN)."""
    if mean != mean:
        return "-"
    return f"{mean:.{decimals}f}" + ("" if std is None else f" ± {std:.{decimals}f}")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG and free it."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": a legend outside the axes stays in the picture
    pyplot().close(fig)
    return path


def plot_curves(results: Sequence[RunResult], metrics: Sequence[tuple[str, str]], path: str | Path,
                title: str = "") -> Path:
    """One panel per metric: mean over seeds per objective with a ±1 std band, against steps."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for name, runs in grouped(results).items():
            steps = sorted({int(p["step"]) for r in runs for p in r.curve if key in p})
            if not steps:
                continue
            per_step = [[p[key] for r in runs for p in r.curve if int(p["step"]) == s and key in p] for s in steps]
            stats = [mean_std(v) for v in per_step]
            mean = [m for m, _ in stats]
            std = [s for _, s in stats]
            line = ax.plot(steps, mean, label=name, linewidth=1.6)[0]
            ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.18)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_pass_at_k(results: Sequence[RunResult], baseline: dict[str, float] | None, ks: Sequence[int],
                   path: str | Path, title: str = "", baseline_name: str = "base student") -> Path:
    """Final ``pass@k`` against ``k``: mean over seeds per objective (±1 std band), the baseline dashed.

    Shows at a glance whether an objective trades pass@k at large ``k`` (diversity) for pass@1 (accuracy).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ks = list(ks)
    if baseline is not None:
        ax.plot(ks, [baseline.get(f"pass@{k}", float("nan")) for k in ks], color="black", linestyle="--",
                marker="o", markersize=3, linewidth=1.2, label=baseline_name)
    for name, runs in grouped(results).items():
        stats = [mean_std([r.final.get(f"pass@{k}", float("nan")) for r in runs]) for k in ks]
        mean = [m for m, _ in stats]
        line = ax.plot(ks, mean, marker="o", markersize=3, linewidth=1.6, label=name)[0]
        ax.fill_between(ks, [m - sd for m, sd in stats], [m + sd for m, sd in stats], color=line.get_color(),
                        alpha=0.18)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_entropy_histogram(entropies: Sequence[float], tau: float, path: str | Path, title: str = "") -> Path:
    """Histogram of teacher entropy on student samples with the gate threshold marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(list(entropies), bins=60, color="#4c72b0", alpha=0.85)
    ax.set_yscale("log")
    ax.axvline(tau, color="#c44e52", linestyle="--", label=f"gate tau = {tau:.2f} nats")
    gated = sum(1 for h in entropies if h >= tau) / max(len(entropies), 1)
    ax.set_xlabel("teacher entropy H_t (nats) at student-sampled positions")
    ax.set_ylabel("tokens (log scale)")
    ax.legend(title=f"gated share {gated:.1%}", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


#: The demo report's main table: final evaluation and late-training means (metric key, header, decimals).
COLUMNS = [
    ("avg@n", "pass@1 (Avg@8)", 3),
    ("pass@8", "pass@8", 3),
    ("distinct_correct_paths", "distinct correct paths /8", 2),
    ("reference_path_share", "share of base path", 3),
    ("mean_entropy", "student entropy (eval)", 3),
    ("train/teacher_entropy", "teacher entropy (train)", 3),
    ("train/gated_share", "gated share (train)", 3),
]


#: Late-training diagnostics (mean over the last 20% of steps; docs/metrics.md, Diagnostics).
DIAG_COLUMNS = [
    ("diag/grad_rkl", "RKL logit-grad norm", 4),
    ("diag/grad_fkl", "FKL logit-grad norm", 4),
    ("diag/grad_cos", "cos(RKL, FKL)", 3),
    ("diag/clip_coef", "clip coefficient", 3),
    ("grad_norm", "grad norm (pre-clip)", 2),
    ("ppo/clip_frac", "PPO clip fraction", 4),
]


#: The paired comparison's metrics (final evaluation).
PAIRED_COLUMNS = [("avg@n", "pass@1", 3), ("pass@8", "pass@8", 3), ("distinct_correct_paths", "distinct paths", 2)]


def pass_at_k_columns(results: list[RunResult], base: dict[str, float] | None) -> list[tuple[str, str, int]]:
    """``(pass@k, k, decimals)`` for every k the evaluation logged (``1..eval.n``), in order of k."""
    keys = {k for r in results for k in r.final} | set(base or {})
    ks = sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(r"pass@(\d+)", k)))
    return [(f"pass@{k}", f"k={k}", 3) for k in ks]

