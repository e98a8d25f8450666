"""The update: PPO epochs over minibatches of one collected batch, micro-batched, globally normalised.

For every minibatch, each micro-batch's loss is its sum of per-token losses divided by the number of valid
tokens of the whole minibatch summed over all processes, so neither the micro-batch size nor the process
count changes the gradient. Gradients accumulate over micro-batches (DDP synchronises on the last one only),
then clipping, one AdamW step and one scheduler step (the scheduler is stepped here, once per update, never
through accelerate, which would step it once per process).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from eopd.collect import Batch
from eopd.config import OptimConfig
from eopd.forward import completion_hidden_states, completion_logits
from eopd.losses import ObjectiveConfig, ObjectiveOutput, objective

Tensor = torch.Tensor


def student_loss(
    model: torch.nn.Module,
    head: torch.nn.Module,
    obj: ObjectiveConfig,
    batch: Batch,
    *,
    normalizer: float,
    impl: str,
    vocab_size: int,
    chunk_size: int | None,
) -> ObjectiveOutput:
    """Loss of one micro-batch, normalised by ``normalizer`` (the global valid-token count).

    ``plain`` materialises the student's ``[b, T, V]`` logits; ``fused`` runs the chunked lm_head + loss that
    keeps at most ``chunk_size x V`` alive and computes the lm_head gradients in the same pass (only the first
    ``vocab_size`` rows of a padded lm_head are used; ``head`` is the model's output embedding). Exact
    full-vocabulary baselines on the fused path get the teacher's hidden states and lm_head instead of its
    logits and recompute them chunk by chunk.
    """
    rollout = batch.rollout
    if impl == "plain":
        logits_BTV = completion_logits(model, rollout, vocab_size)
        return objective(obj, logits_BTV, batch.tokens, weights=batch.weights, normalizer=normalizer)
    from eopd.losses.fused import fused_objective

    mask = rollout.completion_mask_BT.bool()
    hidden_NH = completion_hidden_states(model, rollout)[mask]
    teacher: dict[str, Any] = {}
    if batch.scores.hidden_BTH is not None and batch.scores.head is not None:
        teacher = {"teacher_hidden": batch.scores.hidden_BTH[mask], "teacher_weight": batch.scores.head[0],
                   "teacher_bias": batch.scores.head[1]}
    return fused_objective(obj, hidden_NH, head.weight, batch.tokens.map(lambda x: x[mask]),
                           weights=batch.weights.map(lambda x: x[mask]), normalizer=normalizer,
                           chunk_size=chunk_size, lm_head_bias=head.bias, vocab_size=vocab_size, **teacher)


@torch.no_grad()
def learner_logprobs(
    model: torch.nn.Module, batch: Batch, *, impl: str, temperature: float, vocab_size: int,
    chunk_size: int | None, rows_per_forward: int,
) -> Tensor:
    """The learner's log-prob of every sampled token before the update, ``[B, T]`` (0 where masked).

    Computed exactly as the loss computes its own (``fused``: the chunked lm_head in the hidden states'
    dtype with float32 softmax math; ``plain``: full logits), so the PPO ratio of the first update is 1.
    """
    from eopd.losses.divergences import gather_log_probs
    from eopd.losses.scoring import score_chunked

    head = model.get_output_embeddings()
    out = torch.zeros_like(batch.rollout.logp_old_BT)
    for s in range(0, batch.num_rows, rows_per_forward):
        rollout = batch.rollout.select(slice(s, s + rows_per_forward))
        tokens_BT = rollout.completion_ids_BT
        if impl == "plain":
            logp_BT = gather_log_probs(completion_logits(model, rollout, vocab_size), tokens_BT, temperature)
        else:
            logp_BT = score_chunked(completion_hidden_states(model, rollout), head.weight, tokens_BT,
                                    temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size,
                                    bias=head.bias, float32_logits=False).logp
        out[s : s + rows_per_forward] = logp_BT.float() * rollout.completion_mask_BT
    return out


def with_learner_logp_old(batch: Batch, logp_BT: Tensor) -> tuple[Batch, dict[str, float]]:
    """``batch`` with ``logp_old`` from the learner, and the sampler-learner gap as extremes/token sums."""
    mask = batch.rollout.completion_mask_BT.bool()
    gap = (logp_BT - batch.rollout.logp_old_BT).abs()[mask]
    stats = {"ppo/sampler_gap_max": float(gap.max()) if gap.numel() else 0.0,
             "ppo/sampler_gap_mean": float(gap.sum())}  # a token sum: divided by the token count later
    tokens = dataclasses.replace(batch.tokens, logp_old=logp_BT)
    return dataclasses.replace(batch, tokens=tokens), stats


def merge_metrics(sums: dict[str, float], metrics: dict[str, float], num_valid: int) -> None:
    """Add one micro-batch's metrics: means weighted by its valid tokens, ``_min``/``_max`` keys as extremes."""
    for k, v in metrics.items():
        if k.endswith("_min"):
            sums[k] = min(sums.get(k, v), v)
        elif k.endswith("_max"):
            sums[k] = max(sums.get(k, v), v)
        else:
            sums[k] = sums.get(k, 0.0) + v * num_valid


def minibatches(num_rows: int, size: int, generator: torch.Generator, device: torch.device) -> list[Tensor]:
    """A seeded shuffle of ``range(num_rows)`` cut into minibatches of ``size`` rows."""
    order = torch.randperm(num_rows, generator=generator, device=generator.device).cpu()
    return [order[s : s + size].to(device) for s in range(0, num_rows, size)]


def ppo_update(
    model: torch.nn.Module,
    batch: Batch,
    *,
    obj: ObjectiveConfig,
    optim: OptimConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    generator: torch.Generator,
    loss_impl: str,
    vocab_size: int,
    chunk_size: int | None,
    autocast: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> tuple[dict[str, float], list[float]]:
    """Train on one batch: ``optim.ppo_epochs`` passes over it in minibatches of ``optim.minibatch_size``
    sequences (all processes together), micro-batches of ``optim.micro_batch_size``.

    With ``optim.recompute_logp_old`` the old log-probs come from the learner's own forward first (and the
    sampler-learner gap is reported as ``ppo/sampler_gap_max`` / ``_mean``).

    Returns:
        ``(sums, grad_norms)``: the first epoch's metric sums weighted by valid tokens (divide by the token
        count after reducing over processes; ``_min``/``_max`` keys are extremes), and the pre-clip gradient
        norm of every update.
    """
    world = accelerator.num_processes
    reduce_sum = (lambda x: accelerator.reduce(x, reduction="sum")) if world > 1 else (lambda x: x)
    learner = accelerator.unwrap_model(model)
    head = learner.get_output_embeddings()
    device = batch.rollout.completion_ids_BT.device
    sums: dict[str, float] = {}
    grad_norms: list[float] = []
    if optim.recompute_logp_old and obj.needs_logp_old:
        learner.eval()
        with autocast():
            logp_BT = learner_logprobs(learner, batch, impl=loss_impl, temperature=obj.temperature,
                                       vocab_size=vocab_size, chunk_size=chunk_size,
                                       rows_per_forward=optim.micro_batch_size)
        batch, sums = with_learner_logp_old(batch, logp_BT)
    model.train()
    for epoch in range(optim.ppo_epochs):
        for rows in minibatches(batch.num_rows, optim.minibatch_size // world, generator, device):
            count = batch.rollout.completion_mask_BT[rows].sum().reshape(1)
            # DDP averages gradients over processes; our loss is a sum over all of them
            normalizer = max(float(reduce_sum(count.clone())[0]), 1.0) / world
            micro = [rows[i : i + optim.micro_batch_size] for i in range(0, len(rows), optim.micro_batch_size)]
            for j, r in enumerate(micro):
                sync = j == len(micro) - 1 or world == 1
                with nullcontext() if sync else accelerator.no_sync(model), autocast():
                    out = student_loss(model, head, obj, batch.rows(r), normalizer=normalizer, impl=loss_impl,
                                       vocab_size=vocab_size, chunk_size=chunk_size)
                    accelerator.backward(out.loss)
                if epoch == 0:
                    merge_metrics(sums, out.metrics, out.num_valid)
            if optim.grad_clip > 0:
                grad_norms.append(float(accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return sums, grad_norms
