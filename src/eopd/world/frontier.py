"""The accuracy-diversity frontier of a comparison: pass@8 against pass@1 of every setting at every evaluation step.

Why its own module: the question the demo's report answers about several settings — does any ``eopd`` setting
reach a point that no ``opd`` setting reaches? — is a computation of its own over the runs' curves: every
evaluation of every run is a point, differences are paired by seed (``report.paired_difference``), an ``eopd``
point is beyond the ``opd`` settings only when no ``opd`` point (the base student at step 0 included) is at
least as good on both axes within the intervals (``reach``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eopd.world.report import Paired, RunResult, cell, grouped, mean_std, paired_difference, pyplot, save_figure


def preset_of(setting: str) -> str:
    """The preset of a demo setting, ``"eopd[loss.tau=0.3]"`` -> ``"eopd"`` (``demo.parse_variant``'s syntax)."""
    return setting.split("[", 1)[0]


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
        lines.append(f"| {p.objective} | {p.step} | {p.seeds} | {cell(p.x, None, decimals)} | "
                     f"{cell(p.y, None, decimals)} | {diff(p.dx)} | {diff(p.dy)} | {verdict.get(p.label, '')} |")
    return "\n".join(lines)


def _counted(n: int, one: str, many: str) -> str:
    """``n`` with its verb in agreement: ``"1 is"``, ``"3 are"``."""
    return f"{n} {one if n == 1 else many}"


def reach_answer(verdicts: Sequence[Reach], challenger: str = "EOPD", incumbent: str = "OPD",
                 decimals: int = 3) -> str:
    """One paragraph answering "does any challenger setting reach a point no incumbent setting reaches?"."""
    if not verdicts:
        return f"No {challenger} point after step 0 to compare."
    counts = {v: sum(r.verdict == v for r in verdicts) for v in ("beyond", "dominated", "unresolved")}
    beyond = [r for r in verdicts if r.verdict == "beyond"]
    head = (f"**Does any {challenger} setting reach a point that no {incumbent} setting reaches?** "
            + ("Yes." if beyond else "No, not resolved by these seeds." if counts["unresolved"] else "No."))
    lie = _counted(counts["beyond"], "lies", "lie")
    dominated, unresolved = (_counted(counts[v], "is", "are") for v in ("dominated", "unresolved"))
    body = (f" Of {len(verdicts)} {challenger} points (each setting at each evaluation step after 0), "
            f"{lie} beyond every {incumbent} point (every evaluation step of every {incumbent} "
            "setting, the base student at step 0 included: against each, pass@1 or pass@8 is higher with a "
            f"seed-paired 95% interval above 0), {dominated} dominated (an {incumbent} point is at "
            f"least as high on both, seed means) and {unresolved} unresolved. Intervals are per "
            "comparison, not corrected for the number of comparisons.")
    named = ", ".join(f"`{r.point.label}` (pass@1 {r.point.x:.{decimals}f}, pass@8 {r.point.y:.{decimals}f})"
                      for r in beyond[:10])
    return head + body + (f" Beyond: {named}." if beyond else "")


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
    plt = pyplot()
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
    return save_figure(fig, path)



def frontier(results: list[RunResult]) -> tuple[list[FrontierPoint], list[str], list[Reach]]:
    """The frontier of the runs: every setting's points (paired against the first setting), the ``opd``
    settings (the incumbents) and, when ``eopd`` settings ran too, whether each ``eopd`` point is beyond every
    ``opd`` point (``reach``). Settings are told apart by their preset (``preset_of``)."""
    names = list(grouped(results))
    points = frontier_points(results, names[0])
    preset = {name: preset_of(name) for name in names}
    opd = [n for n in names if preset[n] == "opd"]
    eopd = [n for n in names if preset[n] == "eopd"]
    return points, opd, reach(results, points, eopd, opd) if opd and eopd else []


def frontier_section(out: Path, results: list[RunResult], world_name: str) -> list[str]:
    """The report's frontier section and ``frontier.png`` (several settings only)."""
    points, opd, verdicts = frontier(results)
    reference = points[0].objective
    plot = plot_frontier(points, out / "frontier.png", incumbents=opd,
                         title=f"world {world_name}: seed means at every evaluation step; bars = 95% paired "
                               f"interval vs {reference}")
    answer = reach_answer(verdicts) if verdicts else (
        "(The question whether an `eopd` setting reaches a point no `opd` setting reaches needs settings of both.)")
    return [
        "## Accuracy against diversity: the frontier",
        "",
        "Every setting at every evaluation step is a point (pass@1 = Avg@8, pass@8; means over seeds); the "
        "step-0 points are the base student. Differences are paired by seed against "
        f"`{reference}` at the same step (95% t interval); the dashed line in `frontier.png` is the front of the "
        "`opd` settings' points.",
        "",
        answer,
        "",
        f"![frontier]({plot.name})",
        "",
        frontier_table(points, reference, verdicts),
        "",
    ]

