"""Token-budget micro-batches against fixed-size ones on long-tailed completion lengths, measured in one run.

Why: math completions are long-tailed (most end early, a few run to the budget) and a fixed-size micro-batch
of a shuffled minibatch is padded to its longest row. ``optim.max_tokens_per_micro_batch`` packs rows sorted
by length under a padded-token budget (``eopd.sampling.microbatch``). This measures both on the real code: one batch of
rollout rows whose completion lengths follow a log-normal clipped to ``[16, --max-len]`` (median
``--median``), scored by the teacher (``HFTeacher.score``) and trained on (``eopd.training.update.ppo_update``: the
learner's old log-probs, then one update), both through ``eopd.training.components.build_components`` from
``configs/tiny.yaml`` with wider models built here.

The budget is ``micro_batch_size x (prompt width + max-len)``: the largest micro-batch the fixed mode can
produce, so both modes have the same worst-case memory. Modes alternate, ``--repeats`` times; each time is
the median. Padding share = 1 - valid tokens / positions computed (micro-batches trimmed to their width;
fixed micro-batches are trimmed too, which only helps when all their rows are short).

Usage::

    python benchmarks/microbatch_tokens.py                 # 64 rows, median 128, max 1024, 2 threads

The last line is machine-readable::

    summary: padding_fixed=<share> padding_budget=<share> teacher_speedup=<x> update_speedup=<x> tokens_per_s_ratio=<x>
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from eopd.sampling.microbatch import micro_batches, padded_tokens
from eopd.sampling.rollout import Rollout
from eopd.training.collect import Batch, make_token_batch, token_weights
from eopd.training.update import ppo_update

REPO = Path(__file__).resolve().parents[1]
ALPHABET = "0123456789+=,;"


def lengths(n: int, median: int, max_len: int, seed: int) -> list[int]:
    """Long-tailed completion lengths: log-normal (sigma 1) around ``median``, clipped to ``[16, max_len]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) + torch.log(torch.tensor(float(median))))
    return x.clamp(16, max_len).round().long().tolist()


def rollout_of(lengths_B: list[int], prompt_len: int, max_len: int, vocab: int, eos: int, seed: int) -> Rollout:
    """Random prompts of ``prompt_len`` and completions of the given lengths, each ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths_B)
    completion = torch.randint(3, vocab, (B, max_len), generator=g)
    completion[completion == eos] = 3
    mask = torch.zeros(B, max_len)
    for b, L in enumerate(lengths_B):
        completion[b, L - 1] = eos
        completion[b, L:] = eos
        mask[b, :L] = 1
    prompt = torch.randint(3, vocab, (B, prompt_len), generator=g)
    prompt[prompt == eos] = 3
    attn = torch.cat([torch.ones(B, prompt_len, dtype=torch.long), mask.long()], 1)
    return Rollout(torch.cat([prompt, completion], 1), attn, prompt_len, completion, mask, torch.zeros(B, max_len),
                   torch.arange(B))


def build(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from eopd.models.loading import build_tiny_checkpoint

    paths = root / "teacher", root / "student"
    for path, hidden, layers in ((paths[0], args.hidden * 2, args.layers), (paths[1], args.hidden, args.layers)):
        build_tiny_checkpoint(path, alphabet=ALPHABET, hidden_size=hidden, num_layers=layers, num_heads=4,
                              num_kv_heads=2, max_position_embeddings=args.max_len + 64, seed=1)
    return paths


def components(teacher: Path, student: Path, args: argparse.Namespace, budget: int | None, out: Path):
    from eopd.config import load_config
    from eopd.training.components import build_components

    over = [f"models.teacher={teacher}", f"models.student={student}", "models.build_teacher=null",
            "models.build_student=null", f"output_dir={out}", f"num_threads={args.threads}", "save_every=0",
            f"rollout.max_new_tokens={args.max_len}", f"optim.minibatch_size={args.rows}",
            f"optim.micro_batch_size={args.micro}", "rollout.prompts_per_step=16", f"rollout.n={args.rows // 16}",
            "optim.diagnostics=false", "loss.top_k=8"]
    if budget is not None:
        over.append(f"optim.max_tokens_per_micro_batch={budget}")
    return build_components(load_config(REPO / "configs" / "tiny.yaml", over))


def one_pass(c, rollout: Rollout) -> tuple[float, float]:
    """Teacher scoring seconds and update seconds on ``rollout``."""
    t0 = time.perf_counter()
    scores = c.teacher.score(rollout, top_k=c.obj.top_k, want_logits=False)
    t1 = time.perf_counter()
    tokens = make_token_batch(rollout, scores)
    weights = token_weights(c.obj, tokens, adaptive=None, generator=torch.Generator().manual_seed(0))
    batch = Batch(rollout, scores, tokens, weights)
    t2 = time.perf_counter()
    ppo_update(c.model, batch, obj=c.obj, optim=c.cfg.optim, optimizer=c.optimizer, scheduler=c.scheduler,
               strategy=c.strategy, generator=torch.Generator().manual_seed(1), loss_impl="fused",
               vocab_size=c.vocab_size, chunk_size=None)
    return t1 - t0, time.perf_counter() - t2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64, help="rows of the batch (one minibatch)")
    p.add_argument("--micro", type=int, default=8, help="fixed micro-batch size (rows)")
    p.add_argument("--median", type=int, default=128)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64, help="student hidden size (teacher: twice)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        teacher, student = build(Path(tmp), args)
        budget = args.micro * (args.prompt_len + args.max_len)
        runs = {"fixed": components(teacher, student, args, None, Path(tmp) / "fixed"),
                "budget": components(teacher, student, args, budget, Path(tmp) / "budget")}
        tok = runs["fixed"].tokenizer
        L = lengths(args.rows, args.median, args.max_len, seed=0)
        rollout = rollout_of(L, args.prompt_len, args.max_len, len(tok), tok.eos_token_id, seed=0)
        valid = sum(L)
        order = torch.randperm(args.rows, generator=torch.Generator().manual_seed(1))  # as minibatches() shuffles
        groups = {"fixed": micro_batches(rollout, order, size=args.micro, max_tokens=None),
                  "budget": micro_batches(rollout, order, size=args.micro, max_tokens=budget)}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        one_pass(runs["fixed"], rollout)  # warm-up (allocator, kernels)
        for _ in range(args.repeats):
            for name, c in runs.items():
                times[name].append(one_pass(c, rollout))
    med = {k: (statistics.median(t for t, _ in v), statistics.median(u for _, u in v)) for k, v in times.items()}
    pad = {k: 1 - valid / padded_tokens(rollout, g) for k, g in groups.items()}
    print(f"{args.rows} rows, completion lengths log-normal median {args.median} clipped to [16, {args.max_len}] "
          f"(valid tokens {valid:,}, mean {valid / args.rows:.0f}, max {max(L)}); prompts {args.prompt_len}; "
          f"fixed micro-batches of {args.micro} rows vs a budget of {budget:,} padded tokens; "
          f"student hidden {args.hidden} x {args.layers} layers, teacher {2 * args.hidden}; {args.threads} threads; "
          f"median of {args.repeats}")
    print(f"{'mode':<8}{'micro-batches':>14}{'padding share':>15}{'teacher s':>11}{'update s':>10}{'tokens/s':>10}")
    for k in runs:
        total = sum(med[k])
        print(f"{k:<8}{len(groups[k]):>14}{pad[k]:>15.3f}{med[k][0]:>11.3f}{med[k][1]:>10.3f}{valid / total:>10.0f}")
    ratio = sum(med["fixed"]) / sum(med["budget"])
    print(f"summary: padding_fixed={pad['fixed']:.3f} padding_budget={pad['budget']:.3f} "
          f"teacher_speedup={med['fixed'][0] / med['budget'][0]:.2f} "
          f"update_speedup={med['fixed'][1] / med['budget'][1]:.2f} "
          f"tokens_per_s_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
