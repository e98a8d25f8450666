"""What the per-step diagnostics (``optim.diagnostics``, docs/metrics.md "Diagnostics") cost.

Two measurements, each alternating diagnostics off / on so that a shared machine's drifts hit both alike, timed
in CPU seconds of this process (``time.process_time``: other processes' load on a shared machine does not
count; one thread by default, so CPU time is the work done; wall seconds are printed beside them):

    loss   ``fused_objective`` forward + backward (gradients wrt hidden states and lm_head weight), off vs
           ``diagnostics=True``, for the sparse path (``eopd``: closed-form norms, the unread ids' ``q^2``
           summed inside the gradient's own pass) at Qwen3 scale, with a small hidden size (cheap lm_head
           matmuls: the elementwise work dominates, the upper bound) and at a tiny vocabulary (Python overhead
           dominates), and the generic path (``mixture``, exact terms: two more backward passes per chunk)
    step   ``trainer.step`` of ``configs/tiny.yaml`` (tiny random models): two runs built side by side in this
           process, diagnostics off and on, stepped alternately

Usage::

    python benchmarks/diagnostics_cost.py                  # N=2048, V=151936, H=1024 (generic at N=512)
    python benchmarks/diagnostics_cost.py --n 1024 --repeats 5 --steps 40

Each overhead is given two ways: the minimum on over the minimum off (the least disturbed calls) and the median
over repeats of the paired ratio on / off (robust to one lucky call; for training steps, whose rollouts differ
from step to step, the pairs compare the same rollout). The last line is machine-readable, paired medians::

    summary: sparse_overhead=<Qwen3 scale, on / off - 1> generic_overhead=<...> step_overhead=<...>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from eopd.losses import ObjectiveConfig, TokenBatch, fused_objective, prepare_weights

Tensor = torch.Tensor
REPO = Path(__file__).resolve().parents[1]


@dataclass
class LossCase:
    """One fused-loss shape: preset, positions, vocabulary, student (and teacher) hidden size."""

    name: str
    preset: str
    n: int
    vocab: int
    hidden: int


@dataclass
class LossInputs:
    hidden_NH: Tensor
    weight_VH: Tensor
    batch: TokenBatch
    teacher_NH: Tensor | None
    teacher_weight_VH: Tensor | None


def build(case: LossCase, top_k: int = 16) -> LossInputs:
    """Deterministic inputs (as ``benchmarks/loss_memory.py``: a near-uniform fresh head, ~73% gated tokens)."""
    g = torch.Generator().manual_seed(0)
    n, v, h = case.n, case.vocab, case.hidden
    k = min(top_k, v)

    def normal(*shape: int, std: float) -> Tensor:
        return torch.empty(*shape).normal_(0.0, std, generator=g)

    def uniform(*shape: int, lo: float, hi: float) -> Tensor:
        return torch.empty(*shape).uniform_(lo, hi, generator=g)

    log_v = float(torch.log(torch.tensor(float(v))))
    batch = TokenBatch(
        tokens=torch.randint(0, v, (n,), generator=g), mask=torch.ones(n),
        logp_old=uniform(n, lo=-log_v - 0.2, hi=-log_v + 0.2), teacher_logp=uniform(n, lo=-6.0, hi=-0.1),
        teacher_entropy=uniform(n, lo=0.0, hi=3.0),
        teacher_topk_ids=torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]),
        teacher_topk_logprobs=uniform(n, k, lo=-8.0, hi=-0.1).sort(dim=-1, descending=True).values,
    )
    generic = ObjectiveConfig.preset(case.preset).needs_teacher_logits
    return LossInputs(normal(n, h, std=1.0).requires_grad_(True), normal(v, h, std=0.02).requires_grad_(True), batch,
                      normal(n, h, std=1.0) if generic else None, normal(v, h, std=0.02) if generic else None)


def loss_call(case: LossCase, x: LossInputs, diagnostics: bool) -> None:
    """One forward + backward."""
    cfg = ObjectiveConfig.preset(case.preset, top_k=min(16, case.vocab))
    weights = prepare_weights(cfg, x.batch)
    x.hidden_NH.grad, x.weight_VH.grad = None, None
    out = fused_objective(cfg, x.hidden_NH, x.weight_VH, x.batch, weights=weights, diagnostics=diagnostics,
                          teacher_hidden=x.teacher_NH, teacher_weight=x.teacher_weight_VH)
    out.loss.backward()


Times = dict[bool, list[tuple[float, float]]]  # diagnostics -> [(cpu s, wall s)] per timed call


def alternate(name: str, call: Callable[[bool], None], repeats: int) -> Times:
    """Time ``call(False)`` and ``call(True)`` alternately (ABBA order), ``repeats`` times each."""
    times: Times = {False: [], True: []}
    for r in range(repeats):
        for diagnostics in ((False, True) if r % 2 == 0 else (True, False)):
            c0, w0 = time.process_time(), time.perf_counter()
            call(diagnostics)
            times[diagnostics].append((time.process_time() - c0, time.perf_counter() - w0))
            print(f"  {name:14s} diagnostics={diagnostics!s:5s} cpu {times[diagnostics][-1][0]:8.4f} s "
                  f"wall {times[diagnostics][-1][1]:8.4f} s", file=sys.stderr, flush=True)
    return times


def time_loss(case: LossCase, repeats: int) -> Times:
    """Alternating off/on timings of one case (after a warm-up call of each)."""
    x = build(case)
    for diagnostics in (False, True):
        loss_call(case, x, diagnostics)
    return alternate(case.name, lambda diagnostics: loss_call(case, x, diagnostics), repeats)


def time_steps(steps: int, work: Path) -> tuple[Times, bool]:
    """``trainer.step`` of two tiny runs (diagnostics off, on) stepped alternately; and whether role metrics
    were logged (they are once the trainer passes ``token_roles`` to ``collect_batch``)."""
    from eopd.config import load_config
    from eopd.training.components import build_components
    from eopd.training.trainer import step

    runs = {}
    for diagnostics in (False, True):
        overrides = [f"output_dir={work / str(diagnostics)}", f"models.teacher={work / 'teacher'}",
                     f"models.student={work / 'student'}", f"optim.diagnostics={diagnostics}", "tensorboard=false",
                     f"max_steps={steps + 2}"]
        runs[diagnostics] = build_components(load_config(str(REPO / "configs" / "tiny.yaml"), overrides))
    logged: dict[bool, dict[str, float]] = {}
    for diagnostics, c in runs.items():  # warm-up step
        logged[diagnostics] = step(c)
    times = alternate("tiny step", lambda diagnostics: logged.__setitem__(diagnostics, step(runs[diagnostics])), steps)
    return times, any(k.startswith("role/") for k in logged[True])


def overhead(times: Times, clock: int = 0) -> tuple[float, float]:
    """``(min on / min off - 1, median over repeats of on / off - 1)`` of CPU (``clock=0``) or wall (1) seconds.

    The paired median compares each repeat's on and off call: for training steps, whose rollouts differ
    from step to step, it compares like with like (both runs sample the same rollouts: diagnostics leave the
    training bit-identical), where the minima may come from different steps.
    """
    on, off = [t[clock] for t in times[True]], [t[clock] for t in times[False]]
    return min(on) / min(off) - 1, statistics.median(a / b for a, b in zip(on, off, strict=True)) - 1


def row(name: str, preset: str, shape: str, times: Times, unit: float = 1.0, suffix: str = "s") -> str:
    """One table row: CPU min / median off and on, overheads by CPU min and paired median, wall paired median."""
    cpu = {d: [t[0] * unit for t in ts] for d, ts in times.items()}
    low, paired = overhead(times)
    return (f"| {name} | {preset} | {shape} | {min(cpu[False]):.3f} / {statistics.median(cpu[False]):.3f} {suffix} | "
            f"{min(cpu[True]):.3f} / {statistics.median(cpu[True]):.3f} {suffix} | {low:+.1%} | {paired:+.1%} | "
            f"{overhead(times, 1)[1]:+.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048, help="positions of the sparse Qwen3-scale case")
    parser.add_argument("--generic-n", type=int, default=512, help="positions of the generic (mixture) case")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each loss case, off and on")
    parser.add_argument("--steps", type=int, default=30, help="timed tiny training steps, off and on")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [
        LossCase("sparse_qwen3", "eopd", args.n, args.vocab, args.hidden),
        LossCase("sparse_h64", "eopd", args.n, args.vocab, 64),
        LossCase("sparse_tiny", "eopd", args.n, 17, 64),  # the arithmetic world's vocabulary
        LossCase("generic_qwen3", "mixture", args.generic_n, args.vocab, args.hidden),
        LossCase("generic_tiny", "mixture", args.n, 17, 64),
    ]
    rows = {case.name: (case, time_loss(case, args.repeats)) for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        steps, roles = time_steps(args.steps, Path(tmp))
    torch.set_num_threads(args.threads)

    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats per loss case, "
          f"{args.steps} steps; CPU seconds of this process")
    print("| case | preset | N x V x H | off: min / median | on: min / median | overhead: min | paired median "
          "| wall, paired median |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (case, times) in rows.items():
        print(row(name, case.preset, f"{case.n} x {case.vocab} x {case.hidden}", times))
    print(row(f"tiny train step (roles logged: {roles})", "eopd", "configs/tiny.yaml", steps, 1e3, "ms"))
    print(f"summary: sparse_overhead={overhead(rows['sparse_qwen3'][1])[1]:.4f} "
          f"generic_overhead={overhead(rows['generic_qwen3'][1])[1]:.4f} step_overhead={overhead(steps)[1]:.4f}")


if __name__ == "__main__":
    main()
