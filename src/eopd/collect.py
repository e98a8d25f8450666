"""Collecting one on-policy batch: the student samples, the teacher scores, the objective weighs tokens.

    prompts --sample--> Rollout --teacher.score--> TeacherScores --> TokenBatch --prepare_weights--> TokenWeights

Everything here runs without gradient and is decided once per rollout, before any update: the PPO epochs
that follow see fixed teacher scores and fixed token weights (entropy gate, adaptive tau, random placement).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from eopd.losses import AdaptiveTau, ObjectiveConfig, TokenBatch, TokenWeights, prepare_weights
from eopd.rollout import Rollout, sample
from eopd.teacher import Teacher, TeacherScores

Tensor = torch.Tensor


@dataclass
class Batch:
    """One step's rollout with everything the loss needs, rows ``[B]`` leading."""

    rollout: Rollout
    scores: TeacherScores
    tokens: TokenBatch
    weights: TokenWeights
    seconds: dict[str, float] = field(default_factory=dict)
    token_sums: dict[str, float] = field(default_factory=dict)  # per-token diagnostics summed over valid tokens

    def rows(self, r: Tensor) -> Batch:
        """The sub-batch of rows ``r`` (minibatches and micro-batches)."""
        return Batch(self.rollout.select(r), self.scores.select(r), self.tokens.map(lambda x: x[r]),
                     self.weights.map(lambda x: x[r]), self.seconds)

    @property
    def num_rows(self) -> int:
        """Sequences in the batch."""
        return int(self.rollout.completion_ids_BT.shape[0])


def step_prompt_indices(num_problems: int, position: int, count: int, seed: int, rank: int, world: int) -> list[int]:
    """Global indices of one step's ``count`` prompts from data position ``position``; this process keeps every
    ``world``-th. The order is a fresh seeded permutation per pass over the data (epoch)."""
    idx = []
    for pos in range(position, position + count):
        epoch = torch.Generator().manual_seed(seed * 7_919 + pos // num_problems)
        idx.append(int(torch.randperm(num_problems, generator=epoch)[pos % num_problems]))
    return idx[rank::world]


def make_token_batch(rollout: Rollout, scores: TeacherScores) -> TokenBatch:
    """The objective's per-position inputs for a rollout and its teacher scores (``[B, T]`` leading)."""
    return TokenBatch(
        tokens=rollout.completion_ids_BT, mask=rollout.completion_mask_BT, logp_old=rollout.logp_old_BT,
        teacher_logp=scores.logp_BT, teacher_entropy=scores.entropy_BT, teacher_topk_ids=scores.topk_ids_BTK,
        teacher_topk_logprobs=scores.topk_logprobs_BTK, teacher_logits=scores.logits_BTV,
    )


def token_weights(
    obj: ObjectiveConfig,
    tokens: TokenBatch,
    *,
    adaptive: AdaptiveTau | None,
    generator: torch.Generator,
    mean_over_processes: Callable[[float], float] = lambda x: x,
) -> TokenWeights:
    """The per-token term weights; an adaptive tau is updated on this batch and agreed across processes."""
    tau = None
    if adaptive is not None:
        tau = mean_over_processes(adaptive.update(tokens.teacher_entropy, tokens.mask))
        adaptive.tau = tau
    return prepare_weights(obj, tokens, tau=tau, generator=generator)


def collect_batch(
    student: torch.nn.Module,
    teacher: Teacher,
    prompt_ids: list[list[int]],
    *,
    obj: ObjectiveConfig,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    pad_id: int,
    vocab_size: int,
    sample_generator: torch.Generator,
    loss_generator: torch.Generator,
    adaptive: AdaptiveTau | None = None,
    fused: bool = True,
    mean_over_processes: Callable[[float], float] = lambda x: x,
) -> Batch:
    """Sample ``n`` completions per prompt with the student, score them with the teacher and weigh tokens.

    Exact full-vocabulary objectives also get the teacher's final hidden states (``fused``; the loss
    recomputes its logits chunk by chunk) or its ``[B, T, V]`` logits (plain path).
    """
    t0 = time.perf_counter()
    was_training = student.training
    student.eval()
    try:
        rollout = sample(student, prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, eos_token_ids=eos_ids, pad_token_id=pad_id, generator=sample_generator,
                         vocab_size=vocab_size)
    finally:
        student.train(was_training)
    t1 = time.perf_counter()
    exact = obj.needs_teacher_logits
    scores = teacher.score(rollout, top_k=min(obj.top_k, vocab_size), want_logits=exact and not fused,
                           want_hidden=exact and fused)
    tokens = make_token_batch(rollout, scores)
    weights = token_weights(obj, tokens, adaptive=adaptive, generator=loss_generator,
                            mean_over_processes=mean_over_processes)
    return Batch(rollout, scores, tokens, weights, {"sample": t1 - t0, "teacher": time.perf_counter() - t1})

