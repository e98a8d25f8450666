"""One update, or one whole training step, on one fixed batch, split over however many processes run this file.

``tests/test_rehearsal.py`` launches it under ``torchrun --nproc_per_node 2`` and calls
``first_update_grads`` in its own (single) process: both must give the same gradient, which only holds when
every process normalises its loss by the valid-token count of the whole minibatch over all processes.

    torchrun --standalone --nproc_per_node 2 tests/rehearsal_grads.py OUT_PREFIX CONFIG [key=value ...]

Every process samples the same full batch (same prompts, same seeded generators, rows of uneven lengths),
keeps rows ``rank::world`` and runs ``eopd.training.update.ppo_update`` once with the minibatch = the whole batch and no
clipping; the parameters' gradients are recorded just before ``optimizer.step`` and written, with the full
batch's completion ids, to ``OUT_PREFIX.rank<r>.pt``.

``--step`` runs the trainer's periodic evaluation, then the whole of ``eopd.training.trainer.step`` (every PPO epoch and
minibatch, clipping, the adaptive tau, the diagnostics, the step's metrics reduced over processes) on the
process's rows of one fixed rollout, and writes ``step_on_rollout``'s result
(``tests/test_process_count.py`` compares it with one process):

    torchrun --standalone --nproc_per_node 2 tests/rehearsal_grads.py --step OUT_PREFIX CONFIG [key=value ...]
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import eopd.evaluation
import eopd.training.collect
import eopd.training.update
from eopd.config import load_config
from eopd.sampling.rollout import Rollout, sample
from eopd.training.collect import Batch, collect_batch, step_prompt_indices
from eopd.training.components import Components, build_components, make_generators
from eopd.training.sharding import close_process_group
from eopd.training.trainer import evaluate, step
from eopd.training.update import minibatches, ppo_update

MIN_IMBALANCE = 0.05  # the halves' valid-token counts differ by at least this share of the larger one


def whole(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole tensor: gathered from every process when it is an FSDP shard (a DTensor)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def full_batch(c: Components, seed: int) -> Batch:
    """The first step's prompts, all of them, sampled and scored with generators every process seeds alike."""
    cfg, r = c.cfg, c.cfg.rollout
    prompts = step_prompt_indices(len(c.problems), 0, r.prompts_per_step, cfg.seed, rank=0, world=1)
    return collect_batch(
        c.student, c.teacher, [c.prompt_ids[i] for i in prompts], obj=c.obj, n=r.n,
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, eos_ids=c.eos_ids,
        pad_id=c.tokenizer.pad_token_id, vocab_size=c.vocab_size,
        sample_generator=torch.Generator().manual_seed(seed),
        loss_generator=torch.Generator().manual_seed(seed + 1), adaptive=None,
        fused=cfg.loss_impl == "fused", whole_student=lambda: c.strategy.whole(c.student))


def uneven_batch(c: Components, tries: int = 100) -> tuple[Batch, int]:
    """The first full batch (seeds 0, 1, ...) whose even and odd rows hold clearly different numbers of valid
    tokens, so that normalising by a process's own count instead of the global one would change the gradient.
    Every process runs the same search and finds the same batch."""
    for seed in range(tries):
        batch = full_batch(c, seed)
        tokens = batch.rollout.completion_mask_BT.sum(1)
        halves = float(tokens[0::2].sum()), float(tokens[1::2].sum())
        if abs(halves[0] - halves[1]) >= MIN_IMBALANCE * max(halves):
            return batch, seed
    raise RuntimeError(f"no seed below {tries} gives rows of uneven lengths; completions never end early")


def record_grads_before_step(c: Components) -> dict[str, torch.Tensor]:
    """Wrap ``c.optimizer.step`` so that the gradients it is about to apply are copied into the returned dict."""
    grads: dict[str, torch.Tensor] = {}
    step = c.optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        if not grads:  # the first update only
            grads.update({n: whole(p.grad) for n, p in c.student.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    c.optimizer.step = recording_step  # type: ignore[method-assign]
    return grads


def first_update_grads(c: Components) -> dict[str, Any]:
    """This process's view of the first update of a freshly built run: ``grads`` (name -> gradient,
    synchronised over processes), the full batch's ``completion_ids`` and ``row_tokens`` (valid tokens per
    row), its ``seed``, ``rank`` and ``world``."""
    cfg = c.cfg
    batch, seed = uneven_batch(c)
    mine = batch.rows(torch.arange(c.rank, batch.num_rows, c.world))
    optim = dataclasses.replace(cfg.optim, minibatch_size=batch.num_rows, grad_clip=0.0, ppo_epochs=1)
    grads = record_grads_before_step(c)
    ppo_update(c.model, mine, obj=c.obj, optim=optim, optimizer=c.optimizer, scheduler=c.scheduler,
               strategy=c.strategy, generator=torch.Generator().manual_seed(seed + 2),
               loss_impl=cfg.loss_impl, vocab_size=c.vocab_size, chunk_size=cfg.chunk_size)
    return {"grads": grads, "completion_ids": batch.rollout.completion_ids_BT,
            "row_tokens": batch.rollout.completion_mask_BT.sum(1), "seed": seed, "rank": c.rank, "world": c.world}


def uneven_rollout(c: Components, tries: int = 100) -> tuple[Rollout, int]:
    """The first step's prompts, all of them, sampled with seeds 0, 1, ... until the even and odd rows hold
    clearly different numbers of valid tokens (``uneven_batch``'s rule); the same on every process."""
    cfg, r = c.cfg, c.cfg.rollout
    prompts = step_prompt_indices(len(c.problems), 0, r.prompts_per_step, cfg.seed, rank=0, world=1)
    for seed in range(tries):
        with c.strategy.whole(c.student):
            rollout = sample(c.student, [c.prompt_ids[i] for i in prompts], n=r.n, max_new_tokens=r.max_new_tokens,
                             temperature=r.temperature, eos_token_ids=c.eos_ids,
                             pad_token_id=c.tokenizer.pad_token_id, generator=torch.Generator().manual_seed(seed),
                             vocab_size=c.vocab_size)
        tokens = rollout.completion_mask_BT.sum(1)
        halves = float(tokens[0::2].sum()), float(tokens[1::2].sum())
        if abs(halves[0] - halves[1]) >= MIN_IMBALANCE * max(halves):
            return rollout, seed
    raise RuntimeError(f"no seed below {tries} gives rows of uneven lengths; completions never end early")


def partition_of(world: int, c: Components) -> Iterator[list[torch.Tensor]]:
    """Each PPO epoch's minibatches, as rows of the whole rollout, that a run of ``world`` processes takes:
    process ``r`` holds rows ``r::world`` and shuffles them with its own ``shuffle`` generator
    (``make_generators``), and a minibatch is every process's share of it. One process given these
    minibatches (``step_on_rollout``'s ``partition``) updates on the very minibatches the ``world`` did."""
    optim = c.cfg.optim
    rows = c.cfg.rollout.batch_size
    shuffles = [make_generators(c.cfg.seed, r, torch.device("cpu"))["shuffle"] for r in range(world)]
    while True:
        local = [minibatches(rows // world, optim.minibatch_size // world, g, torch.device("cpu")) for g in shuffles]
        yield [torch.cat([part * world + r for r, part in enumerate(parts)]) for parts in zip(*local, strict=True)]


def step_on_rollout(c: Components, rollout: Rollout, partition: Iterator[list[torch.Tensor]] | None = None,
                    ) -> dict[str, Any]:
    """``eopd.training.trainer.evaluate`` (with ``eval.every``), then ``eopd.training.trainer.step`` on this
    process's rows
    (``rank::world``) of ``rollout`` instead of its own samples; ``partition`` (one process) replaces the
    minibatch shuffle.

    Returns:
        ``records`` (the evaluation's graded records, as one process holds them all) and ``eval`` (its
        metrics), ``metrics`` (the step's, reduced over processes), ``weights`` (the student's parameters
        after the step), ``rank``, ``world``.
    """
    records: list[Any] = []
    eval_metrics: dict[str, float] = {}
    if c.cfg.eval.every:
        evaluate_shared = eopd.evaluation.loop.evaluate_across_processes

        def recording(*args: Any, **kwargs: Any) -> Any:
            records.extend(evaluate_shared(*args, **kwargs))
            return records

        with mock.patch.object(eopd.evaluation, "evaluate_across_processes", recording):  # where the trainer reads it
            eval_metrics = evaluate(c)
    mine = rollout.select(torch.arange(c.rank, rollout.completion_ids_BT.shape[0], c.world))
    with ExitStack() as patched:
        patched.enter_context(mock.patch.object(eopd.training.collect, "sample", lambda *args, **kwargs: mine))
        if partition is not None:
            patched.enter_context(mock.patch.object(eopd.training.update, "minibatches",
                                                    lambda *a, **k: next(partition)))
        metrics = step(c)
    weights = {n: whole(p) for n, p in c.student.named_parameters()}
    return {"metrics": metrics, "weights": weights, "records": records, "eval": eval_metrics, "rank": c.rank,
            "world": c.world}


def main(argv: list[str]) -> None:
    """``[--step] OUT_PREFIX CONFIG [key=value ...]``: write this process's ``first_update_grads`` (or, with
    ``--step``, ``step_on_rollout`` of ``uneven_rollout``) next to OUT_PREFIX."""
    whole_step = argv[0] == "--step"
    prefix, config, *overrides = argv[1:] if whole_step else argv
    c = build_components(load_config(config, overrides))
    result = step_on_rollout(c, uneven_rollout(c)[0]) if whole_step else first_update_grads(c)
    torch.save(result, Path(f"{prefix}.rank{result['rank']}.pt"))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        close_process_group()
