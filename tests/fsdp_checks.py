"""What FSDP runs must show, under however many processes run this file (``tests/test_fsdp.py`` launches it).

    torchrun --standalone --nproc_per_node 2 tests/fsdp_checks.py MODE OUT_PREFIX CONFIG [key=value ...]

Modes, each writing ``OUT_PREFIX.rank<r>.pt``:

- ``sample``: every process samples its own prompts with its own budget (process ``r``: ``6 + 18 r`` new tokens,
  so the processes finish at different steps) from the sharded student inside ``strategy.whole``, counting the
  all-gathers FSDP runs meanwhile; then samples the same from an unsharded copy of the same weights.
- ``state``: builds the run (``resume=true`` resumes its newest checkpoint) and records the whole student and the
  whole optimizer state, gathered from every process, with the loop counters.
- ``uneven``: the first update of ``rehearsal_grads.first_update_grads`` with process 0 given the shortest half of
  the rows and process 1 the longest, so that token-budget micro-batches cut other numbers of micro-batches on
  each; records the full gradients and each process's count.
- ``mixed``: one process: the step of ``rehearsal_grads.step_on_rollout`` on the fixed rollout, recording the dtypes
  the loss receives (teacher inputs, student hidden states) inside the sharded root's forward.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

import eopd.training.update
from eopd.config import load_config
from eopd.models import load_causal_lm
from eopd.sampling import sample
from eopd.training.components import Components, build_components
from eopd.training.sharding import close_process_group

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script under torchrun
from rehearsal_grads import record_grads_before_step, step_on_rollout, uneven_batch, uneven_rollout


def count_all_gathers() -> list[int]:
    """Patch FSDP2's all-gather so every call adds one to the returned counter."""
    calls = [0]
    gather = param_group.foreach_all_gather

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return gather(*args, **kwargs)

    param_group.foreach_all_gather = counting
    return calls


def sample_check(c: Components) -> dict[str, Any]:
    """Sharded (inside ``whole``) vs unsharded sampling of this process's own prompts and budget."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    prompts = [c.prompt_ids[i] for i in range(c.rank * 3, c.rank * 3 + 3)]
    budget = 6 + 18 * c.rank

    def draw(model: torch.nn.Module) -> Any:
        return sample(model, prompts, n=2, max_new_tokens=budget, eos_token_ids=c.eos_ids,
                      pad_token_id=c.tokenizer.pad_token_id, generator=torch.Generator().manual_seed(7 + c.rank),
                      vocab_size=c.vocab_size)

    calls = count_all_gathers()
    with c.strategy.whole(c.student):
        before = calls[0]
        sharded = draw(c.student)
        during = calls[0] - before
    entering = before
    full = get_model_state_dict(c.student, options=StateDictOptions(full_state_dict=True))  # collective
    plain = load_causal_lm(c.cfg.models.student)
    plain.load_state_dict(full)
    unsharded = draw(plain)
    return {"rank": c.rank, "world": c.world, "budget": budget, "gathers_entering": entering,
            "gathers_while_sampling": during, "steps": sharded.completion_ids_BT.shape[1],
            "tokens": sharded.completion_ids_BT, "logp": sharded.logp_old_BT,
            "tokens_unsharded": unsharded.completion_ids_BT, "logp_unsharded": unsharded.logp_old_BT}


def state_check(c: Components) -> dict[str, Any]:
    """The whole student and optimizer state of this run as every process holds it, and its loop counters."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(c.model, options=options)
    optimizer = get_optimizer_state_dict(c.model, c.optimizer, options=options)
    return {"rank": c.rank, "world": c.world, "step": c.state.step, "model": model, "optimizer": optimizer,
            "resumed": str(c.resume_from)}


def uneven_check(c: Components) -> dict[str, Any]:
    """The first update on the whole batch, its rows split by length between the processes."""
    import dataclasses

    from eopd.sampling import micro_batches
    from eopd.training.update import ppo_update

    batch, seed = uneven_batch(c)
    order = torch.argsort(batch.rollout.completion_mask_BT.sum(1), stable=True)
    share = batch.num_rows // c.world
    mine = batch.rows(order[c.rank * share : (c.rank + 1) * share])
    optim = dataclasses.replace(c.cfg.optim, minibatch_size=batch.num_rows, grad_clip=0.0, ppo_epochs=1)
    count = len(micro_batches(mine.rollout, torch.arange(share), size=optim.micro_batch_size,
                              max_tokens=optim.max_tokens_per_micro_batch))
    grads = record_grads_before_step(c)
    ppo_update(c.model, mine, obj=c.obj, optim=optim, optimizer=c.optimizer, scheduler=c.scheduler,
               strategy=c.strategy, generator=torch.Generator().manual_seed(seed + 2), loss_impl=c.cfg.loss_impl,
               vocab_size=c.vocab_size, chunk_size=c.cfg.chunk_size)
    return {"rank": c.rank, "world": c.world, "grads": grads, "micro_batches": count,
            "completion_ids": batch.rollout.completion_ids_BT}


def mixed_check(c: Components) -> dict[str, Any]:
    """One step on the fixed rollout, recording what the loss receives inside the root's forward."""
    seen: dict[str, Any] = {}
    loss = eopd.training.update.student_loss

    def recording(model: torch.nn.Module, obj: Any, batch: Any, **kwargs: Any) -> Any:
        tokens = batch.tokens
        seen.setdefault("teacher_logp", tokens.teacher_logp.dtype)
        seen.setdefault("teacher_topk_logprobs", tokens.teacher_topk_logprobs.dtype)
        seen.setdefault("teacher_entropy", tokens.teacher_entropy.dtype)
        seen.setdefault("lm_head", model.get_output_embeddings().weight.dtype)
        seen.setdefault("lm_head_is_whole", not hasattr(model.get_output_embeddings().weight, "full_tensor"))
        return loss(model, obj, batch, **kwargs)

    rollout = uneven_rollout(c)[0]
    with mock.patch.object(eopd.training.update, "student_loss", recording):
        result = step_on_rollout(c, rollout)
    return {**result, "seen": seen}


def main(argv: list[str]) -> None:
    mode, prefix, config, *overrides = argv
    c = build_components(load_config(config, overrides))
    checks = {"sample": sample_check, "state": state_check, "uneven": uneven_check, "mixed": mixed_check}
    result = checks[mode](c)
    torch.save(result, Path(f"{prefix}.rank{c.rank}.pt"))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        close_process_group()
