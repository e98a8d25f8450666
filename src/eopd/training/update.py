"""The update: PPO epochs over minibatches of one collected batch, micro-batched, globally normalised.

For every minibatch, each micro-batch's loss is its sum of per-token losses divided by the number of valid
tokens of the whole minibatch summed over all processes, so neither the micro-batch size nor the process
count changes the gradient. Gradients accumulate over micro-batches (DDP synchronises on the last one only),
then clipping, one AdamW step and one scheduler step (the scheduler is stepped here, once per update, never
through accelerate, which would step it once per process).

Metric sums come in three kinds, told apart by their key (``merge_metrics``): token-weighted means (the
default: divided by the token count after the reduction over processes), extremes (``_min``/``_max``), and
raw sums (``RAW`` prefix: summed as they are, then finished by ``finish_raw_sums`` into norms, cosines,
group means and variances, role shares: everything that is "sum, then transform").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from eopd.config import OptimConfig
from eopd.losses import ObjectiveConfig, ObjectiveOutput, objective
from eopd.losses.objectives import DIAG_KEYS
from eopd.sampling import completion_hidden_states, completion_logits, micro_batches, output_head
from eopd.training.collect import Batch
from eopd.training.sharding import Strategy
from eopd.training.step_metrics import RAW, ROLE_PARTS, merge_metrics

Tensor = torch.Tensor


def student_loss(
    model: torch.nn.Module,
    obj: ObjectiveConfig,
    batch: Batch,
    *,
    normalizer: float,
    impl: str,
    vocab_size: int,
    chunk_size: int | None,
    diagnostics: bool = False,
) -> ObjectiveOutput:
    """Loss of one micro-batch, normalised by ``normalizer`` (the global valid-token count).

    ``plain`` materialises the student's ``[b, T, V]`` logits; ``fused`` runs the chunked lm_head + loss that
    keeps at most ``chunk_size x V`` alive and computes the lm_head gradients in the same pass (only the first
    ``vocab_size`` rows of a padded lm_head are used). The lm_head is read from ``model``, so under FSDP this runs
    inside the root's forward (``Strategy.in_forward``); the model's soft-cap, if any, is applied as its forward
    does. Exact full-vocabulary baselines on the fused path get the teacher's hidden states and lm_head (with its
    soft-cap) instead of its logits and recompute them chunk by chunk. ``diagnostics`` adds the per-term
    logit-gradient parts to ``token_parts`` (``[b, T]`` on the plain path, ``[N_valid]`` on the fused one).
    """
    rollout = batch.rollout
    if impl == "plain":
        logits_BTV = completion_logits(model, rollout, vocab_size)
        return objective(obj, logits_BTV, batch.tokens, weights=batch.weights, normalizer=normalizer,
                         diagnostics=diagnostics)
    from eopd.losses.fused import fused_objective

    mask = rollout.completion_mask_BT.bool()
    hidden_NH = completion_hidden_states(model, rollout)[mask]
    teacher: dict[str, Any] = {}
    if batch.scores.hidden_BTH is not None and batch.scores.head is not None:
        t_head = batch.scores.head
        teacher = {"teacher_hidden": batch.scores.hidden_BTH[mask], "teacher_weight": t_head.weight,
                   "teacher_bias": t_head.bias, "teacher_softcap": t_head.softcap}
    head = output_head(model)
    return fused_objective(obj, hidden_NH, head.weight, batch.tokens.map(lambda x: x[mask]),
                           weights=batch.weights.map(lambda x: x[mask]), normalizer=normalizer,
                           chunk_size=chunk_size, lm_head_bias=head.bias, vocab_size=vocab_size,
                           diagnostics=diagnostics, softcap=head.softcap, **teacher)


@torch.no_grad()
def learner_logprobs(
    model: torch.nn.Module, batch: Batch, *, impl: str, temperature: float, vocab_size: int,
    chunk_size: int | None, rows_per_forward: int, max_tokens: int | None = None,
    same_count: Callable[[int], int] = lambda n: n,
) -> Tensor:
    """The learner's log-prob of every sampled token before the update, ``[B, T]`` (0 where masked).

    Computed exactly as the loss computes its own (``fused``: the chunked lm_head in the hidden states'
    dtype with float32 soft-cap and softmax math; ``plain``: full logits), so the PPO ratio of the first
    update is 1.
    Rows go through in the update's micro-batches (``rows_per_forward`` rows, or ``max_tokens`` padded tokens);
    ``same_count`` (FSDP: every process runs as many forwards) may add forwards whose result is dropped.
    """
    from eopd.losses.divergences import gather_log_probs
    from eopd.losses.scoring import score_chunked

    head = output_head(model)
    out = torch.zeros_like(batch.rollout.logp_old_BT)
    rows = torch.arange(batch.num_rows, device=out.device)
    groups = micro_batches(batch.rollout, rows, size=rows_per_forward, max_tokens=max_tokens)
    for j in range(same_count(len(groups))):
        g = groups[min(j, len(groups) - 1)]
        rollout = batch.rollout.select(g).trimmed()
        tokens_BT = rollout.completion_ids_BT
        if impl == "plain":
            logp_BT = gather_log_probs(completion_logits(model, rollout, vocab_size), tokens_BT, temperature)
        else:
            logp_BT = score_chunked(completion_hidden_states(model, rollout), head.weight, tokens_BT,
                                    temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size,
                                    bias=head.bias, float32_logits=False, softcap=head.softcap).logp
        if j < len(groups):
            out[g, : tokens_BT.shape[1]] = logp_BT.float() * rollout.completion_mask_BT
    return out


def with_learner_logp_old(batch: Batch, logp_BT: Tensor) -> tuple[Batch, dict[str, float]]:
    """``batch`` with ``logp_old`` from the learner, and the sampler-learner gap as extremes/token sums."""
    mask = batch.rollout.completion_mask_BT.bool()
    gap = (logp_BT - batch.rollout.logp_old_BT).abs()[mask]
    stats = {"ppo/sampler_gap_max": float(gap.max()) if gap.numel() else 0.0,
             "ppo/sampler_gap_mean": float(gap.sum())}  # a token sum: divided by the token count later
    tokens = dataclasses.replace(batch.tokens, logp_old=logp_BT)
    return dataclasses.replace(batch, tokens=tokens), stats


def valid_part(part: Tensor, valid_bT: Tensor) -> Tensor:
    """A per-token part at the valid positions, ``[N_valid]`` float64: plain parts are ``[b, T]`` (indexed by
    the mask), fused parts already ``[N_valid]``."""
    return (part[valid_bT] if part.dim() == valid_bT.dim() else part).double()


def grad_sums(parts: dict[str, Tensor], batch: Batch, minibatch_tokens: float) -> dict[str, float]:
    """Raw sums of one micro-batch's logit-gradient diagnostics (one host transfer).

    ``diag/grad_*``: sums over tokens of ``||G_t||^2`` (and the dot) with the loss's ``1 / N`` normaliser
    (``minibatch_tokens``: the minibatch's valid tokens over all processes); ``diag/rkl_gnorm_<group>/*``:
    count, sum and sum of squares of the unnormalised per-token ``||G^R_t||``, split by ``H_t >= tau``.
    """
    valid_bT = batch.rollout.completion_mask_BT.bool()
    terms_3N = torch.stack([valid_part(parts[k], valid_bT) for k in DIAG_KEYS])
    gnorm_N = terms_3N[0].clamp_min(0.0).sqrt()
    entropy = batch.tokens.teacher_entropy
    high_N = entropy[valid_bT] >= batch.weights.tau if entropy is not None else torch.zeros_like(gnorm_N).bool()
    groups_2N = torch.stack([high_N, ~high_N]).double()
    values = torch.cat([terms_3N.sum(1) / minibatch_tokens**2, groups_2N.sum(1), groups_2N @ gnorm_N,
                        groups_2N @ (gnorm_N * gnorm_N)]).tolist()
    keys = [f"diag/{k}" for k in DIAG_KEYS] + [f"diag/rkl_gnorm_{group}/{stat}" for stat in ("tokens", "sum", "sum_sq")
                                               for group in ("high", "low")]
    return {RAW + k: v for k, v in zip(keys, values, strict=True)}


def role_sums(parts: dict[str, Tensor], batch: Batch, names: tuple[str, ...]) -> dict[str, float]:
    """Raw sums per token role of one micro-batch: its token count and the sums of ``ROLE_PARTS``, the
    teacher entropy and the gate over its tokens (every name in ``names``, zeros for roles absent here)."""
    assert batch.role_ids_BT is not None
    valid_bT = batch.rollout.completion_mask_BT.bool()
    role_N = batch.role_ids_BT[valid_bT]
    values = {"tokens": torch.ones_like(role_N, dtype=torch.float64),
              **{k: valid_part(parts[k], valid_bT) for k in ROLE_PARTS}}
    if batch.tokens.teacher_entropy is not None:
        values["teacher_entropy"] = valid_part(batch.tokens.teacher_entropy, valid_bT)
    values["gated_share"] = valid_part(batch.weights.gate, valid_bT)
    sums_RF = group_sums(values, role_N, batch.role_names, names)
    return {f"{RAW}role/{name}/{k}": sums_RF[r][f] for r, name in enumerate(names) for f, k in enumerate(values)}


def teacher_sums(parts: dict[str, Tensor], batch: Batch) -> dict[str, float]:
    """Token sums of the update's per-token parts (``ROLE_PARTS``) per teacher of one micro-batch of a run with
    several teachers, ``teacher/NAME/<part>``, for every teacher of the run (0 without a token here, so every
    process holds the same keys). Like every token sum they are divided by the step's token count after the sum
    over processes, then by the teacher's share of the tokens (``eopd.teachers.finish_teacher_metrics``): means
    over each teacher's own tokens, whatever the micro-batches and processes."""
    assert batch.teacher_ids_BT is not None
    valid_bT = batch.rollout.completion_mask_BT.bool()
    values = {k: valid_part(parts[k], valid_bT) for k in ROLE_PARTS}
    names = batch.teacher_names
    sums_TF = group_sums(values, batch.teacher_ids_BT[valid_bT], names, names)
    return {f"teacher/{name}/{k}": sums_TF[t][f] for t, name in enumerate(names) for f, k in enumerate(values)}


def group_sums(values: dict[str, Tensor], group_N: Tensor, local: tuple[str, ...], names: tuple[str, ...]
               ) -> list[list[float]]:
    """``[G][F]`` sums of each ``[N]`` value (F of them) over the tokens of each group in ``names``.

    Args:
        values: Per-token values at the valid positions, ``[N]`` each.
        group_N: Each token's group as an index into ``local`` (-1: no group).
        local: This micro-batch's group names; names: the groups to report, in order (absent here: zeros).
    """
    local_G = torch.tensor([local.index(n) if n in local else -2 for n in names], device=group_N.device)
    onehot_GN = (local_G.unsqueeze(1) == group_N.unsqueeze(0)).double()
    return (onehot_GN @ torch.stack(list(values.values()), dim=1)).tolist()


def all_role_names(names: tuple[str, ...], world: int) -> tuple[str, ...]:
    """The roles any process has seen, sorted: every process then emits the same raw keys, so the trainer's
    positional reduction over processes lines them up (a collective when ``world > 1``)."""
    if world == 1:
        return tuple(sorted(names))
    from accelerate.utils import gather_object

    return tuple(sorted(set(gather_object(list(names)))))


def clip_coef(grad_norm: float, grad_clip: float) -> float:
    """The factor ``clip_grad_norm_`` applied: ``min(1, clip / (norm + 1e-6))`` as torch computes it (1 off)."""
    if grad_clip <= 0:
        return 1.0
    coef = grad_clip / (grad_norm + 1e-6)
    return coef if coef < 1.0 or math.isnan(coef) else 1.0


@contextmanager
def checkpointed(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing inside the block only (the update), off again for sampling.

    transformers already skips checkpointing without gradients, so sampling would keep its KV cache anyway;
    switching it off outside the update makes that independent of the library (TRL's GKD instead turns the
    cache off for generation when checkpointing is on). Non-reentrant checkpointing needs no input that
    requires grad, so it works with a frozen embedding (LoRA).
    """
    if not enabled:
        yield
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        off = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        off = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        off()


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
    strategy: Strategy,
    generator: torch.Generator,
    loss_impl: str,
    vocab_size: int,
    chunk_size: int | None,
    autocast: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> tuple[dict[str, float], list[float]]:
    """Train on one batch: ``optim.ppo_epochs`` passes over it in minibatches of ``optim.minibatch_size``
    sequences (all processes together), micro-batches of ``optim.micro_batch_size`` rows or, with
    ``optim.max_tokens_per_micro_batch``, of rows packed by length under a padded-token budget
    (``eopd.sampling.microbatch``); each micro-batch is trimmed to its own width.

    With ``optim.recompute_logp_old`` the old log-probs come from the learner's own forward first (and the
    sampler-learner gap is reported as ``ppo/sampler_gap_max`` / ``_mean``).

    With ``optim.diagnostics`` the first epoch also adds ``RAW`` sums (``pop_raw_sums``, ``finish_raw_sums``):
    per-term logit-gradient norms, their cosine and the per-token RKL gradient norm by entropy group, the
    applied clip coefficient, and per-role metrics when the batch has token roles.

    Returns:
        ``(sums, grad_norms)``: the first epoch's metric sums weighted by valid tokens (divide by the token
        count after reducing over processes; ``_min``/``_max`` keys are extremes, ``RAW`` keys raw sums), and
        the pre-clip gradient norm of every update.
    """
    world = strategy.world
    learner = strategy.learner(model)
    sums: dict[str, float] = {}
    grad_norms: list[float] = []
    if optim.recompute_logp_old and obj.needs_logp_old:
        learner.eval()
        with autocast():
            logp_BT = strategy.in_forward(model, learner_logprobs, batch, grad=False, impl=loss_impl,
                                          temperature=obj.temperature, vocab_size=vocab_size, chunk_size=chunk_size,
                                          rows_per_forward=optim.micro_batch_size,
                                          max_tokens=optim.max_tokens_per_micro_batch,
                                          same_count=strategy.same_count)
        batch, sums = with_learner_logp_old(batch, logp_BT)
    model.train()
    roles = None if batch.role_ids_BT is None or not optim.diagnostics else all_role_names(batch.role_names, world)
    with checkpointed(learner, optim.gradient_checkpointing):
        _epochs(model, batch, obj=obj, optim=optim, optimizer=optimizer, scheduler=scheduler, strategy=strategy,
                generator=generator, loss_impl=loss_impl, vocab_size=vocab_size, chunk_size=chunk_size,
                autocast=autocast, roles=roles, sums=sums, grad_norms=grad_norms)
    return sums, grad_norms


def _epochs(
    model: torch.nn.Module, batch: Batch, *, obj: ObjectiveConfig, optim: OptimConfig,
    optimizer: torch.optim.Optimizer, scheduler: Any, strategy: Strategy, generator: torch.Generator, loss_impl: str,
    vocab_size: int, chunk_size: int | None, autocast: Callable[[], AbstractContextManager[None]],
    roles: tuple[str, ...] | None, sums: dict[str, float], grad_norms: list[float],
) -> None:
    """``ppo_update``'s PPO epochs x minibatches x micro-batches; adds to ``sums`` and ``grad_norms``."""
    world = strategy.world
    device = batch.rollout.completion_ids_BT.device
    for epoch in range(optim.ppo_epochs):
        diagnose = optim.diagnostics and epoch == 0
        for rows in minibatches(batch.num_rows, optim.minibatch_size // world, generator, device):
            count = batch.rollout.completion_mask_BT[rows].sum().reshape(1)
            # DDP averages gradients over processes; our loss is a sum over all of them
            normalizer = max(float(strategy.reduce_sum(count.clone())[0]), 1.0) / world
            micro = micro_batches(batch.rollout, rows, size=optim.micro_batch_size,
                                  max_tokens=optim.max_tokens_per_micro_batch)
            forwards = strategy.same_count(len(micro))  # FSDP: every process as many forwards (each all-gathers)
            for j in range(forwards):
                live = j < len(micro)  # a repeat past this process's own micro-batches adds nothing (weight 0)
                mb = batch.rows(micro[min(j, len(micro) - 1)]).trimmed()
                # optim.normalize=micro_batch (the public code's pipeline): this micro-batch's own token mean over
                # this process's micro-batches, DDP's average weighing processes equally; no valid token gives 0
                norm = normalizer if optim.normalize == "global" else max(float(mb.tokens.mask.sum()), 1.0) * len(micro)
                with strategy.accumulating(model, last=j == forwards - 1), autocast():
                    out = strategy.in_forward(model, student_loss, obj, mb, normalizer=norm, impl=loss_impl,
                                              vocab_size=vocab_size, chunk_size=chunk_size,
                                              diagnostics=diagnose and live)
                    strategy.backward(out.loss if live else out.loss * 0.0)
                if not live:
                    continue
                if epoch == 0:
                    merge_metrics(sums, out.metrics, out.num_valid)
                if diagnose and "grad_rkl_sq" in out.token_parts:
                    merge_metrics(sums, grad_sums(out.token_parts, mb, normalizer * world), 0)
                if diagnose and roles is not None:
                    merge_metrics(sums, role_sums(out.token_parts, mb, roles), 0)
                if epoch == 0 and mb.teacher_ids_BT is not None:  # several teachers: each one's loss and terms
                    for k, v in teacher_sums(out.token_parts, mb).items():
                        sums[k] = sums.get(k, 0.0) + v
            # the pre-clip norm is measured with clipping off too (an infinite max norm scales nothing)
            max_norm = optim.grad_clip if optim.grad_clip > 0 else float("inf")
            grad_norms.append(strategy.clip_grad_norm(model, max_norm))
            if optim.diagnostics:  # every update of the step, as grad_norm
                coef = clip_coef(grad_norms[-1], optim.grad_clip)  # 1 with clipping off
                merge_metrics(sums, {f"{RAW}diag/clip_coef": coef, f"{RAW}diag/updates": 1.0}, 0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
