"""Peak memory per process of 2-process FSDP against 2-process DDP, and their step-time ratio, in one run.

Why: docs/scaling.md estimates from parameter counts that sharding the student (``parallel.strategy=fsdp``)
divides its weights, gradients and AdamW moments by the number of processes; this measures it through the real
training step (``build_components`` + ``trainer.step``: rollout on the unsharded student, teacher scores, fused
loss inside the sharded root's forward, AdamW on the shards) on a benchmark-sized student: Qwen3-0.6B's width
and vocabulary rows (hidden 1,024, 16 heads, 151,936 lm_head rows, tied) with ``--layers`` decoder layers, and a
tiny teacher, so that the student's state is what differs.

Three arms: DDP, FSDP (gradients accumulate unsharded over a minibatch's micro-batches, one reduce-scatter
after the last) and FSDP with ``parallel.reduce_every_micro_batch=true`` (a reduce-scatter per micro-batch, only
sharded gradients kept). Each runs in ``torchrun --nproc_per_node 2`` (gloo on CPU, NCCL on GPU); every process
measures itself as ``benchmarks/memory_levers.py`` does: on CPU the kernel's high-water mark of the resident set
(``VmHWM``, restarted after the build), on CUDA ``torch.cuda.max_memory_allocated``; MiB above the process
before loading. ``built`` is resident after the build (FSDP: the shard, once the whole model it was cut from is freed),
``train`` the peak of the steps above it (gradients, AdamW state, activations, the unsharded copy sampling
uses), ``peak`` their sum. Step time: the mean of the steps after the first (which allocates AdamW's moments).

Usage::

    python benchmarks/fsdp_memory.py                       # CPU, 12 layers, 3 steps
    python benchmarks/fsdp_memory.py --layers 8 --device cuda

The last line is machine-readable::

    summary: fsdp_peak_ratio=<DDP peak / FSDP peak, per process> fsdp_train_ratio=<...> step_time_ratio=<FSDP / DDP>
             fsdp_rs_peak_ratio=<...> fsdp_rs_step_time_ratio=<...>   (FSDP reducing after every micro-batch)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_levers import MIB, REPO, build_models, meters

#: The arms, as config overrides: DDP, FSDP (one reduce-scatter per minibatch: gradients accumulate unsharded
#: over its micro-batches) and FSDP reducing after every micro-batch (sharded gradients only).
STRATEGIES = {"ddp": ("parallel.strategy=ddp",), "fsdp": ("parallel.strategy=fsdp",),
              "fsdp_rs": ("parallel.strategy=fsdp", "parallel.reduce_every_micro_batch=true")}


def overrides(args: argparse.Namespace, models: dict[str, Path], arm: tuple[str, ...], out: Path) -> list[str]:
    return [f"models.student={models['big']}", f"models.teacher={models['tiny']}", "models.build_student=null",
            "models.build_teacher=null", f"models.device={args.device}", f"output_dir={out}", "save_every=0",
            "tensorboard=false", "num_threads=1", "objective=eopd", "loss.top_k=8", "rollout.prompts_per_step=4",
            "rollout.n=2", f"rollout.max_new_tokens={args.new_tokens}", "optim.minibatch_size=8",
            "optim.micro_batch_size=2", f"max_steps={args.steps}", *arm]


def worker(config: list[str], device: str, result: Path) -> None:
    """One process of a run: build, train, write what it measured to ``result.rank<r>.json``."""
    from eopd.config import load_config
    from eopd.training.components import build_components
    from eopd.training.trainer import step

    cfg = load_config(REPO / "configs" / "tiny.yaml", config)
    cuda = device.startswith("cuda")
    now, high, reset = meters(device)
    base = now()
    c = build_components(cfg)
    built = now() - base
    reset()
    seconds = []
    for _ in range(cfg.max_steps):
        t0 = time.perf_counter()
        step(c)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    train = high() - base - built
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in c.student.parameters())
    out = {"built": built, "train": train, "peak": built + train, "step_s": sum(seconds[1:]) / max(len(seconds) - 1, 1),
           "params_here": local, "rank": c.rank}
    Path(f"{result}.rank{c.rank}.json").write_text(json.dumps(out))


def run(args: argparse.Namespace, models: dict[str, Path], strategy: str, root: Path) -> list[dict[str, float]]:
    result = root / f"{strategy}-result"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(args.nproc),
           os.path.abspath(__file__), "--worker", json.dumps(overrides(args, models, STRATEGIES[strategy],
                                                                       root / strategy)),
           "--device", args.device, "--result", str(result)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    return [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(args.nproc)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12, help="decoder layers of the big student")
    p.add_argument("--steps", type=int, default=3, help="training steps per run (>= 2: the first is not timed)")
    p.add_argument("--new-tokens", type=int, default=32, help="completion budget")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--nproc", type=int, default=2, help="processes per run")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "eopd-bench-models"),
                   help="where the models are built (reused)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.device, Path(args.result))
        return
    models = build_models(Path(args.cache), args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: run(args, models, s, Path(tmp)) for s in STRATEGIES}
    how = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "VmHWM"
    print(f"student: Qwen3-0.6B width, {args.layers} layers, 151,936 rows (tied); {args.nproc} processes each; "
          f"{args.steps} steps of 4 prompts x 2 samples x {args.new_tokens} new tokens; {how}, MiB per process")
    print(f"{'strategy':<10}{'rank':>5}{'params here':>13}{'built MiB':>11}{'train MiB':>11}{'peak MiB':>10}"
          f"{'step s':>9}")
    for strategy, ranks in results.items():
        for r in ranks:
            print(f"{strategy:<10}{r['rank']:>5}{r['params_here']:>13,}{r['built'] / MIB:>11.0f}"
                  f"{r['train'] / MIB:>11.0f}{r['peak'] / MIB:>10.0f}{r['step_s']:>9.2f}")
    worst = {s: max(r["peak"] for r in ranks) for s, ranks in results.items()}
    train = {s: max(r["train"] for r in ranks) for s, ranks in results.items()}
    step_s = {s: max(r["step_s"] for r in ranks) for s, ranks in results.items()}
    print(f"summary: fsdp_peak_ratio={worst['ddp'] / worst['fsdp']:.2f} "
          f"fsdp_train_ratio={train['ddp'] / train['fsdp']:.2f} step_time_ratio={step_s['fsdp'] / step_s['ddp']:.2f} "
          f"fsdp_rs_peak_ratio={worst['ddp'] / worst['fsdp_rs']:.2f} "
          f"fsdp_rs_step_time_ratio={step_s['fsdp_rs'] / step_s['ddp']:.2f}")


if __name__ == "__main__":
    main()
