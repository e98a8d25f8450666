"""Avg@k / unbiased pass@k evaluation on math benchmarks, ``results.json`` + ``results.md``, and run comparison.

One entry point serves the CLI (``eopd eval``) and the trainer's periodic evaluation:
``evaluate_problems(model, tokenizer, problems, grade_fn, ...)`` samples ``n`` completions per problem
through a backend (``eval_backends``), grades each, and aggregates per benchmark (``problem.meta
["benchmark"]``) and across benchmarks. The protocol and file format are documented in
``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eopd import __version__
from eopd.eval_backends import (
    BackendUnavailableError,
    Generation,
    GenerationBackend,
    make_backend,
)
from eopd.prompting import resolve_chat_template
from eopd.tasks.base import Problem
from eopd.tasks.math import PAPER_BENCHMARKS, PROMPT_SUFFIX, BenchmarkFormatError, extract_boxed, grade

RESULTS_FORMAT = "eopd-eval/1"
DEFAULT_MAX_NEW_TOKENS = 4096

logger = logging.getLogger(__name__)


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


@dataclass
class CompletionRecord:
    """One graded sample: its text, extracted answer (None: no box), verdict and measurements."""

    text: str
    answer: str | None
    correct: bool
    num_tokens: int
    finished: bool
    mean_entropy: float | None


@dataclass
class ProblemRecord:
    """One problem's prompt, gold answer and all its graded samples."""

    id: str
    benchmark: str
    prompt: str
    gold: str
    completions: list[CompletionRecord]

    @property
    def num_correct(self) -> int:
        return sum(c.correct for c in self.completions)

    def distinct_answers(self) -> int:
        """Distinct extracted final answers (whitespace ignored; samples without a box not counted)."""
        return len({"".join(c.answer.split()) for c in self.completions if c.answer is not None})


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


def benchmark_metrics(problems: Sequence[ProblemRecord]) -> dict[str, float]:
    """Aggregates over a benchmark's problems (every problem must have the same number of samples ``n``).

    Returns ``avg@n`` (mean accuracy over all samples), ``pass@k`` for ``k = 1..n`` (mean unbiased
    estimate), ``distinct_answers`` (mean per problem), ``mean_length`` (tokens per sample),
    ``mean_entropy`` (token-weighted; absent when the backend gave none), ``answer_rate`` (samples with an
    extracted answer, e.g. a box), ``truncation_rate`` (samples that hit the token budget) and ``num_problems``.
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


def grade_problem(
    problem: Problem,
    generations: Sequence[Generation],
    grade_fn: Callable[[str, str], bool],
    answer_fn: Callable[[str], str | None] = extract_boxed,
) -> ProblemRecord:
    """Grade a problem's generations into a record."""
    completions = [
        CompletionRecord(
            text=g.text,
            answer=answer_fn(g.text),
            correct=bool(grade_fn(g.text, problem.answer)),
            num_tokens=g.num_tokens,
            finished=g.finished,
            mean_entropy=g.mean_entropy,
        )
        for g in generations
    ]
    bench = str(problem.meta.get("benchmark", "all"))
    return ProblemRecord(problem.id, bench, problem.prompt, problem.answer, completions)


def evaluate_problems(
    model: torch.nn.Module | str | None,
    tokenizer: Any,
    problems: Sequence[Problem],
    grade_fn: Callable[[str, str], bool] = grade,
    *,
    n: int = 8,
    temperature: float = 1.0,
    top_p: float = 0.8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    seed: int = 0,
    use_chat_template: bool | str = "auto",
    backend: str | GenerationBackend = "hf",
    answer_fn: Callable[[str], str | None] = extract_boxed,
) -> EvalResult:
    """Sample ``n`` completions per problem, grade them and aggregate per benchmark.

    Args:
        model: The causal LM (HF backend), its path / Hub id (vLLM backend), or None with a ready backend.
        tokenizer: Its tokenizer (prompt formatting and decoding).
        problems: Problems; ``meta["benchmark"]`` groups them (missing: one group ``"all"``).
        grade_fn: ``grade_fn(completion, gold) -> bool`` (default: math-verify ``grade``).
        n: Samples per problem.
        temperature: Sampling temperature (paper: 1.0).
        top_p: Nucleus mass (paper: 0.8).
        max_new_tokens: Completion budget.
        batch_size: Sequences per sampling call (HF backend).
        generator: Randomness for the HF backend, on the model's device (default: seeded with ``seed``).
        seed: Seed when no generator is given, and the vLLM engine seed.
        use_chat_template: True, False or ``"auto"`` (when the tokenizer has one).
        backend: ``"hf"``, ``"vllm"`` or a ready ``GenerationBackend``.
        answer_fn: The final answer a completion states (recorded, and counted for ``distinct_answers``).

    Returns:
        An ``EvalResult`` whose ``config`` records the protocol.
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
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
        )
    generations = backend.generate([p.prompt for p in problems], n)
    records = [grade_problem(p, g, grade_fn, answer_fn) for p, g in zip(problems, generations, strict=True)]
    grouped: dict[str, list[ProblemRecord]] = {}
    for r in records:
        grouped.setdefault(r.benchmark, []).append(r)
    benchmarks = {b: BenchmarkResult(b, rs, benchmark_metrics(rs)) for b, rs in grouped.items()}
    config = {
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "chat_template": chat,
        "prompt_suffix": PROMPT_SUFFIX,
        "backend": backend.name,
        "entropy": backend.entropy_kind,
        "seed": seed,
        "eopd_version": __version__,
    }
    return EvalResult(benchmarks, summarise(benchmarks), config)


# --------------------------------------------------------------------------------------------------------
# output files
# --------------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(summary: dict[str, dict[str, float]], metrics: dict[str, dict[str, float]], n: int) -> str:
    """The results table: one row per benchmark then the means; accuracies in percent."""
    ks = sorted({1, n} | ({k for k in (4, 8, 16) if k < n}))
    head = ["benchmark", "problems", f"Avg@{n}", *(f"Pass@{k}" for k in ks), "distinct", "length", "entropy"]
    rows = [head, ["---"] * len(head)]
    for name, m in [*metrics.items(), *summary.items()]:
        entropy = f"{m['mean_entropy']:.3f}" if "mean_entropy" in m else "-"
        rows.append(
            [
                f"**{name}**" if name in summary else name,
                str(int(m["num_problems"])),
                _pct(m.get(f"avg@{n}")),
                *(_pct(m.get(f"pass@{k}")) for k in ks),
                f"{m['distinct_answers']:.2f}",
                f"{m['mean_length']:.0f}",
                entropy,
            ]
        )
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def write_results(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` (every completion, answer, verdict) and ``results.md`` (the table).

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


# --------------------------------------------------------------------------------------------------------
# comparison of two runs
# --------------------------------------------------------------------------------------------------------


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


def _problem_scores(doc: dict[str, Any], k: int) -> dict[str, dict[str, float]]:
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
        ValueError: the runs share no problems.
    """
    k = min(int(a["config"]["n"]), int(b["config"]["n"]))
    lines = [f"A: {a['config'].get('model', '?')}", f"B: {b['config'].get('model', '?')}", ""]
    lines += [f"| metric | benchmark | problems | A | B | B - A | {100 * confidence:.0f}% CI |", "|---" * 7 + "|"]
    for label, kk in (("avg", 0), (f"pass@{k}", k)):
        sa, sb = _problem_scores(a, kk), _problem_scores(b, kk)
        shared = {bench: sorted(set(sa[bench]) & set(sb[bench])) for bench in sa if bench in sb}
        shared = {bench: ids for bench, ids in shared.items() if ids}
        if not shared:
            raise ValueError("the two runs share no problems (compare runs over the same benchmarks)")
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
                f"| {label} | {bench} | {count} | {_pct(a_means[bench])} | {_pct(b_means[bench])} | "
                f"{100 * d:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eopd eval",
        description="Avg@n and unbiased pass@k of a checkpoint on math benchmarks (paper protocol by default), "
        "or --compare two results.json files.",
    )
    p.add_argument("--model", help="checkpoint folder or Hub id")
    p.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: --model)")
    p.add_argument(
        "--benchmarks",
        default="paper",
        help="comma list of names (math500,aime24,aime25,amc23,minerva,olympiadbench,gsm8k), files, "
        "folders or hf:owner/name; 'paper' = the six, 'all' = the six + gsm8k",
    )
    p.add_argument("--data-dir", help="folder holding <name>.jsonl (default: $EOPD_MATH_DATA or shared/data/math)")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--limit", type=int, help="first N problems of each benchmark")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per sampling call (hf backend)")
    p.add_argument("--output-dir", help="where results.json / results.md go (default: runs/eval/<model name>)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--grade-timeout", type=int, default=5, help="math-verify seconds per step")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two runs side by side")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap replicates for --compare")
    return p


def _benchmark_list(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    expanded: list[str] = []
    for name in names:
        expanded += {"paper": list(PAPER_BENCHMARKS), "all": [*PAPER_BENCHMARKS, "gsm8k"]}.get(name, [name])
    return expanded


def _run_compare(args: argparse.Namespace) -> int:
    docs = []
    for path in args.compare:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if doc.get("format") != RESULTS_FORMAT:
            raise ValueError(f"{path} is not an eopd eval results.json (format {doc.get('format')!r})")
        docs.append(doc)
    print(compare_results(docs[0], docs[1], num_resamples=args.bootstrap, seed=args.seed), end="")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from eopd.models import load_causal_lm, load_tokenizer, resolve_device
    from eopd.tasks.math import load_benchmark

    problems = [
        p for b in _benchmark_list(args.benchmarks) for p in load_benchmark(b, data_dir=args.data_dir, limit=args.limit)
    ]
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    chat = {"auto": "auto", "on": True, "off": False}[args.chat_template]
    device = resolve_device(args.device)
    model: torch.nn.Module | str = args.model
    generator = None
    if args.backend == "hf":
        model = load_causal_lm(args.model, device=device, dtype=args.dtype)
        generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.time()
    result = evaluate_problems(
        model,
        tokenizer,
        problems,
        lambda c, g: grade(c, g, timeout_s=args.grade_timeout),
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        generator=generator,
        seed=args.seed,
        use_chat_template=chat,
        backend=args.backend,
    )
    result.config.update(
        model=args.model,
        benchmarks=sorted(result.benchmarks),
        limit=args.limit,
        device=str(device),
        dtype=args.dtype,
        seconds=round(time.time() - start, 1),
    )
    out_dir = Path(args.output_dir or Path("runs") / "eval" / Path(str(args.model).rstrip("/")).name)
    json_path, md_path = write_results(result, out_dir)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 0


def cli(argv: list[str]) -> int:
    """``eopd eval``: evaluate a checkpoint, or ``--compare A.json B.json``. Returns an exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.compare is None and not args.model:
        parser.error("--model is required (or use --compare A.json B.json)")
    if args.n < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--n and --limit must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return _run_compare(args) if args.compare else _run_eval(args)
    except (BenchmarkFormatError, BackendUnavailableError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"eopd eval: error: {err}", file=sys.stderr)
        return 2
