"""Peak memory and time of the distillation loss at Qwen3 vocabulary scale: plain vs fused vs the floor.

Methods (forward + backward, gradients wrt the hidden states and the lm_head weight):

    plain  (a)  ``F.linear`` to full ``[N, V]`` logits, then ``eopd.losses.objective``
    fused  (b)  ``eopd.losses.fused_objective`` (chunked lm_head + loss, 3 lm_head matmuls)
    trl    (c)  TRL's ``GKDTrainer.generalized_jsd_loss`` on full student and teacher logits (if TRL imports)
    floor  (d)  the bare lm_head: ``F.linear`` forward, backward from a fixed ``[N, V]`` upstream gradient

Memory is the peak *above* the inputs (hidden states, lm_head weight, teacher scores or logits, upstream
gradient), so it includes the ``[V, H]`` weight gradient every method produces. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocation before the call. On CPU, where PyTorch keeps no
allocator statistics and ``tracemalloc`` does not see tensor storage, each (method, preset) runs in a fresh
subprocess that builds its inputs (in place, so building them has no transient peak), reads its resident set
size, runs once and reads ``ru_maxrss`` (the kernel's high-water mark of the resident set): the difference is
every byte touched during the call, MKL workspaces included. Large CPU tensors are ``mmap``-ed and returned to
the kernel when freed, so the resident set follows live tensors.

Time is measured in one further subprocess that holds all inputs and runs the methods round-robin
``--repeats`` times (interleaving cancels slow drifts of a shared machine); the table reports the minimum
(the least disturbed run) and the median. All ratios come from this one invocation.

Usage::

    python benchmarks/loss_memory.py                       # N=2048, V=151936, H=1024, CPU float32
    python benchmarks/loss_memory.py --device cuda --n 8192 --dtype bfloat16

The last line is machine-readable::

    summary: memory_ratio=<peak a / peak b> time_vs_floor=<time b / time d> eopd_overhead=<b eopd / b opd - 1>

with the memory ratio the smaller and the time ratio the larger of the two presets' (the worse case).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eopd.losses import ObjectiveConfig, TokenBatch, TokenWeights, fused_objective, objective, prepare_weights
from eopd.losses.fused import fused_chunk_size
from eopd.losses.scoring import balanced_chunk

Tensor = torch.Tensor
PRESETS = ("eopd", "opd")
METHODS = ("plain", "fused", "trl", "floor")
PRESET_FREE = ("trl", "floor")  # do not depend on the objective


@dataclass
class Inputs:
    """Everything a method reads; allocated before the measurement."""

    hidden_NH: Tensor
    weight_VH: Tensor
    batch: TokenBatch
    weights: dict[str, TokenWeights]
    teacher_logits_NV: Tensor | None
    upstream_NV: Tensor | None


def build_inputs(args: argparse.Namespace, method: str | None) -> Inputs:
    """Deterministic inputs at the benchmark's shapes (``method=None``: all methods' inputs)."""
    g = torch.Generator(device=args.device).manual_seed(0)
    dev, dtype, n, v, h, k = args.device, getattr(torch, args.dtype), args.n, args.vocab, args.hidden, args.top_k

    def normal(*shape: int, std: float, dt: torch.dtype = dtype) -> Tensor:
        return torch.empty(*shape, device=dev, dtype=dt).normal_(0.0, std, generator=g)

    def uniform(*shape: int, lo: float, hi: float) -> Tensor:
        return torch.empty(*shape, device=dev).uniform_(lo, hi, generator=g)

    hidden = normal(n, h, std=1.0).requires_grad_(True)
    weight = normal(v, h, std=0.02).requires_grad_(True)  # logits ~ N(0, 0.64): near-uniform, like a fresh head
    log_v = float(torch.log(torch.tensor(float(v))))
    batch = TokenBatch(
        tokens=torch.randint(0, v, (n,), generator=g, device=dev),
        mask=torch.ones(n, device=dev),
        logp_old=uniform(n, lo=-log_v - 0.2, hi=-log_v + 0.2),
        teacher_logp=uniform(n, lo=-6.0, hi=-0.1),
        teacher_entropy=uniform(n, lo=0.0, hi=3.0),  # ~73% of tokens above eopd's tau = 0.8
        teacher_topk_ids=torch.randint(0, v, (n, k), generator=g, device=dev),
        teacher_topk_logprobs=uniform(n, k, lo=-8.0, hi=-0.1).sort(dim=-1, descending=True).values,
    )
    weights = {p: prepare_weights(ObjectiveConfig.preset(p, top_k=k), batch) for p in PRESETS}
    teacher = normal(n, v, std=0.64, dt=torch.float32 if dtype == torch.float64 else dtype) \
        if method in (None, "trl") else None
    upstream = normal(n, v, std=1e-6) if method in (None, "floor") else None
    return Inputs(hidden, weight, batch, weights, teacher, upstream)


def trl_jsd() -> Callable | None:
    """TRL's ``generalized_jsd_loss`` (its location moved between versions), or ``None``."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for module, attr in (("trl.experimental.gkd", "GKDTrainer"), ("trl", "GKDTrainer"),
                         ("trl.trainer.gkd_trainer", "GKDTrainer")):
        try:
            mod = __import__(module, fromlist=[attr])
            return getattr(mod, attr).generalized_jsd_loss
        except Exception:
            continue
    return None


def step(method: str, preset: str, x: Inputs, args: argparse.Namespace) -> None:
    """One forward + backward of ``method``; leaves ``.grad`` on hidden and weight (cleared by the caller)."""
    cfg = ObjectiveConfig.preset(preset, top_k=args.top_k)
    if method == "plain":
        logits = F.linear(x.hidden_NH, x.weight_VH)
        objective(cfg, logits, x.batch, weights=x.weights[preset]).loss.backward()
    elif method == "fused":
        fused_objective(cfg, x.hidden_NH, x.weight_VH, x.batch, weights=x.weights[preset],
                        chunk_size=args.chunk).loss.backward()
    elif method == "trl":
        jsd = trl_jsd()
        assert jsd is not None
        jsd(F.linear(x.hidden_NH, x.weight_VH), x.teacher_logits_NV, beta=0.5).backward()
    else:
        F.linear(x.hidden_NH, x.weight_VH).backward(x.upstream_NV)


def clear(x: Inputs) -> None:
    x.hidden_NH.grad = None
    x.weight_VH.grad = None
    gc.collect()


def sync(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_memory(args: argparse.Namespace, method: str, preset: str) -> dict:
    """Peak bytes above the inputs of one fresh run (this process runs nothing else)."""
    warm = build_inputs(argparse.Namespace(**{**vars(args), "n": 4, "vocab": 64, "hidden": 8}), method)
    step(method, preset, warm, args)  # initialise kernels / thread pools on tiny shapes
    del warm
    x = build_inputs(args, method)
    clear(x)
    sync(args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step(method, preset, x, args)
        sync(args)
        seconds = time.perf_counter() - t0
        return {"peak": torch.cuda.max_memory_allocated() - base, "seconds": seconds, "setup_excess": 0}
    base = rss_bytes()
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    step(method, preset, x, args)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # If building the inputs had a higher transient peak than the run, the run's peak is hidden: report it.
    return {"peak": peak - base, "seconds": seconds, "setup_excess": max(0, setup_peak - base)}


def worker_time(args: argparse.Namespace, jobs: list[tuple[str, str]]) -> dict:
    """Round-robin timing of every (method, preset) on shared inputs; seconds per run."""
    x = build_inputs(args, None)
    times: dict[str, list[float]] = {f"{m}/{p}": [] for m, p in jobs}
    for m, p in jobs:  # warm-up on tiny shapes
        step(m, p, build_inputs(argparse.Namespace(**{**vars(args), "n": 4, "vocab": 64, "hidden": 8}), None), args)
    for _ in range(args.repeats):
        for m, p in jobs:
            clear(x)
            sync(args)
            t0 = time.perf_counter()
            step(m, p, x, args)
            sync(args)
            times[f"{m}/{p}"].append(time.perf_counter() - t0)
            print(f"  timed {m:6s} {p:5s} {times[f'{m}/{p}'][-1]:7.2f} s", file=sys.stderr, flush=True)
    return times


def spawn(args: argparse.Namespace, task: dict) -> dict:
    """Run one worker task in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(task), *_passthrough(args)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _passthrough(args: argparse.Namespace) -> list[str]:
    flags = ["--n", str(args.n), "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--device", args.device,
             "--dtype", args.dtype, "--repeats", str(args.repeats), "--top-k", str(args.top_k)]
    return flags + (["--chunk", str(args.chunk)] if args.chunk else [])


def jobs_for(have_trl: bool) -> list[tuple[str, str]]:
    jobs = [(m, p) for m in ("plain", "fused") for p in PRESETS]
    return jobs + ([("trl", "-")] if have_trl else []) + [("floor", "-")]


def fused_chunk(args: argparse.Namespace) -> int:
    """The chunk the fused path uses at these shapes (the library default unless --chunk)."""
    cfg = ObjectiveConfig.preset("eopd", top_k=args.top_k)
    chunk = args.chunk or fused_chunk_size(cfg, args.vocab, getattr(torch, args.dtype), args.device)
    return balanced_chunk(args.n, chunk)


def report(args: argparse.Namespace, mem: dict[str, dict], times: dict[str, list[float]], have_trl: bool) -> None:
    mib = 2**20
    floor_t = min(times["floor/-"])
    grads = (args.vocab + args.n) * args.hidden * getattr(torch, args.dtype).itemsize  # grad W + grad h
    print(f"device={args.device} dtype={args.dtype} N={args.n} V={args.vocab} H={args.hidden} top_k={args.top_k} "
          f"chunk={fused_chunk(args)} repeats={args.repeats} threads={torch.get_num_threads()}")
    print(f"peak = peak memory above the inputs (includes the {grads / mib:.0f} MiB of returned gradients); "
          "work = peak - gradients")
    print(f"{'method':<10}{'preset':<7}{'peak MiB':>10}{'work MiB':>10}{'vs plain':>10}{'time min s':>12}"
          f"{'median s':>10}{'vs floor':>10}")
    for key in mem:
        method, preset = key.split("/")
        plain = mem.get(f"plain/{preset}") or mem["plain/eopd"]
        t = times[key]
        label = {"plain": "(a) plain", "fused": "(b) fused", "trl": "(c) trl", "floor": "(d) floor"}[method]
        print(f"{label:<10}{preset:<7}{mem[key]['peak'] / mib:>10.0f}{(mem[key]['peak'] - grads) / mib:>10.0f}"
              f"{plain['peak'] / mem[key]['peak']:>9.1f}x{min(t):>12.2f}{statistics.median(t):>10.2f}"
              f"{min(t) / floor_t:>9.2f}x")
        if mem[key]["setup_excess"] > mem[key]["peak"]:
            print(f"  warning: building {key}'s inputs peaked higher than the run; its peak may be under-read")
    if not have_trl:
        print("(c) trl: skipped - TRL is not installed (pip install trl to include GKD's generalized_jsd_loss)")
    mem_ratio = min(mem[f"plain/{p}"]["peak"] / mem[f"fused/{p}"]["peak"] for p in PRESETS)
    time_ratio = max(min(times[f"fused/{p}"]) for p in PRESETS) / floor_t
    overhead = min(times["fused/eopd"]) / min(times["fused/opd"]) - 1
    print("targets: memory_ratio >= 8, time_vs_floor <= 1.25, |eopd_overhead| <= 0.05 (times: minimum of runs)")
    print(f"summary: memory_ratio={mem_ratio:.2f} time_vs_floor={time_ratio:.3f} eopd_overhead={overhead:+.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="positions (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen3: 151,936)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (Qwen3-0.6B: 1024)")
    p.add_argument("--chunk", type=int, default=None, help="fused chunk size (default: the library's)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, help="matmul dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method (round-robin)")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.n = args.n or (8192 if on_cuda else 2048)
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        if task["kind"] == "memory":
            result = worker_memory(args, task["method"], task["preset"])
        else:
            result = worker_time(args, [tuple(j) for j in task["jobs"]])
        print(json.dumps(result))
        return
    have_trl = trl_jsd() is not None
    jobs = jobs_for(have_trl)
    mem = {}
    for method, preset in jobs:
        print(f"memory: {method} {preset} ...", file=sys.stderr, flush=True)
        mem[f"{method}/{preset}"] = spawn(args, {"kind": "memory", "method": method,
                                                 "preset": "eopd" if preset == "-" else preset})
    print(f"timing: {args.repeats} round(s) of {len(jobs)} runs ...", file=sys.stderr, flush=True)
    times = spawn(args, {"kind": "time", "jobs": [(m, "eopd" if p == "-" else p) for m, p in jobs]})
    times = {k.replace("trl/eopd", "trl/-").replace("floor/eopd", "floor/-"): v for k, v in times.items()}
    report(args, mem, times, have_trl)


if __name__ == "__main__":
    main()
