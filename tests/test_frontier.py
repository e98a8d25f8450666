"""The demo report's accuracy-diversity frontier: every setting at every evaluation step as a point, seed-paired
intervals, and the answer to "does any EOPD setting reach a point no OPD setting reaches?", on a case whose
numbers are worked out by hand below (3 seeds; t(0.975, 2) = 4.303, so a paired interval is the mean difference
± 4.303 sd / sqrt(3))."""

from __future__ import annotations

import pytest

from eopd.world.frontier import frontier, frontier_points, frontier_section, pareto, reach_answer
from eopd.world.report import RunResult

BASE = ([0.40, 0.41, 0.42], [0.85, 0.84, 0.86])  # step 0 of every run: the base student, per seed
AT_100 = {  # (pass@1 per seed, pass@8 per seed) at step 100
    "opd": ([0.47, 0.47, 0.48], [0.80, 0.81, 0.79]),
    "opd[optim.lr=1e-3]": ([0.44, 0.45, 0.44], [0.76, 0.75, 0.77]),
    # pass@8 above the base by [.03 .04 .03] (low .019 > 0) and opd@100 by [.08 .07 .10] (low .035 > 0); pass@1
    # above opd[lr]@100 by [.02 .02 .03] (low .009 > 0): beyond every opd point
    "eopd[loss.alpha=5]": ([0.46, 0.47, 0.47], [0.88, 0.88, 0.89]),
    # means .457 / .783 below opd@100's .473 / .800 on both: dominated
    "eopd": ([0.45, 0.46, 0.46], [0.78, 0.79, 0.78]),
    # mean pass@1 .457 above the base (.41) and opd[lr]@100 (.443), pass@8 .827 above opd@100's .800, but the
    # seeds disagree (pass@1 - base: [.10 -.01 .05], interval [-.09, +.18]): unresolved
    "eopd[loss.tau=0.3]": ([0.50, 0.40, 0.47], [0.80, 0.86, 0.82]),
    # barely moved: means .403 / .840 below the base student's .41 / .85 (every opd run's step 0), though not
    # resolved against opd@100 (pass@8 +[.04 .02 .06], interval [-.010, +.090]): dominated by not training
    "eopd[optim.lr=1e-5]": ([0.40, 0.40, 0.41], [0.84, 0.83, 0.85]),
}


def runs() -> list[RunResult]:
    out = []
    for name, (p1, p8) in AT_100.items():
        for seed in range(3):
            curve = [{"step": 0, "avg@n": BASE[0][seed], "pass@8": BASE[1][seed]},
                     {"step": 100, "avg@n": p1[seed], "pass@8": p8[seed]}]
            out.append(RunResult(name, seed, dict(curve[-1]), curve))
    return out


def test_every_eopd_point_gets_its_verdict_against_every_opd_point() -> None:
    _, opd, verdicts = frontier(runs())
    assert opd == ["opd", "opd[optim.lr=1e-3]"]
    assert {r.point.label: r.verdict for r in verdicts} == {
        "eopd[loss.alpha=5]@100": "beyond", "eopd@100": "dominated", "eopd[loss.tau=0.3]@100": "unresolved",
        "eopd[optim.lr=1e-5]@100": "dominated"}
    witnesses = {r.point.label: r.witnesses for r in verdicts}
    assert witnesses["eopd@100"] == ["opd@100"]
    assert witnesses["eopd[optim.lr=1e-5]@100"] == ["opd@0", "opd[optim.lr=1e-3]@0"]
    answer = reach_answer(verdicts)
    assert answer.startswith("**Does any EOPD setting reach a point that no OPD setting reaches?** Yes.")
    assert "Of 4 EOPD points" in answer and "1 lies beyond every OPD point" in answer
    assert "2 are dominated" in answer and "1 is unresolved" in answer
    assert "`eopd[loss.alpha=5]@100` (pass@1 0.467, pass@8 0.883)" in answer


def test_points_are_seed_means_paired_against_the_first_setting_at_the_same_step() -> None:
    points = {p.label: p for p in frontier_points(runs(), "opd")}
    assert len(points) == 12  # 6 settings x steps 0 and 100
    p = points["eopd[loss.alpha=5]@100"]
    assert (p.x, p.y, p.seeds) == (pytest.approx(0.4666667), pytest.approx(0.8833333), 3)
    # pass@8 - opd@100 per seed [.08 .07 .10]: mean .08333, sd .01528, half-width 4.303 * .01528 / sqrt 3 = .03795
    assert p.dy.mean == pytest.approx(0.0833333) and p.dy.low == pytest.approx(0.0833333 - 0.0379485, abs=1e-6)
    assert points["opd@100"].dx is None and points["eopd@0"].dx.mean == pytest.approx(0.0)
    front = pareto([q for q in points.values() if q.objective.startswith("opd")])
    assert [(round(q.x, 4), round(q.y, 4)) for q in front] == [(0.41, 0.85), (0.41, 0.85), (0.4733, 0.8)]


def test_the_report_section_holds_the_answer_the_table_and_the_plot(tmp_path) -> None:
    lines = frontier_section(tmp_path, runs(), "multi-path")
    text = "\n".join(lines)
    assert "Yes." in text and "![frontier](frontier.png)" in text
    # pass@1 - opd@100 per seed [-.01 0 -.01]: mean -.0067, half-width 4.303 * .00577 / sqrt 3 = .0143
    assert "| eopd[loss.alpha=5] | 100 | 3 | 0.467 | 0.883 | -0.007 [-0.021, +0.008] | +0.083 [+0.045, +0.121] | " \
           "beyond |" in text
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only_eopd = [r for r in runs() if r.objective.startswith("eopd")]
    assert "needs settings of both" in "\n".join(frontier_section(tmp_path, only_eopd, "multi-path"))
