"""Reports of comparisons across objectives and seeds: a markdown table (mean ± std) and PNG plots.

Inputs are plain records so any driver (the demo, a sweep script) can use them:

- ``RunResult(objective, seed, final: {metric: value}, curve: [{step, metric: value}, ...])``
"""

from __future__ import annotations

import math
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
        cells = [_cell(baseline.get(k, float("nan")), None, d) for k, _, d in columns]
        lines.append(f"| {baseline_name} | - | " + " | ".join(cells) + " |")
    for name, runs in grouped(results).items():
        cells = []
        for key, _, d in columns:
            m, s = mean_std([r.final.get(key, float("nan")) for r in runs])
            cells.append(_cell(m, s if len(runs) > 1 else None, d))
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


def _cell(mean: float, std: float | None, decimals: int) -> str:
    """``mean ± std``, just ``mean`` for one run, ``-`` for a metric that was not measured (NaN)."""
    if mean != mean:
        return "-"
    return f"{mean:.{decimals}f}" + ("" if std is None else f" ± {std:.{decimals}f}")


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write a figure as PNG and free it."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": a legend outside the axes stays in the picture
    _pyplot().close(fig)
    return path


def plot_curves(results: Sequence[RunResult], metrics: Sequence[tuple[str, str]], path: str | Path,
                title: str = "") -> Path:
    """One panel per metric: mean over seeds per objective with a ±1 std band, against steps."""
    plt = _pyplot()
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
    return _save(fig, path)


def plot_pass_at_k(results: Sequence[RunResult], baseline: dict[str, float] | None, ks: Sequence[int],
                   path: str | Path, title: str = "", baseline_name: str = "base student") -> Path:
    """Final ``pass@k`` against ``k``: mean over seeds per objective (±1 std band), the baseline dashed.

    Shows at a glance whether an objective trades pass@k at large ``k`` (diversity) for pass@1 (accuracy).
    """
    plt = _pyplot()
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
    return _save(fig, path)


def plot_entropy_histogram(entropies: Sequence[float], tau: float, path: str | Path, title: str = "") -> Path:
    """Histogram of teacher entropy on student samples with the gate threshold marked."""
    plt = _pyplot()
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
    return _save(fig, path)


# The accuracy-diversity frontier ----------------------------------------------------------------------------------
#: The frontier's axes: accuracy (pass@1 as the mean over the 8 samples, ``avg@n``) and diversity (pass@8).
FRONTIER_KEYS = ("avg@n", "pass@8")


def at_steps(results: Sequence[RunResult]) -> list[RunResult]:
    """Every evaluation of every run as a result of its own, objective ``"LABEL@STEP"``: what lets the
    seed-paired helpers compare any setting at any step with any other (a seed pairs like with like at every
    step: the same base sampling streams and data order)."""
    return [RunResult(f"{r.objective}@{int(p['step'])}", r.seed, dict(p)) for r in results for p in r.curve]


def eval_steps(results: Sequence[RunResult], objective: str) -> list[int]:
    """The evaluation steps of ``objective``'s runs, in order."""
    return sorted({int(p["step"]) for r in results if r.objective == objective for p in r.curve})


@dataclass
class FrontierPoint:
    """One setting at one evaluation step: seed means on the frontier's axes and the seed-paired differences
    against the reference setting at the same step (``None`` for the reference or fewer than 2 shared seeds)."""

    objective: str
    step: int
    x: float
    y: float
    seeds: int
    dx: Paired | None
    dy: Paired | None

    @property
    def label(self) -> str:
        """``objective@step``."""
        return f"{self.objective}@{self.step}"


def frontier_points(results: Sequence[RunResult], reference: str,
                    keys: tuple[str, str] = FRONTIER_KEYS) -> list[FrontierPoint]:
    """Every setting at every evaluation step, in first-seen order of settings and step order."""
    points = at_steps(results)
    by_label = grouped(points)
    out = []
    for name in grouped(results):
        for step in eval_steps(results, name):
            label = f"{name}@{step}"
            runs = by_label[label]
            x, y = (mean_std([r.final.get(k, float("nan")) for r in runs])[0] for k in keys)
            paired = [None if name == reference else paired_difference(points, f"{reference}@{step}", label, k)
                      for k in keys]
            out.append(FrontierPoint(name, step, x, y, len(runs), *paired))
    return out


@dataclass
class Reach:
    """Whether a challenger point lies where no incumbent point reaches.

    Attributes:
        point: The challenger's point.
        verdict: ``beyond`` (against every incumbent point, one of the two axes is higher with a seed-paired 95%
            interval above 0), ``dominated`` (some incumbent point is at least as high on both, seed means) or
            ``unresolved`` (neither).
        witnesses: The incumbent points behind the verdict: those that dominate it, or those it is not
            resolved against (empty when ``beyond``).
    """

    point: FrontierPoint
    verdict: str
    witnesses: list[str]


def reach(results: Sequence[RunResult], points: Sequence[FrontierPoint], challengers: Sequence[str],
          incumbents: Sequence[str], keys: tuple[str, str] = FRONTIER_KEYS) -> list[Reach]:
    """For every point of the ``challengers`` after step 0 (step 0 is the base student), whether any point of
    the ``incumbents`` (every evaluation step, step 0 included: not training is a setting too) reaches it.

    Every comparison pairs by seed (``paired_difference``); the intervals are per comparison, not corrected for
    how many comparisons are made. ``points`` (``frontier_points`` of ``results``) supply the verdicts' points.
    """
    ours = {p.label: p for p in points}
    evaluations = at_steps(results)
    targets = [f"{n}@{s}" for n in incumbents for s in eval_steps(results, n)]
    out = []
    for name in challengers:
        for step in eval_steps(results, name):
            if step == 0:
                continue
            label = f"{name}@{step}"
            dominated, unresolved = [], []
            for target in targets:
                d = [paired_difference(evaluations, target, label, k) for k in keys]
                if d[0] is None or d[1] is None:
                    unresolved.append(target)
                elif d[0].mean <= 0 and d[1].mean <= 0:
                    dominated.append(target)
                elif not (d[0].low > 0 or d[1].low > 0):
                    unresolved.append(target)
            verdict = "dominated" if dominated else "unresolved" if unresolved else "beyond"
            out.append(Reach(ours[label], verdict, dominated or unresolved))
    return out


def frontier_table(points: Sequence[FrontierPoint], reference: str, verdicts: Sequence[Reach] = (),
                   decimals: int = 3) -> str:
    """Markdown: every setting at every evaluation step, its seed means, its paired difference against
    ``reference`` at that step, and (for challenger points) its ``reach`` verdict."""
    verdict = {r.point.label: r.verdict for r in verdicts}

    def diff(p: Paired | None) -> str:
        return "-" if p is None else f"{p.mean:+.{decimals}f} [{p.low:+.{decimals}f}, {p.high:+.{decimals}f}]"

    lines = [f"| setting | step | seeds | pass@1 | pass@8 | pass@1 - {reference} | pass@8 - {reference} | reach |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.objective} | {p.step} | {p.seeds} | {_cell(p.x, None, decimals)} | "
                     f"{_cell(p.y, None, decimals)} | {diff(p.dx)} | {diff(p.dy)} | {verdict.get(p.label, '')} |")
    return "\n".join(lines)


def reach_answer(verdicts: Sequence[Reach], challenger: str = "EOPD", incumbent: str = "OPD",
                 decimals: int = 3) -> str:
    """One paragraph answering "does any challenger setting reach a point no incumbent setting reaches?"."""
    if not verdicts:
        return f"No {challenger} point after step 0 to compare."
    counts = {v: sum(r.verdict == v for r in verdicts) for v in ("beyond", "dominated", "unresolved")}
    beyond = [r for r in verdicts if r.verdict == "beyond"]
    head = (f"**Does any {challenger} setting reach a point that no {incumbent} setting reaches?** "
            + ("Yes." if beyond else "No, not resolved by these seeds." if counts["unresolved"] else "No."))
    body = (f" Of {len(verdicts)} {challenger} points (each setting at each evaluation step after 0), "
            f"{counts['beyond']} lie beyond every {incumbent} point (every evaluation step of every {incumbent} "
            "setting, the base student at step 0 included: against each, pass@1 or pass@8 is higher with a "
            f"seed-paired 95% interval above 0), {counts['dominated']} are dominated (an {incumbent} point is at "
            f"least as high on both, seed means) and {counts['unresolved']} are unresolved. Intervals are per "
            "comparison, not corrected for the number of comparisons.")
    named = "".join(f" `{r.point.label}` (pass@1 {r.point.x:.{decimals}f}, pass@8 {r.point.y:.{decimals}f})"
                    + ("," if i < len(beyond) - 1 else ".") for i, r in enumerate(beyond[:10]))
    return head + body + (f" Beyond: {named}" if beyond else "")


def pareto(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """The points no other point matches or beats on both axes (seed means), by increasing pass@1."""
    keep = [p for p in points if not any((q.x >= p.x and q.y >= p.y) and (q.x > p.x or q.y > p.y) for q in points)]
    return sorted(keep, key=lambda p: p.x)


def plot_frontier(points: Sequence[FrontierPoint], path: str | Path, incumbents: Sequence[str] = (),
                  title: str = "", keys_label: tuple[str, str] = ("pass@1 (Avg@8)", "pass@8")) -> Path:
    """pass@8 against pass@1: each setting a line through its evaluation steps (seed means; the marker grows
    with the step; squares for ``incumbents``), error bars the seed-paired 95% interval of its difference against
    the reference setting at that step, centred on the point; the incumbents' Pareto front (seed means) dashed.
    The axes frame the means (intervals wider than that are cut at the frame); the legend sits below."""
    plt = _pyplot()
    names = list(dict.fromkeys(p.objective for p in points))
    ncol = 1 if max(len(n) for n in names) > 60 else 2
    legend_rows = -(-(len(names) + 1) // ncol)
    fig, ax = plt.subplots(figsize=(8.0, 5.5 + 0.14 * legend_rows))
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    steps = sorted({p.step for p in points}) or [0]
    size = {s: 3 + 5 * i / max(len(steps) - 1, 1) for i, s in enumerate(steps)}
    for i, name in enumerate(names):
        mine = [p for p in points if p.objective == name]
        color = colors(i % colors.N)
        marker = "s" if name in incumbents else "o"
        short = name.replace("loss.", "").replace("optim.", "")  # the legend's label; the table has the full one
        ax.plot([p.x for p in mine], [p.y for p in mine], linewidth=1.0, alpha=0.8, color=color, marker=marker,
                markersize=0, label=short)
        for p in mine:
            xerr = None if p.dx is None else [[p.dx.mean - p.dx.low], [p.dx.high - p.dx.mean]]
            yerr = None if p.dy is None else [[p.dy.mean - p.dy.low], [p.dy.high - p.dy.mean]]
            ax.errorbar(p.x, p.y, xerr=xerr, yerr=yerr, fmt=marker, markersize=size[p.step], color=color,
                        elinewidth=0.5, capsize=1.5, alpha=0.75, ecolor=(*color[:3], 0.45))
    front = pareto([p for p in points if p.objective in incumbents])
    if front:
        # sorted by pass@1, pass@8 falls: the front's height over (x_{i-1}, x_i] is y_i
        ax.step([p.x for p in front], [p.y for p in front], where="pre", color="black", linestyle="--",
                linewidth=1.4, zorder=5, label="front of the squares' points (seed means)")
    finite = [p for p in points if p.x == p.x and p.y == p.y]
    if finite:
        for lim, values in ((ax.set_xlim, [p.x for p in finite]), (ax.set_ylim, [p.y for p in finite])):
            pad = max(0.02, 0.15 * (max(values) - min(values)))
            lim(min(values) - pad, max(values) + pad)
    ax.set_xlabel(keys_label[0])
    ax.set_ylabel(keys_label[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False, ncol=ncol)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
