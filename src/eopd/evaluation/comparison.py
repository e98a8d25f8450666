"""Is B better than A? Paired bootstrap intervals of the difference between two ``results.json`` runs.

Benchmarks of 30 problems (AIME) move 3.3 points per problem, so a raw difference says little; resampling
the problems both runs share, with each problem's two scores kept together, gives an interval that does.
Used by ``eopd eval --compare A.json B.json`` (``docs/evaluation.md``, "Comparing two runs").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from eopd.errors import UserError
from eopd.evaluation.results import RESULTS_FORMAT, format_percent, pass_at_k


class ComparisonError(UserError, ValueError):
    """Two runs cannot be compared (not results.json files, or no shared problems); the message says why."""


def load_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` document written by ``eopd eval``.

    Raises:
        ComparisonError: the file is missing, not JSON, or not an eopd eval results file.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ComparisonError(f"{path}: cannot read it ({err.strerror or err}); give a results.json of eopd eval") \
            from None
    except json.JSONDecodeError as err:
        raise ComparisonError(f"{path}: not JSON ({err.msg}); give a results.json of eopd eval") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ComparisonError(f"{path} is not an eopd eval results.json (format {found!r}, expected "
                              f"{RESULTS_FORMAT!r})")
    return doc


def paired_bootstrap(
    diffs: dict[str, np.ndarray], *, num_resamples: int, rng: np.random.Generator, confidence: float = 0.95
) -> dict[str, tuple[float, float, float]]:
    """Percentile bootstrap intervals of mean paired differences, per benchmark and for their mean.

    Problems are resampled with replacement within each benchmark (paired: a problem's two scores move
    together); the ``"mean"`` entry averages the benchmarks' resampled means, as the summary does.

    Args:
        diffs: Per benchmark, the per-problem score differences (B - A), ``[num_problems]``.
        num_resamples: Bootstrap replicates.
        rng: Randomness.
        confidence: Interval coverage.

    Returns:
        ``name -> (observed mean difference, low, high)``.
    """
    alpha = (1.0 - confidence) / 2
    replicate_means: dict[str, np.ndarray] = {}
    out: dict[str, tuple[float, float, float]] = {}
    for name, d_M in diffs.items():
        idx_RM = rng.integers(0, len(d_M), size=(num_resamples, len(d_M)))
        replicate_means[name] = d_M[idx_RM].mean(axis=1)
    replicate_means["mean"] = np.mean(np.stack(list(replicate_means.values())), axis=0)
    observed = {name: float(d.mean()) for name, d in diffs.items()}
    observed["mean"] = float(np.mean(list(observed.values())))
    for name, reps_R in replicate_means.items():
        lo, hi = np.quantile(reps_R, [alpha, 1.0 - alpha])
        out[name] = (observed[name], float(lo), float(hi))
    return out


def problem_scores(doc: dict[str, Any], k: int) -> dict[str, dict[str, float]]:
    """Per benchmark, problem id -> pass@k score (k=0: accuracy over samples) from a results.json document."""
    scores: dict[str, dict[str, float]] = {}
    for bench, body in doc["benchmarks"].items():
        scores[bench] = {}
        for p in body["problems"]:
            n = len(p["completions"])
            c = sum(bool(x["correct"]) for x in p["completions"])
            scores[bench][p["id"]] = c / n if k == 0 else pass_at_k(n, c, k)
    return scores


def compare_results(
    a: dict[str, Any], b: dict[str, Any], *, num_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> str:
    """Side-by-side markdown of two ``results.json`` documents with paired bootstrap intervals of B - A.

    Only benchmarks and problems present in both runs are compared. Avg (accuracy over samples) and
    pass@k with ``k`` the smaller of the two runs' ``n`` are shown, in percent.

    Raises:
        ComparisonError: the runs share no problems.
    """
    k = min(int(a["config"]["n"]), int(b["config"]["n"]))
    lines = [f"A: {a['config'].get('model', '?')}", f"B: {b['config'].get('model', '?')}", ""]
    lines += [f"| metric | benchmark | problems | A | B | B - A | {100 * confidence:.0f}% CI |", "|---" * 7 + "|"]
    for label, kk in (("avg", 0), (f"pass@{k}", k)):
        sa, sb = problem_scores(a, kk), problem_scores(b, kk)
        shared = {bench: sorted(set(sa[bench]) & set(sb[bench])) for bench in sa if bench in sb}
        shared = {bench: ids for bench, ids in shared.items() if ids}
        if not shared:
            raise ComparisonError("the two runs share no problems (compare runs over the same benchmarks)")
        a_means = {bench: float(np.mean([sa[bench][i] for i in ids])) for bench, ids in shared.items()}
        b_means = {bench: float(np.mean([sb[bench][i] for i in ids])) for bench, ids in shared.items()}
        a_means["mean"], b_means["mean"] = (
            float(np.mean(list(a_means.values()))),
            float(np.mean(list(b_means.values()))),
        )
        diffs = {bench: np.array([sb[bench][i] - sa[bench][i] for i in ids]) for bench, ids in shared.items()}
        cis = paired_bootstrap(
            diffs, num_resamples=num_resamples, rng=np.random.default_rng(seed), confidence=confidence
        )
        for bench, (d, lo, hi) in cis.items():
            count = sum(len(v) for v in shared.values()) if bench == "mean" else len(shared[bench])
            lines.append(
                f"| {label} | {bench} | {count} | {format_percent(a_means[bench])} | "
                f"{format_percent(b_means[bench])} | {100 * d:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |"
            )
    return "\n".join(lines) + "\n"
