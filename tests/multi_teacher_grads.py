"""One whole training step (``eopd.training.trainer.step``) of a run with two teachers, on one fixed rollout whose
rows mix both, split over however many processes run this file.

``tests/test_multi_teacher.py`` runs it under ``torchrun --nproc_per_node 2`` and as one plain process; both
must give the same gradient, the same weights after the step and the same step metrics, the per-teacher ones too:

    torchrun --standalone --nproc_per_node 2 tests/multi_teacher_grads.py OUT_PREFIX CONFIG [key=value ...]

Every process samples the first step's full rollout alike (all its prompts, one seeded generator) and keeps the
rows of its own prompts (``step_prompt_indices``: prompt ``i`` of the step is process ``i % world``'s), numbered
as its own prompt list numbers them; ``step`` then routes, scores, gates, updates and reduces as in a run. The
gradient just before ``optimizer.step``, the step's metrics and the weights go to ``OUT_PREFIX.rank<r>.pt``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import eopd.training.collect
from eopd.config import load_config
from eopd.sampling import sample
from eopd.training.collect import step_prompt_indices
from eopd.training.components import build_components
from eopd.training.sharding import close_process_group
from eopd.training.trainer import step


def main(argv: list[str]) -> None:
    prefix, config, *overrides = argv
    c = build_components(load_config(config, overrides))
    r = c.cfg.rollout
    prompts = step_prompt_indices(len(c.problems), 0, r.prompts_per_step, c.cfg.seed, rank=0, world=1)
    full = sample(c.student, [c.prompt_ids[i] for i in prompts], n=r.n, max_new_tokens=r.max_new_tokens,
                  temperature=r.temperature, eos_token_ids=c.eos_ids, pad_token_id=c.tokenizer.pad_token_id,
                  generator=torch.Generator().manual_seed(0), vocab_size=c.vocab_size)
    rows = (full.prompt_index_B % c.world == c.rank).nonzero().squeeze(1)
    mine = dataclasses.replace(full.select(rows), prompt_index_B=full.prompt_index_B[rows] // c.world)
    grads: dict[str, torch.Tensor] = {}
    optimizer_step = c.optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        if not grads:
            grads.update({n: p.grad.detach().clone() for n, p in c.student.named_parameters() if p.grad is not None})
        return optimizer_step(*args, **kwargs)

    c.optimizer.step = recording_step  # type: ignore[method-assign]
    with mock.patch.object(eopd.training.collect, "sample", lambda *args, **kwargs: mine):
        metrics = step(c)
    teachers = sorted(set(torch.tensor(c.teacher.routes(c.problems, prompts))[mine.prompt_index_B * c.world
                                                                               + c.rank].tolist()))
    torch.save({"grads": grads, "metrics": metrics, "completion_ids": full.completion_ids_BT, "teachers": teachers,
                "weights": {n: p.detach().clone() for n, p in c.student.named_parameters()}, "rank": c.rank,
                "world": c.world}, Path(f"{prefix}.rank{c.rank}.pt"))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        close_process_group()
